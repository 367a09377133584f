"""A service that listens on a Twisted endpoint string while it runs.

Health and manhole both use it: it logs the address it got (so ``tcp:0`` is
usable), and a listener that cannot start (address in use, bad path) stops
the daemon with a one-line reason instead of a traceback.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure

from amqp_consumer import exitcodes

log = Logger(namespace="amqp_consumer.listen")


def describe_address(address: IAddress) -> str:
    """host:port for TCP, the path for UNIX sockets."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode() if isinstance(name, bytes) else str(name)
    return str(address)


class Listener(Service):
    """Listen on ``description`` with ``factory`` between startService and stopService.

    ``on_error(code, why)`` is called if listening fails; ``announce(address)``
    gives the log line once listening (address as from :func:`describe_address`).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        what: str,
        description: str,
        factory: IProtocolFactory,
        on_error: Callable[[int, str], None],
        announce: Callable[[str], str] | None = None,
    ) -> None:
        self.name = what
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self._on_error = on_error
        self._announce = announce or (lambda address: f"listening on {address}")
        self.port: IListeningPort | None = None
        self.address: str | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiters: list[Deferred[IListeningPort]] = []
        self._stopped = False

    def privilegedStartService(self) -> None:
        # twistd calls this before dropping privileges: ports below 1024 work.
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listen()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._stopped = False
        endpoint = serverFromString(self._reactor, self.description)
        self._listening = endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        if self._stopped:  # stopped before a slow endpoint finished listening
            port.stopListening()
            return port
        self.port = port
        self.address = describe_address(port.getHost())
        log.info("{what}: {line}", what=self.name, line=self._announce(self.address))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(port)
        return port

    def _failed(self, failure: Failure) -> None:
        why = failure.getErrorMessage() or type(failure.value).__name__
        self._on_error(exitcodes.CONFIG, f"{self.name}: cannot listen on {self.description!r}: {why}")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port (at once if already listening)."""
        if self.port is not None:
            return defer.succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        port, self.port = self.port, None
        self._listening = None
        if port is None:
            return defer.succeed(None)
        try:  # what defer.maybeDeferred does, for a method that may return None
            stopping = port.stopListening()
        except Exception:
            return defer.fail()
        return stopping if stopping is not None else defer.succeed(None)
