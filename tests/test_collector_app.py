"""The collector's WSGI application in-process (fast): routing, request bounds, the box's
address behind nginx, a store that is down (503, then recovers), and the shipped systemd
unit and nginx snippet agreeing on the socket and the application."""

from __future__ import annotations

import grp
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opq_box_updater import reporting
from opq_box_updater.publish import collector
from opq_box_updater.publish.collector import Collector, Request, Response, client_address
from opq_box_updater.publish.store import COLLECTOR_DB_ENV, DEFAULT_COLLECTOR_DB

PROJECT = Path(__file__).resolve().parent.parent
NOW = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)


def call(app: Collector, method: str, path: str, body: bytes = b"",
         **extra: Any) -> tuple[int, dict[str, str], bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path,
                               "QUERY_STRING": "", "REMOTE_ADDR": "192.0.2.9",
                               "CONTENT_LENGTH": str(len(body)) if body else "",
                               "wsgi.input": io.BytesIO(body), **extra}
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer["status"], answer["headers"] = int(status.split()[0]), dict(headers)

    chunks = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], chunks


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Collector]:
    made = Collector(f"sqlite:///{tmp_path}/reports.db", clock=lambda: NOW)
    yield made


def signed(counter: int = 1, box_id: str = "box-1") -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    envelope = reporting.sign_report({"box_id": box_id}, box_id,
                                     Ed25519PrivateKey.generate(), counter, NOW)
    return json.dumps(envelope).encode()


def test_reports_are_taken_only_as_signed_posts(app: Collector) -> None:
    assert call(app, "POST", "/report", signed())[0] == 204
    status, headers, _ = call(app, "GET", "/report")
    assert (status, headers["Allow"]) == (405, "POST")
    assert call(app, "POST", "/report")[0] == 411  # no Content-Length
    assert call(app, "POST", "/report", b"{}", CONTENT_LENGTH="12x")[0] == 400
    assert call(app, "POST", "/report", b"{}", CONTENT_LENGTH="99999")[0] == 413
    assert call(app, "GET", "/nothing")[0] == 404
    assert call(app, "PUT", "/healthz")[0] == 405
    status, headers, body = call(app, "GET", "/healthz")
    assert (status, body, headers["X-Content-Type-Options"]) == (200, b"ok\n", "nosniff")
    assert call(app, "HEAD", "/healthz")[2] == b""
    [record] = app.store.latest()
    assert record.remote == "192.0.2.9"


def test_refusal_messages_are_one_printable_line(app: Collector) -> None:
    status, _, body = call(app, "POST", "/report", b'{"box_id": "\\u001b[2Jbox"}')
    # 400: a box id with a control character is refused before anything else (was 401)
    assert status == 400 and body.endswith(b"\n") and body.count(b"\n") == 1
    assert b"\x1b" not in body


@pytest.mark.parametrize(("peer", "forwarded", "shown"), [
    ("", "198.51.100.4", "198.51.100.4"),  # nginx on the Unix socket
    ("127.0.0.1", "198.51.100.4", "198.51.100.4"),  # nginx on loopback
    ("192.0.2.9", "198.51.100.4", "192.0.2.9"),  # a client claiming to be someone else
    ("", "", "-"),
    ("not-an-address", "198.51.100.4", "not-an-address"),
])
def test_the_box_address_is_taken_from_nginx_only(peer: str, forwarded: str,
                                                  shown: str) -> None:
    assert client_address({"REMOTE_ADDR": peer, "HTTP_X_REAL_IP": forwarded}) == shown


def test_a_store_that_is_down_answers_503_and_recovers(tmp_path: Path) -> None:
    blocked = tmp_path / "not-yet"
    blocked.write_text("a file where the database directory belongs")
    app = Collector(f"sqlite:///{blocked}/reports.db", clock=lambda: NOW)
    assert call(app, "POST", "/report", signed())[0] == 503
    blocked.unlink()
    assert call(app, "POST", "/report", signed())[0] == 204


def test_a_database_restart_costs_one_503_then_reconnects(pg_server: Any) -> None:
    """PostgreSQL crashes and comes back: the broken connection is dropped on the first
    request after it (503, the box retries the next day), the next one reconnects."""
    pg_server.reset()
    app = Collector(pg_server.dsn, clock=lambda: NOW)
    assert call(app, "POST", "/report", signed(box_id="box-a"))[0] == 204
    pg_server.restart()
    assert call(app, "POST", "/report", signed(box_id="box-b"))[0] == 503
    assert call(app, "POST", "/report", signed(box_id="box-c"))[0] == 204
    assert [r.box_id for r in app.store.latest()] == ["box-a", "box-c"]
    assert call(app, "GET", "/healthz")[0] == 200
    app.store.close()


def test_routes_are_where_pages_hook_in(tmp_path: Path) -> None:
    seen: list[Request] = []

    def page(request: Request) -> Response:
        seen.append(request)
        return Response(200, b"<p>fleet</p>", "text/html; charset=utf-8")

    app = Collector(f"sqlite:///{tmp_path}/r.db", clock=lambda: NOW, routes={"/": page})
    status, headers, body = call(app, "GET", "/", QUERY_STRING="release=2&result=failed")
    assert (status, headers["Content-Type"], body) == (200, "text/html; charset=utf-8",
                                                       b"<p>fleet</p>")
    assert seen[0].query == {"release": ["2"], "result": ["failed"]} and seen[0].now == NOW


def test_the_application_reads_its_store_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_logger = logging.getLogger("opq_box_updater")  # restored afterwards
    monkeypatch.setattr(package_logger, "handlers", [])
    monkeypatch.setattr(package_logger, "level", package_logger.level)
    assert collector.make_application({}).store_url == DEFAULT_COLLECTOR_DB
    url = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv(COLLECTOR_DB_ENV, url)
    monkeypatch.setattr(collector, "_APP", [])
    status: list[str] = []
    body = collector.application(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz", "wsgi.input": io.BytesIO()},
        lambda s, h: status.append(s))
    assert (status, list(body)) == (["200 OK"], [b"ok\n"])
    assert (tmp_path / "env.db").exists()


def test_the_unit_and_the_nginx_snippet_agree() -> None:
    unit = (PROJECT / "debian/opq-box-publisher.opq-box-collector.service").read_text()
    snippet = (PROJECT / "docs/nginx/opq-box-collector.conf").read_text()
    exec_start = " ".join(re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.MULTILINE)
                          .group(1).replace("\\\n", " ").split())  # type: ignore[union-attr]
    bind = re.search(r"--bind unix:(\S+)", exec_start)
    assert bind and f"proxy_pass http://unix:{bind.group(1)};" in snippet
    assert exec_start.endswith(" opq_box_updater.publish.collector:application")
    assert f"Environment={COLLECTOR_DB_ENV}={DEFAULT_COLLECTOR_DB}" in unit
    assert "StateDirectory=opq-box-collector" in unit and \
        DEFAULT_COLLECTOR_DB.startswith("sqlite:////var/lib/opq-box-collector/")
    assert re.search(r"client_max_body_size 16k;", snippet)
    site = (PROJECT / "docs/nginx/opq-box-repo.conf").read_text()
    assert "#include /etc/nginx/snippets/opq-box-collector.conf;" in site


def _unit_setting(unit: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit, re.MULTILINE)


def test_the_unit_gives_its_runtime_directory_to_nginx_through_systemd() -> None:
    """systemd (since v242, Debian 12 has 252) re-applies RuntimeDirectory='s owner, group and
    mode before every Exec* command, so a chgrp in ExecStartPre is undone by ExecStart and
    nginx is locked out of the 0750 directory (every report a 502). The group must be the
    unit's own (Group=), and no Exec* line may change the directories systemd manages."""
    unit = (PROJECT / "debian/opq-box-publisher.opq-box-collector.service").read_text()
    assert _unit_setting(unit, "Group") == ["www-data"]
    assert _unit_setting(unit, "DynamicUser") == ["yes"] and not _unit_setting(unit, "User")
    managed = ["/run/" + d for d in _unit_setting(unit, "RuntimeDirectory")] + \
        ["/var/lib/" + d for d in _unit_setting(unit, "StateDirectory")]
    for key in ("ExecStartPre", "ExecStartPost", "ExecStart", "ExecReload"):
        for line in _unit_setting(unit, key):
            words = line.lstrip("+-!@:").split()
            assert not (words and Path(words[0]).name in {"chgrp", "chown", "chmod"}
                        and any(w.startswith(tuple(managed)) for w in words)), line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as www-data and nobody")
def test_only_nginx_can_reach_the_collector_socket() -> None:
    """gunicorn's sync workers are protected from half-sent requests by nginx's buffering;
    a local account connecting to the socket directly could hold every worker. The unit's
    runtime directory (its mode, and the unit's group, which systemd gives it) must let
    www-data in and keep everyone else out: rebuilt here from the unit's own lines."""
    unit = (PROJECT / "debian/opq-box-publisher.opq-box-collector.service").read_text()
    mode = int(_unit_setting(unit, "RuntimeDirectoryMode")[0], 8)
    group = _unit_setting(unit, "Group")
    assert group, "the unit no longer runs with the group www-data"
    base = Path(tempfile.mkdtemp(prefix="opq-run-", dir="/tmp"))  # www-data may enter /tmp
    os.chmod(base, 0o755)
    folder = base / "run"
    folder.mkdir()
    os.chown(folder, 0, grp.getgrnam(group[0]).gr_gid)  # root stands in for the service
    os.chmod(folder, mode)
    server = socket.socket(socket.AF_UNIX)
    old = os.umask(0)  # the unit's --umask 0: the socket itself is 0666
    try:
        server.bind(str(folder / "gunicorn.sock"))
    finally:
        os.umask(old)
    server.listen(4)
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
             "try: s.connect(sys.argv[1]); print('connected')\n"
             "except PermissionError: print('refused')")
    try:
        seen = {user: subprocess.run(
            ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", probe,
             str(folder / "gunicorn.sock")], capture_output=True, text=True,
            timeout=30).stdout.strip() for user in ("www-data", "nobody")}
    finally:
        server.close()
        shutil.rmtree(base)
    assert seen == {"www-data": "connected", "nobody": "refused"}
