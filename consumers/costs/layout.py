"""Where the migrations' tables go: one server (or chDB), or a ClickHouse cluster.

The migration files describe the single-node layout. With a cluster name
(``AIPIPE_CLICKHOUSE_CLUSTER``) each statement is placed on the cluster instead:

- a ``…MergeTree`` table becomes ``<name>_local``, ``Replicated…MergeTree`` on every node
  (``ON CLUSTER``, Keeper path ``/clickhouse/tables/{shard}/<database>/<name>_local``,
  replica ``{replica}``: the servers' macros), with the replicated deduplication
  settings, and ``<name>`` becomes a ``Distributed`` table over it. Every reader and
  writer keeps using ``<name>``.
- the Distributed tables shard by ``cityHash64(client_id)`` when the sorting key has
  ``client_id``, else by its first column: every copy of a row (same sorting key) lands
  on one shard, so ``FINAL`` on each shard still sees all of them, and a client's rows
  and rollup buckets stay together.
- a materialized view reads the local table it is fed by and writes the local target, on
  every node; plain views and ``ALTER``s of columns go to both tables ``ON CLUSTER``.

The statement shapes recognized are the ones the migration files use; a statement of
another shape is refused with its first line, so a new migration cannot be placed
wrongly in silence. ``tests/unit/test_cluster_layout.py`` has ClickHouse's own parser
check every generated statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aipipe.consumers.costs.store import StoreError, database_name

LOCAL_SUFFIX = "_local"
# what a replicated table remembers of past inserts, for the sink's deduplication tokens:
# the last 1,000 insert blocks per partition, and none older than a week
REPLICATED_DEDUPLICATION = (
    "replicated_deduplication_window = 1000, replicated_deduplication_window_seconds = 604800"
)
# settings of an insert through a Distributed table: sent to the shards before it returns
# (a queued insert is acknowledged before any shard has it, which would let the sink commit
# its Kafka offsets too early), deduplicated on the shards by the insert's token
DISTRIBUTED_INSERT_SETTINGS: dict[str, object] = {
    "distributed_foreground_insert": 1,
    "insert_deduplicate": 1,
}

_NAME = r"(?P<name>`[A-Za-z_][A-Za-z0-9_]*`\.[A-Za-z_][A-Za-z0-9_]*)"
_CREATE_DATABASE = re.compile(r"^CREATE DATABASE IF NOT EXISTS (?P<db>\S+)$")
_CREATE_TABLE = re.compile(
    rf"^CREATE TABLE IF NOT EXISTS {_NAME}\s*\((?P<columns>.*)\)\s*"
    r"ENGINE\s*=\s*(?P<engine>\w*MergeTree)(?:\((?P<args>[^()]*)\))?(?P<rest>.*)$",
    re.DOTALL,
)
_CREATE_MV = re.compile(
    rf"^CREATE MATERIALIZED VIEW IF NOT EXISTS {_NAME}\s+TO\s+(?P<target>\S+)\s+"
    r"AS\s+(?P<select>.*)$",
    re.DOTALL,
)
_CREATE_VIEW = re.compile(rf"^CREATE VIEW IF NOT EXISTS {_NAME}\s+AS\s+(?P<select>.*)$", re.DOTALL)
_ALTER = re.compile(rf"^ALTER TABLE {_NAME}\s+(?P<commands>.*)$", re.DOTALL)
_INSERT = re.compile(r"^INSERT INTO ", re.DOTALL)
_ORDER_BY = re.compile(r"ORDER BY\s+(?:\((?P<many>[^()]*)\)|(?P<one>\w+))")
_SETTINGS = re.compile(r"\s*SETTINGS\s+(?P<settings>.*)$", re.DOTALL)
_COLUMN_ALTER = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT|CLEAR)\s+COLUMN\b", re.IGNORECASE)
# a sorting key change beside a column's (only the MergeTree table has a sorting key)
_SORTING_KEY = re.compile(r",\s*MODIFY\s+ORDER\s+BY\s+(?:\([^()]*\)|\w+)", re.IGNORECASE)


class LayoutError(StoreError):
    """A migration statement has a shape the cluster layout does not know how to place."""


@dataclass(frozen=True)
class Layout:
    """One database on one server (``cluster`` empty) or on the named cluster."""

    database: str
    cluster: str = ""

    def __post_init__(self) -> None:
        database_name(self.database)
        if self.cluster and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", self.cluster):
            raise LayoutError(
                f"Cluster name {self.cluster!r} is not a ClickHouse cluster name; use the name "
                "of a cluster in the servers' remote_servers (AIPIPE_CLICKHOUSE_CLUSTER)."
            )

    @property
    def quoted(self) -> str:
        return f"`{self.database}`"

    def place(self, statement: str) -> list[str]:
        """The statements that put one single-node ``statement`` in this layout."""
        if not self.cluster:
            return [statement]
        on = f"ON CLUSTER `{self.cluster}`"
        if m := _CREATE_DATABASE.match(statement):
            return [f"CREATE DATABASE IF NOT EXISTS {m['db']} {on}"]
        if m := _CREATE_TABLE.match(statement):
            return self._table(m, on)
        if m := _CREATE_MV.match(statement):
            select = self._local_sources(m["select"])
            return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {m['name']} {on} "
                    f"TO {_local(m['target'])} AS {select}"]
        if m := _CREATE_VIEW.match(statement):
            return [f"CREATE VIEW IF NOT EXISTS {m['name']} {on} AS {m['select']}"]
        if m := _ALTER.match(statement):
            local = f"ALTER TABLE {_local(m['name'])} {on} {m['commands']}"
            if _COLUMN_ALTER.match(m["commands"].strip()):
                columns_only = _SORTING_KEY.sub("", m["commands"])
                return [local, f"ALTER TABLE {m['name']} {on} {columns_only}"]
            return [local]  # indexes, settings, mutations: the Distributed table has none
        if _INSERT.match(statement):
            return [statement]  # through the Distributed tables, like the sink's inserts
        raise LayoutError(
            f"The cluster layout cannot place the statement '{statement.splitlines()[0]}'; "
            "write it in one of the shapes consumers/costs/layout.py knows, or teach it this one."
        )

    def _table(self, m: re.Match[str], on: str) -> list[str]:
        name, local = m["name"], _local(m["name"])
        bare_local = local.split(".", 1)[1]
        args = f", {m['args']}" if m["args"] else ""
        engine = (f"Replicated{m['engine']}('/clickhouse/tables/{{shard}}/{self.database}/"
                  f"{bare_local}', '{{replica}}'{args})")
        rest = m["rest"]
        settings = _SETTINGS.search(rest)
        kept: list[str] = []
        if settings:
            rest = rest[: settings.start()]
            kept = [s.strip() for s in settings["settings"].split(",")
                    if not s.strip().startswith("non_replicated_deduplication_window")]
        all_settings = ", ".join([*kept, REPLICATED_DEDUPLICATION])
        return [
            f"CREATE TABLE IF NOT EXISTS {local} {on}\n({m['columns']})\nENGINE = {engine}"
            f"{rest.rstrip()}\nSETTINGS {all_settings}",
            f"CREATE TABLE IF NOT EXISTS {name} {on} AS {local}\nENGINE = Distributed("
            f"'{self.cluster}', '{self.database}', '{bare_local}', {_sharding_key(rest)})",
        ]

    def _local_sources(self, select: str) -> str:
        """``select`` reading the local tables: a view fed by inserts sees the local ones."""
        return re.sub(rf"(FROM\s+{re.escape(self.quoted)}\.)(\w+)",
                      lambda s: f"{s[1]}{s[2]}{LOCAL_SUFFIX}", select)


def _local(name: str) -> str:
    return f"{name}{LOCAL_SUFFIX}"


def _sharding_key(rest: str) -> str:
    order = _ORDER_BY.search(rest)
    if order is None:
        return "rand()"
    columns = [c.strip() for c in (order["many"] or order["one"]).split(",")]
    return f"cityHash64({'client_id' if 'client_id' in columns else columns[0]})"
