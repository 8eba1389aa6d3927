"""Artifacts: where the outputs of operations (images, video, text) are kept.

A small port (``ArtifactStore``) with two adapters: a local directory (the embedded
default, ``AIPIPE_HOME/artifacts``) and any fsspec filesystem by URL (``s3://``,
``gs://``, ``memory://`` in tests) for servers. See ``store.py``.
"""

from aipipe.streams.artifacts.store import (
    Artifact,
    ArtifactError,
    ArtifactStore,
    FsspecArtifactStore,
    LocalArtifactStore,
    artifact_key,
    store_from_url,
)

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactStore",
    "FsspecArtifactStore",
    "LocalArtifactStore",
    "artifact_key",
    "store_from_url",
]
