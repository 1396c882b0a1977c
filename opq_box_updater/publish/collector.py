"""The report collector: a standard-library WSGI application (``application``) for gunicorn.

Run by Debian's gunicorn behind nginx (``debian/opq-box-collector.service``,
``docs/nginx/collector.conf``)::

    OPQ_COLLECTOR_DB=postgresql://opq@/opq \\
    gunicorn --bind unix:/run/opq-box-collector/gunicorn.sock --workers 4 \\
        opq_box_updater.publish.collector:application

``POST /report`` takes signed reports only (:mod:`.reports` decides, :mod:`.store` keeps;
unsigned ones are 401). Other paths are GET routes (:data:`ROUTES`, by exact path, or by
a prefix ending in ``/``): ``/`` is the fleet page and ``/box/<id>`` a box's history
(:mod:`.fleetweb`); with ``$OPQ_COLLECTOR_REPO`` naming the repository, the fleet page shows
the rollout numbers of its releases. The store is opened on the first request of each
worker, after gunicorn has forked it (a database connection must not cross a fork); a store
that fails (database down) answers 503 and is retried on the next request.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ..fsutil import utcnow
from ..text import printable
from . import fleetweb
from .common import PublishError
from .fleetpage import parse_query
from .reports import REPORT_MAX_BYTES, RateLimiter, receive
from .store import Store, collector_store_url, open_store

logger = logging.getLogger("opq_box_updater.collector")
#: The repository whose releases the fleet page's rollout numbers are about (optional).
REPO_ENV = "OPQ_COLLECTOR_REPO"


@dataclass(frozen=True)
class Request:
    """What a GET route is given: the parsed request, the store and the server's clock."""

    method: str
    path: str
    query: dict[str, list[str]]
    remote: str
    store: Store
    now: datetime
    repo: Path | None = None  # the repository, when the collector knows it (rollout numbers)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Route = Callable[[Request], Response]


def _healthz(request: Request) -> Response:
    """Liveness for the load balancer: the store answers."""
    request.store.box("-")
    return Response(200, b"ok\n")


def _fleet(request: Request) -> Response:
    return _page(fleetweb.fleet(request.store, request.query, request.repo, request.now))


def _box(request: Request) -> Response:
    return _page(fleetweb.box(request.store, request.path, request.now))


def _page(page: fleetweb.Page) -> Response:
    status, body, headers = page
    return Response(status, body, content_type=dict(headers)["Content-Type"],
                    headers=tuple(h for h in headers if h[0] != "Content-Type"))


#: GET (and HEAD) routes by exact path, or by a prefix ending in "/" (the longest wins).
ROUTES: dict[str, Route] = {"/healthz": _healthz, "/": _fleet, fleetweb.BOX_PREFIX: _box}

_PROXIES = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _prefix_route(routes: Mapping[str, Route], path: str) -> Route | None:
    """The route of the longest prefix (a key ending in "/", not "/" itself) of ``path``."""
    prefixes = [p for p in routes if p.endswith("/") and len(p) > 1 and path.startswith(p)]
    return routes[max(prefixes, key=len)] if prefixes else None


def client_address(environ: Mapping[str, Any]) -> str:
    """The box's address: nginx's ``X-Real-IP`` when the peer is nginx on this machine (a
    Unix socket or loopback), else the peer itself. Informational only (shown, never
    trusted)."""
    peer = str(environ.get("REMOTE_ADDR") or "")
    forwarded = str(environ.get("HTTP_X_REAL_IP") or "")[:64]
    try:
        local = not peer or any(ipaddress.ip_address(peer) in net for net in _PROXIES)
    except ValueError:
        local = False
    return forwarded if local and forwarded else (peer or "-")


class Collector:
    """The WSGI callable; one per gunicorn worker."""

    def __init__(self, store_url: str, clock: Callable[[], datetime] = utcnow,
                 routes: Mapping[str, Route] | None = None, repo: Path | None = None) -> None:
        self.store_url = store_url
        self.repo = repo
        self.clock = clock
        self.routes = ROUTES if routes is None else routes
        self.limiter = RateLimiter()
        self._store: Store | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.store_url)
            return self._store

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            response = self._dispatch(environ)
        except PublishError as exc:  # StoreError: database missing, down, or newer
            logger.error("collector: %s", exc)
            with self._lock:
                self._store = None  # reconnect on the next request
            response = Response(503, b"report store unavailable\n")
        except Exception:
            logger.exception("collector: unexpected error")
            response = Response(500, b"internal error\n")
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))),
                   ("X-Content-Type-Options", "nosniff"), *response.headers]
        phrase = HTTPStatus(response.status).phrase
        start_response(f"{response.status} {phrase}", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]

    def _dispatch(self, environ: dict[str, Any]) -> Response:
        method = str(environ.get("REQUEST_METHOD", "GET"))
        path = str(environ.get("PATH_INFO") or "/")
        if path == "/report":
            if method != "POST":
                return Response(405, b"POST a signed report\n", headers=(("Allow", "POST"),))
            return self._report(environ)
        route = self.routes.get(path) or _prefix_route(self.routes, path)
        if route is None:
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"GET only\n", headers=(("Allow", "GET, HEAD"),))
        query = parse_query(str(environ.get("QUERY_STRING", "")))
        return route(Request(method, path, query, client_address(environ), self.store,
                             self.clock(), self.repo))

    def _report(self, environ: dict[str, Any]) -> Response:
        raw = str(environ.get("CONTENT_LENGTH") or "")
        if not raw:
            return Response(411, b"Content-Length required\n")
        if not raw.isdigit():
            return Response(400, b"bad Content-Length\n")
        if int(raw) > REPORT_MAX_BYTES:
            return Response(413, f"reports are limited to {REPORT_MAX_BYTES} bytes\n".encode())
        body = environ["wsgi.input"].read(int(raw))
        remote = client_address(environ)
        answer = receive(self.store, body, remote, self.clock(), self.limiter)
        if answer.status == 204:
            return Response(204, b"")
        return Response(answer.status, (printable(answer.message) + "\n").encode("utf-8"))


def _logging() -> None:
    """Warnings (refused reports, store errors) to stderr, which gunicorn and the journal
    keep; nothing is configured when the host application already has handlers."""
    root = logging.getLogger("opq_box_updater")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("opq-box-collector: %(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def make_application(environ: Mapping[str, str] = os.environ) -> Collector:
    """The application for the store ``$OPQ_COLLECTOR_DB`` names (default: SQLite under
    /var/lib/opq-box-collector); the fleet page's rollout numbers come from the repository
    ``$OPQ_COLLECTOR_REPO`` names, when set."""
    _logging()
    repo = environ.get(REPO_ENV)
    return Collector(collector_store_url(environ), repo=Path(repo) if repo else None)


_APP: list[Collector] = []


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """gunicorn's entry point: the :func:`make_application` of this process, made on its
    first request (importing this module changes nothing)."""
    if not _APP:
        _APP.append(make_application())
    return _APP[0](environ, start_response)
