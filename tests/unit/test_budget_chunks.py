"""``client_chunks``: budget lookups ask for clients in lists whose bound parameter stays
within a form field's limit (no network; sizes measured with clickhouse-connect's binder)."""

from __future__ import annotations

from clickhouse_connect.driver.binding import bind_query

from aipipe.consumers.costs.budgets import CLIENTS_PER_QUERY_BYTES, client_chunks

SQL = "SELECT 1 WHERE client_id IN {clients:Array(String)}"


def bound_bytes(clients: list[str]) -> int:
    _, params = bind_query(SQL, {"clients": clients})
    return len(params["param_clients"].encode())


def test_every_client_once_in_order_and_each_list_within_the_limit() -> None:
    # the worst case: 200 characters (the longest client_id), each one escaped when bound
    clients = [f"{i:04d}" + "\\'" * 98 for i in range(1000)]

    chunks = list(client_chunks(clients))

    assert [c for chunk in chunks for c in chunk] == clients
    assert len(chunks) > 1
    assert max(bound_bytes(chunk) for chunk in chunks) <= CLIENTS_PER_QUERY_BYTES


def test_short_ids_go_in_one_query() -> None:
    clients = [f"client-{i:04d}" for i in range(600)]

    assert list(client_chunks(clients)) == [clients]
    assert list(client_chunks([])) == []
