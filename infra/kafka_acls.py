"""Who may do what on the pipeline's Kafka: the SASL users and their ACLs.

Three principals besides the broker's own ``admin`` (a super user):

- ``upstream`` writes requests and reads their outcomes (completed, rejected), and
  nothing else: a forged ``operation.completed`` or ``budget.set`` is refused by the broker;
- ``workers`` (``aipipe run streams`` / ``costs``) read, write and create every topic of
  the prefix, faust's internal ones (``<prefix>-streams-…`` changelogs, the assignor's
  topic) included, and use the ``<prefix>-…`` consumer groups;
- ``analysts`` read the event topics (and use ``<prefix>-analysts…`` and replay groups).

``acl_bindings`` is the table (pure); ``apply_acls`` creates it through the Admin API
(creating a binding that exists already is a no-op). Local passwords are generated once
per ``AIPIPE_HOME`` into ``kafka-users.json`` (0600), as the Redis password is.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports these without declaring it (mypy's strict re-export rule)
from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType

from aipipe.infra.settings import KAFKA_USERS_FILE
from aipipe.schemas.errors import AipipeError
from aipipe.schemas.topics import Topics

ADMIN = "admin"
PRINCIPALS = ("upstream", "workers", "analysts")
RESULTS_GROUPS = "aipipe-results-"  # aipipe.producers.results: one group per reader
REPLAY_GROUPS = "aipipe-replay-"  # aipipe.consumers.replay: assigned, never committed

_LITERAL, _PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
_READ = (AclOperation.READ, AclOperation.DESCRIBE)
_PRODUCE = (AclOperation.WRITE, AclOperation.DESCRIBE)
_OWN = (AclOperation.READ, AclOperation.WRITE, AclOperation.CREATE, AclOperation.DESCRIBE,
        AclOperation.DESCRIBE_CONFIGS, AclOperation.ALTER_CONFIGS)  # e.g. changelog retention


class AclError(AipipeError):
    """The ACLs could not be created; the message says by whom and why."""


def _allow(principal: str, kind: ResourceType, name: str, pattern: ResourcePatternType,
           operations: tuple[AclOperation, ...]) -> list[AclBinding]:
    return [AclBinding(kind, name, pattern, f"User:{principal}", "*", op,
                       AclPermissionType.ALLOW) for op in operations]


def acl_bindings(prefix: str) -> dict[str, list[AclBinding]]:
    """Each principal's ACLs for the pipeline under the topic prefix ``prefix``."""
    topics, topic, group = Topics(prefix), ResourceType.TOPIC, ResourceType.GROUP
    return {
        "upstream": [
            *_allow("upstream", topic, topics.requested, _LITERAL, _PRODUCE),
            *_allow("upstream", topic, topics.completed, _LITERAL, _READ),
            *_allow("upstream", topic, topics.rejected, _LITERAL, _READ),
            *_allow("upstream", group, RESULTS_GROUPS, _PREFIXED, _READ),
        ],
        "workers": [
            *_allow("workers", topic, f"{prefix}.", _PREFIXED, _OWN),  # the event topics
            *_allow("workers", topic, f"{prefix}-", _PREFIXED, _OWN),  # faust's own topics
            *_allow("workers", group, f"{prefix}-", _PREFIXED, _READ),
        ],
        "analysts": [
            *_allow("analysts", topic, f"{prefix}.", _PREFIXED, _READ),
            *_allow("analysts", group, f"{prefix}-analysts", _PREFIXED, _READ),
            *_allow("analysts", group, REPLAY_GROUPS, _PREFIXED, _READ),
        ],
    }


def apply_acls(admin_config: Mapping[str, str], prefix: str, timeout: float = 30.0) -> int:
    """Create every principal's ACLs with an admin client of ``admin_config`` (bootstrap
    and sign-in of a user allowed to alter ACLs); returns how many bindings were sent."""
    bindings = [b for principal in acl_bindings(prefix).values() for b in principal]
    admin = AdminClient({**admin_config})
    for binding, future in admin.create_acls(bindings, request_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            raise AclError(
                f"Kafka refused the ACL {binding}: {exc.args[0].str()}; sign in as a super "
                "user (the admin of `aipipe up`) or one allowed to alter the cluster's ACLs."
            ) from exc
    return len(bindings)


def ensure_kafka_users(home: Path) -> dict[str, str]:
    """The SASL users of the local Kafka under ``home`` and their passwords: generated
    once and kept in ``<home>/kafka-users.json`` (0600), so restarts keep them."""
    path = home / KAFKA_USERS_FILE
    try:
        users = {str(k): str(v) for k, v in json.loads(path.read_text())["users"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        users = {}
    missing = [name for name in (ADMIN, *PRINCIPALS) if not users.get(name)]
    if missing:
        users.update({name: secrets.token_urlsafe(24) for name in missing})
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            json.dump({"users": users}, out)
        tmp.replace(path)
    return users


def admin_config(bootstrap: str, users: Mapping[str, str],
                 mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
    """A confluent-kafka config signed in as the local broker's ``admin``."""
    return {"bootstrap.servers": bootstrap, "security.protocol": "sasl_plaintext",
            "sasl.mechanism": mechanism, "sasl.username": ADMIN,
            "sasl.password": users[ADMIN]}
