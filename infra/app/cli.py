"""The ``aipipe`` command line: local services, workers, emitting events, and cost queries.

Each command imports what it uses when it runs (``# deferred: loaded per command``): a
worker loads only its role's modules, and a command whose extra is not installed says so.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from aipipe.infra.kafka_auth import kafka_config
from aipipe.infra.leave import exit_code, leave
from aipipe.infra.settings import ConfigError, Settings, home_kafka_password, load_settings
from aipipe.schemas.errors import AipipeError


class _Context:
    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from aipipe.infra.logging import configure_logging  # deferred: loaded per command

            self._settings = load_settings()
            configure_logging(self._settings)
        return self._settings


pass_ctx = click.make_pass_decorator(_Context, ensure=True)


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date or time; use ISO 8601 such as 2026-11-01 or "
            "2026-11-01T12:00:00Z.",
            param_hint=name,
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.group()
def cli() -> None:
    """aipipe: an event-sourced pipeline for AI operations on Kafka, with costs in ClickHouse."""


# -- local services --------------------------------------------------------------------


def _kafka_users(s: Settings) -> dict[str, str] | None:
    """With SASL on: the local Kafka's users and passwords (generated once under the home)."""
    if not s.kafka_security_protocol.startswith("SASL"):
        return None
    from aipipe.infra.kafka_acls import ensure_kafka_users  # deferred: loaded per command

    return ensure_kafka_users(s.home)


def _kafka_status(s: Settings) -> Any:
    """The local Kafka's status, probed as the configured user when SASL is on."""
    from aipipe import services  # deferred: loaded per command

    return services.kafka_status(*s.kafka_host_port, home=s.home, config=kafka_config(s))


def _apply_acls(s: Settings, users: dict[str, str] | None) -> None:
    """Create each principal's ACLs for the prefix: as the local ``admin`` when ``users``
    (from ``aipipe up``), else as the configured user (one allowed to alter ACLs)."""
    from aipipe.infra.kafka_acls import (  # deferred: loaded per command
        admin_config,
        apply_acls,
    )

    config = (admin_config(s.kafka_bootstrap, users) if users
              else {"bootstrap.servers": s.kafka_bootstrap, **kafka_config(s)})
    count = apply_acls(config, s.topic_prefix)
    click.echo(f"{'acls':<6} {s.topic_prefix + '.*':<22} {count} bindings for upstream, "
               "workers and analysts (README, Authentication and ACLs)")


@cli.command()
@click.option("--brokers", type=click.IntRange(1, 9), default=None,
              help="Kafka nodes: 3 starts a replicated cluster on the bootstrap port and the "
              "five after it.  [default: AIPIPE_KAFKA_BROKERS, 1]")
@pass_ctx
def up(ctx: _Context, brokers: int | None) -> None:
    """Start the local Kafka (KRaft) and Redis on loopback; wait until they answer."""
    from aipipe import services  # deferred: loaded per command

    s = ctx.settings
    users = _kafka_users(s)  # SASL: SCRAM users at format time, then the prefix's ACLs
    brokers = brokers or s.kafka_brokers
    if brokers > 1:
        kafka = services.start_kafka_cluster(*s.kafka_host_port, brokers, home=s.home,
                                             cache_dir=s.cache_dir)
    else:
        kafka = [services.start_kafka(*s.kafka_host_port, home=s.home, cache_dir=s.cache_dir,
                                      users=users)]
    for status in (
        *kafka,
        services.start_redis(*s.redis_host_port, home=s.home, password=s.redis_password),
    ):
        click.echo(f"{status.name:<6} {status.address:<22} up   {status.detail}")
    if users is not None:
        _apply_acls(s, users)
    if brokers > 1:
        nodes = services.cluster_nodes(*s.kafka_host_port, brokers, s.home)
        click.echo(f"export AIPIPE_KAFKA_BOOTSTRAP={services.cluster_bootstrap(nodes)} "
                   f"AIPIPE_KAFKA_BROKERS={brokers}")


@cli.command()
@pass_ctx
def down(ctx: _Context) -> None:
    """Stop the local Kafka and Redis that `aipipe up` started."""
    from aipipe import services  # deferred: loaded per command

    for name, stopped in (
        ("kafka", services.stop_kafka(ctx.settings.home)
                  | bool(services.stop_kafka_cluster(ctx.settings.home))),
        ("redis", services.stop_redis(ctx.settings.home)),
    ):
        click.echo(f"{name:<6} {'stopped' if stopped else 'was not running'}")


@cli.command()
@pass_ctx
def status(ctx: _Context) -> None:
    """Probe Kafka, Redis and the embedded read endpoint."""
    from aipipe import services  # deferred: loaded per command
    from aipipe.infra.endpoint import find_endpoint  # deferred: loaded per command

    s = ctx.settings
    kafka = (services.kafka_cluster_status(*s.kafka_host_port, s.kafka_brokers, s.home)
             if s.kafka_brokers > 1 else [_kafka_status(s)])
    for st in (
        *kafka,
        services.redis_status(*s.redis_host_port, home=s.home, password=s.redis_password),
    ):
        click.echo(f"{st.name:<6} {st.address:<22} {'up' if st.running else 'down':<5} {st.detail}")
    if s.embedded:
        url = find_endpoint(s.home)
        click.echo(f"{'reads':<6} {url or s.clickhouse_dsn:<22} {'up' if url else 'embedded'}")


@cli.command("kafka-acls")
@pass_ctx
def kafka_acls(ctx: _Context) -> None:
    """Create the upstream, workers and analysts principals' ACLs for AIPIPE_TOPIC_PREFIX:
    as the admin of `aipipe up`'s SASL Kafka, else as AIPIPE_KAFKA_USERNAME."""
    s = ctx.settings
    if not s.kafka_security_protocol.startswith("SASL"):
        raise click.ClickException("Kafka ACLs need a signed-in admin; set "
                                   "AIPIPE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT (README, "
                                   "Authentication and ACLs).")
    from aipipe.infra.kafka_acls import ADMIN  # deferred: loaded per command

    users = ({ADMIN: password} if (password := home_kafka_password(s.home, ADMIN)) else None)
    _apply_acls(s, users)


# -- workers ---------------------------------------------------------------------------


@cli.command()
@click.argument("role", type=click.Choice(["all", "streams", "costs"]), default="all")
@pass_ctx
def run(ctx: _Context, role: str) -> None:
    """Run the pipeline: all of it in one process, or only the streams or the cost sink."""
    from aipipe.infra.logging import renders_json  # deferred: loaded per command
    from aipipe.runner import run as run_role  # deferred: loaded per command

    settings = ctx.settings
    try:
        run_role(settings, role)  # type: ignore[arg-type]
    except AipipeError as exc:
        if not renders_json(settings):
            raise  # main() says it in one sentence
        import structlog  # deferred: loaded per command

        # a worker's every line is JSON, its last one too
        structlog.get_logger("aipipe").error("worker_failed", role=role, error=str(exc))
        sys.exit(2)


@cli.command()
@click.option("--operations", default=300, show_default=True, help="Simulated operations.")
@click.option("--clients", default=6, show_default=True)
@pass_ctx
def demo(ctx: _Context, operations: int, clients: int) -> None:
    """Run the pipeline on simulated traffic and print the cost per client from ClickHouse."""
    from aipipe.demo import run_demo  # deferred: loaded per command

    run_demo(ctx.settings, operations=operations, clients=clients)


@cli.command()
@click.option("--client", "client_id", required=True)
@click.option(
    "--type",
    "operation_type",
    type=click.Choice(["image_generation", "video_generation", "text_generation"]),
    default="image_generation",
    show_default=True,
)
@click.option("--model", default="gemini-2.5-flash-image", show_default=True)
@click.option("--provider", default="simulated", show_default=True)
@click.option("--param", "params", multiple=True, help="key=value (JSON values allowed).")
@click.option("--user", "user_id", default=None)
@click.option("--count", default=1, show_default=True)
@pass_ctx
def emit(
    ctx: _Context,
    client_id: str,
    operation_type: str,
    model: str,
    provider: str,
    params: tuple[str, ...],
    user_id: str | None,
    count: int,
) -> None:
    """Emit operation.requested events (idempotent producer, keyed by client)."""
    import uuid

    from aipipe.producers import EventProducer  # deferred: loaded per command
    from aipipe.schemas import OperationRequested  # deferred: loaded per command

    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value.", param_hint="--param")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    from aipipe.infra.tracing import (  # deferred: loaded per command
        configure_tracing,
        flush_traces,
    )

    s = ctx.settings
    configure_tracing(s, "aipipe-emit")  # a producer span per event when OTEL_* asks for it
    with EventProducer(s.kafka_bootstrap, **kafka_config(s)) as producer:
        for _ in range(count):
            event = OperationRequested(
                request_id=str(uuid.uuid4()),
                client_id=client_id,
                user_id=user_id,
                operation_type=operation_type,  # type: ignore[arg-type]
                provider=provider,
                model=model,
                params=parsed,
            )
            producer.send(s.topics.requested, event)
            click.echo(event.event_id)
    flush_traces()


@cli.command()
@click.argument("wanted", metavar="OPERATION_OR_REQUEST_ID")
@click.option("--wait", is_flag=True, help="Wait for the outcome if it is not there yet.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the outputs' bytes into this directory.")
@click.option("--client", "client_id", default=None,
              help="Only this client's outcome (an id is unique within its client).")
@pass_ctx
def result(ctx: _Context, wanted: str, wait: bool, timeout: float, out: Path | None,
           client_id: str | None) -> None:
    """Print the outcome (completion or rejection) of an operation as JSON."""
    import asyncio

    from aipipe.producers.results import find_outcome  # deferred: loaded per command
    from aipipe.schemas.events import OperationCompleted, encode  # deferred: loaded per command
    from aipipe.streams.artifacts.store import (  # deferred: loaded per command
        EXTENSIONS,
        ArtifactError,
        store_from_url,
    )

    s = ctx.settings
    outcome = find_outcome(s.kafka_bootstrap, s.topics, wanted, wait=timeout if wait else 0,
                           client=client_id, **kafka_config(s))
    if outcome is None:
        hint = "" if wait else "; add --wait to wait for it"
        raise click.ClickException(
            f"No outcome for {wanted} yet{' within ' + format(timeout, 'g') + 's' if wait else ''}"
            f"{hint}."
        )
    click.echo(encode(outcome).decode())
    if out is None or not isinstance(outcome, OperationCompleted):
        return
    out.mkdir(parents=True, exist_ok=True)
    store = store_from_url(s.artifact_url, s.home, s.artifact_fsync)
    stem = file_stem(outcome.operation_id)
    for number, output in enumerate(outcome.outputs):
        name = f"{stem}-{number}{EXTENSIONS.get(output.mime_type, '.bin')}"
        try:
            data = asyncio.run(store.get(output.uri))
        except ArtifactError as exc:
            click.echo(f"not written: {exc}", err=True)
            continue
        (out / name).write_bytes(data)
        click.echo(str(out / name), err=True)


def file_stem(operation_id: str) -> str:
    """The start of an output's file name under ``--out``: the operation's id when it is a
    plain name; else its letters, digits, ``.``, ``_`` and ``-`` (the rest as ``_``), ``~``
    (which no plain name holds) and a digest of the whole id, so that no two ids share a
    name. An operation's id is its request's ``event_id``, the emitter's choice: ``../x``
    or ``/etc/x`` must not leave DIR."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", operation_id).lstrip(".")[:100]
    if safe == operation_id:
        return safe
    digest = hashlib.sha256(operation_id.encode()).hexdigest()[:12]
    return f"{safe or 'id'}~{digest}"


# -- queries ---------------------------------------------------------------------------


@cli.group()
def costs() -> None:
    """Cost questions answered from ClickHouse."""


@costs.command("summary")
@click.option("--client", "client_id", required=True)
@click.option("--from", "start", default=None, help="ISO date/time, inclusive.")
@click.option("--to", "end", default=None, help="ISO date/time, exclusive.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def costs_summary(
    ctx: _Context, client_id: str, start: str | None, end: str | None, as_json: bool
) -> None:
    """Total cost, counts, and breakdowns by operation type, model and day."""
    from aipipe.reader import cost_store  # deferred: loaded per command
    from aipipe.tables import print_summary  # deferred: loaded per command

    summary = cost_store(ctx.settings).summary(
        client_id, _time(start, "--from"), _time(end, "--to")
    )
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        print_summary(summary)


@cli.group()
def budget() -> None:
    """Budgets per client and period: set them, check spend against them."""


def _usd_option(value: str, hint: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        amount = Decimal(-1)
    if not amount.is_finite() or amount < 0:
        raise click.BadParameter(
            f"{value!r} is not an amount in USD; use a number such as 100 or 12.50.",
            param_hint=hint,
        )
    return amount


@budget.command("check")
@click.option("--client", "client_id", required=True)
@click.option("--limit", "limit", default=None,
              help="Check against this budget (USD) instead of the one set.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--as-of", "as_of", default=None,
              help="ISO time: spend and budget as the log had recorded them at that time.")
@pass_ctx
def budget_check(ctx: _Context, client_id: str, limit: str | None, as_json: bool,
                 as_of: str | None = None) -> None:
    """Spend in the period against the budget, and admission's decision; exits 1 when over."""
    from aipipe.consumers.costs.budgets import BudgetStore  # deferred: loaded per command
    from aipipe.reader import open_reader  # deferred: loaded per command
    from aipipe.streams.admission.budgets import budget_report  # deferred: loaded per command

    s = ctx.settings
    override = _usd_option(limit, "--limit") if limit is not None else None
    if as_of is not None:  # from the log's own record at that time (issue 5)
        from aipipe.replaycmd import budget_report_at  # deferred: loaded per command

        moment = _time(as_of, "--as-of")
        assert moment is not None
        result = budget_report_at(s, client_id, moment, override)
        client_id = f"{client_id} as of {moment.isoformat()}"
    else:
        store = BudgetStore(open_reader(s), s.clickhouse_database)
        result = budget_report(store, client_id, datetime.now(UTC), s.budget_usd,
                               s.budget_period, override)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result["budget_usd"] is None:
        click.echo(f"{client_id}: spent ${result['spend_usd']} since "
                   f"{result['period_start'][:10]}; no budget set (admit)")
    else:
        verdict = "OVER BUDGET: reject" if result["over_budget"] else "within budget: admit"
        click.echo(
            f"{client_id}: spent ${result['spend_usd']} of ${result['budget_usd']} "
            f"({result['period']}) since {result['period_start'][:10]} ({verdict})"
        )
    sys.exit(1 if result["over_budget"] else 0)


@budget.command("set")
@click.option("--client", "client_id", required=True)
@click.option("--amount", required=True, help="Budget in USD per period.")
@click.option("--period", type=click.Choice(["month", "week", "day"]), default="month",
              show_default=True)
@pass_ctx
def budget_set(ctx: _Context, client_id: str, amount: str, period: str) -> None:
    """Set a client's budget: a budget.set event, recorded in ClickHouse by the cost sink."""
    import uuid

    from aipipe.producers import EventProducer  # deferred: loaded per command
    from aipipe.schemas.events import BudgetSet  # deferred: loaded per command

    s = ctx.settings
    event = BudgetSet(request_id=str(uuid.uuid4()), client_id=client_id,
                      amount_usd=_usd_option(amount, "--amount"), period=period)  # type: ignore[arg-type]
    with EventProducer(s.kafka_bootstrap, **kafka_config(s)) as producer:
        producer.send(s.topics.budgets, event)
    click.echo(
        f"{client_id}: budget ${event.amount_usd} per {period} sent ({event.event_id}); it "
        f"applies once the cost sink has recorded it and admission's {s.budget_cache_seconds:g} s "
        "cache has expired."
    )


# -- history: replay, verify, re-pricing (issue 5) -------------------------------------


@cli.group("replay", invoke_without_command=True)
@click.option("--from", "start", default=None, help="ISO date/time (record time), inclusive.")
@click.option("--to", "end", default=None, help="ISO date/time (record time), exclusive.")
@click.option("--into", default=None, help="Target: chdb:///fresh/path or http(s)://…:8123.")
@click.option("--database", default=None, help="Target database [the configured one].")
@click.option("--price-table", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Re-price every cost with this TOML/JSON price table.")
@click.option("--price-version", default=None, help="Re-price with a built-in price version.")
@click.option("--batch", default=5000, show_default=True, help="Rows per insert.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def replay(click_ctx: click.Context, start: str | None, end: str | None, into: str | None,
           database: str | None, price_table: Path | None, price_version: str | None,
           batch: int, as_json: bool) -> None:
    """Rebuild the cost projection from the completed-operations log into another ClickHouse.

    Never calls a provider. Writes a manifest (topic, offset ranges, price version) into
    the target; `aipipe replay verify --into URL` compares it with the live projection.
    """
    if click_ctx.invoked_subcommand is not None:
        return
    from aipipe.infra.gc_tuning import tune_gc  # deferred: loaded per command
    from aipipe.replaycmd import (  # deferred: loaded per command
        prices_for,
        print_manifest,
        run_replay,
    )

    if into is None:
        raise click.UsageError("Missing option '--into' (chdb:///fresh/path or http(s)://…).")
    s = click_ctx.ensure_object(_Context).settings
    tune_gc()  # it decodes and inserts in batches, as a worker does
    manifest = run_replay(
        s, into=into, database=database or s.clickhouse_database,
        start=_time(start, "--from"), end=_time(end, "--to"),
        prices=prices_for(price_table, price_version), batch_rows=batch,
    )
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2))
    else:
        print_manifest(manifest)


@replay.command("verify")
@click.option("--into", required=True, help="The replay target given to aipipe replay.")
@click.option("--database", default=None, help="Target database [the configured one].")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def replay_verify(ctx: _Context, into: str, database: str | None, as_json: bool) -> None:
    """Compare the rebuilt projection with the live one; exits 1 and names every difference."""
    from aipipe.replaycmd import print_verdict, run_verify  # deferred: loaded per command

    s = ctx.settings
    manifest, verdict = run_verify(s, into=into, database=database or s.clickhouse_database)
    if as_json:
        click.echo(json.dumps({"replay_id": manifest.replay_id, **verdict.to_json()}, indent=2,
                              default=str))
    else:
        print_verdict(manifest, verdict)
    sys.exit(0 if verdict.matches else 1)


@cli.command("report")
@click.option("--from", "start", required=True, help="ISO date, inclusive.")
@click.option("--to", "end", required=True, help="ISO date, exclusive.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="report.html",
              show_default=True)
@click.option("--png", "png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the plots as a PNG file.")
@pass_ctx
def report(ctx: _Context, start: str, end: str, out: Path, png: Path | None) -> None:
    """Cost report: spend per day by model, client and operation type; rejections by reason."""
    from aipipe.report import write_report  # deferred: loaded per command
    from aipipe.sqlcmd import analyst_client  # deferred: loaded per command

    s = ctx.settings
    begin, finish = _time(start, "--from"), _time(end, "--to")
    assert begin is not None and finish is not None
    data = write_report(analyst_client(s), s.clickhouse_database, begin, finish, out, png)
    click.echo(f"{out}: ${data.total_usd} over {data.operations} operations, "
               f"{len(data.days)} days" + (f"; plots in {png}" if png else ""))


@cli.command("sql")
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "tsv", "json"]),
              default="table", show_default=True)
@click.option("--param", "params", multiple=True,
              help="name=value for a {name:Type} placeholder in the query.")
@pass_ctx
def sql(ctx: _Context, query: str, fmt: str, params: tuple[str, ...]) -> None:
    """Run one read-only query (SELECT …) on the configured ClickHouse; print the rows.

    Works while the pipeline runs (through its read endpoint) and with a server.
    Unqualified table names are in AIPIPE_CLICKHOUSE_DATABASE. Writes are refused.
    """
    from aipipe.sqlcmd import checked, render, run_query  # deferred: loaded per command
    from aipipe.tables import console, table  # deferred: loaded per command

    binds: dict[str, str] = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not name=value.", param_hint="--param")
        binds[name] = value
    checked(query)  # refuse a write before opening anything
    columns, rows = run_query(ctx.settings, query, binds)
    if fmt == "table":
        console.print(table(f"{len(rows)} rows", columns, rows))
    else:
        click.echo(render(columns, rows, fmt))


@cli.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; loopback unless you mean to share the page.")
@click.option("--port", default=8321, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@pass_ctx
def ui(ctx: _Context, host: str, port: int) -> None:
    """Serve the cost analytics page: spend over time, budgets, rejections, provider errors
    and each client's operations, read like `aipipe sql` (works while the pipeline runs)."""
    from aipipe.ui import serve  # deferred: loaded per command

    serve(ctx.settings, host, port,
          lambda url: click.echo(f"aipipe ui: cost analytics on {url} (Ctrl-C stops)"))


@cli.group()
def schemas() -> None:
    """The event schemas."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schemas_export(directory: Path) -> None:
    """Write one JSON Schema per event type into DIRECTORY."""
    from aipipe.schemas.jsonschema import export_json_schemas  # deferred: loaded per command

    for path in export_json_schemas(directory):
        click.echo(str(path))


@cli.group()
def topics() -> None:
    """Kafka topics."""


@topics.command("create")
@pass_ctx
def topics_create(ctx: _Context) -> None:
    """Create the pipeline's topics (partitions and retention from settings)."""
    from aipipe.runner import prepare_topics  # deferred: loaded per command

    prepare_topics(ctx.settings)
    for name in ctx.settings.topics.created():
        click.echo(name)


#: The extra (pyproject.toml) that installs each module a command may need beyond the base
#: install; the commands import them where they run, so a missing one is named there.
EXTRAS = {
    **dict.fromkeys(
        ("faust", "mode", "redis", "clickhouse_connect", "clickhouse_cityhash", "cramjam",
         "sentry_sdk", "google", "openai", "httpx2", "fsspec", "rich", "prometheus_client"),
        "workers",
    ),
    "chdb": "embedded",
    "matplotlib": "report",
    **dict.fromkeys(("starlette", "uvicorn"), "ui"),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One sentence naming the extra to install for a module that is not there, or None."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    return (f"this command needs {module}, which the base install of aipipe leaves out; "
            f"install it with: pip install 'aipipe[{extra}]'")


def main() -> None:
    try:
        cli(standalone_mode=True)  # ends with SystemExit, even on success
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except (ConfigError, AipipeError) as exc:
        click.echo(f"aipipe: {exc}", err=True)
        code = 2
    except ModuleNotFoundError as exc:
        fix = missing_extra(exc)
        if fix is None:
            sys.excepthook(*sys.exc_info())  # as uncaught: a JSON line and Sentry when set up
            code = 1
        else:
            click.echo(f"aipipe: {fix}", err=True)
            code = 2
    except Exception:  # a bug: reported as an uncaught one would be, and the same end
        sys.excepthook(*sys.exc_info())
        code = 1
    leave(code)  # without chDB's exit handlers, which can hang (see aipipe.infra.leave)


if __name__ == "__main__":
    main()
