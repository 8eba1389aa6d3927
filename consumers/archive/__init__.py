"""The raw event archive: every message of every pipeline topic in ``events_archive``.

``ArchiveSink`` runs next to the cost sink, in the process that owns ClickHouse, with the
same order per batch (read, insert with a deterministic deduplication token, then commit
the offsets) and the same fault points; only the mapping differs: any message becomes a
row (``archive_row``), and nothing is dead-lettered (the stages that own each topic do that).
"""

from aipipe.consumers.archive.sink import ArchiveRow, ArchiveSink, ArchiveStore, archive_row

__all__ = ["ArchiveRow", "ArchiveSink", "ArchiveStore", "archive_row"]
