"""Limits from settings and the TOML file, reloaded on change with an injected clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aipipe.infra.settings import ConfigError, load_settings
from aipipe.schemas.limits import Limit, LimitError
from aipipe.streams.admission.limits import LimitsSource, limits_from_toml

DEFAULT = Limit(60, 60_000)
FILE = """
[default]
limit = "100/60s"
[clients.acme-1]
limit = "10/60s"
[models."gemini-2.5-flash-image"]
limit = "500/60s"
"""


def test_the_file_overrides_the_default_per_client_and_per_model() -> None:
    limits = limits_from_toml(FILE, DEFAULT, "limits.toml")
    assert limits.for_client("acme-1") == Limit(10, 60_000)
    assert limits.for_client("someone") == Limit(100, 60_000)
    assert limits.for_model("gemini-2.5-flash-image") == Limit(500, 60_000)
    assert limits.for_model("gemini-2.5-flash") is None
    assert limits_from_toml("", DEFAULT, "x").for_client("a") == DEFAULT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[clients.acme-1]\nlimit = "ten"', r"Rate limit \[clients\.acme-1\]\.limit in f\.toml"),
        ('[models."m"]\nlimit = "5/0s"', r'Rate limit \[models\."m"\]\.limit in f\.toml'),
        ("[clients.acme-1]\nrate = 3", r"Entry \[clients\.acme-1\] of f\.toml has 'rate', "
                                       r"which is not one of limit; fix its name"),
        ("[clients.acme-1]", r"Entry \[clients\.acme-1\] of f\.toml has no limit"),
        # misspelt, each would have been ignored: no default, no override, no fallbacks
        ('[defaults]\nlimit = "5/1s"', r"Rate limits file f\.toml has \[defaults\], which is "
                                        r"not one of \[default\]"),
        ('[client.acme-1]\nlimit = "5/1s"', r"has \[client\], which is not one of"),
        ('[models."m"]\nlimit = "5/1s"\nfallback = ["n"]',
         r"Entry \[models\.\"m\"\] of f\.toml has 'fallback', which is not one of fallbacks, "
         r"limit"),
        ('[default]\nlimit = "5/1s"\nburst = 3', r"Entry \[default\] of f\.toml has 'burst'"),
        # past what JSON carries exactly (a decision carries its limit), or Python's int()
        ('[clients.a]\nlimit = "100000000000000000/1s"', r"must be at most 9007199254740991"),
        ('[clients.a]\nlimit = "1/100000000000000d"', r"must be at most 9007199254740991"),
        ('[clients.a]\nlimit = "' + "9" * 5000 + '/1s"', r"must be at most 9007199254740991"),
        ("a = " + "[" * 2000 + "]" * 2000, r"nests too deep to read"),
        ("clients = 3", r"Entry \[clients\] of f\.toml is not a table"),
        ("[default\n", r"Rate limits file f\.toml is not valid TOML"),
    ],
)
def test_a_malformed_entry_is_refused_in_one_sentence(text: str, message: str) -> None:
    with pytest.raises(LimitError, match=message):
        limits_from_toml(text, DEFAULT, "f.toml")


def test_the_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPIPE_RATE_LIMIT", "20/2s")
    assert load_settings().rate_limit == "20/2s"
    monkeypatch.setenv("AIPIPE_RATE_LIMIT", "twenty")
    with pytest.raises(ConfigError, match=r'^AIPIPE_RATE_LIMIT is invalid .*"60/60s"'):
        load_settings()


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str, stamp: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))  # a distinct mtime, however fast the test runs


def test_a_changed_file_applies_within_the_reload_time(tmp_path: Path) -> None:
    path, clock = tmp_path / "limits.toml", Clock()
    _write(path, FILE, 1_000_000_000)
    source = LimitsSource(DEFAULT, path, reload_seconds=2.0, clock=clock)
    assert source.current().for_client("acme-1") == Limit(10, 60_000)
    _write(path, FILE.replace("10/60s", "3/1s"), 2_000_000_000)
    clock.now = 1.9
    assert source.current().for_client("acme-1") == Limit(10, 60_000)  # not looked yet
    clock.now = 2.0
    assert source.current().for_client("acme-1") == Limit(3, 1000)


def test_a_bad_reload_keeps_the_limits_in_force(tmp_path: Path) -> None:
    path, clock = tmp_path / "limits.toml", Clock()
    _write(path, FILE, 1_000_000_000)
    source = LimitsSource(DEFAULT, path, reload_seconds=1.0, clock=clock)
    _write(path, '[clients.acme-1]\nlimit = "lots"', 2_000_000_000)
    clock.now = 5
    assert source.current().for_client("acme-1") == Limit(10, 60_000)
    path.unlink()
    clock.now = 10
    assert source.current().for_client("acme-1") == Limit(10, 60_000)


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    with pytest.raises(LimitError, match="cannot be read"):
        LimitsSource(DEFAULT, path)
    path.write_text('[default]\nlimit = "x"')
    with pytest.raises(LimitError, match=r"\[default\]\.limit"):
        LimitsSource(DEFAULT, path)
