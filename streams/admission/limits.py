"""Which rate limits apply: a default for every client, overrides per client and per model.

The default comes from ``AIPIPE_RATE_LIMIT``; ``AIPIPE_RATE_LIMITS_FILE`` names a TOML file
whose ``[default] limit`` replaces it and whose ``[clients.<id>]`` and
``[models."<model>"]`` tables override it::

    [default]
    limit = "60/60s"
    [clients.acme-1]
    limit = "10/60s"
    [models."gemini-2.5-flash-image"]
    limit = "500/60s"

A model without an entry has no model limit. A model's entry may also list fallbacks, the
models generation runs an operation on while this model's circuit breaker is open (the
first whose breaker is closed; ``provider/model``, or a bare model of the same provider);
such an entry needs no limit::

    [models."gpt-image-1"]
    limit = "100/60s"
    fallbacks = ["openai/dall-e-3", "stability/stable-image-core"]
 ``LimitsSource`` looks at the file's
modification time at most every ``reload_seconds`` and re-reads it when it changed, so a
change applies to decisions within that time, without a restart. A malformed file is
refused with one sentence naming the entry: at start that is an error; on a reload the
previous limits stay in force and the sentence is logged.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from aipipe.schemas.limits import Limit, LimitError, parse_limit

log = structlog.get_logger("aipipe.admission.limits")


@dataclass(frozen=True)
class Limits:
    default: Limit
    clients: Mapping[str, Limit] = field(default_factory=dict)
    models: Mapping[str, Limit] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def for_client(self, client_id: str) -> Limit:
        return self.clients.get(client_id, self.default)

    def for_model(self, model: str) -> Limit | None:
        return self.models.get(model)

    def fallbacks_for(self, provider: str, model: str) -> tuple[tuple[str, str], ...]:
        """The ``(provider, model)`` pairs to try, in order, while ``model`` is down."""
        routes = []
        for entry in self.fallbacks.get(model, ()):
            other, _, name = entry.rpartition("/")
            routes.append((other or provider, name))
        return tuple(routes)


MAX_FALLBACKS = 8
TOP_LEVEL = frozenset({"default", "clients", "models"})
LIMIT_KEYS, MODEL_KEYS = frozenset({"limit"}), frozenset({"limit", "fallbacks"})


def _fallbacks(section: object, entry: str, model: str, source: str) -> tuple[str, ...]:
    value = section.get("fallbacks", []) if isinstance(section, dict) else []
    if (not isinstance(value, list) or len(value) > MAX_FALLBACKS
            or not all(isinstance(v, str) and v.strip("/") and v.count("/") <= 1
                       and v.rpartition("/")[2] for v in value)):
        raise LimitError(
            f"Entry {entry}.fallbacks of {source} must be a list of at most {MAX_FALLBACKS} "
            'models such as ["openai/dall-e-3", "gemini-2.5-flash-image"]; fix it.'
        )
    if any(v.rpartition("/")[2] == model and "/" not in v for v in value):
        raise LimitError(f"Entry {entry}.fallbacks of {source} names the model itself; "
                         "remove it.")
    return tuple(value)


def limits_from_toml(text: str, default: Limit, source: str) -> Limits:
    """Parse the limits file's text; ``LimitError`` names the bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LimitError(f"Rate limits file {source} is not valid TOML ({exc}); fix it.") from None
    except RecursionError:
        raise LimitError(f"Rate limits file {source} nests too deep to read; it needs only "
                         "[default], [clients.<id>] and [models.\"<model>\"] tables.") from None
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise LimitError(
            f"Rate limits file {source} has [{str(unknown[0])[:100]}], which is not one of "
            "[default], [clients.<id>] or [models.\"<model>\"]; fix its name.")

    def table(name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise LimitError(
                f"Entry [{name}] of {source} is not a table; write it as [{name}.<name>] "
                'sections with limit = "COUNT/WINDOW".'
            )
        return value

    def known_keys(section: object, entry: str, keys: frozenset[str]) -> None:
        extra = sorted(set(section) - keys) if isinstance(section, dict) else []
        if extra:
            raise LimitError(
                f"Entry {entry} of {source} has {str(extra[0])[:100]!r}, which is not one of "
                f"{', '.join(sorted(keys))}; fix its name.")

    def limit_of(section: object, entry: str, keys: frozenset[str] = LIMIT_KEYS) -> Limit:
        known_keys(section, entry, keys)
        if not isinstance(section, dict) or "limit" not in section:
            raise LimitError(
                f"Entry {entry} of {source} has no limit; add limit = \"COUNT/WINDOW\", "
                'e.g. "60/60s".'
            )
        return parse_limit(section["limit"], f"{entry}.limit in {source}")

    base = limit_of(data["default"], "[default]") if "default" in data else default
    models = table("models")
    for name, section in models.items():  # (one with fallbacks only has no limit_of)
        known_keys(section, f'[models."{name}"]', MODEL_KEYS)
    fallbacks = {name: _fallbacks(s, f'[models."{name}"]', name, source)
                 for name, s in models.items()}
    return Limits(
        default=base,
        clients={name: limit_of(s, f"[clients.{name}]") for name, s in table("clients").items()},
        models={name: limit_of(s, f'[models."{name}"]', MODEL_KEYS)
                for name, s in models.items()
                if not (isinstance(s, dict) and "limit" not in s and fallbacks[name])},
        fallbacks={name: routes for name, routes in fallbacks.items() if routes},
    )


class LimitsSource:
    """The limits in force, re-read from the file when it changed (checked every
    ``reload_seconds``)."""

    def __init__(
        self,
        default: Limit,
        path: Path | None = None,
        reload_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = default
        self.path = path
        self.reload_seconds = reload_seconds
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._checked = clock()
        self.limits = Limits(default)
        if path is not None:
            self._load(strict=True)

    def current(self) -> Limits:
        if self.path is not None and self.clock() - self._checked >= self.reload_seconds:
            self._load(strict=False)
        return self.limits

    def _load(self, strict: bool) -> None:
        assert self.path is not None
        self._checked = self.clock()
        try:
            stat = self.path.stat()
        except OSError as exc:
            if strict:
                raise LimitError(
                    f"Rate limits file {self.path} cannot be read ({exc.strerror}); create it "
                    "or unset AIPIPE_RATE_LIMITS_FILE."
                ) from None
            return  # keep the limits in force while the file is being replaced
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            limits = limits_from_toml(self.path.read_text(), self.base, str(self.path))
        except Exception as exc:  # (any file an operator can write: the worker goes on)
            if strict:
                raise
            self._stamp = stamp
            log.error("rate_limits_refused", error=str(exc)[:1000], kept="the previous limits",
                      error_type=type(exc).__name__)
            return
        self._stamp, self.limits = stamp, limits
        log.info("rate_limits_loaded", path=str(self.path), default=str(limits.default),
                 clients=len(limits.clients), models=len(limits.models))
