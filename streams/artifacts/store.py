"""The artifact store: content-addressed bytes with their MIME type.

Every output is stored under the SHA-256 of its bytes::

    <root>/sha256/<first two hex digits>/<sha256 hex><extension of the MIME type>

so storing the same bytes again (an operation re-run after a crash, the same image twice)
finds the object already there and returns the same URI: a re-run never stores a second
copy under a new name. The local adapter writes to a temporary file in the target
directory and renames it into place, so a reader never sees half an object. It does not
flush each object to the disk unless told to (``sync``, ``AIPIPE_ARTIFACT_FSYNC``): that
took the store from 3,200 to 770 objects a second here, and the pipeline's other stores
(Kafka, ClickHouse) leave flushing to the system too. So after a power loss an object may
be cut short: a file at an object's path whose size is not the bytes' is written again
when they are stored again, and ``get`` refuses an object whose bytes no longer match its
name. Object stores (s3, gcs) make a PUT visible whole by themselves.

``get`` reads only what its own store holds: a URI outside the store's root is refused,
so a URI taken from an event cannot make a worker or the CLI read another file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from aipipe.schemas.errors import AipipeError

EXTENSIONS = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
    "video/mp4": ".mp4", "text/plain": ".txt", "application/json": ".json",
}
WRITERS = 8  # threads of a store (local or fsspec) that write and hash outputs at once
#: outputs from this size up are hashed off the event loop, with their write: SHA-256 runs at
#: about 0.5-1 GB/s here, so a 2 MB image held the loop (and every operation in flight) for
#: milliseconds, and a video of tens of MB for tens
HASH_ON_LOOP_BYTES = 64 * 1024


def digest_on_loop(data: bytes) -> str | None:
    """The SHA-256 of a small output, at once; None for a large one (hash it in a thread)."""
    return hashlib.sha256(data).hexdigest() if len(data) < HASH_ON_LOOP_BYTES else None


class ArtifactError(AipipeError):
    """An artifact could not be stored or read; the message names the URI and the fix."""


@dataclass(frozen=True)
class Artifact:
    uri: str
    mime_type: str
    size: int
    sha256: str


def artifact_key(sha256: str, mime_type: str) -> str:
    """The path of an object below the store's root."""
    base = mime_type.split(";")[0].strip().lower()
    return f"sha256/{sha256[:2]}/{sha256}{EXTENSIONS.get(base, '.bin')}"


class ArtifactStore(Protocol):
    async def put(self, data: bytes, mime_type: str) -> Artifact: ...

    async def get(self, uri: str) -> bytes: ...


_SHA256 = re.compile(r"[0-9a-f]{64}")  # an object's file name, less its extension


class LocalArtifactStore:
    """A directory on this machine; URIs are ``file://`` URLs of absolute paths."""

    def __init__(self, root: Path, sync: bool = False) -> None:
        """``sync``: flush each object (and its directory) to the disk before it counts."""
        self.root = root.expanduser().resolve()
        self.sync = sync
        self._made: set[Path] = set()  # directories known to exist
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="aipipe-artifacts")

    def __repr__(self) -> str:
        return f"LocalArtifactStore({str(self.root)!r})"

    def _write(self, path: Path, data: bytes) -> None:
        if _holds(path, len(data)):
            return
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                if self.sync:  # the bytes on the disk before the name points at them
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.sync:
            _sync_directory(path.parent)

    def _store(self, data: bytes, mime_type: str, digest: str | None) -> str:
        digest = digest or hashlib.sha256(data).hexdigest()
        self._write(self.root / artifact_key(digest, mime_type), data)
        return digest

    async def put(self, data: bytes, mime_type: str) -> Artifact:
        digest = digest_on_loop(data)
        try:  # creating a file costs the kernel ~0.5 ms: not on the event loop
            if digest is None or not _holds(self.root / artifact_key(digest, mime_type),
                                            len(data)):
                digest = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._store, data, mime_type, digest)
        except OSError as exc:
            raise ArtifactError(
                f"Cannot store an artifact under {self.root} ({exc.strerror}); make the "
                "directory writable or set AIPIPE_ARTIFACT_URL."
            ) from exc
        path = self.root / artifact_key(digest, mime_type)
        return Artifact(path.as_uri(), mime_type, len(data), digest)

    def _path(self, uri: str) -> Path:
        parsed = urlparse(uri)
        path = Path(unquote(parsed.path)).resolve()
        if parsed.scheme != "file" or not path.is_relative_to(self.root):
            raise ArtifactError(f"{uri} is not in the artifact store {self.root.as_uri()}.")
        return path

    async def get(self, uri: str) -> bytes:
        path = self._path(uri)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise ArtifactError(f"Cannot read {uri} ({exc.strerror}).") from exc
        if _SHA256.fullmatch(path.stem) and hashlib.sha256(data).hexdigest() != path.stem:
            raise ArtifactError(
                f"{uri} is damaged: its bytes no longer match its name (a power loss may have "
                "cut it short); store the output again, e.g. by re-running the operation.")
        return data


def _holds(path: Path, size: int) -> bool:
    """``path`` is a file of ``size`` bytes: at a content address, the object (a file a
    power loss cut short or left empty is not, and is written again)."""
    try:
        return path.stat().st_size == size
    except (FileNotFoundError, NotADirectoryError):
        return False


def _sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (the rename) to the disk: best effort, as some systems
    and filesystems refuse to open or sync a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FsspecArtifactStore:
    """Any fsspec filesystem by URL: ``s3://bucket/prefix``, ``gs://…``, ``memory://…``.

    s3 and gcs need their fsspec packages (``s3fs``, ``gcsfs``) and take credentials the
    way those packages do (environment, instance roles); ``options`` go to the filesystem.
    """

    def __init__(self, url: str, **options: Any) -> None:
        from fsspec.core import url_to_fs

        try:
            self.fs, root = url_to_fs(url.rstrip("/"), **options)
        except (ImportError, ValueError) as exc:
            raise ArtifactError(
                f"AIPIPE_ARTIFACT_URL {url} cannot be opened ({exc}); install the fsspec "
                "package for its scheme (s3fs, gcsfs) or fix the URL."
            ) from exc
        self.root = root.rstrip("/")
        self.url = self.fs.unstrip_protocol(self.root)
        # its own threads: uploads slow to a bucket must not queue ahead of the work the
        # loop's default executor does for others (admission's budget lookups)
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="aipipe-artifacts")

    def __repr__(self) -> str:
        return f"FsspecArtifactStore({self.url!r})"

    def _put(self, data: bytes, mime_type: str, digest: str | None) -> tuple[str, str]:
        digest = digest or hashlib.sha256(data).hexdigest()
        path = f"{self.root}/{artifact_key(digest, mime_type)}"
        if not self.fs.exists(path):
            self.fs.pipe_file(path, data)
        return digest, path

    async def put(self, data: bytes, mime_type: str) -> Artifact:
        try:
            digest, path = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._put, data, mime_type, digest_on_loop(data))
        except OSError as exc:
            raise ArtifactError(f"Cannot store an artifact in {self.url} ({exc}).") from exc
        return Artifact(self.fs.unstrip_protocol(path), mime_type, len(data), digest)

    async def get(self, uri: str) -> bytes:
        if not uri.startswith(self.url + "/") or "/../" in uri:
            raise ArtifactError(f"{uri} is not in the artifact store {self.url}.")
        path = self.fs._strip_protocol(uri)
        try:
            data: bytes = await asyncio.to_thread(self.fs.cat_file, path)
        except (OSError, KeyError) as exc:
            raise ArtifactError(f"Cannot read {uri} ({exc}).") from exc
        return data


def store_from_url(url: str, home: Path, sync: bool = False) -> ArtifactStore:
    """The store ``url`` names (``AIPIPE_ARTIFACT_URL``); empty: ``home/artifacts``.
    ``sync``: a local directory flushes each object to the disk (``AIPIPE_ARTIFACT_FSYNC``)."""
    if not url:
        return LocalArtifactStore(home / "artifacts", sync)
    if url.startswith("file://"):
        return LocalArtifactStore(Path(unquote(urlparse(url).path)), sync)
    return FsspecArtifactStore(url)
