"""One contract for every cost store, run against the in-memory store and against the real
ClickHouse engine (chDB, in-process), plus what only ClickHouse can show.

chDB allows one engine path per process, so the whole session shares one path
(``<basetemp>/chdb``) and each test gets a database of its own inside it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.rows import COLUMNS, CostRow
from aipipe.consumers.costs.store import (
    Bucket,
    ClickHouseCostStore,
    CostStore,
    MemoryCostStore,
    StoreError,
)
from tests.support.rows import T0
from tests.support.rows import cost_row as row

MS = timedelta(milliseconds=1)


def fresh_database() -> str:
    return f"costs_{uuid.uuid4().hex[:12]}"


def expected_totals(rows: Sequence[CostRow]) -> dict[str, tuple[int, Decimal]]:
    last = {(r.client_id, r.operation_id): r for r in rows}
    out: dict[str, tuple[int, Decimal]] = {}
    for r in last.values():
        count, total = out.get(r.client_id, (0, Decimal(0)))
        out[r.client_id] = (count + 1, total + r.cost_usd)
    return out


class CostStoreContract:
    """What every ``CostStore`` promises; subclasses say how to make one."""

    def make_store(self) -> CostStore:
        raise NotImplementedError

    def test_totals_are_exact_to_the_nano_dollar(self) -> None:
        store = self.make_store()
        rng = random.Random(7)
        rows = [
            row(
                f"op-{i}",
                Decimal(rng.randrange(0, 10**12)).scaleb(-9),
                client_id=f"client-{i % 5}",
                created_at=T0 + timedelta(minutes=i),
                offset=i,
            )
            for i in range(3000)
        ]
        for n, start in enumerate(range(0, len(rows), 500)):
            store.write(rows[start : start + 500], dedup_token=f"t:0:{n}")

        totals = store.totals()

        assert totals == expected_totals(rows)
        assert sum(count for count, _ in totals.values()) == 3000
        assert all(cost.as_tuple().exponent == -9 for _, cost in totals.values())

    def test_an_operation_written_twice_counts_once_and_the_last_write_wins(self) -> None:
        store = self.make_store()
        first = row("op-1", "1.000000001", created_at=T0 + timedelta(hours=1))
        again = replace(
            first,
            event_id="evt-other",
            cost_usd=Decimal("2.5"),
            created_at=T0 + timedelta(days=3),
            kafka_offset=99,
        )
        store.write([first, row("op-2", "0.5")], dedup_token="t:0:0-1")
        store.write([again], dedup_token="t:0:99-99")

        assert store.totals() == {"acme": (2, Decimal("3.000000000"))}
        day_one = store.summary("acme", T0, T0 + timedelta(days=1))
        assert (day_one.operation_count, day_one.total_cost_usd) == (1, Decimal("0.5"))
        assert store.spend("acme", T0 + timedelta(days=3), T0 + timedelta(days=4)) == Decimal("2.5")

    def test_duplicates_inside_one_batch_count_once(self) -> None:
        store = self.make_store()
        store.write([row("op-1", "1"), row("op-1", "1"), row("op-2", "2")], dedup_token="b")

        assert store.totals() == {"acme": (2, Decimal(3))}

    def test_a_retried_write_with_the_same_token_is_stored_once(self) -> None:
        store = self.make_store()
        batch = [row(f"op-{i}", "0.25", offset=i) for i in range(10)]
        store.write(batch, dedup_token="t:0:0-9")
        store.write(batch, dedup_token="t:0:0-9")

        assert store.totals() == {"acme": (10, Decimal("2.5"))}

    def test_the_token_not_the_content_decides_a_retry(self) -> None:
        store = self.make_store()
        store.write([row("op-1", "1")], dedup_token="t:0:5-5")
        store.write([row("op-1", "7"), row("op-2", "1")], dedup_token="t:0:5-5")
        store.write([row("op-3", "1")], dedup_token="t:0:6-6")

        assert store.totals() == {"acme": (2, Decimal(2))}

    def test_summary_splits_by_type_model_day_and_outcome(self) -> None:
        store = self.make_store()
        day = timedelta(days=1)
        rows = [
            row("i1", "0.039", created_at=T0 + timedelta(hours=1)),
            row("i2", "0.039", created_at=T0 + day - MS),
            row("i3", "0", created_at=T0 + day, success=False),
            row(
                "v1",
                "3.2",
                created_at=T0 + day + timedelta(hours=5),
                operation_type="video_generation",
                model="veo-3.0-generate-001",
            ),
            row(
                "t1",
                "0.000412345",
                created_at=T0 + 2 * day,
                operation_type="text_generation",
                model="gemini-2.5-flash",
            ),
            row("other", "100", client_id="globex", created_at=T0 + day),
        ]
        store.write(rows, dedup_token="b1")

        s = store.summary("acme")

        assert s.client_id == "acme" and s.start is None and s.end is None
        assert s.total_cost_usd == Decimal("3.278412345")
        assert (s.operation_count, s.success_count, s.failure_count) == (5, 4, 1)
        assert s.by_operation_type == {
            "image_generation": Bucket(3, Decimal("0.078")),
            "video_generation": Bucket(1, Decimal("3.2")),
            "text_generation": Bucket(1, Decimal("0.000412345")),
        }
        assert s.by_model == {
            "gemini-2.5-flash-image": Bucket(3, Decimal("0.078")),
            "veo-3.0-generate-001": Bucket(1, Decimal("3.2")),
            "gemini-2.5-flash": Bucket(1, Decimal("0.000412345")),
        }
        assert s.by_day == {
            date(2025, 11, 1): Bucket(2, Decimal("0.078")),
            date(2025, 11, 2): Bucket(2, Decimal("3.2")),
            date(2025, 11, 3): Bucket(1, Decimal("0.000412345")),
        }
        assert s.to_json()["by_day"]["2025-11-02"] == {"count": 2, "cost_usd": "3.200000000"}

    def test_summary_and_spend_cover_start_but_not_end(self) -> None:
        store = self.make_store()
        start, end = T0 + timedelta(days=10), T0 + timedelta(days=40)
        store.write(
            [
                row("before", "1", created_at=start - MS),
                row("at-start", "2", created_at=start),
                row("inside", "4", created_at=start + timedelta(days=3)),
                row("last-ms", "8", created_at=end - MS),
                row("at-end", "16", created_at=end),
            ],
            dedup_token="b",
        )

        assert store.spend("acme", start, end) == Decimal(14)
        s = store.summary("acme", start, end)
        assert (s.operation_count, s.total_cost_usd) == (3, Decimal(14))
        assert store.summary("acme", None, start).total_cost_usd == Decimal(1)
        assert store.summary("acme", end, None).total_cost_usd == Decimal(16)

    def test_an_unknown_client_has_nothing(self) -> None:
        store = self.make_store()
        store.write([row("op-1", "1")], dedup_token="b")

        assert store.spend("nobody", T0, T0 + timedelta(days=1)) == 0
        s = store.summary("nobody")
        assert (s.operation_count, s.total_cost_usd) == (0, Decimal(0))
        assert s.by_day == s.by_model == s.by_operation_type == {}

    def test_an_empty_store(self) -> None:
        store = self.make_store()
        store.write([], dedup_token="nothing")

        assert store.totals() == {}

    # One contract, several store classes: each subclass is its own executor, on purpose.
    @settings(
        max_examples=25, deadline=None, suppress_health_check=[HealthCheck.differing_executors]
    )
    @given(
        writes=st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c"]),
                st.integers(0, 8),
                st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False),
                st.integers(0, 60 * 24 * 90),
            ),
            max_size=40,
        ),
        batch_size=st.integers(1, 7),
    )
    def test_totals_equal_the_last_write_of_each_operation(
        self, writes: list[tuple[str, int, Decimal, int]], batch_size: int
    ) -> None:
        store = self.make_store()
        rows = [
            row(
                f"op-{op}",
                cost,
                client_id=client,
                offset=i,
                requested_at=T0 + timedelta(hours=op),
                created_at=T0 + timedelta(minutes=minutes),
            )
            for i, (client, op, cost, minutes) in enumerate(writes)
        ]
        for start in range(0, len(rows), batch_size):
            store.write(rows[start : start + batch_size], dedup_token=f"t:0:{start}")

        assert store.totals() == expected_totals(rows)


class TestMemoryCostStore(CostStoreContract):
    def make_store(self) -> CostStore:
        return MemoryCostStore()


class TestClickHouseCostStore(CostStoreContract):
    @pytest.fixture(autouse=True)
    def _client(self, chdb_client: Client) -> None:
        self.client = chdb_client

    def make_store(self) -> ClickHouseCostStore:
        database = fresh_database()
        migrate(self.client, database)
        return ClickHouseCostStore(self.client, database)

    def test_a_retried_insert_stores_one_block(self) -> None:
        store = self.make_store()
        batch = [row(f"op-{i}", "1", offset=i) for i in range(50)]
        for _ in range(3):
            store.write(batch, dedup_token="t:0:0-49")

        raw = self.client.query(f"SELECT count() FROM {store.table}").result_rows
        assert raw == [(50,)]  # without FINAL: the retries never reached the table

    def test_an_operation_re_run_after_its_dedup_horizon_counts_once(self) -> None:
        """An operation's row written a second time long after the first (a re-run after a
        crash, an id sent again with a fresh occurred_at): its completion comes months
        later, with another event id, at a later offset and under another batch token,
        after the first row was merged."""
        store = self.make_store()
        requested = T0 + timedelta(hours=1)
        first = row("op-1", "1.5", requested_at=requested, created_at=requested + MS)
        store.write([first, *(row(f"op-{i}", "1", offset=i) for i in range(2, 50))],
                    dedup_token="t:0:0-48")
        self.client.command(f"OPTIMIZE TABLE {store.table} FINAL")  # merged, then re-run
        rerun = replace(first, event_id="evt-rerun", cost_usd=Decimal("1.75"),
                        created_at=requested + timedelta(days=95), kafka_offset=10**9)
        store.write([rerun, row("op-50", "1", offset=10**9 + 1)], dedup_token="t:0:1e9")

        assert store.totals() == {"acme": (50, Decimal("50.75"))}  # FINAL: the re-run's cost
        by_argmax = self.client.query(
            f"SELECT count(), sum(cost) FROM (SELECT argMax(cost_usd, ingested_at) AS cost "
            f"FROM {store.table} GROUP BY client_id, operation_id)").result_rows
        assert by_argmax == [(50, Decimal("50.75"))]
        self.client.command(f"OPTIMIZE TABLE {store.table} FINAL")
        physical = self.client.query(
            f"SELECT count(), countIf(operation_id = 'op-1'), sum(cost_usd) FROM {store.table}"
        ).result_rows
        assert physical == [(50, 1, Decimal("50.75"))]  # without FINAL: merged into one row

    def test_a_re_run_on_another_model_leaves_no_stale_seal_behind(self) -> None:
        """A crash re-run (attempt 2) that completes on another model than the first run
        (its fallback) replaces the first row; the first row's bucket was sealed. The sink
        touches that bucket, so ai_cost_daily answers it from the raw table until the next
        seal, which no longer counts the operation there: one operation, at any moment."""
        from aipipe.consumers.rollups import Sealer

        store = self.make_store()
        assert isinstance(store, ClickHouseCostStore)
        first = row("op-1", "0.04", model="dall-e-3", created_at=T0 + MS)
        store.write([first, row("op-2", "0.04", model="dall-e-3", offset=1)],
                    dedup_token="t:0:0-1")
        sealer = Sealer(self.client, store.database, today=lambda: date(2025, 12, 1))
        assert sealer.seal() == 1

        def daily() -> list[tuple[Any, ...]]:
            return self.client.query(
                f"SELECT model, operations, cost_usd, source FROM `{store.database}`.ai_cost_daily "
                "ORDER BY model").result_rows

        assert daily() == [("dall-e-3", 2, Decimal("0.08"), "sealed")]
        rerun = replace(first, event_id="evt-op-1-2", model="stable-image-core",
                        cost_usd=Decimal("0.03"), attempt=2, kafka_offset=7)
        store.write([rerun], dedup_token="t:0:7-7")
        expected = [("dall-e-3", 1, Decimal("0.04")), ("stable-image-core", 1, Decimal("0.03"))]
        assert [r[:3] for r in daily()] == expected  # the stale seal is no longer trusted
        assert sealer.seal() == 2
        assert daily() == [(*e, "sealed") for e in expected]
        assert store.totals() == {"acme": (2, Decimal("0.07"))}

    def test_each_touch_counts_where_the_rollup_deduplicates_inserts(self) -> None:
        """On a cluster the rollup's replicated table drops an insert block equal to an
        earlier one (its deduplication window): two re-runs, hours apart, that touch the
        same bucket send the same block. Here the single-node equivalent, the window on
        the state table: the second re-run must still unseal the bucket."""
        from aipipe.consumers.rollups import Sealer

        store = self.make_store()
        assert isinstance(store, ClickHouseCostStore)
        self.client.command(f"ALTER TABLE `{store.database}`.ai_cost_daily_state "
                            "MODIFY SETTING non_replicated_deduplication_window = 1000")
        first = [row(f"op-{i}", "0.04", model="dall-e-3", offset=i) for i in (1, 2)]
        store.write(first, dedup_token="t:0:1-2")
        sealer = Sealer(self.client, store.database, today=lambda: date(2025, 12, 1))
        for n, (op, offset) in enumerate(((first[0], 7), (first[1], 8))):
            assert sealer.seal() >= 1
            store.write([replace(op, event_id=f"{op.event_id}-2", model="stable-image-core",
                                 cost_usd=Decimal("0.03"), attempt=2, kafka_offset=offset)],
                        dedup_token=f"t:0:{offset}-{offset}")
            daily = self.client.query(
                f"SELECT sum(operations), sum(cost_usd) FROM `{store.database}`.ai_cost_daily"
            ).result_rows
            assert daily == [(2, Decimal("0.04") * (1 - n) + Decimal("0.03") * (n + 1))]

    def test_an_id_admitted_again_is_another_run_and_costs_again(self) -> None:
        """A client that sends an id again after the dedup horizon, with a fresh
        occurred_at, has it admitted and run again (the provider bills again): another
        run, another row, whatever its month. A copy of either run still counts once."""
        store = self.make_store()
        once = row("op-1", "0.04", requested_at=T0 + MS, created_at=T0 + 2 * MS)
        again = replace(once, event_id="evt-op-1-again", requested_at=T0 + timedelta(days=8),
                        created_at=T0 + timedelta(days=8, milliseconds=1), kafka_offset=5)
        store.write([once], dedup_token="t:0:0-0")
        store.write([again], dedup_token="t:0:5-5")
        store.write([replace(again, cost_usd=Decimal("0.05"), kafka_offset=9)],
                    dedup_token="t:0:9-9")  # a copy of the second run, re-priced
        assert store.totals() == {"acme": (2, Decimal("0.09"))}
        self.client.command(f"OPTIMIZE TABLE {store.table} FINAL")
        assert self.client.query(f"SELECT count() FROM {store.table}").result_rows == [(2,)]

    def test_rows_read_back_exactly(self) -> None:
        store = self.make_store()
        written = [
            row("op-1", "123456789.123456789", created_at=T0 + 5 * MS),
            replace(
                row("op-2", "0.000000001", success=False),
                user_id="u-1",
                job_id="j-1",
                operation_type="video_generation",
                model="veo-3.0-generate-001",
                input_tokens=None,
                output_tokens=None,
                image_count=None,
                video_duration_seconds=Decimal("8.125"),
                poll_count=9,
                metadata='{"resolution":"720p"}',
                kafka_partition=3,
                kafka_offset=2**40,
            ),
        ]
        store.write(written, dedup_token="b")

        result = self.client.query(
            f"SELECT {', '.join(COLUMNS)} FROM {store.table} FINAL ORDER BY operation_id"
        ).result_rows
        utc: list[list[Any]] = [
            [v.replace(tzinfo=UTC) if isinstance(v, datetime) else v for v in r] for r in result
        ]
        read = [CostRow(*values) for values in utc]
        assert read == written

    def test_clickhouse_errors_become_store_errors(self) -> None:
        store = ClickHouseCostStore(self.client, "no_such_database")

        with pytest.raises(StoreError, match="total the costs") as caught:
            store.totals()
        assert isinstance(caught.value.__cause__, DatabaseError)
        with pytest.raises(StoreError, match="insert 1 rows"):
            store.write([row("op-1")], dedup_token="b")

    def test_open_clickhouse_migrates_idempotently(
        self, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        path = tmp_path_factory.getbasetemp() / "chdb"
        database = fresh_database()
        for _ in range(2):
            client = open_clickhouse(f"chdb://{path}", database)
            ClickHouseCostStore(client, database).write([row("op-1")], dedup_token="b")
            client.close()

        assert ClickHouseCostStore(self.client, database).totals() == {
            "acme": (1, Decimal("0.039"))
        }

    def test_open_clickhouse_names_a_bad_scheme(self) -> None:
        with pytest.raises(StoreError, match="use chdb:///path"):
            open_clickhouse("mysql://localhost", "aipipe")
