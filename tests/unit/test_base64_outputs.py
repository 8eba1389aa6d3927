"""A provider's base64 output (OpenAI's ``b64_json``) is decoded without holding the event
loop: large ones in a thread, in slices between which the loop gets its turn."""

import asyncio
import base64
import os
import threading

import pytest

from aipipe.streams.generation import provider
from aipipe.streams.generation.provider import B64_SLICE, decode_b64, decoded_b64


@pytest.mark.parametrize("size", [0, 1, 2, 3, B64_SLICE // 4 * 3 - 1, B64_SLICE // 4 * 3,
                                  B64_SLICE // 4 * 3 + 1, 3 * B64_SLICE + 7])
def test_slices_decode_to_the_same_bytes(size: int) -> None:
    data = os.urandom(size)
    text = base64.b64encode(data).decode()
    assert decode_b64(text) == data
    assert decode_b64(base64.encodebytes(data).decode()) == data  # wrapped at 76 characters
    assert asyncio.run(decoded_b64(text)) == data


def test_a_large_output_is_decoded_in_a_thread_slice_by_slice(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, bool]] = []
    b64decode = base64.b64decode

    def watched(text: str) -> bytes:
        calls.append((len(text), threading.current_thread() is threading.main_thread()))
        return b64decode(text)

    monkeypatch.setattr(provider.base64, "b64decode", watched)
    image = os.urandom(2 * 1024 * 1024)  # a 2 MB PNG's size
    assert asyncio.run(decoded_b64(base64.b64encode(image).decode())) == image
    assert len(calls) > 1 and all(length <= B64_SLICE for length, _ in calls)
    assert not any(on_main for _, on_main in calls)
    calls.clear()
    assert asyncio.run(decoded_b64(base64.b64encode(b"small").decode())) == b"small"
    assert calls == [(8, True)]
