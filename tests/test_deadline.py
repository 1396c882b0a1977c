"""``timeouts.total`` bounds every transfer, whatever the connection does (issue 13, 1.1).

A server trickles one byte per second, well within ``timeouts.read``, so only the overall
deadline can stop it. It does so with keep-alive, with ``Connection: close`` and as an HTTP/1.0
server (both make ``http.client`` hand the socket to the response and set ``conn.sock`` to
None: the watchdog once had nothing left to shut down), over TLS, and during the TLS handshake,
for metadata, packages and status reports (a report's answer is never read past its
headers, so only trickled headers can hold it). Each call must raise :class:`SlowRetrievalError`
within a generous bound far below the time the trickle would take (minutes).

The same tests run once more under urllib3 2.x (what ``pip install`` brings; Debian 12 has
1.26) in a second virtualenv, ``.venv-urllib3-2``, made on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from faultserver import Fault, FaultServer, TrickleProxy, self_signed_cert

from opq_box_updater.config import Timeouts
from opq_box_updater.errors import SlowRetrievalError
from opq_box_updater.fetcher import Fetcher, post_report

TOTAL = 2.5  # timeouts.total of every test
BOUND = 30.0  # a run must end within this; the trickles below take minutes
TRICKLE = 1.0  # seconds per byte
LIMITS = Timeouts(connect=3, read=3, total=TOTAL)
META = "version.json"
PACKAGE = os.urandom(4096)  # 4096 s of trickle
SHA = hashlib.sha256(PACKAGE).hexdigest()
ROOT = Path(__file__).resolve().parents[1]
VENV2 = ROOT / ".venv-urllib3-2"

CONNECTIONS = {
    "keep-alive": {},
    "connection-close": {"connection_close": True},
    "http-1.0": {"http10": True},
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    (tmp_path / "packages").mkdir()
    (tmp_path / META).write_bytes(b"{}".ljust(200))
    (tmp_path / "packages" / f"{SHA}.zip").write_bytes(PACKAGE)
    with FaultServer(tmp_path) as srv:
        yield srv


def within_bound(start: float) -> None:
    elapsed = time.monotonic() - start
    assert elapsed < BOUND, f"took {elapsed:.0f}s with timeouts.total={TOTAL}"


@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_trickling_metadata_stops_at_the_deadline(server: FaultServer, connection: str,
                                                  headers: bool) -> None:
    server.set_fault(META, Fault(trickle=TRICKLE, trickle_headers=headers,
                                 **CONNECTIONS[connection]))  # type: ignore[arg-type]
    start = time.monotonic()
    with Fetcher(server.url, LIMITS, progress=False) as f, \
            pytest.raises(SlowRetrievalError, match=r"timeouts\.total"):
        f.fetch_metadata(META)
    within_bound(start)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_trickling_package_stops_at_the_deadline_and_keeps_the_part(
        server: FaultServer, connection: str, tmp_path: Path) -> None:
    path = f"packages/{SHA}.zip"
    server.set_fault(path, Fault(trickle=TRICKLE, **CONNECTIONS[connection]))  # type: ignore[arg-type]
    dest = tmp_path / "dl"
    start = time.monotonic()
    with Fetcher(server.url, LIMITS, progress=False) as f, \
            pytest.raises(SlowRetrievalError, match=r"timeouts\.total"):
        f.fetch_package(path, dest, SHA, len(PACKAGE))
    within_bound(start)
    part = (dest / f"{SHA}.part").read_bytes()
    assert 0 < len(part) < len(PACKAGE) and PACKAGE.startswith(part)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_trickling_report_answer_stops_at_the_deadline(
        server: FaultServer, connection: str, caplog: pytest.LogCaptureFixture) -> None:
    server.set_fault("/report", Fault(trickle=TRICKLE, trickle_headers=True,
                                      **CONNECTIONS[connection]))  # type: ignore[arg-type]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert post_report(f"{server.url}/report", {"box_id": "b"}, LIMITS) is False
    within_bound(start)
    assert "timeouts.total" in caplog.text


@pytest.mark.parametrize("connection", ["keep-alive", "connection-close"])
def test_trickling_https_stops_at_the_deadline(tmp_path: Path, connection: str) -> None:
    import ssl

    cert, key = self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    (tmp_path / META).write_bytes(b"{}".ljust(200))
    with FaultServer(tmp_path, ssl_context=context) as srv:
        srv.set_fault(META, Fault(trickle=TRICKLE, **CONNECTIONS[connection]))  # type: ignore[arg-type]
        start = time.monotonic()
        with Fetcher(srv.url, LIMITS, ca_bundle=cert, progress=False) as f, \
                pytest.raises(SlowRetrievalError, match=r"timeouts\.total"):
            f.fetch_metadata(META)
        within_bound(start)


def test_trickling_tls_handshake_stops_at_the_deadline(tmp_path: Path) -> None:
    """The server's handshake bytes (certificate included) arrive one per 0.5 s. CPython
    bounds a whole handshake by the socket's timeout (here the connect timeout, never more
    than what remains), and the watchdog's duplicate of the plain socket covers it too."""
    import ssl

    cert, key = self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    (tmp_path / META).write_bytes(b"{}")
    with FaultServer(tmp_path, ssl_context=context) as srv, \
            TrickleProxy(int(srv.url.rsplit(":", 1)[1]), 0.5) as proxy:
        start = time.monotonic()
        with Fetcher(f"https://127.0.0.1:{proxy.port}", LIMITS, ca_bundle=cert,
                     progress=False) as f, \
                pytest.raises(SlowRetrievalError, match=r"timeouts\.total"):
            f.fetch_metadata(META)
        within_bound(start)


def test_closed_connections_leave_no_descriptor_behind(server: FaultServer) -> None:
    """The watchdog's duplicates are closed once their connection is: fifty requests on
    connections the server closes cost no descriptor, and the server sees each one end."""
    server.set_fault(META, Fault(connection_close=True))
    before = len(os.listdir("/proc/self/fd"))
    with Fetcher(server.url, Timeouts(connect=3, read=3, total=60), progress=False) as f:
        for _ in range(50):
            assert f.fetch_metadata(META).status == 200
        during = len(os.listdir("/proc/self/fd"))
    assert during - before < 5, (before, during)
    assert len(os.listdir("/proc/self/fd")) - before < 3


def test_running_urllib3_is_the_expected_one() -> None:
    """The urllib3 2 run below sets OPQ_EXPECT_URLLIB3=2: prove it really ran under it."""
    expected = os.environ.get("OPQ_EXPECT_URLLIB3", urllib3.__version__.split(".")[0])
    assert urllib3.__version__.split(".")[0] == expected


# --- the same tests under urllib3 2.x -------------------------------------------------------


def urllib3_2_python() -> Path:
    """The interpreter of ``.venv-urllib3-2`` (Debian's python3 with system site packages,
    plus urllib3 2.x and a requests made for it), created once; fails in CI when it cannot
    be made (no PyPI), skips elsewhere."""
    python = VENV2 / "bin" / "python"
    stamp = VENV2 / ".stamp"
    VENV2.mkdir(exist_ok=True)
    with (VENV2 / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions at once build it once
        if stamp.exists():
            return python
        steps = [
            ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(VENV2)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "urllib3>=2,<3", "requests>=2.32,<3", "pytest>=7.2", "pytest-timeout>=2.1"],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                why = f"cannot build {VENV2}: {proc.stderr.strip()[-500:]}"
                if os.environ.get("CI"):
                    pytest.fail(why)
                pytest.skip(why)
        stamp.touch()
    return python


@pytest.mark.skipif(urllib3.__version__.startswith("2."), reason="this is the urllib3 2 run")
def test_the_deadline_holds_with_urllib3_2() -> None:
    python = urllib3_2_python()
    version = subprocess.run([str(python), "-c", "import urllib3; print(urllib3.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("2."), version
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=300",
         "-k", "not urllib3_2", str(Path(__file__))],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OPQ_EXPECT_URLLIB3": "2", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
