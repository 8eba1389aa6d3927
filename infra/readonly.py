"""Which queries the read endpoint runs, decided by ClickHouse's own parser.

Nothing here reads SQL text. The engine parses the query (``parseQueryToJSON``, the
query passed as a value, so nothing is executed) and the verdict is taken on its syntax
tree: one statement (the parser refuses a second one), a read kind (SELECT, WITH, SHOW
TABLES/DATABASES/COLUMNS, DESCRIBE, EXISTS, SHOW CREATE, EXPLAIN of a SELECT), no
``INTO OUTFILE``, and only functions, table functions and system tables from an allowlist.
What runs is the engine's own rendering of the tree that was checked
(``formatQueryFromJSON``), so a lexer trick that fools a reader of the text cannot make
the engine run something else. The few kinds the JSON form does not cover (DESCRIBE,
EXISTS, SHOW CREATE) are checked on ``EXPLAIN AST`` of the engine's ``formatQuery``.

The function allowlist is the engine's own catalogue (``system.functions``, built-in
only) filtered by documented category: computations on values (arithmetic, strings,
dates, arrays, JSON, hashes, geo, aggregates, ...) pass; the ``Other``, ``Introspection``,
``Dictionary``, ``AI``, ``Machine Learning``, ``Time Series`` and ``Internal`` categories,
which hold everything that reads files (``file``), the server or its environment
(``getServerSetting``, ``hostName``, ``filesystemAvailable``), other tables (``joinGet``,
``dictGet``), the network (``ai*``) or just waits (``sleep``), do not, except for a named
handful of pure ones. Table functions: only generators (``numbers``, ``zeros``,
``values``, ``generateRandom``, ...); never ``file``, ``url``, ``s3``, ``remote``,
``mysql``, ``postgresql``, ``executable``, ``input``, ``merge`` or any other.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aipipe.schemas.errors import AipipeError

SYNTAX_ERROR, UNKNOWN_FORMAT, READONLY, ABORTED, NOT_IMPLEMENTED = 62, 73, 164, 236, 48
ACCESS_DENIED, UNKNOWN_FUNCTION, UNKNOWN_TABLE, BAD_ARGUMENTS = 497, 46, 60, 36
ERROR_NAMES = {
    SYNTAX_ERROR: "SYNTAX_ERROR",
    UNKNOWN_FORMAT: "UNKNOWN_FORMAT",
    ABORTED: "ABORTED",
    READONLY: "READONLY",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    ACCESS_DENIED: "ACCESS_DENIED",
    BAD_ARGUMENTS: "BAD_ARGUMENTS",
    516: "AUTHENTICATION_FAILED",
    195: "IP_ADDRESS_NOT_ALLOWED",
    159: "TIMEOUT_EXCEEDED",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    307: "TOO_MANY_BYTES",
    81: "UNKNOWN_DATABASE",
    115: "UNKNOWN_SETTING",
    354: "CANNOT_DECOMPRESS",
    33: "CANNOT_READ_ALL_DATA",
    290: "LIMIT_EXCEEDED",
    246: "CORRUPTED_DATA",
}

SAFE_CATEGORIES = frozenset({
    "Aggregate Functions", "Arithmetic", "Arrays", "Bit", "Bitmap", "Comparison",
    "Conditional", "Dates and Times", "Distance", "Encoding", "Encryption", "Financial",
    "Geo", "Geo Polygon", "Hash", "IP Address", "JSON", "Logical", "Map", "Mathematical",
    "Null", "NumericIndexedVector", "QBit", "Random Number", "Rounding", "String",
    "String Replacement", "String Search", "String Splitting", "Time Window", "Tuple",
    "Type Conversion", "URL", "UUID",
})
# Pure functions the catalogue files under "Other".
SAFE_OTHER = frozenset({
    "currentDatabase", "currentUser", "version", "toTypeName", "toColumnTypeName", "ignore",
    "identity", "materialize", "isConstant", "transform", "throwIf", "bar", "byteSize",
    "visibleWidth", "formatReadableSize", "formatReadableDecimalSize",
    "formatReadableQuantity", "formatReadableTimeDelta", "parseTimeDelta",
    "parseReadableSize", "parseReadableSizeOrNull", "parseReadableSizeOrZero",
    "parseISO8601Duration", "defaultValueOfArgumentType", "defaultValueOfTypeName",
    "getSizeOfEnumType", "finalizeAggregation", "initializeAggregation", "runningAccumulate",
    "runningDifference", "runningDifferenceStartingWithFirstValue", "neighbor",
    "rowNumberInBlock", "rowNumberInAllBlocks", "blockSize", "blockNumber",
    "errorCodeToName", "getSetting", "getSettingOrDefault", "countDigits", "digits",
    "isDecimalOverflow", "variantElement",
    "variantType", "getSubcolumn", "indexHint", "formatQuery", "formatQueryOrNull",
    "formatQuerySingleLine", "formatQuerySingleLineOrNull", "normalizeQuery",
    "normalizedQueryHash", "MACNumToString", "MACStringToNum", "MACStringToOUI",
})
# Syntax the parser writes as functions without a catalogue entry.
SYNTAX_FUNCTIONS = frozenset({"lambda", "exists", "grouping", "untuple"})
SAFE_TABLE_FUNCTIONS = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateSeries",
    "primes", "values", "view", "generateRandom",
})
# What BI tools and clients read to discover tables, columns, types and functions.
SAFE_SYSTEM_TABLES = frozenset({
    "one", "numbers", "numbers_mt", "zeros", "zeros_mt", "primes", "databases", "tables",
    "columns", "functions", "table_functions", "aggregate_function_combinators",
    "data_type_families", "formats", "table_engines", "database_engines", "time_zones",
    "collations", "keywords", "settings", "build_options", "contributors",
})
SYSTEM_DATABASES = frozenset({"system"})
OPEN_DATABASES = frozenset({"information_schema", "INFORMATION_SCHEMA"})
JSON_ROOTS = frozenset({"SelectWithUnionQuery", "ShowTablesQuery", "ShowColumnsQuery",
                        "ExplainQuery"})
TEXT_ROOTS = frozenset({
    "DescribeQuery", "ExistsTableQuery", "ExistsDatabaseQuery", "ExistsViewQuery",
    "ExistsDictionaryQuery", "ShowCreateTableQuery", "ShowCreateViewQuery",
    "ShowCreateDatabaseQuery", "ShowCreateDictionaryQuery",
})
READ_KINDS = "SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN"
_CODE = re.compile(r"Code: (\d+)\.")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QueryError(AipipeError):
    """A query the endpoint refused or the engine failed; ``code`` is ClickHouse's."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_engine(cls, exc: BaseException) -> QueryError:
        message = str(exc).strip().removeprefix("Streaming query failed: ")
        match = _CODE.search(message)
        return cls(int(match.group(1)) if match else 1001, message)

    def text(self, version: str) -> str:
        text = str(self)
        if not text.startswith("Code: "):
            name = ERROR_NAMES.get(self.code, "")
            text = f"Code: {self.code}. DB::Exception: {text}" + (f" ({name})" if name else "")
        if "(version " not in text:
            text = f"{text} (version {version})"
        return text

    def body(self, version: str) -> bytes:
        return f"{self.text(version)}\n".encode()


@dataclass(frozen=True)
class Verdict:
    """A query allowed to run: the engine's rendering of it, its kind and its FORMAT."""

    sql: str
    kind: str
    format: str | None


def _escape(value: str) -> str:
    """A query parameter value as ClickHouse reads it (TSV escaping)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def statement(kind: str) -> str:
    """``KillQueryQuery`` -> ``KILL QUERY``: the statement an AST node kind stands for."""
    words = re.findall(r"[A-Z][a-z]*", kind.removesuffix("Query"))
    return " ".join(words).upper() or "this"


def not_read(kind: str) -> QueryError:
    return QueryError(READONLY, f"Cannot execute {statement(kind)} query in readonly mode: "
                      f"the aipipe read endpoint runs only {READ_KINDS}.")


def _refuse(what: str) -> QueryError:
    return QueryError(ACCESS_DENIED, f"{what} is not allowed on the aipipe read endpoint.")


class Catalogue:
    """The functions the engine has, and which of them a read may call."""

    def __init__(self, rows: list[tuple[str, int, int, str, str, str]],
                 table_functions: set[str], combinators: set[str]) -> None:
        by_name = {r[0]: r for r in rows}
        allowed: set[str] = set()
        insensitive: set[str] = set()
        aggregates: set[str] = set()
        aggregates_ci: set[str] = set()
        for name, is_aggregate, case_insensitive, alias_to, categories, origin in rows:
            if origin != "System":
                continue
            target = by_name.get(alias_to or name, (name, is_aggregate, 0, "", categories, origin))
            category = target[4]
            if category in SAFE_CATEGORIES or target[0] in SAFE_OTHER or (
                    target[1] and category == ""):
                allowed.add(name)
                if case_insensitive:
                    insensitive.add(name.lower())
                if is_aggregate:
                    aggregates.add(name)
                    if case_insensitive:
                        aggregates_ci.add(name.lower())
        # A name that is also an unsafe table function is refused wherever it appears, so
        # the verdict never depends on telling a table function from a scalar.
        unsafe_tables = {t for t in table_functions if t not in SAFE_TABLE_FUNCTIONS}
        unsafe_lower = {t.lower() for t in unsafe_tables}
        self.allowed = (allowed - unsafe_tables) | SAFE_TABLE_FUNCTIONS | SYNTAX_FUNCTIONS
        self.insensitive = insensitive - unsafe_lower
        self.aggregates = aggregates - unsafe_tables
        self.aggregates_ci = aggregates_ci - unsafe_lower
        self.combinators = sorted(combinators, key=len, reverse=True)
        self.table_functions = {t.lower() for t in table_functions}

    def is_view(self, name: str) -> bool:
        """In a FROM, a name that is no table function calls a parameterized view."""
        return name.lower() not in self.table_functions

    def allows(self, name: str) -> bool:
        if not _NAME.match(name):
            return False
        if name in self.allowed or name.lower() in self.insensitive:
            return True
        base = name
        while True:  # sumIf, uniqArrayIf, quantilesStateMerge, ...: an aggregate + combinators
            suffix = next((c for c in self.combinators if base.endswith(c) and len(base) > len(c)),
                          None)
            if suffix is None:
                return False
            base = base[: -len(suffix)]
            if base in self.aggregates or base.lower() in self.aggregates_ci:
                return True


def check_table(parts: list[str]) -> None:
    """Refuse ``system.<table>`` outside the discovery tables."""
    if len(parts) >= 2 and parts[0] in SYSTEM_DATABASES and parts[1] not in SAFE_SYSTEM_TABLES:
        raise _refuse(f"Reading {parts[0]}.{parts[1]}")


def _nodes(node: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "type" in node:
            yield key, node
        for k, value in node.items():
            yield from _nodes(value, k)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value, key)


def check_tree(tree: dict[str, Any], catalogue: Catalogue) -> tuple[str, str | None]:
    """Check a ``parseQueryToJSON`` tree; return its kind and its FORMAT name."""
    root = tree.get("type", "")
    if root not in JSON_ROOTS:
        raise not_read(root)
    if root == "ExplainQuery" and tree.get("query", {}).get("type") != "SelectWithUnionQuery":
        raise _refuse("EXPLAIN of anything but a SELECT")
    for key, node in _nodes(tree):
        kind = node["type"]
        if key in ("out_file", "compression") or node.get("is_into_outfile_with_stdout"):
            raise _refuse("INTO OUTFILE")
        if kind == "Function" and key == "table_function" and catalogue.is_view(
                str(node.get("name", ""))):
            check_table(str(node.get("name", "")).split("."))
        elif kind == "Function" and not catalogue.allows(str(node.get("name", ""))):
            raise _refuse(f"Function {node.get('name')!r}")
        if kind in ("TableIdentifier", "Identifier"):
            parts = node.get("name_parts") or str(node.get("name", "")).split(".")
            check_table([str(p) for p in parts])
        if kind == "QueryParameter" and node.get("param_type") == "Identifier":
            raise _refuse("A query parameter of type Identifier")
        if kind == "ShowTablesQuery" and node.get("from"):
            pass  # names of another database's tables: allowed, like SHOW TABLES
    format_ast = tree.get("format_ast") or {}
    return root, (str(format_ast["name"]) if "name" in format_ast else None)


def check_explained(lines: list[str], catalogue: Catalogue) -> tuple[str, str | None]:
    """Check ``EXPLAIN AST`` lines of a DESCRIBE, EXISTS or SHOW CREATE; kind and FORMAT.

    Names with line breaks can add lines to this text, never remove the engine's own:
    what they add can only make the verdict stricter.
    """
    if not lines:
        raise QueryError(SYNTAX_ERROR, "Empty query.")
    root = lines[0].split(" ", 1)[0]
    if root not in TEXT_ROOTS or lines[0].startswith(" "):
        raise not_read(root)
    fmt = None
    for line in lines[1:]:
        depth = len(line) - len(line.lstrip(" "))
        kind, _, rest = line.strip().partition(" ")
        if depth == 0:
            raise QueryError(SYNTAX_ERROR, "Multi-statements are not allowed.")
        if kind == "Literal" and depth == 1:
            raise _refuse("INTO OUTFILE")
        if kind == "Function" and not catalogue.allows(rest.split(" (", 1)[0]):
            raise _refuse(f"Function {rest.split(' (', 1)[0]!r}")
        if kind in ("TableIdentifier", "Identifier"):
            check_table(rest.split(" (", 1)[0].split("."))
        if kind == "Identifier" and depth == 1:
            fmt = rest.split(" ", 1)[0]
    return root, fmt


class Classifier:
    """Asks the engine (a chDB connection of its own) whether a query may run; caches it."""

    def __init__(self, conn: Any, cache_size: int = 512) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], Verdict | QueryError] = (
            OrderedDict())
        self._cache_size = cache_size
        rows = [tuple(r) for r in self._rows(
            "SELECT name, is_aggregate, case_insensitive, alias_to, categories, origin "
            "FROM system.functions")]
        tables = {r[0] for r in self._rows("SELECT name FROM system.table_functions")}
        combinators = {r[0] for r in self._rows(
            "SELECT name FROM system.aggregate_function_combinators")}
        self.catalogue = Catalogue(rows, tables, combinators)

    def _rows(self, sql: str, params: Mapping[str, str] | None = None) -> list[list[Any]]:
        data = self._conn.query(sql, "JSONCompactEachRow", params=dict(params or {}))
        return [json.loads(line) for line in (data.bytes() or b"").decode().splitlines() if line]

    def classify(self, sql: str, params: Mapping[str, str] | None = None) -> Verdict:
        """The verdict on ``sql``; ``QueryError`` with ClickHouse's code if it may not run."""
        key = (sql, tuple(sorted((params or {}).items())))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
            else:
                try:
                    cached = self._classify(sql, params or {})
                except QueryError as exc:
                    cached = exc
                self._cache[key] = cached
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(cached, QueryError):
            raise QueryError(cached.code, str(cached))
        return cached

    def _classify(self, sql: str, params: Mapping[str, str]) -> Verdict:
        if not sql.strip():
            raise QueryError(SYNTAX_ERROR, "Empty query.")
        try:
            (tree_text, rendered), = self._rows(
                "SELECT j, formatQueryFromJSON(j) FROM (SELECT parseQueryToJSON({q:String}) AS j)",
                {"q": _escape(sql)})
        except Exception as exc:  # the engine's own parse error, or a kind JSON cannot carry
            error = QueryError.from_engine(exc)
            if error.code != BAD_ARGUMENTS:
                raise _scoped(error) from None
            return self._classify_explained(sql, params)
        kind, fmt = check_tree(json.loads(tree_text), self.catalogue)
        return Verdict(rendered, kind, fmt)

    def _classify_explained(self, sql: str, params: Mapping[str, str]) -> Verdict:
        try:
            (rendered,), = self._rows("SELECT formatQuery({q:String})", {"q": _escape(sql)})
            explained = self._conn.query(f"EXPLAIN AST {rendered}", "TabSeparatedRaw",
                                         params=dict(params))
        except Exception as exc:
            raise _scoped(QueryError.from_engine(exc)) from None
        lines = [ln for ln in (explained.bytes() or b"").decode().split("\n") if ln.strip()]
        kind, fmt = check_explained(lines, self.catalogue)
        # A FORMAT clause is the root's last Identifier; EXISTS and SHOW CREATE name their
        # table with Identifiers too, so only a rendering with a FORMAT line has one.
        has_format = any(line.startswith("FORMAT ") for line in str(rendered).split("\n")[1:])
        return Verdict(str(rendered), kind, fmt if has_format else None)


def _scoped(error: QueryError) -> QueryError:
    """The engine's error about the query, without the wrapper query it was parsed in."""
    head, found, rest = str(error).partition(": In scope SELECT ")
    if not found:
        return error
    name = re.search(r" \(([A-Z_]+)\)$", rest.strip())
    return QueryError(error.code, head.rstrip(" .") + "." + (f" ({name.group(1)})" if name else ""))
