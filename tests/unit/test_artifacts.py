"""One contract for every artifact store: the local directory and fsspec (``memory://``)."""

import asyncio
import hashlib
import os
import stat
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from aipipe.streams.artifacts import store as artifacts
from aipipe.streams.artifacts.store import (
    ArtifactError,
    ArtifactStore,
    FsspecArtifactStore,
    LocalArtifactStore,
    store_from_url,
)
from aipipe.streams.generation.png import solid_png

PNG = solid_png(b"contract")


def local(tmp_path: Path) -> ArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def memory(tmp_path: Path) -> ArtifactStore:
    return FsspecArtifactStore(f"memory://aipipe-test/{uuid.uuid4().hex}")


STORES = [pytest.param(local, id="local"), pytest.param(memory, id="fsspec-memory")]
Factory = Callable[[Path], ArtifactStore]


@pytest.mark.parametrize("make", STORES)
def test_put_returns_what_get_reads_back_by_its_sha256(make: Factory, tmp_path: Path) -> None:
    store = make(tmp_path)
    artifact = asyncio.run(store.put(PNG, "image/png"))
    assert (artifact.mime_type, artifact.size) == ("image/png", len(PNG))
    assert artifact.sha256 == hashlib.sha256(PNG).hexdigest()
    assert artifact.uri.endswith(f"/sha256/{artifact.sha256[:2]}/{artifact.sha256}.png")
    assert asyncio.run(store.get(artifact.uri)) == PNG


@pytest.mark.parametrize("make", STORES)
def test_the_same_bytes_are_stored_once_under_the_same_uri(
    make: Factory, tmp_path: Path
) -> None:
    store = make(tmp_path)

    async def twice() -> tuple[str, str, str]:
        first = await store.put(PNG, "image/png")
        again = await store.put(PNG, "image/png")
        other = await store.put(b"hello\n", "text/plain")
        return first.uri, again.uri, other.uri

    first, again, other = asyncio.run(twice())
    assert first == again != other
    assert other.endswith(".txt")


@pytest.mark.parametrize("make", STORES)
def test_a_uri_outside_the_store_is_refused(make: Factory, tmp_path: Path) -> None:
    store = make(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an artifact")
    artifact = asyncio.run(store.put(PNG, "image/png"))
    outside = [secret.as_uri(), "memory://elsewhere/x.png",
               artifact.uri.rsplit("/sha256/", 1)[0] + "/../../secret.txt"]
    for uri in outside:
        with pytest.raises(ArtifactError, match="is not in the artifact store"):
            asyncio.run(store.get(uri))


@pytest.mark.parametrize("make", STORES)
def test_a_missing_object_is_an_artifact_error(make: Factory, tmp_path: Path) -> None:
    store = make(tmp_path)
    artifact = asyncio.run(store.put(PNG, "image/png"))
    missing = artifact.uri.replace(artifact.sha256, "0" * 64)
    with pytest.raises(ArtifactError, match="Cannot read"):
        asyncio.run(store.get(missing))


@pytest.mark.parametrize("make", STORES)
def test_a_large_output_is_hashed_off_the_event_loop_and_a_small_one_on_it(
    make: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A video of tens of MB takes tens of ms to hash: on the loop, that would hold every
    operation in flight."""
    store = make(tmp_path)
    hashed_on: list[tuple[int, bool]] = []
    sha256 = hashlib.sha256

    def watched(data: bytes) -> Any:
        hashed_on.append((len(data), threading.current_thread() is threading.main_thread()))
        return sha256(data)

    monkeypatch.setattr(artifacts.hashlib, "sha256", watched)
    big = bytes(range(256)) * (artifacts.HASH_ON_LOOP_BYTES // 256)
    stored = [asyncio.run(store.put(data, "image/png")) for data in (big, PNG)]
    assert hashed_on == [(len(big), False), (len(PNG), True)]
    assert [a.sha256 for a in stored] == [sha256(big).hexdigest(), sha256(PNG).hexdigest()]
    assert [asyncio.run(store.get(a.uri)) for a in stored] == [big, PNG]


@pytest.mark.parametrize("make", STORES)
def test_a_store_writes_with_its_own_threads_not_the_loops_default_executor(
    make: Factory, tmp_path: Path
) -> None:
    """The default executor runs admission's budget lookups: a slow bucket must not hold
    them, nor they the outputs."""
    store = make(tmp_path)

    async def go() -> str:
        loop = asyncio.get_running_loop()
        busy = ThreadPoolExecutor(1)
        loop.set_default_executor(busy)
        release = threading.Event()
        held = loop.run_in_executor(None, release.wait, 60)  # the default executor, taken
        try:
            big = bytes(range(256)) * (artifacts.HASH_ON_LOOP_BYTES // 256)
            stored = await asyncio.wait_for(store.put(big, "image/png"), 30)
            return stored.sha256
        finally:
            release.set()
            await held

    assert asyncio.run(go()) == hashlib.sha256(
        bytes(range(256)) * (artifacts.HASH_ON_LOOP_BYTES // 256)).hexdigest()


def test_the_local_store_leaves_no_temporary_files_and_no_second_copy(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    big = bytes(range(256)) * 2048
    for _ in range(3):
        asyncio.run(store.put(big, "application/octet-stream"))
        asyncio.run(store.put(PNG, "image/png"))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                   if p.is_file())
    digest_big, digest_png = (hashlib.sha256(b).hexdigest() for b in (big, PNG))
    assert files == sorted([f"sha256/{digest_big[:2]}/{digest_big}.bin",
                            f"sha256/{digest_png[:2]}/{digest_png}.png"])


BIG = bytes(range(256)) * (artifacts.HASH_ON_LOOP_BYTES // 256)  # hashed off the loop


@pytest.mark.parametrize("data", [PNG, BIG], ids=["small", "large"])
@pytest.mark.parametrize("left", [b"", PNG[:10]], ids=["empty", "cut-short"])
def test_a_file_cut_short_at_the_objects_path_is_written_again(
    tmp_path: Path, data: bytes, left: bytes
) -> None:
    """What a power loss between the write and the disk leaves: the name, with fewer bytes.
    ``put`` found a file there and trusted it, so the object stayed broken for good."""
    store = LocalArtifactStore(tmp_path)
    path = tmp_path / artifacts.artifact_key(hashlib.sha256(data).hexdigest(), "image/png")
    path.parent.mkdir(parents=True)
    path.write_bytes(left)
    artifact = asyncio.run(store.put(data, "image/png"))
    assert artifact.uri == path.as_uri() and path.read_bytes() == data
    assert asyncio.run(store.get(artifact.uri)) == data


def test_a_syncing_store_flushes_the_bytes_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``AIPIPE_ARTIFACT_FSYNC``: without an fsync, the rename could reach the disk
    before the bytes, and after a power loss the object's name held an empty or cut file.
    Without the setting nothing is flushed (the system does it in its own time)."""
    steps: list[str] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        steps.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else
                     f"fsync file of {os.fstat(fd).st_size} bytes")
        fsync(fd)

    def renamed(source: Any, target: Any) -> None:
        steps.append("rename")
        replace(source, target)

    monkeypatch.setattr(artifacts.os, "fsync", synced)
    monkeypatch.setattr(artifacts.os, "replace", renamed)
    asyncio.run(LocalArtifactStore(tmp_path / "a", sync=True).put(PNG, "image/png"))
    assert steps == [f"fsync file of {len(PNG)} bytes", "rename", "fsync directory"]
    steps.clear()
    asyncio.run(LocalArtifactStore(tmp_path / "b").put(PNG, "image/png"))
    assert steps == ["rename"]


def test_an_object_whose_bytes_no_longer_match_its_name_is_refused(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    stored = asyncio.run(store.put(PNG, "image/png"))
    path = Path(stored.uri.removeprefix("file://"))
    path.write_bytes(PNG[:-1] + b"\x00")  # the same size, other bytes
    with pytest.raises(ArtifactError, match="is damaged: its bytes no longer match its name"):
        asyncio.run(store.get(stored.uri))


def test_the_url_setting_picks_the_adapter(tmp_path: Path) -> None:
    default = store_from_url("", tmp_path)
    assert isinstance(default, LocalArtifactStore) and default.root == tmp_path / "artifacts"
    explicit = store_from_url((tmp_path / "elsewhere").as_uri(), tmp_path)
    assert isinstance(explicit, LocalArtifactStore)
    assert explicit.root == tmp_path / "elsewhere"
    assert isinstance(store_from_url("memory://bucket/prefix", tmp_path), FsspecArtifactStore)
    with pytest.raises(ArtifactError, match="AIPIPE_ARTIFACT_URL nosuch://b"):
        store_from_url("nosuch://b/p", tmp_path)


def test_text_travels_inline_up_to_4_kib_and_odd_mime_types_are_octet_streams(
    tmp_path: Path,
) -> None:
    from aipipe.schemas.events import INLINE_TEXT_BYTES
    from aipipe.streams.generation.outputs import record, store_output
    from aipipe.streams.generation.provider import ProviderOutput

    store = LocalArtifactStore(tmp_path)
    at_limit = "é" * (INLINE_TEXT_BYTES // 2)  # 4096 bytes in UTF-8
    over = at_limit + "!"

    def recorded(data: bytes, mime: str) -> Any:
        return record(asyncio.run(store_output(ProviderOutput(mime, data=data), store)))

    assert recorded(at_limit.encode(), "text/plain; charset=utf-8").text == at_limit
    long = recorded(over.encode(), "text/plain")
    assert long.text is None and long.size == INLINE_TEXT_BYTES + 1
    assert asyncio.run(store.get(long.uri)) == over.encode()
    odd = recorded(b"\x00\x01", "Not A Type")
    assert odd.mime_type == "application/octet-stream" and odd.uri.endswith(".bin")
    assert record(ProviderOutput("image/png", data=b"unstored")) is None
