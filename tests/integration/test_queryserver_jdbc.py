"""A real non-Python client against the read endpoint: the ClickHouse JDBC driver 0.9.x
from Maven Central, running a query, a prepared statement and the ``DatabaseMetaData``
calls BI tools make to discover schemas, tables and columns."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from clickhouse_connect.driver.client import Client

from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.infra import chcompress, queryserver
from aipipe.infra.queryserver import QueryServer
from aipipe.infra.settings import Settings
from tests.support import jdbc
from tests.support.rows import cost_row

pytestmark = pytest.mark.e2e

ROWS = [cost_row(f"op-{i}", f"{i}.25", client_id=f"client-{i % 2}", event_id=f"e-{i}",
                 offset=i) for i in range(8)]


@pytest.fixture(scope="module")
def classpath() -> str:
    missing = jdbc.missing_tools()
    assert not missing, (
        f"the JDBC client test needs Java and Maven ({missing}): install them "
        "(apt-get install -y openjdk-17-jdk-headless maven); a skip would prove nothing")
    return jdbc.build_probe(Settings().cache_dir)


@pytest.fixture(scope="module")
def served(chdb_client: Client) -> Iterator[tuple[QueryServer, str]]:
    database = f"jdbc_{uuid.uuid4().hex[:10]}"
    migrate(chdb_client, database)
    ClickHouseCostStore(chdb_client, database).write(ROWS, dedup_token="jdbc")
    with QueryServer(chdb_client) as server:
        yield server, database


def probe(classpath: str, server: QueryServer, database: str, options: str) -> list[list[str]]:
    port = server.url.rsplit(":", 1)[1]
    url = f"jdbc:clickhouse://127.0.0.1:{port}/{database}{options}"
    done = subprocess.run(["java", "-cp", classpath, "Probe", url, server.user,
                           server.password, database], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split("\t") for line in done.stdout.splitlines()]


@pytest.mark.parametrize("options", ["", "?compress=false", "?decompress=true"],
                         ids=["default-native-compression", "uncompressed", "both-ways"])
def test_the_jdbc_driver_queries_and_discovers_tables_and_columns(
    classpath: str, served: tuple[QueryServer, str], options: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the driver's defaults it asks for ``compress=1`` (LZ4 blocks with CityHash128
    checksums, checked by the driver) and gets them; ``compress=false`` still works; with
    ``decompress=true`` the driver also sends its queries as blocks of its own making."""
    server, database = served
    sent: list[int] = []
    read: list[int] = []

    def counted(data: bytes, block_size: int = chcompress.BLOCK_SIZE) -> bytes:
        sent.append(len(data))
        return chcompress.compress_blocks(data, block_size)

    def reading(data: bytes, limit: int = 0) -> bytes:
        read.append(len(data))
        return chcompress.decompress_blocks(data, limit)

    monkeypatch.setattr(queryserver, "compress_blocks", counted)
    monkeypatch.setattr(queryserver, "decompress_blocks", reading)
    facts = probe(classpath, server, database, options)
    assert bool(sent) == (options != "?compress=false")  # the default is compress=1
    assert bool(read) == (options == "?decompress=true")

    assert ["select1", "1"] in facts
    sums = [(f[1], Decimal(f[2])) for f in facts if f[0] == "sum"]
    assert sums == [("client-1", sum(r.cost_usd for r in ROWS if r.client_id == "client-1"))]
    assert sums[0][1] == Decimal("17")  # 1.25 + 3.25 + 5.25 + 7.25, to the cent
    tables = {f[1]: f[2] for f in facts if f[0] == "table"}
    assert tables["ai_cost_tracking"] == "TABLE" and tables["ai_cost_daily"] == "VIEW"
    columns = {f[1]: f[2] for f in facts if f[0] == "column"}
    assert columns["cost_usd"] == "Decimal(18, 9)"
    assert columns["created_at"] == "DateTime64(3, 'UTC')"
    assert database in [f[1] for f in facts if f[0] == "schema"]
    assert ["product", "ClickHouse", server.engine.version] in facts
