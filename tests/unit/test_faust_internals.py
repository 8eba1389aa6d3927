"""The faust internals the streams rely on are still there, or an upgrade fails loudly here.

``streams/consumer.py`` overrides parts of faust's consumer (and reorders the records
aiokafka's fetcher holds) and ``streams/intake.py``
sets faust's task-local current event (the private ``faust.streams._current_event``);
pyproject pins faust-streaming below 0.16 and the lock to one release of that line
(tests/unit/test_packaging.py). Moving either pin without re-checking fails here.
"""

from __future__ import annotations

import contextvars
import inspect
import weakref
from importlib.metadata import version

import faust.streams
from faust.transport import consumer as base
from faust.transport.drivers import aiokafka as driver
from faust.types import tuples

from aipipe.streams.consumer import SafeSeekConsumer


def test_faust_is_the_line_the_consumer_fixes_were_written_for() -> None:
    assert version("faust-streaming").startswith("0.15."), (
        "faust-streaming changed: re-check streams/consumer.py against its consumer and "
        "Stream._py_aiter, then move the pin in pyproject.toml"
    )


class Marker:
    """Stands for an event: anything a weak reference can point to."""


def test_the_current_event_intake_sets_is_still_faust_s_context_variable() -> None:
    current = getattr(faust.streams, "_current_event", None)
    assert isinstance(current, contextvars.ContextVar), (
        "faust.streams._current_event is gone or changed: streams/intake.py sets it for "
        "every event it hands over; re-check it against faust's Stream before moving the pin"
    )
    assert current.get(None) is None
    # faust's own getter reads what the intake sets there: a weak reference to the event
    event = Marker()
    token = current.set(weakref.ref(event))
    try:
        assert faust.current_event() is event
    finally:
        current.reset(token)


def test_the_overridden_and_used_internals_exist() -> None:
    for name in ("ack", "on_partitions_assigned", "_new_offset", "_is_changelog_tp"):
        assert hasattr(base.Consumer, name), name
    assert hasattr(driver.Consumer, "seek_to_committed")
    assert hasattr(driver.AIOKafkaConsumerThread, "seek_to_beginning")
    slots = tuples.Message.__slots__
    assert "generation_id" in slots and "tracked" in slots
    source = inspect.getsource(base.Consumer.__init__)
    for state in ("_acked", "_acked_index", "_gap", "_read_offset", "_committed_offset"):
        assert f"self.{state} =" in source, state
    assert issubclass(SafeSeekConsumer, driver.Consumer)
    assert hasattr(faust.streams.Stream, "noack")


def test_the_fetch_the_turns_reorder_is_still_aiokafka_s() -> None:
    """``TakingTurnsThread`` wraps faust's ``_fetch_records`` and reorders aiokafka's
    ``Fetcher._records`` (an ordered dict of each partition's fetched records)."""
    from aiokafka.consumer.fetcher import Fetcher

    from aipipe.streams.consumer import TakingTurnsThread

    assert issubclass(TakingTurnsThread, driver.AIOKafkaConsumerThread)
    assert "_new_consumer_thread" in vars(SafeSeekConsumer)
    wrapped = inspect.signature(driver.AIOKafkaConsumerThread._fetch_records).parameters
    assert list(wrapped) == ["self", "consumer", "active_partitions", "timeout", "max_records"]
    assert "fetcher.fetched_records(" in inspect.getsource(
        driver.AIOKafkaConsumerThread._fetch_records)
    assert "self._records = collections.OrderedDict()" in inspect.getsource(Fetcher.__init__)
    assert "for tp in list(self._records.keys())" in inspect.getsource(Fetcher.fetched_records)
