"""The servers a benchmark runs against: Debian's nginx with the shipped site configuration
(``tests/nginxfix.py``, the harness the tests use too), and a byte-counting TCP proxy that can
cut a transfer at a chosen byte. Both bind 127.0.0.1 on an ephemeral port and stop when their
``with`` block ends.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PROJECT = Path(__file__).resolve().parent.parent
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# The nginx harness lives with the tests (it needs neither pytest nor the product).
if str(PROJECT / "tests") not in sys.path:
    sys.path.append(str(PROJECT / "tests"))
from nginxfix import AccessEntry, Nginx, NginxError  # noqa: E402

__all__ = ["AccessEntry", "BenchError", "CountingProxy", "Nginx", "NginxError", "require"]


class BenchError(RuntimeError):
    """A benchmark could not run (a tool is missing, a server did not start)."""


def require(tool: str) -> str:
    """The path of ``tool`` (also searched in the sbin directories)."""
    path = shutil.which(tool) or shutil.which(tool, path=SYSTEM_PATH)
    if path is None:
        raise BenchError(f"{tool} is not installed (apt-get install "
                         f"{'nginx-light' if tool == 'nginx' else tool})")
    return path


@dataclass
class Counts:
    """Bytes relayed by a :class:`CountingProxy` (TCP payload: TCP/IP headers not counted)."""

    upstream: int = 0  # client -> server
    downstream: int = 0  # server -> client
    connections: int = 0

    @property
    def total(self) -> int:
        return self.upstream + self.downstream


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` that counts the bytes it relays.

    :meth:`cut_after` arms a one-shot cut: once ``n`` more bytes have gone downstream (over
    all connections), the connection carrying the n-th byte is closed after exactly that
    byte — an interrupted download. With ``rate`` (bytes per second), each connection's
    downstream is paced to that rate: a slower link than loopback.
    """

    def __init__(self, target: tuple[str, int], rate: float | None = None) -> None:
        self.target = target
        self.rate = rate
        self.counts = Counts()
        self._lock = threading.Lock()
        self._cut_budget: int | None = None
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        if self._listener is None:
            raise BenchError("proxy not started")
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/"

    def reset(self) -> Counts:
        """Start counting from zero; returns the counts so far."""
        with self._lock:
            counts, self.counts = self.counts, Counts()
        return counts

    def cut_after(self, downstream_bytes: int) -> None:
        with self._lock:
            self._cut_budget = downstream_bytes

    def start(self) -> CountingProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.counts.connections += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        done = threading.Event()
        up = threading.Thread(target=self._pump, args=(client, server, False, done),
                              daemon=True)
        up.start()
        self._pump(server, client, True, done)
        up.join(timeout=5)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.close()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool,
              done: threading.Event) -> None:
        """Relay one direction until EOF, the other direction's end, or a cut."""
        src.settimeout(0.2)
        started, relayed = time.monotonic(), 0
        try:
            while not done.is_set() and not self._stopping.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                cut = False
                with self._lock:
                    if downstream:
                        if self._cut_budget is not None:
                            if len(data) >= self._cut_budget:
                                data, cut = data[:self._cut_budget], True
                                self._cut_budget = None
                            else:
                                self._cut_budget -= len(data)
                        self.counts.downstream += len(data)
                    else:
                        self.counts.upstream += len(data)
                dst.sendall(data)
                if cut:
                    break
                if downstream and self.rate:
                    relayed += len(data)
                    time.sleep(max(0.0, started + relayed / self.rate - time.monotonic()))
        except OSError:
            pass
        finally:
            done.set()
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
