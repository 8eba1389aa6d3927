"""How every Kafka client of the pipeline signs in: the one place the SASL settings
(``AIPIPE_KAFKA_SECURITY_PROTOCOL``, ``_SASL_MECHANISM``, ``_USERNAME``, ``_PASSWORD``)
become client configuration, for confluent-kafka (a config dict merged into each
producer, consumer and admin client) and for faust (``broker_credentials``).

With the default ``PLAINTEXT`` both are empty and the clients are as they were.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from aipipe.infra.settings import ConfigError, Settings, reveal

if TYPE_CHECKING:
    from faust.auth import SASLCredentials


def kafka_config(settings: Settings) -> dict[str, Any]:
    """The confluent-kafka (librdkafka) settings that sign in as the configured user."""
    if not settings.kafka_security_protocol.startswith("SASL"):
        return {}
    _password(settings)
    return {
        "security.protocol": settings.kafka_security_protocol.lower(),
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": settings.kafka_username,
        "sasl.password": reveal(settings.kafka_password),
    }


def _password(settings: Settings) -> str:
    password = reveal(settings.kafka_password)
    if not password:
        raise ConfigError(
            f"AIPIPE_KAFKA_PASSWORD is empty for the Kafka user {settings.kafka_username!r}; "
            "set it, or run `aipipe up` with this AIPIPE_HOME so that it keeps the passwords "
            "of the local Kafka's users."
        )
    return password


def broker_credentials(settings: Settings) -> SASLCredentials | None:
    """faust's ``broker_credentials`` for the configured user (None: no SASL)."""
    if not settings.kafka_security_protocol.startswith("SASL"):
        return None
    from faust.auth import SASLCredentials  # deferred: faust loads in the streams role only

    return SASLCredentials(
        username=settings.kafka_username,
        password=_password(settings),
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=(ssl.create_default_context()
                     if settings.kafka_security_protocol == "SASL_SSL" else None),
    )
