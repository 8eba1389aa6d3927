import pytest

from infra.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIPIPE_KAFKA_BOOTSTRAP", "localhost"),
        ("AIPIPE_REDIS_URL", "http://x"),
        ("AIPIPE_CLICKHOUSE_URL", "postgres://db"),
        ("AIPIPE_PARTITIONS", "zero"),
        ("AIPIPE_ENV", "staging"),
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
