"""Rate limits as operators write them: ``COUNT/WINDOW`` (``"60/60s"``).

The one format of ``AIPIPE_RATE_LIMIT``, the rate limits file and the pipeline's own
defaults, parsed here so that the settings check it at load and the sliding window
(``aipipe.streams.admission.window``) counts with it. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aipipe.schemas.errors import AipipeError
from aipipe.schemas.events import MAX_INT  # (a decision's event carries its limit)

US_PER_MS = 1000
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(ms|s|m|h|d)\s*$")


class LimitError(AipipeError):
    """A rate limit that cannot be parsed; the message names the entry and the fix."""


@dataclass(frozen=True, slots=True)
class Limit:
    """``count`` admissions per ``window_ms`` milliseconds."""

    count: int
    window_ms: int

    @property
    def window_us(self) -> int:
        return self.window_ms * US_PER_MS

    def __str__(self) -> str:
        for unit in ("d", "h", "m", "s"):
            if self.window_ms % _UNITS_MS[unit] == 0:
                return f"{self.count}/{self.window_ms // _UNITS_MS[unit]}{unit}"
        return f"{self.count}/{self.window_ms}ms"


def parse_limit(text: object, entry: str) -> Limit:
    """``"60/60s"`` (units ms, s, m, h, d; ``"10/m"`` is 10 per minute) as a ``Limit``.

    ``entry`` names where the text came from, for the one-sentence error.
    """
    match = _LIMIT.match(text) if isinstance(text, str) else None
    if match is None:
        raise LimitError(
            f"Rate limit {entry} is {text!r}, which is not COUNT/WINDOW; write it like "
            '"60/60s" (window units ms, s, m, h or d).'
        )
    if len(match[1]) > 16 or len(match[2]) > 16 or (
            int(match[1]) > MAX_INT or int(match[2] or 1) * _UNITS_MS[match[3]] > MAX_INT):
        raise LimitError(
            f"Rate limit {entry} is {str(text)[:60]!r}; the count and the window (in ms) "
            f"must be at most {MAX_INT} (2^53 - 1), e.g. \"1000000/1s\" for a high limit."
        )
    count, amount, unit = int(match[1]), int(match[2] or 1), match[3]
    if count < 1 or amount < 1:
        raise LimitError(
            f"Rate limit {entry} is {text!r}; the count and the window must both be at "
            'least 1, e.g. "60/60s".'
        )
    return Limit(count, amount * _UNITS_MS[unit])
