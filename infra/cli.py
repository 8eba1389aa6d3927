"""The ``aipipe`` command line: local services, workers, emitting events, and cost queries."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from infra.settings import ConfigError, Settings, load_settings
from schemas.errors import AipipeError


class _Context:
    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from infra.logging import configure_logging

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


@cli.command()
@pass_ctx
def up(ctx: _Context) -> None:
    """Start the local Kafka (KRaft) and Redis on loopback; wait until they answer."""
    from infra import services

    s = ctx.settings
    for status in (
        services.start_kafka(*s.kafka_host_port, home=s.home, cache_dir=s.cache_dir),
        services.start_redis(*s.redis_host_port, home=s.home),
    ):
        click.echo(f"{status.name:<6} {status.address:<22} up   {status.detail}")


@cli.command()
@pass_ctx
def down(ctx: _Context) -> None:
    """Stop the local Kafka and Redis that `aipipe up` started."""
    from infra import services

    for name, stopped in (
        ("kafka", services.stop_kafka(ctx.settings.home)),
        ("redis", services.stop_redis(ctx.settings.home)),
    ):
        click.echo(f"{name:<6} {'stopped' if stopped else 'was not running'}")


@cli.command()
@pass_ctx
def status(ctx: _Context) -> None:
    """Probe Kafka, Redis and the embedded read endpoint."""
    from infra import services
    from infra.queryserver import find_endpoint

    s = ctx.settings
    for st in (
        services.kafka_status(*s.kafka_host_port, home=s.home),
        services.redis_status(*s.redis_host_port, home=s.home),
    ):
        click.echo(f"{st.name:<6} {st.address:<22} {'up' if st.running else 'down':<5} {st.detail}")
    if s.embedded:
        url = find_endpoint(s.home)
        click.echo(f"{'reads':<6} {url or s.clickhouse_dsn:<22} {'up' if url else 'embedded'}")


# -- workers ---------------------------------------------------------------------------


@cli.command()
@click.argument("role", type=click.Choice(["all", "streams", "costs"]), default="all")
@pass_ctx
def run(ctx: _Context, role: str) -> None:
    """Run the pipeline: all of it in one process, or only the streams or the cost sink."""
    from infra.runner import run as run_role

    run_role(ctx.settings, role)  # type: ignore[arg-type]


@cli.command()
@click.option("--operations", default=300, show_default=True, help="Simulated operations.")
@click.option("--clients", default=6, show_default=True)
@pass_ctx
def demo(ctx: _Context, operations: int, clients: int) -> None:
    """Run the pipeline on simulated traffic and print the cost per client from ClickHouse."""
    from infra.demo import run_demo

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

    from producers import EventProducer
    from schemas import OperationRequested

    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value.", param_hint="--param")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    s = ctx.settings
    with EventProducer(s.kafka_bootstrap) as producer:
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
    from infra.reader import cost_store
    from infra.tables import print_summary

    summary = cost_store(ctx.settings).summary(
        client_id, _time(start, "--from"), _time(end, "--to")
    )
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        print_summary(summary)


@cli.group()
def budget() -> None:
    """Budget checks (month to date)."""


@budget.command("check")
@click.option("--client", "client_id", required=True)
@click.option("--limit", "limit", required=True, help="Budget in USD for the month.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def budget_check(ctx: _Context, client_id: str, limit: str, as_json: bool) -> None:
    """Month-to-date spend against a limit; exits 1 when the client is over budget."""
    from infra.reader import cost_store

    try:
        budget_usd = Decimal(limit)
    except InvalidOperation:
        raise click.BadParameter(
            f"{limit!r} is not an amount in USD; use a number such as 100 or 12.50.",
            param_hint="--limit",
        ) from None
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spend = cost_store(ctx.settings).spend(client_id, month_start, now)
    over = spend >= budget_usd
    result = {
        "client_id": client_id,
        "period_start": month_start.isoformat(),
        "spend_usd": str(spend),
        "budget_usd": str(budget_usd),
        "remaining_usd": str(budget_usd - spend),
        "over_budget": over,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        verdict = "OVER BUDGET" if over else "within budget"
        click.echo(
            f"{client_id}: spent ${spend} of ${budget_usd} since {month_start:%Y-%m-%d} "
            f"({verdict})"
        )
    sys.exit(1 if over else 0)


@cli.group()
def schemas() -> None:
    """The event schemas."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schemas_export(directory: Path) -> None:
    """Write one JSON Schema per event type into DIRECTORY."""
    from schemas.jsonschema import export_json_schemas

    for path in export_json_schemas(directory):
        click.echo(str(path))


@cli.group()
def topics() -> None:
    """Kafka topics."""


@topics.command("create")
@pass_ctx
def topics_create(ctx: _Context) -> None:
    """Create the pipeline's topics (partitions and retention from settings)."""
    from infra.runner import prepare_topics

    prepare_topics(ctx.settings)
    for name in ctx.settings.topics.all():
        click.echo(name)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except (ConfigError, AipipeError) as exc:
        click.echo(f"aipipe: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
