"""The read endpoint's own decisions against hostile input, without an engine or a network:
which settings a client may send, when a query's time is up, and how a running query
watches its client's socket.

The end-to-end versions (a real endpoint on chDB) are in
tests/integration/test_queryserver_hostile.py.
"""

from __future__ import annotations

import fcntl
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from aipipe.infra.queryserver import Deadline, Limits, QueryError, _watch, effective_settings

# what the engine reports in force (system.settings) for the names below
IN_FORCE = {
    "format_template_resultset": "", "format_template_row": "", "format_schema": "",
    "output_format_schema": "", "format_avro_schema_registry_url": "",
    "format_display_secrets_in_show_and_select": "0", "allow_experimental_analyzer": "1",
    "allow_suspicious_low_cardinality_types": "0", "enable_analyzer": "1",
    "format_csv_delimiter": ",", "output_format_json_quote_64bit_integers": "0",
    "format_template_row_format": "", "max_threads": "2",
}


@pytest.mark.parametrize(("name", "value"), [
    ("format_template_resultset", "/etc/passwd"),  # the engine reads the file, and quotes it
    ("format_template_row", "/etc/passwd"),
    ("format_schema", "/etc/passwd:Message"),
    ("output_format_schema", "/tmp/written-by-the-engine.capnp"),
    ("format_avro_schema_registry_url", "http://127.0.0.1:9/"),
    ("format_display_secrets_in_show_and_select", "1"),
    ("allow_suspicious_low_cardinality_types", "1"),  # not output: no longer by prefix
])
def test_settings_that_are_not_plain_output_shape_are_refused(name: str, value: str) -> None:
    with pytest.raises(QueryError) as refused:
        effective_settings(Limits(), {name: value}, IN_FORCE)

    assert refused.value.code == 164
    assert str(refused.value) == f"Cannot modify '{name}' setting in readonly mode."


def test_output_settings_pass_by_name() -> None:
    asked = {"format_csv_delimiter": ";", "output_format_json_quote_64bit_integers": "1",
             "format_template_row_format": "<${x:Raw}>"}

    settings = effective_settings(Limits(), asked, IN_FORCE)

    assert {name: settings[name] for name in asked} == asked


def test_a_setting_asked_at_its_value_in_force_is_accepted_and_not_passed() -> None:
    settings = effective_settings(Limits(), {"format_template_row": "", "enable_analyzer": "1"},
                                  IN_FORCE)

    assert "format_template_row" not in settings and "enable_analyzer" not in settings


def test_an_unknown_setting_is_code_115_even_if_allowed_by_name() -> None:
    with pytest.raises(QueryError) as refused:
        effective_settings(Limits(), {"output_format_pretty_max_rows": "5"}, IN_FORCE)

    assert refused.value.code == 115


def test_a_deadline_past_is_timeout_exceeded() -> None:
    assert Deadline.after(0) is None  # 0: unlimited, as in ClickHouse
    assert Deadline.after(60) is not None
    past = Deadline(2.0, time.monotonic() - 0.5)

    with pytest.raises(QueryError) as late:
        past.check()

    assert late.value.code == 159
    assert "maximum: 2, the time the client took to read the result included" in str(late.value)


@pytest.fixture
def high_socket() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket whose descriptor is past 1023 (what select() cannot watch)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"the descriptor limit ({hard}) is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    ours, peer = socket.socketpair()
    high = socket.socket(fileno=fcntl.fcntl(ours.fileno(), fcntl.F_DUPFD, 1100))
    ours.close()
    try:
        yield high, peer
    finally:
        high.close()
        peer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_on_a_descriptor_past_1023_is_not_taken_for_gone(
    high_socket: tuple[socket.socket, socket.socket],
) -> None:
    high, peer = high_socket
    assert high.fileno() >= 1024
    called = threading.Event()

    with _watch(high, called.set) as gone:
        assert not called.wait(1.0)  # a few rounds of the watch: the client is still there
        assert not gone.is_set()
        peer.close()  # now it goes
        assert called.wait(5.0)
    assert gone.is_set()
