"""The garbage collector of a process that decodes Kafka records in batches: the workers
(``aipipe run``) and ``aipipe replay``."""

from __future__ import annotations

import gc

#: net allocations between the interpreter's young collections (CPython's default is 700).
#: A worker allocates in bursts: a fetch of up to 500 records is decoded at once, with its
#: events, rows and futures. At 700 a young collection came every few records and moved
#: objects still in flight to the older generations, whose growth then set off full
#: collections of the whole heap (faust, pydantic, pandas, chDB: about a million objects).
#: In a 20,000-request burst that was 1,900-2,000 collections, 10 of them full, and 2.9-3.1 s
#: of the worker's CPU (8 %); at 20,000, 11-12 collections, none full, 0.3 s, for 3 % more
#: peak memory (666 against 644 MB). A replay reads and inserts in batches the same way: it
#: ran 1.16-1.25x as fast at 20,000 (README, Benchmarks).
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect young objects every ``GC_YOUNG_THRESHOLD`` net allocations; the older
    generations keep the interpreter's own thresholds."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
