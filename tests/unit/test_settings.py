import pytest

from aipipe.infra.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIPIPE_KAFKA_BOOTSTRAP", "localhost"),
        ("AIPIPE_REDIS_URL", "http://x"),
        ("AIPIPE_CLICKHOUSE_URL", "postgres://db"),
        ("AIPIPE_PARTITIONS", "zero"),
        ("AIPIPE_ENV", "staging"),
        ("AIPIPE_PROVIDERS", "gemini,midjourney"),
        ("AIPIPE_PROVIDERS", "simulated"),
        ("AIPIPE_SIMULATED_MAX_LATENCY_MS", "-1"),
    ],
)
def test_a_bad_variable_is_named_in_one_sentence(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable} is invalid .*; set it"):
        load_settings()


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in ("AIPIPE_KAFKA_BOOTSTRAP", "AIPIPE_CLICKHOUSE_URL", "AIPIPE_TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(home="/tmp/aipipe-home")
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.clickhouse_dsn == "chdb:///tmp/aipipe-home/chdb"
    assert settings.embedded
    assert settings.topics.requested == "aipipe.operations.requested"


def test_sentry_dsn_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENTRY_DSN", "http://key@127.0.0.1:1/1")
    settings = load_settings()
    assert "key@" not in repr(settings)
    assert settings.to_env()["SENTRY_DSN"] == "http://key@127.0.0.1:1/1"


def test_providers_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIPIPE_PROVIDERS", "AIPIPE_SIMULATED_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings().offered_providers == ("gemini",)
    monkeypatch.setenv("AIPIPE_SIMULATED_ENABLED", "true")
    assert load_settings().offered_providers == ("gemini", "simulated")
    monkeypatch.setenv("AIPIPE_PROVIDERS", "")
    assert load_settings().offered_providers == ("simulated",)


def test_a_bad_provider_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPIPE_PROVIDERS", "simulated")
    with pytest.raises(ConfigError, match="AIPIPE_SIMULATED_ENABLED=true"):
        load_settings()
