from aipipe.consumers.sink import Batch, content_digest


def test_the_token_is_the_offset_ranges_of_the_batch_and_the_digest_of_its_messages() -> None:
    batch = Batch()
    for partition, offset in [(1, 7), (0, 3), (1, 8), (0, 4), (1, 9)]:
        batch.track("t.completed", partition, offset, now=10.0, digest=bytes([offset]))
    assert batch.dedup_token() == "t.completed:0:3-4;t.completed:1:7-9#" + content_digest(
        (("t.completed", p, o), bytes([o])) for p, o in [(0, 3), (0, 4), (1, 7), (1, 8), (1, 9)])
    assert batch.next_offsets == {("t.completed", 0): 5, ("t.completed", 1): 10}


def test_other_messages_at_the_same_offsets_give_another_token() -> None:
    """A topic deleted and created again restarts at offset 0: its first batch must not
    carry the token of the old topic's first batch, or ClickHouse drops it as a retry."""
    def token(digests: list[bytes]) -> str:
        batch = Batch()
        for offset, digest in enumerate(digests):
            batch.track("t.completed", 0, offset, now=0.0, digest=digest)
        return batch.dedup_token()

    old, new = [b"old-0", b"old-1"], [b"new-0", b"new-1"]
    assert token(old) == token(list(old))  # a retry of the same messages
    assert token(old) != token(new)
    assert token(old).split("#")[0] == token(new).split("#")[0] == "t.completed:0:0-1"


def test_a_batch_is_due_by_size_or_age_and_never_when_empty() -> None:
    batch = Batch()
    assert not batch.due(max_rows=2, max_seconds=1.0, now=100.0)
    batch.track("t", 0, 0, now=100.0)
    batch.dead += 1
    assert not batch.due(max_rows=2, max_seconds=1.0, now=100.5)
    assert batch.due(max_rows=2, max_seconds=1.0, now=101.0)
    batch.dead += 1
    assert batch.due(max_rows=2, max_seconds=1.0, now=100.1)
