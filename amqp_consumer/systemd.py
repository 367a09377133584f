"""sd_notify without libsystemd: READY, STATUS, WATCHDOG and STOPPING datagrams.

Active only when systemd set ``$NOTIFY_SOCKET`` (``Type=notify`` units).
READY=1 goes out as soon as the services are up, not when the broker answers:
a broker outage must not fail the unit's start. STATUS= is the status
snapshot's one line (status.py, the same snapshot /ready reads), taken when
the state says it changed and sent only when the line changes; after a fatal
error the last one says why the daemon stopped, which the failed unit keeps. WATCHDOG=1 is sent every half
``$WATCHDOG_USEC`` from a reactor timer, so a stuck reactor stops the pings
and systemd restarts the daemon.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from amqp_consumer.status import Snapshot

log = Logger(namespace="amqp_consumer.systemd")


def socket_address(value: str) -> str | bytes:
    """The sendto() address for a $NOTIFY_SOCKET value; '@name' is an abstract socket."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not asked for.

    systemd sets $WATCHDOG_PID when the watchdog is meant for one process; another
    process (a child, say) must not ping for it.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warn("ignoring WATCHDOG_USEC={value!r}: not a number of microseconds", value=usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    """Sends sd_notify datagrams to one socket; never raises (systemd going away must not stop us)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._target = socket_address(address)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._warned = False

    def send(self, *assignments: str) -> bool:
        """Send VAR=value lines as one datagram; False if it could not be sent."""
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            self._sock.sendto(data, self._target)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd at {address}: {why}", address=self.address, why=e.strerror or e)
            return False
        self._warned = False
        return True

    def close(self) -> None:
        self._sock.close()


class Fed(Protocol):
    """What systemd reads: the daemon's snapshot, and a notice after each change of its state."""

    def snapshot(self) -> Snapshot: ...
    def subscribe(self, listener: Callable[[], None]) -> None: ...


class Sender(Protocol):
    def send(self, *assignments: str) -> bool: ...


class SystemdNotify(Service):
    """READY=1 on start, STATUS= on state changes, WATCHDOG=1 while the reactor turns, STOPPING=1 on stop."""

    name = "systemd"

    def __init__(self, reactor: IReactorTime, status: Fed, notifier: Sender, watchdog: float | None) -> None:
        self._reactor = reactor
        self._status = status
        self.notifier = notifier
        self.watchdog = watchdog
        self._pinger: LoopingCall | None = None
        self._last_status: str | None = None
        self._stopping_sent = False
        status.subscribe(self._state_changed)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self._stopping_sent = False
        self._last_status = self._status.snapshot().status_line()
        self.notifier.send("READY=1", f"STATUS={self._last_status}")
        if self.watchdog is not None and self._pinger is None:
            self._pinger = LoopingCall(self.notifier.send, "WATCHDOG=1")
            self._pinger.clock = self._reactor
            self._pinger.start(self.watchdog, now=True)

    def _state_changed(self) -> None:
        if not self.running:
            return
        snap = self._status.snapshot()
        if snap.draining and not self._stopping_sent:
            # Shutdown starts with the drain, long before this service stops.
            self._send_stopping(snap)
            return
        status = snap.status_line()
        if status != self._last_status:
            self._last_status = status
            self.notifier.send(f"STATUS={status}")

    def _send_stopping(self, snap: Snapshot) -> None:
        self._stopping_sent = True
        status = snap.status_line()
        if status == self._last_status:
            self.notifier.send("STOPPING=1")
            return
        self._last_status = status
        self.notifier.send("STOPPING=1", f"STATUS={status}")

    def stopService(self) -> None:
        if not self._stopping_sent:
            self._send_stopping(self._status.snapshot())
        super().stopService()  # type: ignore[no-untyped-call]
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None


def service(reactor: IReactorTime, status: Fed, environ: Mapping[str, str] | None = None) -> SystemdNotify | None:
    """The notifier for this process's environment, or None when not run by systemd as Type=notify."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    return SystemdNotify(reactor, status, Notifier(address), watchdog_interval(env))
