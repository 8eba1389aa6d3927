"""``aipipe result --out DIR``: an output's file name stays in DIR whatever the operation's id
(the emitter's ``event_id``) holds."""

import hashlib
from pathlib import Path

import pytest

from aipipe.cli import file_stem


def test_a_plain_id_is_the_name() -> None:
    assert file_stem("op-2026.12.03_1") == "op-2026.12.03_1"


@pytest.mark.parametrize("operation_id", [
    "../escaped/pwned", "/home/op/x", "..", ".", ".hidden", "a/../../b", "a\\\\..\\\\b", "ä/ö",
    "x" * 300, "con:1", "a\x7fb",
])
def test_any_other_id_is_a_name_within_the_folder(operation_id: str, tmp_path: Path) -> None:
    name = f"{file_stem(operation_id)}-0.png"
    assert "/" not in name and not name.startswith(".") and len(name) < 130
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_ids_that_look_alike_get_different_names() -> None:
    assert len({file_stem(i) for i in ("a/b", "a_b", "a:b", "a/b ")}) == 4
    assert file_stem("a/b") == file_stem("a/b")


def test_a_plain_id_cannot_take_another_ids_name() -> None:
    """An emitter may pick the plain id that an escaped id's name would be."""
    escaped = file_stem("a/b")
    lookalike = f"a_b-{hashlib.sha256(b'a/b').hexdigest()[:12]}"
    assert file_stem(lookalike) == lookalike != escaped
