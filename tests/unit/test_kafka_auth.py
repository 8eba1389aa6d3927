"""Kafka sign-in settings and the principals' ACL table (no broker: tests/e2e/test_kafka_acls.py
runs them against a real SASL broker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from aipipe.infra.kafka_acls import acl_bindings, ensure_kafka_users
from aipipe.infra.kafka_auth import broker_credentials, kafka_config
from aipipe.infra.settings import ConfigError, Settings, load_settings


def test_plaintext_adds_nothing_to_any_client(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert kafka_config(settings) == {}
    assert broker_credentials(settings) is None


def test_sasl_signs_in_confluent_and_faust_clients_with_the_same_user(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_sasl_mechanism="SCRAM-SHA-256", kafka_username="workers",
                        kafka_password=SecretStr("s3cret"))
    assert kafka_config(settings) == {
        "security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "workers", "sasl.password": "s3cret"}
    credentials = broker_credentials(settings)
    assert credentials is not None
    assert (credentials.username, credentials.password) == ("workers", "s3cret")
    assert (credentials.mechanism.value, credentials.protocol.value) == (
        "SCRAM-SHA-256", "SASL_PLAINTEXT")
    assert "s3cret" not in repr(settings)
    assert settings.to_env()["AIPIPE_KAFKA_PASSWORD"] == "s3cret"  # a child signs in too


def test_the_password_comes_from_the_home_that_aipipe_up_wrote(tmp_path: Path) -> None:
    users = ensure_kafka_users(tmp_path)
    assert set(users) == {"admin", "upstream", "workers", "analysts"}
    assert (tmp_path / "kafka-users.json").stat().st_mode & 0o777 == 0o600
    assert ensure_kafka_users(tmp_path) == users  # generated once
    settings = Settings(home=tmp_path, kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_username="upstream")
    assert kafka_config(settings)["sasl.password"] == users["upstream"]
    assert json.loads((tmp_path / "kafka-users.json").read_text()) == {"users": users}


def test_sasl_without_a_user_or_a_password_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^AIPIPE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
                       r"needs a user: set AIPIPE_KAFKA_USERNAME \(upstream, workers or "
                       r"analysts\)\.$"):
        load_settings(home=tmp_path, kafka_security_protocol="SASL_PLAINTEXT")
    settings = Settings(home=tmp_path, kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_username="analysts")
    with pytest.raises(ConfigError, match="AIPIPE_KAFKA_PASSWORD is empty for the Kafka user "
                       "'analysts'"):
        kafka_config(settings)


def _table(prefix: str) -> dict[str, set[tuple[str, str, str, str]]]:
    return {principal: {(b.restype.name, b.name, b.resource_pattern_type.name,
                         b.operation.name) for b in bindings}
            for principal, bindings in acl_bindings(prefix).items()}


def test_upstream_writes_requests_only_and_reads_outcomes() -> None:
    upstream = _table("acme")["upstream"]
    assert {(kind, name, op) for kind, name, _, op in upstream if op == "WRITE"} == {
        ("TOPIC", "acme.operations.requested", "WRITE")}
    assert {name for kind, name, _, op in upstream if kind == "TOPIC" and op == "READ"} == {
        "acme.operations.completed", "acme.operations.rejected"}
    assert {(name, pattern) for kind, name, pattern, _ in upstream if kind == "GROUP"} == {
        ("aipipe-results-", "PREFIXED")}


def test_workers_own_the_prefix_and_analysts_only_read() -> None:
    table = _table("acme")
    assert {(name, op) for kind, name, pattern, op in table["workers"]
            if kind == "TOPIC" and pattern == "PREFIXED" and op in ("WRITE", "CREATE")} == {
        ("acme.", "WRITE"), ("acme.", "CREATE"), ("acme-", "WRITE"), ("acme-", "CREATE")}
    assert {op for _, _, _, op in table["analysts"]} == {"READ", "DESCRIBE"}
    every = [b for bindings in acl_bindings("acme").values() for b in bindings]
    assert {b.permission_type.name for b in every} == {"ALLOW"}
    assert {b.host for b in every} == {"*"}
