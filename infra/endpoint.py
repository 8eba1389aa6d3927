"""The read endpoint as other processes find it: ``$AIPIPE_HOME/query-endpoint.json``.

The process that owns the chDB path serves reads (``aipipe.infra.queryserver``) and
publishes its URL, user and password here (0600); readers (admission's budget lookups,
the CLI, the tests) find it here without loading the server or the engine.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

ENDPOINT_FILE = "query-endpoint.json"
#: the ``quota_key`` of admission's budget lookups: they get the endpoint's own slots
ADMISSION_QUOTA_KEY = "aipipe-admission"
#: the header that, with the endpoint's admission key, gives that quota key its slots
ADMISSION_KEY_HEADER = "X-Aipipe-Admission-Key"


@dataclass(frozen=True)
class Endpoint:
    """A running read endpoint as its owner published it."""

    url: str
    user: str
    password: str = field(repr=False)
    chdb_path: str = ""
    # with ``quota_key=ADMISSION_QUOTA_KEY``, puts a lookup in admission's own slots
    # (``ADMISSION_KEY_HEADER``): the quota key alone is any reader's to send
    admission_key: str = field(default="", repr=False)

    def serves(self, chdb_path: Path | str) -> bool:
        return os.path.realpath(str(chdb_path)) == self.chdb_path


def publish_endpoint(home: Path, endpoint: Endpoint) -> None:
    """Write ``<home>/query-endpoint.json`` readable by this user only (0600)."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{ENDPOINT_FILE}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({**asdict(endpoint), "pid": os.getpid()}, out)
    tmp.replace(home / ENDPOINT_FILE)


def withdraw_endpoint(home: Path, url: str) -> None:
    """Remove the endpoint file if it is still ours (another owner may have replaced it)."""
    path = home / ENDPOINT_FILE
    try:
        if json.loads(path.read_text()).get("url") == url:
            path.unlink()
    except (OSError, ValueError):
        pass


def read_endpoint(home: Path, timeout: float = 2.0) -> Endpoint | None:
    """The read endpoint published under ``home``, if it answers ``SELECT 1`` with its
    credentials."""
    try:
        data = json.loads((home / ENDPOINT_FILE).read_text())
        endpoint = Endpoint(str(data["url"]), str(data["user"]), str(data["password"]),
                            str(data.get("chdb_path", "")), str(data.get("admission_key", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    request = urllib.request.Request(
        f"{endpoint.url}/?query={quote('SELECT 1')}",
        headers={"X-ClickHouse-User": endpoint.user, "X-ClickHouse-Key": endpoint.password})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return endpoint if reply.status == 200 and reply.read() == b"1\n" else None
    except (OSError, urllib.error.HTTPError):
        return None


def find_endpoint(home: Path, timeout: float = 2.0) -> str | None:
    """The URL of the running read endpoint under ``home``, if one answers."""
    endpoint = read_endpoint(home, timeout)
    return endpoint.url if endpoint else None


def refuse_other_path(endpoint: Endpoint, chdb_path: Path) -> str:
    """One sentence for a reader whose URL names a path the running endpoint does not serve."""
    return (f"The pipeline running under this AIPIPE_HOME serves {endpoint.chdb_path}, not "
            f"{chdb_path}; point AIPIPE_CLICKHOUSE_URL at the served path or stop that "
            "pipeline to read the other one directly.")

