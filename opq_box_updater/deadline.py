"""The overall deadline of a fetcher (``timeouts.total``, DESIGN 3.1 step 6).

Per-read socket timeouts cannot bound a transfer: a server sending one byte per second resets
them forever. So a watchdog timer shuts down, at the deadline, every TCP connection the
fetcher opened; a read blocked in the fetcher's thread then returns at once (EOF or an error)
and the fetcher, seeing :meth:`Watchdog.expired`, raises ``SlowRetrievalError``.

What is shut down is a **duplicate of each socket's descriptor**, taken the moment urllib3
creates the socket (``_new_conn``), not the connection's ``sock`` attribute: when a response
will close the connection (``Connection: close``, HTTP/1.0), ``http.client`` hands the socket
to the response and sets ``conn.sock = None``, and during a TLS handshake the plain socket is
already detached while the TLS socket is not yet visible. ``shutdown(2)`` acts on the TCP
connection, not on the descriptor, so the duplicate stops every reader of the original,
whoever holds it, with urllib3 1.26 and 2.x alike. A duplicate also keeps the connection
open after its owner closes it, so the duplicates of connections no longer in use are closed
when each operation ends (:meth:`Watchdog.armed`), and all of them by :meth:`Watchdog.close`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, TypeVar, cast

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class Watchdog:
    """Knows every socket of one fetcher and shuts them all down at the deadline.

    Callers must check :meth:`expired` after every read, because a read interrupted by the
    shutdown can look like a clean EOF.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._fired = False
        self._lock = threading.Lock()
        # (the connection, a duplicate of its socket's descriptor), one per socket created
        self._socks: list[tuple[weakref.ref[HTTPConnection], socket.socket]] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self._fired or self.remaining() <= 0

    def track(self, conn: HTTPConnection, sock: socket.socket) -> None:
        """Register the freshly connected ``sock`` of ``conn`` (before any TLS handshake, so
        the handshake is covered too). A socket registered after the deadline is shut down
        at once. Raises OSError when the descriptor cannot be duplicated."""
        dup = socket.socket.dup(sock)  # the base method: SSLSocket.dup() refuses
        with self._lock:
            self._socks.append((weakref.ref(conn), dup))
            if self._fired:
                _shutdown(dup)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Run the body with a timer that fires at the deadline (one timer per operation, so
        no thread outlives a call); afterwards release the sockets no longer in use."""
        timer = threading.Timer(min(max(self.remaining(), 0.0), threading.TIMEOUT_MAX),
                                self._fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            self._release(idle_only=True)

    def close(self) -> None:
        """Close every duplicate (the fetcher is done with all its connections)."""
        self._release(idle_only=False)

    def _release(self, *, idle_only: bool) -> None:
        """Close the duplicates of connections that are gone or closed (``sock`` is None
        once urllib3 or http.client closed it or handed it to a response, which the
        operation that just ended has closed); all of them unless ``idle_only``."""
        with self._lock:
            keep: list[tuple[weakref.ref[HTTPConnection], socket.socket]] = []
            for ref, dup in self._socks:
                conn = ref()
                if idle_only and conn is not None and getattr(conn, "sock", None) is not None:
                    keep.append((ref, dup))
                else:
                    dup.close()
            self._socks = keep

    def _fire(self) -> None:
        with self._lock:  # never races _release: a closed duplicate is never shut down
            self._fired = True
            for _ref, dup in self._socks:
                _shutdown(dup)


def _shutdown(sock: socket.socket) -> None:
    # OSError: already closed or not connected, nothing left to stop.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_C = TypeVar("_C", bound=HTTPConnection)


def _tracked(base: type[_C], watchdog: Watchdog) -> type[_C]:
    """A subclass of urllib3's connection class ``base`` whose sockets ``watchdog`` tracks.

    ``_new_conn`` creates the TCP socket in urllib3 1.26 and 2.x alike (before TLS and before
    any proxy tunnel), for every connect and reconnect of the connection.
    """

    def _new_conn(self: _C) -> socket.socket:
        sock = cast(socket.socket, base._new_conn(self))  # type: ignore[attr-defined]
        try:
            watchdog.track(self, sock)
        except OSError:
            sock.close()
            raise
        return sock

    return cast("type[_C]", type(f"Deadline{base.__name__}", (base,), {"_new_conn": _new_conn}))


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter, with connection pools whose sockets ``watchdog`` can stop."""

    def __init__(self, watchdog: Watchdog) -> None:
        # Set before super().__init__(), which calls init_poolmanager().
        self._pool_classes = {
            "http": type("DeadlineHTTPConnectionPool", (HTTPConnectionPool,),
                         {"ConnectionCls": _tracked(HTTPConnection, watchdog)}),
            "https": type("DeadlineHTTPSConnectionPool", (HTTPSConnectionPool,),
                          {"ConnectionCls": _tracked(HTTPSConnection, watchdog)}),
        }
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # SOCKS managers bring their own pools; there only the per-read clock check applies.
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = self._pool_classes
        return manager
