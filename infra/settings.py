"""The one settings object, read from ``AIPIPE_*`` variables (and ``SENTRY_DSN``).

Built once in an entry point and passed down; nothing else reads the environment.
A bad value fails at start with one sentence naming the variable and the fix.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlparse, urlunparse

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from aipipe.producers.webhooks import WebhookVerificationError, secret_key
from aipipe.schemas.errors import AipipeError
from aipipe.schemas.limits import LimitError, parse_limit
from aipipe.schemas.providers import REAL_PROVIDERS, SIMULATED
from aipipe.schemas.topics import Topics


class ConfigError(AipipeError):
    """A setting is missing or malformed; the message names the variable and the fix."""


TRACE_EXPORTERS = ("otlp", "console", "none")  # OTEL_TRACES_EXPORTER's values here
REDIS_PASSWORD_FILE = "redis.json"  # <home>/redis.json (0600), written by ``aipipe up``
KAFKA_USERS_FILE = "kafka-users.json"  # <home>/kafka-users.json (0600): SASL users, ``aipipe up``
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def home_redis_password(home: Path, host: str, port: int) -> str | None:
    """The password ``aipipe up`` keeps under ``home`` for the Redis it runs at host:port."""
    try:
        kept = json.loads((home / REDIS_PASSWORD_FILE).read_text())
        same_host = kept["host"] == host or {kept["host"], host} <= set(_LOOPBACK)
        return str(kept["password"]) if same_host and int(kept["port"]) == port else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def home_kafka_password(home: Path, username: str) -> str | None:
    """The SASL password ``aipipe up`` generated under ``home`` for the Kafka user ``username``."""
    try:
        kept = json.loads((home / KAFKA_USERS_FILE).read_text())
        return str(kept["users"][username]) if username else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reveal(value: SecretStr | str) -> str:
    """The real value of a secret setting (``model_copy`` may have put a plain str there)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIPIPE_", frozen=True, extra="ignore")

    home: Path = Field(Path(".aipipe"), description="Where local data, logs and caches live.")
    kafka_bootstrap: str = "127.0.0.1:9092"
    # -- Kafka authentication (README, Authentication and ACLs) --
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="SASL_PLAINTEXT: `aipipe up` starts Kafka with SCRAM users and "
        "ACLs, and every client signs in as AIPIPE_KAFKA_USERNAME.",
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_username: str = Field(
        "", description="The SASL user: upstream, workers or analysts (admin: `aipipe up`)."
    )
    kafka_password: SecretStr = Field(
        SecretStr(""), description="Empty: the one `aipipe up` generated under AIPIPE_HOME."
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Without a password: the one `aipipe up` keeps for it under AIPIPE_HOME.",
    )
    clickhouse_url: SecretStr = Field(
        SecretStr(""),
        description="chdb:///path (embedded, the default under AIPIPE_HOME) or http(s)://.",
    )
    clickhouse_database: str = "aipipe"
    clickhouse_cluster: str = Field(
        "",
        pattern=r"^([A-Za-z_][A-Za-z0-9_.-]*)?$",
        description="A cluster of the server's remote_servers: replicated tables ON CLUSTER, "
        "Distributed tables over them (README, ClickHouse cluster). Empty: one server.",
    )
    topic_prefix: str = Field("aipipe", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(4, ge=1, le=1000)
    replication_factor: int | None = Field(
        None, ge=1, description="Of the topics aipipe creates; unset: three on a cluster of "
        "three or more brokers (min.insync.replicas=2), else one (README, Kafka cluster).",
    )
    kafka_brokers: int = Field(
        1, ge=1, le=9, description="Nodes of the local Kafka that `aipipe up` starts (3: a "
        "replicated cluster on the bootstrap port and the ports after it).",
    )
    topic_retention_ms: int = Field(-1, ge=-1)
    env: Literal["development", "production"] = "development"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    sentry_dsn: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SENTRY_DSN", "AIPIPE_SENTRY_DSN")
    )
    # -- tracing: the standard OpenTelemetry variables (README, Tracing); the SDK reads
    # the others it knows (OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, ...) itself --
    otel_traces_exporter: str = Field("", validation_alias="OTEL_TRACES_EXPORTER")
    otel_exporter_otlp_endpoint: str = Field("", validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_exporter_otlp_traces_endpoint: str = Field(
        "", validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    otel_sdk_disabled: bool = Field(False, validation_alias="OTEL_SDK_DISABLED")
    otel_service_name: str = Field("", validation_alias="OTEL_SERVICE_NAME")
    query_port: int = Field(
        8124, ge=0, le=65535, description="Loopback port of the embedded read endpoint."
    )
    metrics_port: int = Field(
        9464, ge=0, le=65535,
        description="Port of a worker's /metrics, /healthz and /readyz; 0 turns them off.",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the metrics port listens on (0.0.0.0 in a container)."
    )
    health_stall_seconds: float = Field(
        120.0, gt=0,
        description="/healthz fails when a busy part of a worker made no progress for this long.",
    )
    worker_session_timeout_seconds: float = Field(
        10.0, ge=6, le=1800,  # Kafka's group.min/max.session.timeout.ms defaults
        description="How soon a dead worker's partitions move to another.",
    )
    sink_batch_size: int = Field(1000, ge=1)
    sink_batch_seconds: float = Field(1.0, gt=0)
    simulated_latency_ms: int = Field(0, ge=0)
    stall_refetch_seconds: float = Field(
        15.0, ge=2, description="Quiet time before a worker re-fetches partitions left behind."
    )
    generation_max_in_flight: int = Field(
        256, ge=1, le=100_000, description="Operations a streams worker runs at once."
    )
    dedup_horizon_hours: float = Field(
        168.0, gt=0, le=87_600,
        description="How long the streams remember a request or operation they handled: "
        "a redelivery within it is skipped; a request whose occurred_at is older than it "
        "(less AIPIPE_CLOCK_SKEW_SECONDS) is refused (README).",
    )
    # -- generation: providers, video polling, retries, circuit breaker --
    simulated_failure_rate: float = Field(0.0, ge=0, le=1)
    simulated_video_polls: int = Field(1, ge=1, description="Polls until a simulated video ends.")
    gemini_api_key: SecretStr | None = Field(None, description="Gemini API key (images, text).")
    gemini_base_url: str | None = Field(
        None, description="Override the Gemini and Vertex endpoints (tests: a local fake)."
    )
    gemini_timeout_seconds: float = Field(120.0, gt=0)
    openai_api_key: SecretStr | None = Field(None, description="OpenAI API key (images, text).")
    openai_base_url: str | None = Field(
        None, description="Override the OpenAI endpoint (a proxy; tests: a local fake)."
    )
    openai_timeout_seconds: float = Field(120.0, gt=0)
    stability_api_key: SecretStr | None = Field(None, description="Stability AI API key.")
    stability_base_url: str | None = Field(
        None, description="Override https://api.stability.ai (tests: a local fake)."
    )
    stability_timeout_seconds: float = Field(120.0, gt=0)
    artifact_url: str = Field(
        "", description="Where outputs are kept: s3://bucket/prefix, gs://…; empty: "
        "AIPIPE_HOME/artifacts."
    )
    artifact_fsync: bool = Field(
        False, description="Flush each output stored in a local directory to the disk before "
        "its operation completes (about 4 times slower to store)."
    )
    video_output_buckets: str = Field(
        "", description="Cloud Storage buckets a Veo request may name in output_gcs_uri, "
        "comma-separated; empty: none."
    )
    vertex_project: str | None = Field(None, description="Google Cloud project for Veo video.")
    vertex_location: str = "us-central1"
    vertex_access_token: SecretStr | None = Field(
        None, description="A static OAuth token for Vertex; unset: application default credentials."
    )
    video_poll_base_seconds: float = Field(2.0, gt=0)
    video_poll_factor: float = Field(1.5, ge=1)
    video_poll_cap_seconds: float = Field(30.0, gt=0)
    video_max_wait_seconds: float = Field(1800.0, gt=0)
    video_poll_tick_seconds: float = Field(0.25, gt=0, description="How often due polls are run.")
    provider_retry_attempts: int = Field(4, ge=1)
    provider_retry_base_seconds: float = Field(0.5, ge=0)
    provider_retry_cap_seconds: float = Field(8.0, ge=0)
    breaker_failure_threshold: int = Field(5, ge=1)
    breaker_window_seconds: float = Field(60.0, gt=0)
    breaker_cooldown_seconds: float = Field(30.0, gt=0)
    breaker_client_share: int | None = Field(
        None, ge=1, description="While another client is being served, one client's failures "
        "count at most this many times toward opening a breaker (default: half the threshold, "
        "rounded up).")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "aipipe", description="Downloaded Kafka jars, shared by clones."
    )
    fault: str = Field("", description="Fault tests only: a named point where a worker dies.")
    # -- admission: rate limits and budgets --
    rate_limit: str = Field("60/60s", description="Default per-client limit, COUNT/WINDOW.")
    rate_limits_file: Path | None = Field(
        None, description="TOML overrides per client and model; re-read when it changes."
    )
    rate_limits_reload_seconds: float = Field(2.0, gt=0)
    rate_limit_failure_mode: Literal["open", "closed"] = Field(
        "open", description="Without Redis: per-worker in-process window (open) or reject."
    )
    rate_limit_redis_timeout_ms: int = Field(
        250, ge=1, le=60_000, description="Slower than this and the limiter fails over."
    )
    rate_limit_probe_seconds: float = Field(1.0, gt=0)
    admission_batch_size: int = Field(500, ge=1)
    admission_batch_seconds: float = Field(0.02, gt=0)
    budget_usd: Decimal | None = Field(
        None, ge=0, description="Default budget per client and period; none when unset."
    )
    budget_period: Literal["month", "week", "day"] = "month"
    budget_cache_seconds: float = Field(5.0, ge=0)
    budget_wait_seconds: float = Field(
        1.0, gt=0, description="Longest admission waits for a budget lookup; then last answers."
    )
    # -- admission: params, clock and providers --
    providers: str = Field(
        "gemini", description="The real providers offered, comma-separated (may be empty)."
    )
    simulated_enabled: bool = Field(
        False, description="Offer the offline simulated provider (development, tests, demo)."
    )
    simulated_max_latency_ms: int = Field(5_000, ge=0, le=600_000)
    simulated_max_polls: int = Field(20, ge=1, le=10_000)
    params_max_bytes: int = Field(65_536, ge=1_024, le=900_000)
    params_max_depth: int = Field(4, ge=2, le=30)
    prompt_max_chars: int = Field(8_000, ge=1)
    image_max_count: int = Field(4, ge=1)
    text_max_output_tokens: int = Field(65_536, ge=1)
    video_max_seconds: int = Field(8, ge=1)
    clock_skew_seconds: float = Field(
        300.0, ge=0, description="How far ahead of the pipeline's clock occurred_at may be."
    )

    @field_validator("providers")
    @classmethod
    def _providers(cls, value: str) -> str:
        for name in filter(None, (n.strip() for n in value.split(","))):
            if name == SIMULATED:
                raise ValueError("simulated is offered by AIPIPE_SIMULATED_ENABLED=true, "
                                 "not listed here")
            if name not in REAL_PROVIDERS:
                raise ValueError(f"{name!r} is not a provider; use {', '.join(REAL_PROVIDERS)}")
        return value

    @property
    def offered_providers(self) -> tuple[str, ...]:
        """The providers requests may name: AIPIPE_PROVIDERS, plus simulated if enabled."""
        names = {n.strip() for n in self.providers.split(",") if n.strip()}
        return tuple(sorted(names | ({"simulated"} if self.simulated_enabled else set())))

    # -- analysts and history --
    archive_events: bool = Field(
        True, description="Archive every event of every topic into events_archive (cost sink)."
    )
    rollup_seal_seconds: float = Field(
        60.0, gt=0, description="How often closed days of the cost rollups are sealed."
    )
    # -- read endpoint: auth and limits --
    query_max_execution_seconds: float = Field(
        60.0, gt=0, description="Longest an analyst query may run on the read endpoint."
    )
    query_max_memory_bytes: int = Field(2_000_000_000, gt=0, description="Memory per query.")
    query_max_rows_to_read: int = Field(2_000_000_000, gt=0, description="Rows read per query.")
    query_max_result_rows: int = Field(50_000_000, gt=0)
    query_max_result_bytes: int = Field(1_000_000_000, gt=0)
    query_max_threads: int = Field(2, ge=1, description="Engine threads per query.")
    query_max_body_bytes: int = Field(1_048_576, gt=0, description="Largest request body.")
    query_max_concurrent: int = Field(
        4, ge=1, description="Analyst queries at once; admission's budget lookups have their own."
    )
    archive_prompts: bool = Field(
        False, description="Keep prompt text in events_archive (default: a hash and a length)."
    )
    # -- sinks: retries and supervision --
    sink_retry_base_seconds: float = Field(
        0.5, gt=0, description="First wait before a ClickHouse write that failed transiently."
    )
    sink_retry_cap_seconds: float = Field(
        30.0, gt=0, description="Longest wait between retries; a write is retried until it lands."
    )
    sink_max_poll_interval_seconds: float = Field(
        300.0, ge=1, description="librdkafka max.poll.interval.ms of the sinks' consumers."
    )
    rollup_seal_max_failures: int = Field(
        10, ge=1, description="Failed seal rounds in a row before the process exits (code 70)."
    )
    worker_exit_grace_seconds: float = Field(
        20.0, gt=0, description="After a worker thread died: time for a clean stop before exit 70."
    )
    parent_pid: int = Field(
        0, ge=0, description="Stop (as on SIGTERM) when this process, the one that started the "
        "worker, ends (Linux); 0: never. Set by the demo, tests and benchmarks for theirs."
    )
    # -- webhooks (consumers/webhooks) --
    webhook_allowed_urls: str = Field(
        default="", description="URL prefixes a request's callback_url may start with, "
        "comma-separated; https only (http on 127.0.0.1/localhost); empty: no webhooks."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, validate_default=True,
        description="Signs every delivery (HMAC-SHA256); needed when webhooks are on.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="One delivery attempt."
    )
    webhook_slow_seconds: float = Field(
        default=2.0, gt=0, description="A first try's time (at most the timeout); a receiver "
        "whose attempt took this long gets its first tries from the retry consumer for a minute."
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries per delivery before it is dead-lettered."
    )
    webhook_retry_base_seconds: float = Field(
        default=1.0, gt=0, description="First wait between attempts; doubles each time."
    )
    webhook_retry_cap_seconds: float = Field(default=30.0, gt=0, description="Longest wait.")
    webhook_concurrency: int = Field(default=32, ge=1, le=1000, description="Deliveries at once.")

    @field_validator("otel_traces_exporter")
    @classmethod
    def _known_exporters(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in TRACE_EXPORTERS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an exporter here; use otlp, console or none")
        return ",".join(names)

    @property
    def tracing(self) -> bool:
        """Traces are exported: an exporter or an OTLP endpoint is set, and the SDK is not
        disabled (``OTEL_SDK_DISABLED``)."""
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return False
        exporters = set(self.otel_traces_exporter.split(",")) - {"", "none"}
        return bool(exporters or self.otel_exporter_otlp_endpoint
                    or self.otel_exporter_otlp_traces_endpoint)

    @field_validator("webhook_allowed_urls")
    @classmethod
    def _webhook_urls(cls, value: str) -> str:
        for prefix in filter(None, (p.strip() for p in value.split(","))):
            url = urlparse(prefix)
            local = url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost")
            if not url.hostname or not (url.scheme == "https" or local):
                raise ValueError(f"{prefix!r} is not an https:// URL prefix (http:// only for "
                                 "127.0.0.1 or localhost)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if str(info.data.get("webhook_allowed_urls", "")).strip(", ") and not (
            value and reveal(value)
        ):
            raise ValueError("required when AIPIPE_WEBHOOK_ALLOWED_URLS is set: the secret "
                             "receivers verify signatures with")
        if value is not None:
            try:
                secret_key(reveal(value))
            except WebhookVerificationError:
                raise ValueError("a whsec_ secret must be whsec_ and base64") from None
        return value

    @property
    def webhook_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.webhook_allowed_urls.split(",") if p.strip())

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            parse_limit(value, "AIPIPE_RATE_LIMIT")
        except LimitError:
            raise ValueError('must be COUNT/WINDOW, e.g. "60/60s" (units ms, s, m, h, d)') from None
        return value

    @field_validator("home", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("must be host:port[,host:port...], e.g. 127.0.0.1:9092")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: SecretStr) -> SecretStr:
        if urlparse(value.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis:// URL, e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and urlparse(url).scheme not in ("chdb", "http", "https"):
            raise ValueError("must be chdb:///path or an http(s):// ClickHouse URL")
        return value

    @model_validator(mode="after")
    def _horizon_past_the_skew(self) -> Settings:
        if self.dedup_horizon_hours * 3600 <= self.clock_skew_seconds:
            raise ValueError(
                f"AIPIPE_DEDUP_HORIZON_HOURS ({self.dedup_horizon_hours:g} h) must be longer "
                f"than AIPIPE_CLOCK_SKEW_SECONDS ({self.clock_skew_seconds:g} s): a request is "
                "refused when its occurred_at is older than the horizon less the skew; raise "
                "the horizon or lower the skew"
            )
        return self

    @model_validator(mode="after")
    def _cluster_needs_a_server(self) -> Settings:
        if self.clickhouse_cluster and self.embedded:
            raise ValueError(
                "AIPIPE_CLICKHOUSE_CLUSTER needs a ClickHouse server: set AIPIPE_CLICKHOUSE_URL "
                "to http(s)://user:password@host:8123 of one of the cluster's nodes"
            )
        return self

    @model_validator(mode="after")
    def _sasl_needs_a_user(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_username:
            raise ValueError(
                f"AIPIPE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs a user: "
                "set AIPIPE_KAFKA_USERNAME (upstream, workers or analysts)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _kafka_password(cls, data: Any) -> Any:
        """No AIPIPE_KAFKA_PASSWORD: the one ``aipipe up`` generated for the user under home."""
        if not isinstance(data, dict) or reveal(data.get("kafka_password") or ""):
            return data
        try:
            home = Path(data.get("home", cls.model_fields["home"].default)).expanduser().resolve()
        except (TypeError, ValueError):
            return data  # the field validator names what is wrong
        password = home_kafka_password(home, str(data.get("kafka_username") or ""))
        return data if password is None else {**data, "kafka_password": SecretStr(password)}

    @model_validator(mode="before")
    @classmethod
    def _redis_password(cls, data: Any) -> Any:
        """A redis:// URL without a password gets the one ``aipipe up`` keeps for that Redis
        under the home, so the default URL reaches the protected local Redis."""
        if not isinstance(data, dict):
            return data
        try:
            url = urlparse(reveal(data.get("redis_url", cls.model_fields["redis_url"].default)))
            home = Path(data.get("home", cls.model_fields["home"].default)).expanduser().resolve()
            port = url.port or 6379
        except (AttributeError, TypeError, ValueError):
            return data  # the field validators name what is wrong
        if url.scheme not in ("redis", "rediss") or url.password is not None:
            return data
        password = home_redis_password(home, url.hostname or "127.0.0.1", port)
        if password is None:
            return data
        netloc = f"{url.username or ''}:{quote(password, safe='')}@{url.netloc.rpartition('@')[2]}"
        return {**data, "redis_url": SecretStr(urlunparse(url._replace(netloc=netloc)))}

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def clickhouse_dsn(self) -> str:
        return reveal(self.clickhouse_url) or f"chdb://{(self.home / 'chdb').resolve()}"

    @property
    def embedded(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    @property
    def chdb_path(self) -> Path:
        return Path(urlparse(self.clickhouse_dsn).path)

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        host, _, port = self.kafka_bootstrap.split(",")[0].strip().rpartition(":")
        return host, int(port)

    @property
    def redis_host_port(self) -> tuple[str, int]:
        url = urlparse(self.redis_dsn)
        return url.hostname or "127.0.0.1", url.port or 6379

    @property
    def redis_dsn(self) -> str:
        """The Redis URL to connect with, password included: never log it."""
        return reveal(self.redis_url)

    @property
    def redis_password(self) -> str | None:
        password = urlparse(self.redis_dsn).password
        return None if password is None else unquote(password)


    def to_env(self) -> dict[str, str]:
        """These settings as AIPIPE_ variables, for a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_defaults=False).items():
            if value is None or name == "sentry_dsn":
                continue
            if name.startswith("otel_"):  # under its own OpenTelemetry name
                if value not in ("", False):
                    env[name.upper()] = str(value).lower() if value is True else str(value)
                continue
            if isinstance(value, SecretStr):  # str() would pass on the mask, not the key
                value = value.get_secret_value()
            env[f"AIPIPE_{name.upper()}"] = str(value)
        if self.sentry_dsn is not None:
            env["SENTRY_DSN"] = self.sentry_dsn.get_secret_value()
        return env


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation error into one clear sentence."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across settings: its message names them and the fix
            raise ConfigError(f"{first['msg'].removeprefix('Value error, ')}.") from exc
        name = str(first["loc"][0])
        var = ("SENTRY_DSN" if name == "sentry_dsn" else name if name.startswith("OTEL_")
               else f"AIPIPE_{name.upper()}")
        raise ConfigError(
            f"{var} is invalid ({first['msg']}); set it to a valid value or unset it "
            "to use the default."
        ) from exc
