"""opq-box-publish serve and fleet: conditional GET, ranges, confinement, reports."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from opq_box_updater.publish import cli, reports, serve
from opq_box_updater.publish.store import UNSIGNED, StoreError, open_repo_store

BODY = bytes(range(256)) * 40  # 10240 bytes


class Server:
    """A running development server on a free port, and a raw HTTP client for it."""

    def __init__(self, repo: Path) -> None:
        self.log = io.StringIO()
        self.httpd = serve.make_server(repo, "127.0.0.1", 0, log=self.log)
        self.httpd.clock = lambda: datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            # skip_host etc. are not needed; the raw path is sent as given (no normalising).
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "packages").mkdir(parents=True)
    (repo / "version.json").write_bytes(b'{"hello": 1}\n')
    (repo / "packages" / "p.zip").write_bytes(BODY)
    (repo / ".hidden.json").write_bytes(b"secret")
    (repo / ".reports").mkdir()
    (repo / ".reports" / "box.json").write_bytes(b"{}")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "outside.txt", repo / "link-out.txt")
    os.symlink(repo / ".hidden.json", repo / "link-hidden.json")
    os.symlink(repo / "version.json", repo / "alias.json")
    return repo


@pytest.fixture
def server(repo_dir: Path) -> Iterator[Server]:
    s = Server(repo_dir)
    yield s
    s.close()


def test_get_head_and_validators(server: Server) -> None:
    status, headers, body = server.request("GET", "/version.json")
    assert (status, body) == (200, b'{"hello": 1}\n')
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept-Ranges"] == "bytes"
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+"', headers["ETag"])
    assert headers["Content-Length"] == "13"
    status, head_headers, body = server.request("HEAD", "/version.json")
    assert (status, body) == (200, b"")
    assert head_headers["ETag"] == headers["ETag"]
    assert server.request("GET", "/alias.json")[0] == 200  # symlinks inside are fine


def test_conditional_get(server: Server, repo_dir: Path) -> None:
    _, headers, _ = server.request("GET", "/version.json")
    etag, last_modified = headers["ETag"], headers["Last-Modified"]
    status, headers304, body = server.request("GET", "/version.json",
                                              headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert headers304["ETag"] == etag
    assert server.request("GET", "/version.json",
                          headers={"If-None-Match": f'"other", W/{etag}'})[0] == 304
    assert server.request("GET", "/version.json",
                          headers={"If-Modified-Since": last_modified})[0] == 304
    old = formatdate(0, usegmt=True)
    assert server.request("GET", "/version.json", headers={"If-Modified-Since": old})[0] == 200
    # If-None-Match wins over If-Modified-Since.
    assert server.request("GET", "/version.json", headers={
        "If-None-Match": '"stale"', "If-Modified-Since": last_modified})[0] == 200
    # A replaced file gets a new ETag (atomic replace: new inode).
    replacement = repo_dir / ".tmp"
    replacement.write_bytes(b'{"hello": 2}\n')
    os.replace(replacement, repo_dir / "version.json")
    status, headers, body = server.request("GET", "/version.json",
                                           headers={"If-None-Match": etag})
    assert (status, body) == (200, b'{"hello": 2}\n')
    assert headers["ETag"] != etag


@pytest.mark.parametrize(("header", "first", "last"), [
    ("bytes=0-99", 0, 99),
    ("bytes=5000-", 5000, 10239),
    ("bytes=-100", 10140, 10239),
    ("bytes=10000-99999", 10000, 10239),
    ("bytes=-99999", 0, 10239),
])
def test_range(server: Server, header: str, first: int, last: int) -> None:
    status, headers, body = server.request("GET", "/packages/p.zip", headers={"Range": header})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {first}-{last}/{len(BODY)}"
    assert body == BODY[first:last + 1]


def test_range_unsatisfiable_ignored_and_if_range(server: Server) -> None:
    status, headers, body = server.request("GET", "/packages/p.zip",
                                           headers={"Range": "bytes=20000-"})
    assert (status, headers["Content-Range"], body) == (416, f"bytes */{len(BODY)}", b"")
    assert server.request("GET", "/packages/p.zip", headers={"Range": "bytes=-0"})[0] == 416
    for ignored in ("bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=-"):
        status, _, body = server.request("GET", "/packages/p.zip", headers={"Range": ignored})
        assert (status, len(body)) == (200, len(BODY)), ignored
    etag = server.request("HEAD", "/packages/p.zip")[1]["ETag"]
    status, _, body = server.request("GET", "/packages/p.zip",
                                     headers={"Range": "bytes=10-", "If-Range": etag})
    assert (status, body) == (206, BODY[10:])
    status, _, body = server.request("GET", "/packages/p.zip",
                                     headers={"Range": "bytes=10-", "If-Range": '"old"'})
    assert (status, body) == (200, BODY)


@pytest.mark.parametrize("path", [
    "/", "/packages", "/packages/", "/../outside.txt", "/packages/../../outside.txt",
    "/%2e%2e/outside.txt", "/packages/%2E%2E/%2E%2E/outside.txt", "/..%2foutside.txt",
    "/.hidden.json", "/.reports/box.json", "/packages/./p.zip", "/link-out.txt",
    "/link-hidden.json", "/nothing.json", "/version.json%00", "/..\\outside.txt",
])
def test_never_serves_outside_dotfiles_or_listings(server: Server, path: str) -> None:
    status, _, body = server.request("GET", path)
    assert status == 404, path
    assert b"outside" not in body and b"secret" not in body


def test_one_log_line_per_request(server: Server) -> None:
    server.request("GET", "/version.json")
    server.request("GET", "/missing")
    server.request("GET", "/packages/p.zip", headers={"Range": "bytes=0-9"})
    deadline = time.monotonic() + 5
    # A line is written once its response is complete, which may be after the client read it.
    while len(server.log.getvalue().splitlines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = server.log.getvalue().splitlines()
    assert len(lines) == 3
    # Each thread writes its line after its response: the order of lines may differ.
    lines.sort(key=lambda line: line.split('"')[1])
    assert lines[0].endswith('"GET /missing HTTP/1.1" 404 -')
    assert lines[1].endswith(" 206 10")
    assert lines[2].endswith('"GET /version.json HTTP/1.1" 200 13')


def test_post_report_then_fleet(server: Server, repo_dir: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    report = {"box_id": "box-17", "versions": {"installed": 7, "previous": 6, "target": 7},
              "result": "updated", "duration": 12.5, "error": None}
    status, _, _ = server.request("POST", "/report", json.dumps(report).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 204
    odd = {"box_id": "../../etc/passwd", "versions": 3, "result": "apply-failed",
           "error": "dpkg failed\nbadly"}
    assert server.request("POST", "/report", json.dumps(odd).encode())[0] == 204
    box = {"box_id": "0123abcd", "installed_version": 4, "last_result": "refused",
           "last_message": "release v5 expired", "last_run": "2031-01-02T03:00:00Z",
           "duration": 0.25}
    assert server.request("POST", "/report", json.dumps(box).encode())[0] == 204
    [stored] = open_repo_store(repo_dir).history("box-17")
    assert (stored.report, stored.status, stored.remote) == (report, UNSIGNED, "127.0.0.1")
    assert stored.received == datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert stat_mode(repo_dir / ".reports" / "reports.db") == 0o600
    assert not (repo_dir.parent / "etc").exists()
    assert cli.main(["fleet", str(repo_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["BOX", "INSTALLED", "RESULT", "LAST", "SEEN", "MESSAGE"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows["box-17"][1:4] == ["7", "updated", "2031-01-02T03:04:05Z"]
    assert rows["../../etc/passwd"][1:] == ["3", "apply-failed", "2031-01-02T03:04:05Z",
                                            "dpkg", "failed", "badly"]
    assert rows["0123abcd"][1:] == ["4", "refused", "2031-01-02T03:04:05Z", "release", "v5",
                                    "expired"]
    # Reports are never served back.
    assert server.request("GET", "/.reports/reports.db")[0] == 404


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(("body", "headers", "status"), [
    (b"x" * (16 * 1024 + 1), {}, 413),
    (b"not json", {}, 400),
    (b'["box_id"]', {}, 400),
    (b'{"box_id": 5}', {}, 400),
    (b'{"box_id": ""}', {}, 400),
])
def test_bad_reports_are_refused(server: Server, repo_dir: Path, body: bytes,
                                 headers: dict[str, str], status: int) -> None:
    assert server.request("POST", "/report", body, headers)[0] == status
    assert server.httpd.store.report_count() == 0
    assert server.request("POST", "/version.json", b"{}")[0] == 404


def test_serve_cli_port_0(repo_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "opq_box_updater.publish.cli", "serve", str(repo_dir),
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving (.+) on http://127\.0\.0\.1:(\d+)/\n", line)
        assert match and match.group(1) == str(repo_dir), line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(2)), timeout=10)
        conn.request("GET", "/version.json")
        assert conn.getresponse().read() == b'{"hello": 1}\n'
        conn.close()
        assert proc.stderr is not None
        # The line is written once the response is complete: wait for it, not for exit.
        assert '"GET /version.json HTTP/1.1" 200 13' in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_usage_errors(tmp_path: Path, server: Server,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    assert cli.main(["serve", str(tmp_path), "--port", str(server.port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "is not a directory" in err[0] and "cannot listen" in err[1]


def test_report_storage_is_bounded(server: Server, repo_dir: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "MAX_UNSIGNED_REPORTS", 2)
    assert server.request("POST", "/report", b'{"box_id": "a"}')[0] == 204
    assert server.request("POST", "/report", b'{"box_id": "b"}')[0] == 204
    assert server.request("POST", "/report", b'{"box_id": "a", "result": "x"}')[0] == 507
    assert server.httpd.store.report_count() == 2


# --- nothing a client sends reaches the operator's terminal raw (issue 13, 2) --------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m\x9b1m\x7f\u202e\x00"


def assert_no_terminal_controls(text: str) -> None:
    bad = [ch for ch in text if ch != "\n" and not ch.isprintable()]
    assert not bad, [hex(ord(ch)) for ch in bad]


def test_fleet_escapes_control_characters_from_reports(
        server: Server, repo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A box id with control characters is refused (400); format characters (bidi) pass.
    refused = {"box_id": f"box{ESCAPES}", "last_result": "updated"}
    assert server.request("POST", "/report", json.dumps(refused).encode())[0] == 400
    report = {"box_id": "box\u202e\u200b", "installed_version": f"7{ESCAPES}",
              "last_result": f"updated{ESCAPES}", "last_message": f"fine{ESCAPES}"}
    assert server.request("POST", "/report", json.dumps(report).encode())[0] == 204
    assert cli.main(["fleet", str(repo_dir)]) == 0
    out = capsys.readouterr().out
    assert_no_terminal_controls(out)
    row = out.splitlines()[1]
    assert row.startswith("box\\u202e\\u200b") and "7\\x1b]0;owned\\x07" in row, row
    assert "updated\\x1b" in row and "fine\\x1b" in row


def test_request_lines_are_logged_with_control_characters_escaped(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /\x1b[2J\x1b]0;owned\x07\x9b HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    deadline = time.monotonic() + 5
    while not server.log.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    line = server.log.getvalue()
    assert_no_terminal_controls(line)
    assert '"GET /\\x1b[2J\\x1b]0;owned\\x07\\x9b HTTP/1.1" 404' in line, line


# --- hostile clients and files (issue 12, item 5) ---------------------------------------------


def test_a_fifo_in_the_repository_is_refused_without_blocking(server: Server,
                                                              repo_dir: Path) -> None:
    os.mkfifo(repo_dir / "packages" / "fifo.zip")
    status, _, _ = server.request("GET", "/packages/fifo.zip")  # a timeout here: it blocked
    assert status == 404
    assert server.request("GET", "/version.json")[0] == 200


def test_a_deeply_nested_report_is_a_400(server: Server, repo_dir: Path) -> None:
    deep = b'{"box_id": "box-1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, _ = server.request("POST", "/report", deep,
                                  {"Content-Type": "application/json"})
    assert status == 400
    assert server.httpd.store.report_count() == 0
    brackets = json.dumps({"box_id": "box-2", "last_message": "[" * 100}).encode()
    assert server.request("POST", "/report", brackets)[0] == 204
    assert reports.json_depth('{"a": [1, {"b": "]]]["}], "c": "\\"["}') == 3


def test_half_open_connections_do_not_create_unbounded_threads(server: Server) -> None:
    server.httpd.slots = threading.BoundedSemaphore(4)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(20)]
    try:
        refused = 0
        for sock in idle[4:]:  # the server closes each connection over the cap at once
            try:
                refused += sock.recv(1) == b""
            except ConnectionResetError:
                refused += 1
        assert refused == 16
        assert threading.active_count() - before <= 4
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the slots come back as the idle handlers end
        try:
            if server.request("GET", "/version.json")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.1)
    else:
        pytest.fail("the server never served again after the idle connections closed")


def test_a_failing_store_is_a_503_and_the_server_goes_on(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(record: Any) -> None:
        raise StoreError("the report store failed (disk full); try again")

    monkeypatch.setattr(server.httpd.store, "add", broken)
    status, _, body = server.request("POST", "/report", b'{"box_id": "box-9"}')
    assert status == 503 and b"disk full" in body
    monkeypatch.undo()
    assert server.request("POST", "/report", b'{"box_id": "box-9"}')[0] == 204
    assert server.request("GET", "/version.json")[0] == 200
