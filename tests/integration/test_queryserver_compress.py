"""ClickHouse's native compressed blocks (``compress=1`` / ``decompress=1``): the framing in
``aipipe.infra.chcompress`` and the read endpoint speaking it.

The checksum vectors below are what clickhouse-java's own ``ClickHouseCityHash.cityHash128``
(the driver 0.9.9's, the one that checks every block it reads) returns: ``[low, high]``,
which ClickHouse and the driver write low first, each little-endian. The JDBC test
(test_queryserver_jdbc.py) runs the driver with its default ``compress=1`` against the
endpoint, so the driver itself checks the blocks produced here.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator

import cramjam
import pytest
from clickhouse_connect.driver.client import Client

from aipipe.infra.chcompress import (
    LZ4,
    NONE,
    TooLarge,
    checksum,
    compress_block,
    compress_blocks,
    decompress_blocks,
)
from aipipe.infra.queryserver import Limits, QueryError, QueryServer

# (data, low, high) from com.clickhouse.data.ClickHouseCityHash.cityHash128 (driver 0.9.9)
VECTORS = [
    (b"abc", 0x900FF195577748FE, 0x13A9176355B20D7E),
    (b"hello world, a longer string that exceeds sixteen bytes and more than sixty four "
     b"bytes for sure yes", 0xD766788A0336AB90, 0x3F64C4DA5A47312A),
]


@pytest.mark.parametrize(("data", "low", "high"), VECTORS)
def test_the_checksum_is_cityhash128_v102_low_half_first(data: bytes, low: int,
                                                          high: int) -> None:
    assert checksum(data) == struct.pack("<QQ", low, high)


def test_a_block_is_checksum_method_sizes_then_an_lz4_block() -> None:
    data = b"SELECT 1\n" * 50
    block = compress_block(data)
    method, size, raw = struct.unpack_from("<BII", block, 16)
    assert (method, raw) == (LZ4, len(data)) and size == len(block) - 16
    assert block[:16] == checksum(block[16:])
    assert bytes(cramjam.lz4.decompress_block(block[25:], output_len=raw)) == data


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17])
def test_round_trip_across_block_boundaries(size: int) -> None:
    data = (os.urandom(size // 2) + b"a" * size)[:size]
    packed = compress_blocks(data)
    assert decompress_blocks(packed) == data
    assert decompress_blocks(compress_blocks(data, block_size=4096)) == data
    blocks = 0
    pos = 0
    while pos < len(packed):
        pos += 16 + struct.unpack_from("<I", packed, pos + 17)[0]
        blocks += 1
    assert pos == len(packed) and blocks == -(-size // (1 << 20))


def test_an_uncompressed_block_is_read() -> None:
    body = struct.pack("<BII", NONE, 9 + 5, 5) + b"hello"
    assert decompress_blocks(checksum(body) + body + compress_block(b" world")) == b"hello world"


@pytest.mark.parametrize("where", [0, 15, 16, 22, 30])  # checksum, method, raw size, data
def test_a_corrupted_block_is_code_40(where: int) -> None:
    packed = bytearray(compress_blocks(b"some data to corrupt " * 20))
    packed[where] ^= 0x01
    with pytest.raises(QueryError) as err:
        decompress_blocks(bytes(packed))
    assert err.value.code == 40
    assert "Checksum doesn't match" in str(err.value)


def test_other_broken_input_is_refused_with_clickhouses_codes() -> None:
    good = compress_block(b"x" * 100)
    with pytest.raises(QueryError) as err:
        decompress_blocks(good[:-1])
    assert err.value.code == 33
    with pytest.raises(QueryError) as err:
        decompress_blocks(good[:20])
    assert err.value.code == 33
    body = struct.pack("<BII", 0x90, 9 + 3, 3) + b"abc"
    with pytest.raises(QueryError) as err:
        decompress_blocks(checksum(body) + body)
    assert err.value.code == 89
    lying = struct.pack("<BII", LZ4, len(good) - 16, 99) + good[25:]  # 100 bytes, not 99
    with pytest.raises(QueryError) as err:  # a valid checksum over a wrong size
        decompress_blocks(checksum(lying) + lying)
    assert err.value.code == 271
    with pytest.raises(TooLarge) as big:
        decompress_blocks(good + good, limit=150)
    assert big.value.code == 160


# -- the endpoint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(chdb_client: Client) -> Iterator[QueryServer]:
    with QueryServer(chdb_client, limits=Limits(max_body_bytes=4096)) as running:
        yield running


def post(server: QueryServer, params: str, body: bytes,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"{server.url}/?{params}", data=body,
        headers={"X-ClickHouse-User": server.user, "X-ClickHouse-Key": server.password,
                 **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_compress_1_answers_in_blocks(server: QueryServer) -> None:
    status, headers, body = post(server, "compress=1", b"SELECT 1")
    assert status == 200 and "Content-Encoding" not in headers
    assert body[16] == LZ4 and decompress_blocks(body) == b"1\n"


@pytest.mark.parametrize("fmt", ["TSV", "JSON"])  # streamed, and sent whole
def test_a_large_result_is_the_same_in_blocks(server: QueryServer, fmt: str) -> None:
    sql = f"SELECT number, toString(number) FROM numbers(300000) FORMAT {fmt}".encode()
    status, _, plain = post(server, "", sql)
    assert status == 200 and len(plain) > 1 << 20
    status, headers, packed = post(server, "compress=1", sql)
    assert status == 200
    if fmt == "TSV":
        assert headers.get("Transfer-Encoding") == "chunked"
    unpacked = decompress_blocks(packed)
    if fmt == "JSON":  # elapsed and statistics differ between runs
        plain, unpacked = plain.split(b'"statistics"')[0], unpacked.split(b'"statistics"')[0]
    assert unpacked == plain


def test_blocks_inside_gzip(server: QueryServer) -> None:
    status, headers, body = post(server, "compress=1&enable_http_compression=1",
                                 b"SELECT number FROM numbers(100000)",
                                 {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert decompress_blocks(gzip.decompress(body)) == b"".join(
        b"%d\n" % i for i in range(100000))


def test_decompress_1_reads_a_body_of_blocks(server: QueryServer) -> None:
    status, _, body = post(server, "decompress=1", compress_blocks(b"SELECT 40 + 2"))
    assert (status, body) == (200, b"42\n")
    status, _, body = post(server, "decompress=1&compress=1",
                           gzip.compress(compress_blocks(b"SELECT 'both'")),
                           {"Content-Encoding": "gzip"})
    assert status == 200 and decompress_blocks(body) == b"both\n"


def test_a_body_with_a_bad_checksum_is_code_40(server: QueryServer) -> None:
    packed = bytearray(compress_blocks(b"SELECT 1"))
    packed[3] ^= 0xFF
    status, headers, body = post(server, "decompress=1", bytes(packed))
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "40"
    assert body.startswith(b"Code: 40. DB::Exception: Checksum doesn't match")


def test_a_body_of_blocks_decompressing_past_the_limit_is_refused(server: QueryServer) -> None:
    sql = b"SELECT 1 -- " + b"x" * 8000  # compresses far below the 4096-byte body limit
    status, headers, _ = post(server, "decompress=1", compress_blocks(sql))
    assert status == 413 and headers["X-ClickHouse-Exception-Code"] == "307"
