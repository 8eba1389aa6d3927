"""Webhooks without a network: signatures, the retry schedule, one delivery against an
in-process HTTP transport, and admission's allowlist of callback URLs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx
import pytest

from aipipe.consumers.webhooks import Outcome, RetryPolicy, deliver
from aipipe.infra.settings import ConfigError, load_settings
from aipipe.producers.webhooks import (
    WebhookVerificationError,
    callback_allowed,
    signature,
    signed_headers,
    verify_signature,
)
from aipipe.schemas.events import OperationAdmitted, OperationRejected, OperationRequested
from aipipe.streams.admission.decide import Rules, decide
from tests.support.raw_http import Handler, canned, run_against

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = b'{"event_id":"e-1","event_type":"operation.completed"}'
T = 1_790_000_000


# -- signatures ------------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_id_timestamp_and_body_in_base64() -> None:
    key = b"0123456789abcdef0123456789abcdef"  # what the whsec_ secret encodes
    mac = hmac.new(key, b"e-1.%d." % T + BODY, hashlib.sha256).digest()
    assert signature(SECRET, "e-1", T, BODY) == "v1," + base64.b64encode(mac).decode()
    plain = hmac.new(b"plain secret", b"e-1.%d." % T + BODY, hashlib.sha256).digest()
    assert signature("plain secret", "e-1", T, BODY) == "v1," + base64.b64encode(plain).decode()


def test_a_signed_delivery_verifies_whatever_the_header_case() -> None:
    headers = signed_headers(SECRET, "e-1", BODY, T)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    verify_signature(SECRET, headers, BODY, 300, now=T + 299)
    verify_signature(SECRET, {k.title(): v for k, v in headers.items()}, BODY, 300, now=T)


@pytest.mark.parametrize(("change", "match"), [
    ({"body": BODY + b" "}, "No v1 signature"),
    ({"secret": "whsec_" + base64.b64encode(b"another key").decode()}, "No v1 signature"),
    ({"webhook-id": "e-2"}, "No v1 signature"),
    ({"webhook-timestamp": str(T + 1)}, "No v1 signature"),
    ({"now": T + 301}, "past the 300 s tolerance"),
    ({"now": T - 301}, "past the 300 s tolerance"),
    ({"webhook-signature": ""}, "'webhook-signature' is missing"),
    ({"webhook-timestamp": "soon"}, "not unix seconds"),
])
def test_a_changed_or_stale_delivery_is_refused(change: dict[str, object], match: str) -> None:
    headers = signed_headers(SECRET, "e-1", BODY, T)
    headers.update({k: str(v) for k, v in change.items() if k.startswith("webhook-")})
    with pytest.raises(WebhookVerificationError, match=match):
        verify_signature(str(change.get("secret", SECRET)), headers,
                         bytes(change.get("body", BODY)),  # type: ignore[call-overload]
                         300, now=float(change.get("now", T)))  # type: ignore[arg-type]


def test_any_of_several_signatures_may_match_while_a_secret_rotates() -> None:
    headers = signed_headers(SECRET, "e-1", BODY, T)
    old = signature("the old secret", "e-1", T, BODY)
    headers["webhook-signature"] = f"{old} {headers['webhook-signature']}"
    verify_signature(SECRET, headers, BODY, 300, now=T)
    verify_signature("the old secret", headers, BODY, 300, now=T)


# -- the retry schedule ----------------------------------------------------------------------


def test_the_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=6, base_seconds=1.0, cap_seconds=5.0, timeout_seconds=2.0)
    assert [policy.delay(a) for a in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# -- one delivery, against an in-process transport ---------------------------------------------


def run_delivery(answers: list[int | Exception], policy: RetryPolicy,
                 retry_after: str = "") -> tuple[Outcome, list[httpx.Request], list[float]]:
    seen: list[httpx.Request] = []
    waits: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        got = answers[min(len(seen), len(answers)) - 1]
        if isinstance(got, Exception):
            raise got
        return httpx.Response(got, headers={"retry-after": retry_after} if retry_after else {})

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def go() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await deliver(client, "https://hooks.example/aipipe?token=t", "e-1", BODY,
                                 SECRET, policy, clock=lambda: T, sleep=sleep)

    return asyncio.run(go()), seen, waits


POLICY = RetryPolicy(max_attempts=4, base_seconds=0.5, cap_seconds=1.5, timeout_seconds=1.0)


def test_a_delivery_is_retried_after_5xx_and_429_with_the_same_id() -> None:
    outcome, seen, waits = run_delivery([500, 429, 204], POLICY)
    assert outcome == Outcome(True, 3, 204, "")
    assert waits == [0.5, 1.0]
    assert {r.headers["webhook-id"] for r in seen} == {"e-1"}
    assert all(r.content == BODY and r.method == "POST" for r in seen)
    assert seen[0].headers["content-type"] == "application/json"
    for request in seen:
        verify_signature(SECRET, dict(request.headers), request.content, 300, now=T)


def test_connection_errors_are_retried_and_the_last_try_gives_the_reason() -> None:
    refused = httpx.ConnectError("Connection refused")
    outcome, seen, waits = run_delivery([refused, 503, refused], POLICY)
    assert (outcome.delivered, outcome.attempts, outcome.status) == (False, 4, None)
    assert waits == [0.5, 1.0, 1.5]
    assert outcome.reason == (
        "The webhook to https://hooks.example/aipipe failed 4 times (last: ConnectError: "
        "Connection refused); once the receiver answers 2xx, re-send this event from the "
        "dead-letter topic.")
    assert len(seen) == 4


def against_receiver(handle: Handler, policy: RetryPolicy) -> tuple[Outcome, float]:
    """One attempt at a receiver on a real local socket that answers as ``handle`` writes;
    the outcome and how long the attempt took."""
    async def attempt(base: str) -> Outcome:
        async with httpx.AsyncClient() as client:
            return await deliver(client, f"{base}/hook", "e-1", BODY, SECRET, policy,
                                 first=1, last=1)

    outcome, seconds = run_against(handle, attempt)
    return outcome, seconds


def test_a_retry_after_that_is_not_ascii_digits_is_the_backoff() -> None:
    """``"²".isdigit()`` is true and ``float("²")`` raises: the header took the sink down."""
    head = "HTTP/1.1 503 Busy\r\nRetry-After: \u00b2\r\nContent-Length: 0\r\n\r\n"
    outcome, _ = against_receiver(canned(head.encode("latin-1")), POLICY)
    assert (outcome.delivered, outcome.status, outcome.retry_in) == (False, 503, 0.5)


def test_a_receiver_that_drips_its_headers_is_cut_off_at_the_attempts_timeout() -> None:
    drip = canned(b"", drip=b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000, every=0.2)
    outcome, seconds = against_receiver(drip, POLICY)  # each read within 1 s
    assert (outcome.delivered, outcome.status, outcome.retry_in) == (False, None, 0.5)
    assert outcome.reason.startswith("TimeoutError")
    assert seconds < 10  # the policy's 1 s in all (the drip would take 200 s)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000,  # drips, huge
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",
], ids=["slow-huge-body", "body-not-gzip"])
def test_an_accepting_answer_is_a_delivery_whatever_its_body(head: bytes) -> None:
    """The status and headers decide; the body is never read (nor inflated, nor waited for)."""
    outcome, seconds = against_receiver(canned(head), POLICY)
    assert (outcome.delivered, outcome.status) == (True, 200)
    assert seconds < 10


def test_a_4xx_answer_is_final_at_once() -> None:
    outcome, seen, waits = run_delivery([404], POLICY)
    assert (outcome.delivered, outcome.attempts, outcome.status, waits) == (False, 1, 404, [])
    assert "answered HTTP 404, which a retry cannot change" in outcome.reason
    assert len(seen) == 1


def test_a_delivery_may_make_some_attempts_and_say_when_the_next_is_due() -> None:
    async def go(first: int, last: int) -> Outcome:
        transport = httpx.MockTransport(lambda request: httpx.Response(500))
        async with httpx.AsyncClient(transport=transport) as client:
            return await deliver(client, "https://hooks.example/aipipe", "e-1", BODY, SECRET,
                                 POLICY, clock=lambda: T, first=first, last=last)

    assert asyncio.run(go(2, 2)) == Outcome(False, 2, 500, "HTTP 500", retry_in=1.0)
    final = asyncio.run(go(4, 4))
    assert (final.attempts, final.retry_in) == (4, None)
    assert final.reason.startswith("The webhook to https://hooks.example/aipipe failed 4 times")


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    _, _, waits = run_delivery([503, 503, 200], POLICY, retry_after="1")
    assert waits == [1.0, 1.0]
    _, _, waits = run_delivery([503, 200], POLICY, retry_after="3600")
    assert waits == [1.5]


# -- admission: which callback URLs may be called ----------------------------------------------

ALLOWED = ("https://hooks.example/aipipe/", "http://127.0.0.1:8080/",
           "https://in.example/in")


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://hooks.example/aipipe/done", True),
    ("https://hooks.example/aipipe/done?sig=1", True),
    ("https://HOOKS.example/aipipe/x", True),
    ("http://127.0.0.1:8080/anything", True),
    ("https://hooks.example/other", False),
    ("https://hooks.example.evil.net/aipipe/x", False),
    ("https://hooks.example:8443/aipipe/x", False),
    ("http://hooks.example/aipipe/x", False),
    ("https://user:pw@hooks.example/aipipe/x", False),
    ("https://hooks.example/aipipe/../admin", False),
    ("https://hooks.example/aipipe/%2e%2e/admin", False),
    ("http://127.0.0.1:9090/", False),
    ("https://[::1/", False),
    ("https://in.example/in", True),
    ("https://in.example/in/done", True),
    ("https://in.example/inevil", False),
    ("https://in.example/in/%252e%252e/admin", False),
    ("https://in.example/in\\..\\admin", False),
    ("https://in.example/in/..;/admin", False),
    ("https://in.example/in/%2F..%2Fadmin", False),
])
def test_a_callback_url_must_be_under_an_allowed_prefix(url: str, allowed: bool) -> None:
    assert any(callback_allowed(url, prefix) for prefix in ALLOWED) is allowed


def requested(callback_url: str | None) -> OperationRequested:
    return OperationRequested(
        request_id="r", client_id="acme", operation_type="image_generation",
        model="gemini-2.5-flash-image", params={"prompt": "a chair"}, callback_url=callback_url,
    )


def test_admission_carries_an_allowed_callback_url() -> None:
    decision = decide(requested("https://hooks.example/aipipe/1"), rules=Rules(
        callback_prefixes=ALLOWED))
    assert isinstance(decision, OperationAdmitted)
    assert decision.callback_url == "https://hooks.example/aipipe/1"


def test_the_completion_carries_the_callback_url_of_its_admission() -> None:
    from aipipe.schemas.prices import price_table_at
    from aipipe.streams.generation import SimulatedProvider, completed

    admitted = decide(requested("https://hooks.example/aipipe/1"), rules=Rules(
        callback_prefixes=ALLOWED))
    assert isinstance(admitted, OperationAdmitted)
    result = asyncio.run(SimulatedProvider().generate(admitted))
    done = completed(admitted, result, price_table_at(admitted.requested_at), 1,
                     datetime.now(UTC))
    assert done.callback_url == "https://hooks.example/aipipe/1"


def test_admission_rejects_a_callback_url_off_the_allowlist_without_carrying_it() -> None:
    decision = decide(requested("https://evil.example/x"), rules=Rules(callback_prefixes=ALLOWED))
    assert isinstance(decision, OperationRejected) and decision.reason == "invalid"
    assert decision.callback_url is None
    assert decision.detail == (
        "Field 'callback_url' 'https://evil.example/x' is not under an allowed webhook URL "
        "(AIPIPE_WEBHOOK_ALLOWED_URLS); use an https URL the operator allowed.")
    off = decide(requested("https://hooks.example/aipipe/1"), datetime.now(UTC))
    assert isinstance(off, OperationRejected)
    assert "AIPIPE_WEBHOOK_ALLOWED_URLS is empty" in off.detail


def test_settings_allow_https_prefixes_and_plain_http_on_loopback_only() -> None:
    on = load_settings(webhook_allowed_urls="https://a.example/h/, http://localhost:9/",
                       webhook_secret="s")
    assert on.webhook_prefixes == ("https://a.example/h/", "http://localhost:9/")
    with pytest.raises(ConfigError, match="AIPIPE_WEBHOOK_ALLOWED_URLS is invalid"):
        load_settings(webhook_allowed_urls="http://a.example/", webhook_secret="s")
    with pytest.raises(ConfigError, match="AIPIPE_WEBHOOK_SECRET is invalid"):
        load_settings(webhook_allowed_urls="https://a.example/")
    assert load_settings().webhook_prefixes == ()
    with pytest.raises(ConfigError, match=r"AIPIPE_WEBHOOK_SECRET is invalid .*base64"):
        load_settings(webhook_allowed_urls="https://a.example/", webhook_secret="whsec_not b64!")


# -- the wire contract of callback_url: the JSON Schema and the decoder agree ------------------


@pytest.mark.parametrize(("url", "valid"), [
    ("https://hooks.example/aipipe/1", True),
    ("http://127.0.0.1:8080/x", True),
    (None, True),
    ("ftp://hooks.example/x", False),
    ("https://hooks.example/a b", False),
    ("https://", False),
    ("https://h.example/" + "x" * 2031, False),
    (42, False),
])
def test_the_schema_and_the_decoder_agree_on_callback_url(url: object, valid: bool) -> None:
    from tests.unit.test_json_schemas import COMPLETED, REQUESTED, verdicts

    assert verdicts("operation.requested", {**REQUESTED, "callback_url": url}) == (valid, valid)
    assert verdicts("operation.completed", {**COMPLETED, "callback_url": url}) == (valid, valid)


# -- the webhook sink's flush, with the in-memory Kafka stand-ins of test_sink_policy ----------


def completion(n: int, callback_url: str | None) -> bytes:
    from decimal import Decimal

    from aipipe.schemas.events import OperationCompleted, encode

    return encode(OperationCompleted(
        request_id=f"r{n}", client_id="acme", operation_id=f"op-{n}",
        requested_at=datetime.now(UTC),
        operation_type="image_generation", provider="simulated", model="gemini-2.5-flash-image",
        success=True, cost_usd=Decimal("0.01"), price_version="v", duration_ms=1,
        callback_url=callback_url))


RETRIES = "hooks-retry"
NOW = 1_790_000_000.0  # the projections' clock (signatures and due times)


def webhook_sink(answer: Callable[[httpx.Request], Any], topics: tuple[str, ...] = (
        "done",), policy: RetryPolicy | None = None, slow_hosts: Any = None,
) -> tuple[Any, Any, Any]:
    from aipipe.consumers.webhooks import WebhookProjection, WebhookSink
    from tests.unit.test_sink_policy import FakeConsumer, FakeProducer

    clock = [0.0]
    consumer, producer = FakeConsumer(clock), FakeProducer()
    projection = WebhookProjection(
        secret=SECRET, allowed=("https://hooks.example/", "https://slow.example/"),
        transport=httpx.MockTransport(answer),
        policy=policy or RetryPolicy(max_attempts=2, base_seconds=0.001, cap_seconds=0.001),
        retry_topic=RETRIES, slow_hosts=slow_hosts, clock=lambda: NOW)
    sink = WebhookSink(topics=list(topics), projection=projection, bootstrap="unused:9092",
                       deadletter_topic="dlq", group_id="g", clock=lambda: clock[0],
                       consumer=consumer, deadletters=producer)
    return sink, consumer, producer


def retry_record(offset: int, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
    """A message of the retry topic with ``headers``."""
    from tests.unit.test_sink_policy import Msg

    class Retry(Msg):
        def headers(self) -> list[tuple[str, bytes]]:
            return headers

    return Retry(0, offset, value, topic=RETRIES)


def test_a_failed_first_try_waits_on_the_retry_topic_and_the_last_is_dead_lettered() -> None:
    """Each pass makes one attempt; a retry and a dead letter are both acknowledged before
    the offsets move, and the dead letter names the event's own topic and offset."""
    from tests.unit.test_sink_policy import Msg

    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(500 if request.url.path == "/down" else 200)

    sink, consumer, producer = webhook_sink(answer)
    values = [completion(0, "https://hooks.example/ok"), completion(1, None),
              completion(2, "https://hooks.example/down")]
    for offset, value in enumerate(values):
        sink.add(Msg(0, offset, value, topic="done"))
    sink.flush()
    sink.webhooks.close()
    assert sorted(seen) == ["/down", "/ok"]
    [(topic, value, headers)] = producer.sent
    assert (topic, value) == (RETRIES, values[2])
    assert headers == {"request_id": "r", "aipipe.webhook.attempts": "1",
                       "aipipe.webhook.due_ms": str(round((NOW + 0.001) * 1000)),
                       "aipipe.webhook.origin": "done:0:2"}
    assert producer.flushed == 1 and consumer.commits == [[("done", 0, 3)]]

    retry, consumer, producer = webhook_sink(answer, topics=(RETRIES,))
    retry.add(retry_record(7, values[2], [(k, v.encode()) for k, v in headers.items()]))
    retry.flush()
    retry.webhooks.close()
    assert sorted(seen) == ["/down", "/down", "/ok"]
    [(topic, value, headers)] = producer.sent
    assert (topic, value) == ("dlq", values[2])
    assert (headers["aipipe.dlq.stage"], headers["aipipe.dlq.topic"],
            headers["aipipe.dlq.partition"], headers["aipipe.dlq.offset"]) == (
        "webhooks", "done", "0", "2")
    assert headers["aipipe.dlq.reason"].startswith(
        "The webhook to https://hooks.example/down failed 2 times (last: HTTP 500)")
    assert not any(name.startswith("aipipe.webhook.") for name in headers)
    assert producer.flushed == 1 and consumer.commits == [[(RETRIES, 0, 8)]]


def test_a_retry_is_made_when_it_is_due_and_a_delivered_one_sends_nothing() -> None:
    import time

    arrived: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        arrived.append(time.monotonic())
        return httpx.Response(204)

    retry, consumer, producer = webhook_sink(answer, topics=(RETRIES,), policy=RetryPolicy(
        max_attempts=3, base_seconds=1.0, cap_seconds=30.0))
    due_ms = str(round((NOW + 0.3) * 1000)).encode()
    retry.add(retry_record(0, completion(0, "https://hooks.example/ok"), [
        ("aipipe.webhook.attempts", b"1"), ("aipipe.webhook.due_ms", due_ms),
        ("aipipe.webhook.origin", b"done:1:5")]))
    started = time.monotonic()
    retry.flush()
    retry.webhooks.close()
    assert len(arrived) == 1 and arrived[0] - started >= 0.3  # not before it was due
    assert producer.sent == [] and consumer.commits == [[(RETRIES, 0, 1)]]


def test_a_stopping_sink_leaves_retries_not_yet_due_uncommitted_for_the_next_start() -> None:
    import time

    seen: list[str] = []
    retry, consumer, producer = webhook_sink(
        lambda request: seen.append(request.url.path) or httpx.Response(204), topics=(RETRIES,),
        policy=RetryPolicy(max_attempts=3, base_seconds=30.0, cap_seconds=30.0))
    retry.webhooks.stopping = lambda: True
    due_ms = str(round((NOW + 30) * 1000)).encode()
    retry.add(retry_record(0, completion(0, "https://hooks.example/later"), [
        ("aipipe.webhook.attempts", b"1"), ("aipipe.webhook.due_ms", due_ms),
        ("aipipe.webhook.origin", b"done:0:0")]))
    retry.add(retry_record(1, completion(1, "https://hooks.example/now"), [
        ("aipipe.webhook.attempts", b"1"), ("aipipe.webhook.due_ms", b"0"),
        ("aipipe.webhook.origin", b"done:0:1")]))
    started = time.monotonic()
    retry.flush()
    retry.webhooks.close()
    assert time.monotonic() - started < 10  # not the 30 s until the first was due
    assert seen == ["/now"]  # the one already due was tried
    assert producer.sent == [] and consumer.commits == []


def test_a_retry_record_without_its_state_is_dead_lettered_with_the_headers_named() -> None:
    retry, consumer, producer = webhook_sink(lambda r: httpx.Response(200), topics=(RETRIES,))
    value = completion(0, "https://hooks.example/ok")
    retry.add(retry_record(3, value, [("aipipe.webhook.attempts", b"one")]))
    retry.flush()
    retry.webhooks.close()
    [(topic, sent, headers)] = producer.sent
    assert (topic, sent, headers["aipipe.dlq.topic"]) == ("dlq", value, RETRIES)
    assert headers["aipipe.dlq.reason"] == (
        "Headers 'aipipe.webhook.attempts' and 'aipipe.webhook.due_ms' must be whole numbers on "
        "a webhook retry record; re-send the event to its own topic instead.")
    assert consumer.commits == [[(RETRIES, 0, 4)]]


def test_a_bug_while_delivering_ends_the_sink_instead_of_dead_lettering() -> None:
    from tests.unit.test_sink_policy import Msg

    def answer(request: httpx.Request) -> httpx.Response:
        raise ZeroDivisionError("a bug")

    sink, consumer, producer = webhook_sink(answer)
    sink.add(Msg(0, 0, completion(0, "https://hooks.example/ok"), topic="done"))
    with pytest.raises(ZeroDivisionError):
        sink.flush()
    sink.webhooks.close()
    assert producer.sent == [] and consumer.commits == []


# -- a slow receiver (a tarpit) and the batch of first tries -----------------------------------


def test_a_receiver_is_remembered_as_slow_for_the_window_and_forgotten_on_a_quick_answer() -> None:
    from aipipe.consumers.webhooks import SlowHosts

    now = [0.0]
    hosts = SlowHosts(2.0, window=60.0, clock=lambda: now[0])
    hosts.observe("https://hooks.example/a?token=1", 2.0)
    # the receiver is its scheme, host and port: other paths, users and queries are it too
    assert hosts.slow("https://user@HOOKS.example/b")
    assert not hosts.slow("https://hooks.example:8443/a")
    assert not hosts.slow("http://hooks.example/a")
    now[0] = 59.9
    assert hosts.slow("https://hooks.example/a")
    now[0] = 60.0
    assert not hosts.slow("https://hooks.example/a")
    hosts.observe("https://hooks.example/a", 5.0)
    hosts.observe("https://hooks.example/c", 1.9)  # answered in time: forgotten
    assert not hosts.slow("https://hooks.example/a")


def test_the_receivers_remembered_as_slow_are_bounded_oldest_first() -> None:
    from aipipe.consumers.webhooks import SlowHosts

    hosts = SlowHosts(1.0)
    hosts.MAX_RECEIVERS = 3
    for n in range(5):
        hosts.observe(f"https://h{n}.example/", 1.0)
    assert [hosts.slow(f"https://h{n}.example/") for n in range(5)] == [
        False, False, True, True, True]


def tarpit(seen: list[str], hold: float = 30.0) -> Callable[[httpx.Request], Any]:
    """Receivers (all on one transport): /tarpit paths hold the request for ``hold`` seconds
    before answering, every other path answers 200 at once."""

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.startswith("/tarpit"):
            await asyncio.sleep(hold)
        return httpx.Response(200)

    return answer


def test_a_tarpit_holds_a_batch_of_first_tries_for_the_slow_time_then_not_at_all() -> None:
    """A first try has the slow time, not the timeout; cut short, it is a failed attempt
    retried from the retry topic. The receiver is then slow: its next first try goes to the
    retry topic untried (no attempt counted), and its batch does not wait at all."""
    import time

    from aipipe.consumers.webhooks import SlowHosts
    from tests.unit.test_sink_policy import Msg

    seen: list[str] = []
    policy = RetryPolicy(max_attempts=3, base_seconds=1.0, cap_seconds=5.0, timeout_seconds=30.0)
    sink, consumer, producer = webhook_sink(tarpit(seen), policy=policy,
                                            slow_hosts=SlowHosts(0.3))
    first = [completion(0, "https://slow.example/tarpit/0"),
             completion(1, "https://hooks.example/ok/1")]
    for offset, value in enumerate(first):
        sink.add(Msg(0, offset, value, topic="done"))
    started = time.monotonic()
    sink.flush()
    assert time.monotonic() - started < 10  # the slow time, not the 30 s timeout
    assert sorted(seen) == ["/ok/1", "/tarpit/0"]
    [(topic, value, headers)] = producer.sent
    assert (topic, value, headers["aipipe.webhook.attempts"]) == (RETRIES, first[0], "1")
    assert headers["aipipe.webhook.due_ms"] == str(round((NOW + 1.0) * 1000))  # the backoff

    second = [completion(2, "https://slow.example/tarpit/2"),
              completion(3, "https://hooks.example/ok/3")]
    for offset, value in enumerate(second, start=2):
        sink.add(Msg(0, offset, value, topic="done"))
    sink.flush()
    sink.webhooks.close()
    # the tarpit was not tried again; another receiver's first try went through the batch
    assert sorted(seen) == ["/ok/1", "/ok/3", "/tarpit/0"]
    assert len(producer.sent) == 2
    (_, value, headers) = producer.sent[1]
    assert (value, headers["aipipe.webhook.attempts"], headers["aipipe.webhook.due_ms"],
            headers["aipipe.webhook.origin"]) == (second[0], "0", str(round(NOW * 1000)),
                                                  "done:0:2")
    assert consumer.commits == [[("done", 0, 2)], [("done", 0, 4)]]


def test_a_deferred_first_try_is_the_retry_consumers_first_attempt_with_the_whole_timeout(
) -> None:
    """The retry consumer tries a deferred delivery as attempt 1 with the whole timeout; a
    quick answer there makes its receiver's first tries go through the batch again (the
    two consumers share what they learn)."""
    from aipipe.consumers.webhooks import SlowHosts
    from tests.unit.test_sink_policy import Msg

    seen: list[str] = []
    hosts = SlowHosts(0.2)
    hosts.observe("https://slow.example/tarpit/0", 1.0)
    policy = RetryPolicy(max_attempts=3, base_seconds=1.0, cap_seconds=5.0, timeout_seconds=5.0)
    retry, consumer, producer = webhook_sink(tarpit(seen, hold=0.5), topics=(RETRIES,),
                                             policy=policy, slow_hosts=hosts)
    value = completion(0, "https://slow.example/tarpit/0")
    retry.add(retry_record(4, value, [("aipipe.webhook.attempts", b"0"),
                                      ("aipipe.webhook.due_ms", str(round(NOW * 1000)).encode()),
                                      ("aipipe.webhook.origin", b"done:0:0")]))
    retry.flush()
    retry.webhooks.close()
    # held 0.5 s, more than the slow time, within the timeout: delivered, still slow
    assert seen == ["/tarpit/0"] and producer.sent == []
    assert consumer.commits == [[(RETRIES, 0, 5)]]
    assert hosts.slow("https://slow.example/tarpit/1")

    hosts.observe("https://slow.example/tarpit/0", 0.01)  # a quick answer, on either consumer
    sink, consumer, producer = webhook_sink(tarpit(seen, hold=0.0), policy=policy,
                                            slow_hosts=hosts)
    sink.add(Msg(0, 0, completion(1, "https://slow.example/tarpit/1"), topic="done"))
    sink.flush()
    sink.webhooks.close()
    assert seen == ["/tarpit/0", "/tarpit/1"] and producer.sent == []


def test_with_one_attempt_a_first_try_has_the_whole_timeout_and_is_never_deferred() -> None:
    from aipipe.consumers.webhooks import SlowHosts
    from tests.unit.test_sink_policy import Msg

    seen: list[str] = []
    hosts = SlowHosts(0.1)
    hosts.observe("https://slow.example/tarpit/0", 1.0)
    sink, consumer, producer = webhook_sink(tarpit(seen, hold=0.3), policy=RetryPolicy(
        max_attempts=1, timeout_seconds=5.0), slow_hosts=hosts)
    sink.add(Msg(0, 0, completion(0, "https://slow.example/tarpit/0"), topic="done"))
    sink.flush()
    sink.webhooks.close()
    assert seen == ["/tarpit/0"] and producer.sent == []  # delivered, after 0.3 s
    assert consumer.commits == [[("done", 0, 1)]]
