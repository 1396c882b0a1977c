"""The report collector as operators run it (issue 10, items 1 and 2): Debian's gunicorn
with the WSGI application on a Unix socket, behind Debian's nginx with the shipped site and
collector snippet, storing into SQLite and into a real PostgreSQL. A real box's signed
report arrives and is shown by ``fleet`` and ``boxes list``; forged, replayed, unsigned and
oversized reports are refused with nothing stored; a conflict is kept apart until the
operator accepts its key. One stack (gunicorn + nginx) per back end for the whole module.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from collectorfix import Gunicorn, collector_site, find_gunicorn, socket_dir
from conftest import Box, require_tool
from nginxfix import Nginx, require_nginx
from reposim import RepoSim

from opq_box_updater import reporting
from opq_box_updater.metadata import keyid_of
from opq_box_updater.publish.store import ACCEPTED, CONFLICT, REJECTED, Store, open_store

pytestmark = pytest.mark.slow
PY = sys.executable
BoxFactory = Callable[..., Box]


@dataclass
class Stack:
    backend: str
    db_url: str
    nginx: Nginx
    gunicorn: Gunicorn
    sim: RepoSim
    store: Store

    def post(self, body: bytes, method: str = "POST") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.nginx.port, timeout=30)
        try:
            conn.request(method, "/report", body=body if method == "POST" else None,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.nginx.port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8")
        finally:
            conn.close()

    def publish(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "opq_box_updater.publish.cli", *args,
                               "--store", self.db_url], capture_output=True, text=True,
                              timeout=60)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_nginx()
    if find_gunicorn() is None:
        require_tool("gunicorn")
    base = tmp_path_factory.mktemp(f"collector-{request.param}")
    if request.param == "sqlite":
        db_url = f"sqlite:///{base}/reports.db"
    else:
        pg = request.getfixturevalue("pg_server")
        pg.reset()
        db_url = pg.dsn
    sim = RepoSim(base / "repo")
    sim.release(1)
    with socket_dir() as sockets, \
            Gunicorn(sock := sockets / "gunicorn.sock", db_url,
                     base / "gunicorn.log") as gunicorn, \
            Nginx(sim.path, base / "nginx",
                  site_filter=collector_site(sock, base / "collector.conf")) as nginx:
        store = open_store(db_url)
        yield Stack(request.param, db_url, nginx, gunicorn, sim, store)
        store.close()


def signed_body(key: Any, box_id: str, counter: int, **report: Any) -> bytes:
    envelope = reporting.sign_report({"box_id": box_id, "last_result": "updated", **report},
                                     box_id, key, counter, datetime.now(UTC))
    return json.dumps(envelope).encode()


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def test_a_box_report_reaches_the_store_through_nginx(stack: Stack,
                                                      box_factory: BoxFactory) -> None:
    box = box_factory(stack.nginx.url, stack.sim.anchor, box_id="box-real",
                      report_url=stack.nginx.url + "report")
    assert box.run("run").returncode == 0
    assert box.run("run").returncode == 0
    history = stack.store.history("box-real")
    assert [(r.status, r.counter) for r in history] == [(ACCEPTED, 2), (ACCEPTED, 1)]
    assert [r.report["last_result"] for r in history] == ["up-to-date", "updated"]
    assert history[0].remote == "127.0.0.1"  # X-Real-IP from nginx, not the socket
    key = reporting.load_or_make_key(box.state_dir)
    assert history[0].key_id == keyid_of(bytes.fromhex(reporting.public_hex(key)))

    fleet = stack.publish("fleet")
    assert fleet.returncode == 0, fleet.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in fleet.stdout.splitlines()[1:]}
    assert rows["box-real"] == ["1", "up-to-date"]
    listed = stack.publish("boxes", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines()
               if line.startswith("box-real "))
    assert row[1:4] == ["trusted", history[0].key_id[:16], "2"]

    # ... and on the fleet page, through the same nginx (the snippet's /fleet/ location).
    status, page = stack.get("/fleet/")
    assert status == 200 and "box-real" in page and "up-to-date" in page
    status, page = stack.get("/fleet/box/box-real")
    assert status == 200 and page.count("up-to-date") >= 1 and "updated" in page


def test_forged_replayed_unsigned_and_oversized_reports_are_refused(stack: Stack) -> None:
    key = new_key()
    good = signed_body(key, "box-x", 1, installed_version=1)
    assert stack.post(good)[0] == 204
    before = len(stack.store.history("box-x"))

    status, text = stack.post(good)  # captured and sent again
    assert status == 409 and b"replay" in text
    tampered = json.loads(signed_body(key, "box-x", 2, installed_version=1))
    tampered["signed"]["report"]["installed_version"] = 9
    assert stack.post(json.dumps(tampered).encode())[0] == 403
    assert stack.post(json.dumps({"box_id": "box-x", "last_result": "x"}).encode())[0] == 401
    padded = signed_body(key, "box-x", 3, last_message="x" * 17_000)
    assert stack.post(padded)[0] == 413  # nginx stops it before the collector
    assert stack.post(b"", method="GET")[0] == 405
    assert stack.post(b"\x00" * 10)[0] == 400

    assert len(stack.store.history("box-x")) == before == 1
    box = stack.store.box("box-x")
    assert box is not None and box.counter == 1
    assert "replay refused" in stack.gunicorn.log.read_text()  # refusals are logged


def test_a_conflict_is_kept_apart_until_the_operator_accepts_its_key(stack: Stack) -> None:
    old, new = new_key(), new_key()
    assert stack.post(signed_body(old, "box-c", 5, installed_version=3))[0] == 204
    status, text = stack.post(signed_body(new, "box-c", 1, installed_version=7))
    assert status == 409 and b"conflict" in text
    [latest] = [r for r in stack.store.latest() if r.box_id == "box-c"]
    assert latest.report["installed_version"] == 3  # never merged
    new_id = keyid_of(bytes.fromhex(reporting.public_hex(new)))
    listed = stack.publish("boxes", "list").stdout
    assert f"box-c  key {new_id}  counter 1" in listed

    accepted = stack.publish("boxes", "accept", "box-c", "--key", new_id[:12])
    assert accepted.returncode == 0, accepted.stderr
    assert stack.post(signed_body(new, "box-c", 2, installed_version=7))[0] == 204
    assert stack.post(signed_body(old, "box-c", 6))[0] == 409
    assert [r.status for r in stack.store.history("box-c")] == \
        [CONFLICT, ACCEPTED, CONFLICT, ACCEPTED]

    assert stack.publish("boxes", "reject", "box-c").returncode == 0
    assert stack.post(signed_body(new, "box-c", 3))[0] == 403
    box = stack.store.box("box-c")
    assert box is not None and box.state == REJECTED
    unknown = stack.publish("boxes", "rekey", "box-404")
    assert unknown.returncode == 2 and "no box 'box-404'" in unknown.stderr


def test_the_fleet_page_through_nginx(stack: Stack) -> None:
    """The shipped snippet serves the fleet page at /fleet/ (from this machine only): the
    relative links reach a box's page below the prefix, and only GET passes."""
    hostile = "<b>x</b>\u202e"  # a control character (ESC) is refused in box ids
    assert stack.post(signed_body(new_key(), hostile, 1, installed_version=4))[0] == 204

    def get(path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", stack.nginx.port, timeout=30)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return (response.status, dict(response.getheaders()),
                    response.read().decode("utf-8"))
        finally:
            conn.close()

    status, headers, page = get("/fleet/?release=4")
    assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<a href="box/%3Cb%3Ex%3C%2Fb%3E%E2%80%AE">&lt;b&gt;x&lt;/b&gt;\\u202e</a>' in page
    status, _, page = get("/fleet/box/%3Cb%3Ex%3C%2Fb%3E%E2%80%AE")
    assert status == 200 and "<title>Box &lt;b&gt;x&lt;/b&gt;\\u202e</title>" in page
    assert get("/fleet/", "POST")[0] == 403
    assert get("/box/x")[0] == 404  # only below /fleet/: the repository site's own 404
