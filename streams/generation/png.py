"""A small valid PNG without an imaging library: the simulated provider's images.

``solid_png`` draws one colour, picked from ``seed``, so each seed has its own bytes and
the same seed always the same bytes (the store is content-addressed).
"""

from __future__ import annotations

import hashlib
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def solid_png(seed: bytes, width: int = 8, height: int = 8) -> bytes:
    """A ``width`` x ``height`` RGB PNG of one colour derived from ``seed``."""
    rgb = hashlib.sha256(seed).digest()[:3]
    row = b"\x00" + rgb * width  # filter type 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(row * height)) + _chunk(b"IEND", b""))
