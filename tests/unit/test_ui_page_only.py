"""``aipipe ui``'s API answers its own page only: a request a browser marks as from another
site or origin, or one without the page's ``X-Aipipe-UI`` header, is refused with a 403 and
one sentence before anything is read (``aipipe.ui.PageOnly``)."""

from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from aipipe.ui import STATIC, Busy, create_app

SUMMARY = "/api/summary?from=2026-11-01&to=2026-11-30"
PAGE = {"X-Aipipe-UI": "1"}  # what the page's own fetch sends
CROSS = ("This API answers only the cost page it serves, not a page from another site or "
         "origin (Sec-Fetch-Site: {site}).")
NO_HEADER = ("API requests must carry the header 'X-Aipipe-UI: 1', as the cost page's own "
             "requests do (with curl: -H 'X-Aipipe-UI: 1').")


class Reads:
    """Stands in for ``aipipe.ui.Reads``: records what was read, answers with its name."""

    def __init__(self, raises: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.raises = raises

    def __call__(self, method: str, *args: Any) -> dict[str, Any]:
        self.calls.append(method)
        if self.raises is not None:
            raise self.raises
        return {"read": method}


def client_of(reads: Reads) -> TestClient:
    return TestClient(create_app(reads, clock=lambda: datetime(2026, 12, 1, tzinfo=UTC)))


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
@pytest.mark.parametrize("path", [SUMMARY, "/api/operations?client=acme"])
def test_a_request_from_another_site_or_origin_is_refused_before_any_read(
        site: str, path: str) -> None:
    """``<img src=".../api/summary">`` on another page, or a page on another loopback port
    (same-site: ports do not make a site): 403, nothing read, even with the header."""
    reads = Reads()
    with client_of(reads) as http:
        for headers in ({"Sec-Fetch-Site": site}, {"Sec-Fetch-Site": site, **PAGE}):
            answer = http.get(path, headers=headers)
            assert (answer.status_code, answer.json()) == (
                403, {"error": CROSS.format(site=site)})
    assert reads.calls == []


@pytest.mark.parametrize("headers", [
    {},  # curl, a script, an old browser that sends no Sec-Fetch-Site
    {"Sec-Fetch-Site": "same-origin"},  # the page's script from before the header
    {"Sec-Fetch-Site": "none"},  # the API's address typed into the address bar
])
def test_an_api_request_without_the_pages_header_is_refused(headers: dict[str, str]) -> None:
    reads = Reads()
    with client_of(reads) as http:
        answer = http.get(SUMMARY, headers=headers)
    assert (answer.status_code, answer.json()) == (403, {"error": NO_HEADER})
    assert reads.calls == []


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-origin", **PAGE},  # the page's own fetch
    PAGE,  # curl -H 'X-Aipipe-UI: 1'
])
def test_the_pages_own_requests_are_answered(headers: dict[str, str]) -> None:
    reads = Reads()
    with client_of(reads) as http:
        summary = http.get(SUMMARY, headers=headers)
        operations = http.get("/api/operations?client=acme", headers=headers)
        refused = http.get("/api/summary?from=yesterday", headers=headers)
    assert (summary.status_code, summary.json()) == (200, {"read": "summary"})
    assert (operations.status_code, operations.json()) == (200, {"read": "operations"})
    assert refused.status_code == 400  # past the guard, the parameters are checked as before
    assert reads.calls == ["summary", "operations"]


def test_the_page_itself_is_served_to_any_navigation() -> None:
    """Only the API is guarded: the page and its script hold no data."""
    with client_of(Reads()) as http:
        for path in ("/", "/static/ui.js"):
            assert http.get(path, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_a_cors_preflight_is_never_granted() -> None:
    """What a page elsewhere must get before it may send the header: it is refused."""
    with client_of(Reads()) as http:
        answer = http.options(SUMMARY, headers={
            "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-aipipe-ui", "Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 403
    assert not [h for h in answer.headers if h.lower().startswith("access-control-")]


def test_the_pages_script_sends_the_header() -> None:
    assert '"X-Aipipe-UI": "1"' in (STATIC / "ui.js").read_text()


def test_a_read_that_waits_too_long_for_the_path_gets_503_and_its_sentence() -> None:
    sentence = "Another read of the chDB path is still running after 45 s; refresh once it ends."
    with client_of(Reads(raises=Busy(sentence))) as http:
        answer = http.get(SUMMARY, headers=PAGE)
    assert (answer.status_code, answer.json()) == (503, {"error": sentence})
