"""pyproject.toml against the tree: every package is listed, every extra a command names
exists, and the lock pins a version that every declared dependency accepts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from aipipe.cli import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "infra" / "requirements.lock"


def installed_name(folder: Path) -> str:
    """The import name of a package folder, through pyproject's package-dir mapping."""
    relative = folder.relative_to(ROOT)
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    # the longest folder prefix wins: infra/app is `aipipe`, infra is `aipipe.infra`
    for name, where in sorted(mapping.items(), key=lambda item: -len(item[1])):
        prefix = Path(where)
        if relative == prefix or prefix in relative.parents:
            rest = relative.relative_to(prefix).parts
            return ".".join((name, *rest))
    raise AssertionError(f"{relative} is under no package-dir of pyproject.toml")


def test_packaging_lists_every_folder_with_an_init() -> None:
    folders = {
        path.parent
        for top in ("schemas", "producers", "streams", "consumers", "infra")
        for path in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    found = {installed_name(folder) for folder in folders}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert sorted(found - listed) == [], "add these to [tool.setuptools] packages"
    assert sorted(listed - found) == [], "listed in pyproject.toml but not in the tree"


def test_packaging_names_only_extras_that_exist() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    assert set(EXTRAS.values()) <= extras
    assert {"workers", "embedded", "report", "all", "dev", "containers"} <= extras


def locked() -> dict[str, list[Version]]:
    pins: dict[str, list[Version]] = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins.setdefault(canonicalize_name(match[1]), []).append(Version(match[2]))
    return pins


def test_packaging_lock_pins_every_declared_dependency_within_its_bounds() -> None:
    project = PYPROJECT["project"]
    declared = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r)
        for group in project["optional-dependencies"].values()
        for r in group
        if not r.startswith("aipipe[")
    ]
    pins = locked()
    problems = [
        f"{req}: locked {pins.get(canonicalize_name(req.name))}"
        for req in declared
        if not pins.get(canonicalize_name(req.name))
        or not all(req.specifier.contains(v) for v in pins[canonicalize_name(req.name)])
    ]
    assert problems == [], "the lock is out of date with pyproject.toml: run `make lock`"
    # every pin carries its hashes (uv checks them on install)
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2])
    assert len(blocks) == sum(len(v) for v in pins.values())
    assert [b.splitlines()[0] for b in blocks if "--hash=sha256:" not in b] == []


def test_packaging_faust_stays_on_the_line_its_internals_were_checked_against() -> None:
    faust = next(
        Requirement(r)
        for r in PYPROJECT["project"]["optional-dependencies"]["workers"]
        if r.startswith("faust-streaming")
    )
    assert str(faust.specifier) == "<0.16,>=0.15.3"
    assert [str(v) for v in locked()["faust-streaming"]] == ["0.15.3"]
