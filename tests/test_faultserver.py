"""The test server's own bookkeeping: the tests that read its log rely on its order."""

from __future__ import annotations

from pathlib import Path

from faultserver import FaultServer, LoggedRequest


def test_the_log_keeps_the_order_requests_arrived_in(tmp_path: Path) -> None:
    """A client's retry can be answered before the handler of the request it follows has
    logged that one (seen in CI: a 400 logged after the retry it caused). The log is in
    the order the requests arrived, whichever handler finishes first."""
    server = FaultServer(tmp_path)
    first_request = LoggedRequest("GET", "/version.json", {"If-None-Match": '"e"'}, 400, 0)
    retry = LoggedRequest("GET", "/version.json", {}, 200, 10)
    first, second = server.begin(), server.begin()
    server.record(second, retry)  # the retry's handler finishes first
    server.record(first, first_request)
    assert server.log == [first_request, retry]
