from aipipe.consumers.sink import Batch


def test_the_token_is_the_offset_ranges_of_the_batch() -> None:
    batch = Batch()
    for partition, offset in [(1, 7), (0, 3), (1, 8), (0, 4), (1, 9)]:
        batch.track("t.completed", partition, offset, now=10.0)
    assert batch.dedup_token() == "t.completed:0:3-4;t.completed:1:7-9"
    assert batch.next_offsets == {("t.completed", 0): 5, ("t.completed", 1): 10}


def test_a_batch_is_due_by_size_or_age_and_never_when_empty() -> None:
    batch = Batch()
    assert not batch.due(max_rows=2, max_seconds=1.0, now=100.0)
    batch.track("t", 0, 0, now=100.0)
    batch.dead += 1
    assert not batch.due(max_rows=2, max_seconds=1.0, now=100.5)
    assert batch.due(max_rows=2, max_seconds=1.0, now=101.0)
    batch.dead += 1
    assert batch.due(max_rows=2, max_seconds=1.0, now=100.1)
