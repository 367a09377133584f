"""A TCP proxy that tests control, to cut or stall the daemon's broker link.

It runs in its own thread with plain sockets and a selector, so it works
whether or not the test's Twisted reactor is running, and a daemon in a
subprocess can connect to it like to any broker.  It listens on 127.0.0.1
only.

Control calls (:meth:`cut`, :meth:`stall`, :meth:`resume`, :meth:`refuse`)
are applied by the proxy thread and return once they have taken effect.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["TCPProxy"]

LOOPBACK = "127.0.0.1"
_CHUNK = 65536
_MAX_BUFFER = 4 * _CHUNK  # stop reading a side while this much waits for the other


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client socket and its upstream."""

    client: socket.socket
    upstream: socket.socket | None = None
    connecting: bool = False
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_eof: bool = False  # the client will send no more
    upstream_eof: bool = False  # the upstream will send no more
    shut_upstream: bool = False  # we sent FIN to the upstream
    shut_client: bool = False  # we sent FIN to the client


def _abort(sock: socket.socket | None) -> None:
    """Close with RST rather than FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TCPProxy:
    """Forward connections from ``127.0.0.1:<port>`` to a target."""

    def __init__(self, target_port: int, target_host: str = LOOPBACK) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]

        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._links: set[_Link] = set()
        self._stalled = False
        self._refusing = False
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Proxied connections currently open (including stalled ones)."""
        with self._lock:
            return len(self._links)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        if self._closed:
            raise RuntimeError("proxy was stopped")
        self._running = True
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"TCPProxy:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the listening socket.  Safe to call twice."""
        if self._closed:
            return
        if self._thread is not None and self._thread.is_alive():
            self._call(self._shutdown)
            self._thread.join(timeout=10)
        else:
            self._shutdown()
        self._closed = True
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(Exception):
            self._selector.close()

    def cut(self) -> None:
        """Reset every open proxied connection, on both sides, now."""
        self._call(self._cut_all)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open.

        New connections are accepted but not connected upstream until
        :meth:`resume`.  Bytes already sent wait in the kernel's buffers.
        """
        self._call(lambda: self._set_stalled(True))

    def resume(self) -> None:
        """Forward again after :meth:`stall`."""
        self._call(lambda: self._set_stalled(False))

    def refuse(self, on: bool) -> None:
        """While on, close new connections as soon as they are accepted."""
        self._call(lambda: setattr(self, "_refusing", bool(on)))

    def __enter__(self) -> TCPProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<TCPProxy {LOOPBACK}:{self.port} -> {self.target_host}:{self.target_port}>"

    # -- commands ----------------------------------------------------------------

    def _call(self, func: Callable[[], None], timeout: float = 10) -> None:
        """Run *func* in the proxy thread and wait for it."""
        if self._thread is None or not self._thread.is_alive():
            if self._closed:
                raise RuntimeError("proxy was stopped")
            func()  # not started: nothing else touches the sockets
            return
        done = threading.Event()
        with self._lock:
            self._commands.append((func, done))
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")
        if not done.wait(timeout):
            raise RuntimeError(f"{self!r}: the proxy thread did not answer")

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            commands, self._commands = self._commands, []
        for func, done in commands:
            try:
                func()
            finally:
                done.set()

    def _shutdown(self) -> None:
        self._running = False
        self._cut_all()
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(self._listener)
        with contextlib.suppress(OSError):
            self._listener.close()

    def _cut_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            self._drop(link)

    def _set_stalled(self, stalled: bool) -> None:
        self._stalled = stalled
        with self._lock:
            links = list(self._links)
        for link in links:
            if not stalled and link.upstream is None:
                self._connect_upstream(link)
            else:
                self._update(link)

    # -- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._running:
                for key, events in self._selector.select(timeout=1.0):
                    if key.data == "wake":
                        self._run_commands()
                    elif key.data == "listener":
                        self._accept()
                    else:
                        link, side = key.data
                        if link in self._links:
                            self._service(link, side, events)
                # Commands may arrive between the wake-up and the select.
                if self._commands:
                    self._run_commands()
        finally:
            self._running = False
            # Release anyone waiting on a command that will never run.
            with self._lock:
                commands, self._commands = self._commands, []
            for _func, done in commands:
                done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self._refusing:
                _abort(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client=client)
            with self._lock:
                self._links.add(link)
            if self._stalled:
                self._update(link)  # parked: connected upstream on resume
            else:
                self._connect_upstream(link)

    def _connect_upstream(self, link: _Link) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.upstream = upstream
        err = upstream.connect_ex((self.target_host, self.target_port))
        if err in (0, errno.EISCONN):
            link.connecting = False
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            link.connecting = True
        else:
            self._drop(link)  # target down: the client sees its connection closed
            return
        self._update(link)

    def _service(self, link: _Link, side: str, events: int) -> None:
        sock = link.client if side == "client" else link.upstream
        if sock is None or self._stalled:
            return  # events selected before a stall() in the same round
        if side == "upstream" and link.connecting:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop(link)
                return
            link.connecting = False
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(link, side)
            if events & selectors.EVENT_READ:
                self._read(link, side)
        except OSError:
            self._drop(link)
            return
        if link in self._links:
            self._finish_half_closes(link)
        if link in self._links:
            self._update(link)

    def _read(self, link: _Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        assert sock is not None
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if side == "client":
            if data:
                link.to_upstream += data
            else:
                link.client_eof = True
        else:
            if data:
                link.to_client += data
            else:
                link.upstream_eof = True
        # Try to pass it on straight away.
        self._flush(link, "upstream" if side == "client" else "client")

    def _flush(self, link: _Link, side: str) -> None:
        """Write pending bytes to *side*."""
        sock = link.client if side == "client" else link.upstream
        buf = link.to_client if side == "client" else link.to_upstream
        if sock is None or not buf or (side == "upstream" and link.connecting):
            return
        try:
            sent = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        del buf[:sent]

    def _finish_half_closes(self, link: _Link) -> None:
        if link.client_eof and not link.to_upstream and not link.shut_upstream and link.upstream is not None:
            with contextlib.suppress(OSError):
                link.upstream.shutdown(socket.SHUT_WR)
            link.shut_upstream = True
        if link.upstream_eof and not link.to_client and not link.shut_client:
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)
            link.shut_client = True
        if link.shut_upstream and link.shut_client:
            self._drop(link, reset=False)

    def _update(self, link: _Link) -> None:
        """Register the sockets of *link* for the events they need now."""
        if self._stalled:
            self._set_events(link.client, 0, (link, "client"))
            self._set_events(link.upstream, 0, (link, "upstream"))
            return
        client_events = 0
        upstream_events = 0
        if link.upstream is not None and link.connecting:
            upstream_events = selectors.EVENT_WRITE
        elif link.upstream is not None:
            if not link.client_eof and len(link.to_upstream) < _MAX_BUFFER:
                client_events |= selectors.EVENT_READ
            if not link.upstream_eof and len(link.to_client) < _MAX_BUFFER:
                upstream_events |= selectors.EVENT_READ
            if link.to_client:
                client_events |= selectors.EVENT_WRITE
            if link.to_upstream:
                upstream_events |= selectors.EVENT_WRITE
        self._set_events(link.client, client_events, (link, "client"))
        self._set_events(link.upstream, upstream_events, (link, "upstream"))

    def _set_events(self, sock: socket.socket | None, events: int, data: tuple[_Link, str]) -> None:
        if sock is None or sock.fileno() < 0:
            return
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self._selector.unregister(sock)
        elif key is None:
            self._selector.register(sock, events, data)
        elif key.events != events:
            self._selector.modify(sock, events, data)

    def _drop(self, link: _Link, reset: bool = True) -> None:
        with self._lock:
            self._links.discard(link)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)
            if reset:
                _abort(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
