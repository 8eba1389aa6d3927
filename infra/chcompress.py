"""ClickHouse's native compressed blocks, as the HTTP interface sends them for ``compress=1``
and reads them for ``decompress=1`` (the ClickHouse JDBC driver's default).

Each block (src/Compression/CompressionInfo.h in ClickHouse) is::

    16 bytes  CityHash128 (CityHash v1.0.2) of the rest of the block: the low 64 bits,
              then the high 64 bits, each little-endian
     1 byte   method: 0x82 LZ4, 0x02 none (0x90 ZSTD is not read here)
     4 bytes  size of the block after the checksum (header included), little-endian
     4 bytes  size of the data once decompressed, little-endian
     ...      the data (an LZ4 *block*, without a size prefix, for 0x82)

``clickhouse_cityhash.CityHash128`` returns ``(low << 64) | high``, so the checksum is
written as ``int >> 64`` then ``int & (2**64 - 1)`` (checked against clickhouse-java's
``ClickHouseCityHash``: see tests/integration/test_queryserver_compress.py).
"""

from __future__ import annotations

import struct

import cramjam
from clickhouse_cityhash.cityhash import CityHash128  # type: ignore[import-untyped]

from aipipe.infra.readonly import QueryError

__all__ = ["LZ4", "NONE", "TooLarge", "checksum", "compress_block", "compress_blocks",
           "decompress_blocks"]

LZ4, NONE = 0x82, 0x02
BLOCK_SIZE = 1 << 20  # ClickHouse's DBMS_DEFAULT_BUFFER_SIZE
MAX_COMPRESSED_SIZE = 0x40000000  # DBMS_MAX_COMPRESSED_SIZE: 1 GiB
_HEADER = struct.Struct("<BII")  # method, compressed size (with header), uncompressed size
_CHECKSUM = 16
_MASK = (1 << 64) - 1

CANNOT_READ_ALL_DATA, CHECKSUM_DOESNT_MATCH, UNKNOWN_COMPRESSION_METHOD = 33, 40, 89
TOO_LARGE_SIZE_COMPRESSED, CANNOT_DECOMPRESS = 160, 271


class TooLarge(QueryError):
    """The blocks decompress to more than the caller's limit."""

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(TOO_LARGE_SIZE_COMPRESSED, f"The compressed data decompresses to "
                         f"more than {limit} bytes (at least {size}).")
        self.size = size


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The 16 bytes ClickHouse writes before a block: CityHash128 v1.0.2 of ``data``."""
    value = CityHash128(bytes(data))
    return struct.pack("<QQ", value >> 64, value & _MASK)


def compress_block(data: bytes | bytearray | memoryview) -> bytes:
    """One LZ4 block, checksum first."""
    packed = bytes(cramjam.lz4.compress_block(bytes(data), store_size=False))
    body = _HEADER.pack(LZ4, _HEADER.size + len(packed), len(data)) + packed
    return checksum(body) + body


def compress_blocks(data: bytes | bytearray | memoryview, block_size: int = BLOCK_SIZE) -> bytes:
    """``data`` as LZ4 blocks of at most ``block_size`` uncompressed bytes (none if empty)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    view = memoryview(data)
    return b"".join(compress_block(view[i:i + block_size])
                    for i in range(0, len(view), block_size))


def decompress_blocks(data: bytes | bytearray | memoryview, limit: int = 0) -> bytes:
    """The data of successive blocks, each checked against its checksum (code 40 if it does
    not match, as ClickHouse answers). With ``limit``, more than that many decompressed bytes
    is refused (``TooLarge``, code 160) before anything is allocated for them."""
    view = memoryview(data)
    out: list[bytes] = []
    total = pos = 0
    while pos < len(view):
        if len(view) - pos < _CHECKSUM + _HEADER.size:
            raise QueryError(CANNOT_READ_ALL_DATA, "Cannot read all data: a compressed block's "
                             f"header is cut short ({len(view) - pos} bytes left).")
        method, size, raw = _HEADER.unpack_from(view, pos + _CHECKSUM)
        if size < _HEADER.size or size > MAX_COMPRESSED_SIZE:
            raise QueryError(TOO_LARGE_SIZE_COMPRESSED, f"Too large size ({size}) of a "
                             "compressed block, or a corrupted header.")
        end = pos + _CHECKSUM + size
        if end > len(view):
            raise QueryError(CANNOT_READ_ALL_DATA, f"Cannot read all data: a compressed block "
                             f"of {size} bytes has {len(view) - pos - _CHECKSUM}.")
        block = view[pos + _CHECKSUM:end]
        if checksum(block) != view[pos:pos + _CHECKSUM]:
            raise QueryError(CHECKSUM_DOESNT_MATCH, "Checksum doesn't match: corrupted data. "
                             f"Reference: {bytes(view[pos:pos + _CHECKSUM]).hex()}. Actual: "
                             f"{checksum(block).hex()}. Size of compressed block: {size}.")
        total += raw
        if limit and total > limit:
            raise TooLarge(limit, total)
        payload = block[_HEADER.size:]
        if method == LZ4:
            buffer = bytearray(raw)
            try:
                written = cramjam.lz4.decompress_block_into(bytes(payload), buffer) if raw else 0
            except cramjam.DecompressionError as exc:
                raise QueryError(CANNOT_DECOMPRESS, f"Cannot decompress an LZ4 block ({exc}).") \
                    from None
            if written != raw:
                raise QueryError(CANNOT_DECOMPRESS, f"Cannot decompress an LZ4 block: {written} "
                                 f"bytes where its header says {raw}.")
            out.append(bytes(buffer))
        elif method == NONE:
            if len(payload) != raw:
                raise QueryError(CANNOT_DECOMPRESS, f"An uncompressed block holds "
                                 f"{len(payload)} bytes where its header says {raw}.")
            out.append(bytes(payload))
        else:
            raise QueryError(UNKNOWN_COMPRESSION_METHOD, f"Unknown compression method "
                             f"0x{method:02x}: the read endpoint reads LZ4 (0x82) and none "
                             "(0x02).")
        pos = end
    return b"".join(out)
