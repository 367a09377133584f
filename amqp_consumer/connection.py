"""Everything that touches pika lives here, behind a small pika-free surface.

pika's Twisted adapter is deprecated for pika 2; keeping it in one module means
the day it goes, one file changes. The rest of the daemon sees ``Connector``
(a reconnecting service), ``Session`` (one AMQP connection) and ``Channel``.
"""

from __future__ import annotations

import __future__
import ast
import importlib
import importlib.util
import logging
import random
import re
import socket
import struct
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping, cast
from urllib.parse import urlsplit


# --- importing only the pika the daemon uses ------------------------------------------
#
# ``import pika.adapters.twisted_connection`` runs three things the daemon never uses,
# which an idle daemon would hold (bench/idle_rss.py):
# - pika/__init__.py and pika/adapters/__init__.py, which import the blocking, select
#   and asyncio adapters as well: 78 classes, 0.65 MB;
# - pika.adapters.utils.io_services_utils, the other adapters' socket and TLS plumbing,
#   from which the Twisted adapter takes one five-line check (check_callback_arg): 0.15 MB;
# - in pika.data, the decimal module, for one AMQP field type: 0.4 MB.
# So pika, pika.adapters and io_services_utils go into sys.modules bare, holding only
# what is used: the ``__path__`` a submodule import needs, pika's ``__version__``
# (connection_workflow imports it, and the broker sees it) and check_callback_arg,
# compiled alone from pika's own source, at its own lines. The first look-up of
# anything else they define (a callback's ``pika.BlockingConnection``, say) runs the
# real module then. pika.data gets a stand-in for decimal (below). A pika that is
# already imported (by a callback module) is left alone, and so is one whose source
# does not read as expected: that gets the ordinary import.
# tests/test_pika_packages.py checks all of it.


def _bare_module(spec: importlib.machinery.ModuleSpec, early: types.CodeType | None = None) -> types.ModuleType:
    module = importlib.util.module_from_spec(spec)
    name = spec.name
    package = spec.submodule_search_locations is not None
    if early is not None:
        exec(early, module.__dict__)
    # Callback threads may ask at once: one runs the module, the others wait for it. pika's
    # __init__ completes pika.adapters' on the same thread, hence a reentrant lock.
    lock = threading.RLock()
    began = False

    def complete(attribute: str) -> Any:
        nonlocal began
        if not package and attribute == "__path__":
            # What `from module import name` asks first: running a module never makes it a package.
            raise AttributeError(f"module {name!r} has no attribute '__path__'")
        if package and attribute.isidentifier() and not attribute.startswith("__"):
            try:  # pika's own `from pika import frame`: a submodule, no __init__ needed
                return importlib.import_module(f"{name}.{attribute}")
            except ModuleNotFoundError as e:
                if e.name != f"{name}.{attribute}":
                    raise
        with lock:
            if not began:
                began = True
                assert spec.loader is not None
                spec.loader.exec_module(module)
                del module.__dict__["__getattr__"]
        try:  # not getattr(): while the module runs, that would come back here
            return module.__dict__[attribute]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}") from None

    module.__getattr__ = complete  # type: ignore[method-assign]  # PEP 562: the module's own fallback
    return module


def _source(spec: importlib.machinery.ModuleSpec | None) -> str | None:
    get_source = getattr(spec and spec.loader, "get_source", None)
    try:
        return get_source(spec.name) if spec and get_source else None
    except (ImportError, OSError):
        return None


def _version(source: str | None) -> str | None:
    for statement in ast.parse(source).body if source else ():
        match statement:
            case ast.Assign(targets=[ast.Name(id="__version__")], value=ast.Constant(value=str() as version)):
                return version
    return None


def _definition(spec: importlib.machinery.ModuleSpec, function: str) -> types.CodeType | None:
    """One top-level function of the module, compiled alone at its own lines (for tracebacks)."""
    source = _source(spec)
    found = re.search(rf"^def {function}\(.*?(?=^\S)", source, re.M | re.S) if source else None
    if source is None or found is None:
        return None
    try:
        code: types.CodeType = compile("\n" * source.count("\n", 0, found.start()) + found.group(),
                                       spec.origin or spec.name, "exec",
                                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
    except SyntaxError:
        return None
    return code


def _import_pika_bare() -> None:
    if "pika" in sys.modules:
        return
    spec = importlib.util.find_spec("pika")
    version = _version(_source(spec))
    if spec is None or version is None:
        return  # the ordinary import
    pika = sys.modules["pika"] = _bare_module(spec)
    setattr(pika, "__version__", version)
    logging.getLogger("pika").addHandler(logging.NullHandler())  # as pika's __init__ does first
    adapters_spec = importlib.util.find_spec("pika.adapters")
    assert adapters_spec is not None
    sys.modules["pika.adapters"] = _bare_module(adapters_spec)
    setattr(pika, "adapters", sys.modules["pika.adapters"])
    io_spec = importlib.util.find_spec("pika.adapters.utils.io_services_utils")  # imports pika.adapters.utils
    early = _definition(io_spec, "check_callback_arg") if io_spec else None
    if io_spec is not None and early is not None:
        bare_io = sys.modules[io_spec.name] = _bare_module(io_spec, early)
        setattr(sys.modules["pika.adapters.utils"], "io_services_utils", bare_io)


_import_pika_bare()


# --- pika.data without the decimal module ------------------------------------------
#
# pika.data imports decimal for the AMQP decimal field type. The broker sends none in
# the handshake, and a message carries one only if its publisher put a Decimal in its
# headers. So while pika.data is imported, "decimal" names a stand-in: no value is an
# instance of its Decimal until the real module exists (no Decimal can exist before
# it does), and calling it (a header of that type being decoded) imports the real
# module and puts it in pika.data in the stand-in's place. A decimal imported earlier
# is used as it is.


def _real_decimal() -> types.ModuleType:
    import decimal

    pika.data.decimal = decimal
    return decimal


class _DecimalOnDemand(type):
    def __instancecheck__(cls, value: object) -> bool:
        real = sys.modules.get("decimal")
        return real is not None and real is not _DECIMAL_STAND_IN and isinstance(value, real.Decimal)

    def __call__(cls, *args: Any) -> Any:
        return _real_decimal().Decimal(*args)


class _Decimal(metaclass=_DecimalOnDemand):
    pass


_DECIMAL_STAND_IN = types.ModuleType("decimal", "pika.data's decimal until one is needed (amqp_consumer.connection)")
setattr(_DECIMAL_STAND_IN, "Decimal", _Decimal)
# Anything else asked of it (nothing in pika 1.4) is the real module's.
setattr(_DECIMAL_STAND_IN, "__getattr__", lambda name: getattr(_real_decimal(), name))


def _import_pika_data_without_decimal() -> None:
    # This runs when the daemon's assembly first imports this module, before any of its
    # threads start: no other import can meet the stand-in in sys.modules meanwhile.
    if "decimal" in sys.modules or "pika.data" in sys.modules:
        return
    # What pika.data imports besides decimal, first: none of them may see the stand-in.
    for name in ("calendar", "datetime", "struct", "typing", "pika.compat", "pika.exceptions"):
        importlib.import_module(name)
    sys.modules["decimal"] = _DECIMAL_STAND_IN
    try:
        importlib.import_module("pika.data")
    finally:
        if sys.modules.get("decimal") is _DECIMAL_STAND_IN:
            del sys.modules["decimal"]


_import_pika_data_without_decimal()

# pika ships no type information (no py.typed): everything from it is Any, here
# and only here. The rest of the daemon sees the typed classes below.
import pika  # type: ignore[import-untyped]  # noqa: E402  (after _import_pika_bare)
import pika.channel  # type: ignore[import-untyped]
import pika.connection  # type: ignore[import-untyped]
import pika.credentials  # type: ignore[import-untyped]
import pika.data  # type: ignore[import-untyped]
import pika.frame  # type: ignore[import-untyped]
import pika.spec  # type: ignore[import-untyped]
from pika import exceptions as pika_exc
from pika.adapters.twisted_connection import (  # type: ignore[import-untyped]
    ClosableDeferredQueue,
    TwistedChannel,
    TwistedProtocolConnection,
)
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amqp_consumer.backoff import Backoff
from amqp_consumer.config import AMQPConfig, Config, redact_url
from amqp_consumer.message import Message
from amqp_consumer.stall import StallWatch
from amqp_consumer.state import BrokerNode

log = Logger(namespace="amqp_consumer.connection")


# --- pika's private surface -------------------------------------------------------
#
# pika 1.x offers no public way to do what these do. Every private name this
# module touches is listed here, checked against PIKA_CHECKED;
# tests/test_pika_surface.py fails when the installed pika lacks one or changes
# its shape ("name(params)" is a method with those parameters, "name" an
# attribute). Change a use and this list together.
PIKA_CHECKED = "1.4.4"
PIKA_PRIVATE: tuple[tuple[str, str, str], ...] = (
    # (pika class, name, what we rely on it for)
    ("TwistedProtocolConnection", "_impl", "the pika Connection behind the adapter (params, callbacks)"),
    ("TwistedProtocolConnection", "_on_connection_failed(_connection, _error_message)",
     "overridden: the handshake fails with the broker's refusal, not a generic error"),
    ("TwistedProtocolConnection", "_on_connection_closed(_connection, exception)",
     "overridden: a close carries the broker's reason, or the stall watch's"),
    ("Connection", "_error", "the broker's Connection.Close, read when the socket goes"),
    ("Connection", "_read_frame()", "replaced: a content header pika cannot decode is read leniently"),
    ("Connection", "_frame_buffer", "the bytes read and not yet decoded, for the lenient reader"),
    ("Connection", "_channels", "channel number to Channel: which numbers are in use"),
    ("Connection", "_next_channel_number()", "replaced: a number the broker closed is held (_ChannelNumbers)"),
    ("Connection", "_on_channel_cleanup(channel)", "wrapped: notes a number the broker closed"),
    ("Connection", "_deliver_frame_to_channel(value)", "wrapped: frames for a held number are dropped"),
    ("Channel", "_closing_reason", "ChannelClosedByBroker when the broker started the close"),
    ("Channel", "_consumers", "consumer tag to on_message: put back to answer a broker's cancel"),
    ("TwistedChannel", "_channel", "the pika Channel: acks without a Deferred each, cancel callbacks"),
    ("TwistedChannel", "_consumers", "consumer tag to ClosableDeferredQueue, kept in step with ours"),
)

OnDelivery = Callable[["Channel", int, Message], None]


# --- errors, pika-free ---------------------------------------------------------


class AMQPError(Exception):
    """A broker-side problem, worded for a log line."""


class AccessRefused(AMQPError):
    """Credentials or the virtual host refused at login: restarting will not help.

    A refusal on a queue or exchange (403 on a channel: missing permission, or a
    queue another client holds exclusively) is not this: it can clear by itself
    or be fixed on the broker, so it is retried.
    """


class ConnectionClosed(AMQPError):
    """The broker closed the whole connection (a hard error such as 503 COMMAND_INVALID)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"the broker closed the connection: {code} {text}")
        self.code = code
        self.text = text


class ChannelClosed(AMQPError):
    def __init__(self, code: int, text: str, by_broker: bool) -> None:
        super().__init__(f"{code} {text}" if code else text)
        self.code = code
        self.text = text
        self.by_broker = by_broker


class PublishFailed(AMQPError):
    """The broker did not confirm a publish (nacked, unroutable, or the channel died)."""


class Unroutable(PublishFailed):
    """The broker returned a mandatory publish: no queue is bound to take it (NO_ROUTE)."""


def _translate(error: object) -> Exception:
    """Turn a pika or Twisted error into one of ours with a readable text."""
    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, (pika_exc.ProbableAuthenticationError, pika_exc.AuthenticationError)):
        return AccessRefused(f"the broker refused our credentials ({_pika_text(error)})")
    if isinstance(error, pika_exc.ProbableAccessDeniedError):
        return AccessRefused(f"the broker denied access to the virtual host ({_pika_text(error)})")
    if isinstance(error, pika_exc.ConnectionClosedByBroker):
        return ConnectionClosed(error.reply_code, error.reply_text)
    if isinstance(error, pika_exc.ChannelClosed):
        return ChannelClosed(
            error.reply_code, error.reply_text, isinstance(error, pika_exc.ChannelClosedByBroker)
        )
    if isinstance(error, pika_exc.AMQPHeartbeatTimeout):
        return AMQPError("no heartbeat from the broker; the connection is dead")
    if isinstance(error, pika_exc.UnroutableError):
        return Unroutable("the broker returned it: no queue takes it (NO_ROUTE)")
    if isinstance(error, pika_exc.NackError):
        return PublishFailed("the broker nacked it")
    if isinstance(error, AMQPError):
        return error
    return AMQPError(_tls_or_plain_text(error))


def _refused_at_login(error: Exception) -> AccessRefused | None:
    """The handshake's refusals that need an operator: credentials, or access to the vhost."""
    if isinstance(error, AccessRefused):
        return error
    if isinstance(error, ConnectionClosed) and error.code in (403, 530) and "is down" not in error.text:
        # 530 also says "vhost ... is down" while a vhost restarts: that one passes.
        return AccessRefused(f"the broker refused access: {error.code} {error.text}")
    return None


def _pika_text(error: Exception) -> str:
    return str(error) or type(error).__name__


def _tls_or_plain_text(error: object) -> str:
    name = type(error).__name__
    text = str(error)
    if name == "VerificationError":
        return f"TLS: the broker's certificate does not match its host name ({text})"
    if "certificate verify failed" in text:
        return "TLS: the broker's certificate is not signed by a trusted CA (check amqp.tls.ca_cert)"
    if name == "Error" and "SSL" in text:
        return f"TLS handshake failed: {text}"
    return f"{name}: {text}" if text else name


# --- the connection -------------------------------------------------------------


class _Protocol(TwistedProtocolConnection):  # type: ignore[misc]  # pika's class is Any
    """Keep the broker's real reason instead of pika's generic errors."""

    # Set by pika's __init__; declared for the checker, as pika's classes are Any.
    ready: Deferred[Any] | None
    closed: Deferred[Any] | None
    _broker_close: Exception | None = None
    _stalled: Exception | None = None
    _watch: StallWatch | None = None

    def watch_for_stalls(self, clock: IReactorTime) -> None:
        """Once open: drop the connection after two heartbeat intervals without a byte from the broker."""
        heartbeat = self._impl.params.heartbeat  # as negotiated with the broker
        if heartbeat:
            self._watch = StallWatch(clock, 2.0 * heartbeat, self._on_stall)

    def _on_stall(self, quiet: float) -> None:
        self._stalled = AMQPError(
            f"nothing received from the broker for {quiet:.1f} s (two heartbeat intervals); the connection is dead"
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        watch = self._watch
        if watch is not None:
            watch.received()
        self._impl.data_received(data)

    def __init__(self, parameters: pika.connection.ConnectionParameters, custom_reactor: Any = None) -> None:
        super().__init__(parameters, custom_reactor=custom_reactor)
        impl = self._impl
        # A header pika cannot decode must not kill the connection (see _read_frame).
        impl._read_frame = lambda: _read_frame(impl._frame_buffer)
        self._numbers = _ChannelNumbers(impl)

    def channel(self, channel_number: int | None = None) -> Deferred[Any]:
        return self._numbers.opening(super().channel(channel_number))

    def connectionMade(self) -> None:
        # pika's own adapters set TCP_NODELAY; Twisted's transports do not. Without
        # it a lone ack or close frame can wait for the broker's delayed TCP ACK.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # pika's adapter replaces the reason the broker gave in Connection.Close
        # (403 ACCESS_REFUSED for a wrong password, 530 for a vhost) with
        # ConnectionDone once the socket closes; keep the broker's reason.
        if self._watch is not None:
            self._watch.stop()
        pending = getattr(self._impl, "_error", None)
        if isinstance(pending, pika_exc.ConnectionClosedByBroker):
            self._broker_close = pending
        super().connectionLost(reason)

    def _on_connection_failed(self, _connection: Any, error: Exception | None = None) -> None:
        d: Deferred[Any] | None
        d, self.ready = self.ready, None
        if d:
            d.errback(self._broker_close or error or pika_exc.AMQPConnectionError("handshake failed"))

    def _on_connection_closed(self, connection: Any, exception: Exception) -> None:
        super()._on_connection_closed(connection, self._broker_close or self._stalled or exception)


@dataclass(frozen=True)
class _Target:
    display: str
    address: str  # host:port, which names the node: the broker does not send its node name
    endpoint: IStreamClientEndpoint
    params: pika.connection.ConnectionParameters


def _targets(reactor: IReactorTime, config: AMQPConfig, rng: random.Random) -> list[_Target]:
    """One target per URL, in the configured order or, with amqp.shuffle, in a random one
    drawn once: daemons sharing a config then spread their first connections over the nodes."""
    out = []
    name = config.connection_name or f"amqp-consumer@{socket.gethostname()}"
    for url in config.urls:
        parts = urlsplit(url)
        params = pika.connection.URLParameters(url)
        params.heartbeat = config.heartbeat
        params.client_properties = {"connection_name": name, "product": "amqp-consumer"}
        if config.auth_mechanism == "EXTERNAL":
            params.credentials = pika.credentials.ExternalCredentials()
        tls = parts.scheme == "amqps"
        port = parts.port or (5671 if tls else 5672)
        host = parts.hostname or "localhost"
        endpoint = _tcp_endpoint(reactor, host, port, config.connect_timeout)
        if tls:
            endpoint = wrapClientTLS(_tls_options(host, config), endpoint)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.append(_Target(redact_url(url), address, endpoint, params))
    if config.shuffle:
        rng.shuffle(out)
    return out


def _tcp_endpoint(reactor: IReactorTime, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """An address is connected to as it is; only a name goes through the resolver.

    HostnameEndpoint resolves even an address, on the reactor's thread pool: that
    starts a thread which then stays, with its malloc arena and glibc's resolver
    state, and loads the IDNA codec: 0.35 MB of an idle daemon (bench/idle_rss.py).
    """
    tcp = cast(IReactorTCP, reactor)
    if isIPAddress(host):
        return TCP4ClientEndpoint(tcp, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(tcp, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def _tls_options(host: str, config: AMQPConfig) -> IOpenSSLClientConnectionCreator:
    from twisted.internet import ssl

    tls = config.tls
    trust = ssl.platformTrust()
    if tls.ca_cert:
        with open(tls.ca_cert, "rb") as f:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())]
            )
    client = None
    if tls.cert:
        with open(tls.cert, "rb") as c, open(tls.key, "rb") as k:
            client = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [chunk + end for chunk in data.split(end) if b"-----BEGIN CERTIFICATE-----" in chunk]


@implementer(IStreamClientEndpoint)
class _RoundRobin(Factory):
    """An endpoint and factory in one: each attempt uses the current URL; a failure moves on."""

    noisy = False  # no "Starting factory" line per reconnect

    def __init__(self, targets: list[_Target], reactor: IReactorTime, next_delay: Callable[[], float]) -> None:
        self._targets = targets
        self._index = 0
        self._reactor = reactor
        self._next_delay = next_delay

    @property
    def current(self) -> _Target:
        return self._targets[self._index]

    def advance(self) -> None:
        self._index = (self._index + 1) % len(self._targets)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        target = self.current
        d = target.endpoint.connect(protocolFactory)

        def failed(f: Failure) -> Failure:
            log.warn(
                "cannot connect to {url}: {why}; retrying in {delay:.1f} s",
                url=target.display,
                why=_translate(f),
                delay=self._next_delay(),
            )
            self.advance()
            return f

        return d.addErrback(failed)

    def buildProtocol(self, addr: IAddress | None) -> _Protocol:
        return _Protocol(self.current.params, custom_reactor=self._reactor)

    def __repr__(self) -> str:
        return self.current.display


class Connector(Service):
    """Keeps one AMQP connection up through ClientService, handing each new one over as a Session.

    The one part built here rather than passed in: ClientService is how the
    connector works, not a collaborator to swap, and its endpoint (the
    round-robin over the URLs), retry policy and handshake are the
    connector's own. Its backoff is passed in, shared with the subscription.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: AMQPConfig,
        on_session: Callable[[Session], None],
        on_failure: Callable[[str], None],
        on_fatal: Callable[[Exception], None],
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._on_session = on_session
        self._on_failure = on_failure
        self._on_fatal = on_fatal
        # Says what a lost connection was in the middle of, when that explains the loss
        # better than "connection lost" (the broker refusing the topology, say).
        self.explain_loss: Callable[[AMQPError], str | None] = lambda error: None
        # Shared with the subscription's channel retries (one count for both), when given.
        self._backoff = backoff or Backoff(config.reconnect_min_delay, config.reconnect_max_delay)
        self._planned: float | None = None
        self._rr = _RoundRobin(_targets(reactor, config, rng or random.Random()), reactor, self._plan_retry)
        self._service = ClientService(
            self._rr,
            self._rr,
            retryPolicy=self._retry_delay,
            clock=reactor,
            prepareConnection=self._handshake,
        )
        self.session: Session | None = None

    @property
    def target(self) -> str:
        return self._rr.current.display

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        log.info("connecting to {url}", url=self.target)
        self._service.startService()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the AMQP connection with its handshake, then stop reconnecting.

        The order matters: ClientService.stopService() only drops the socket, and
        a broker that sees the socket go without connection.close may discard
        acks it has read but not yet applied (the messages are delivered again).
        channel.close-ok and connection.close-ok come only after the broker has
        handled everything sent before them.
        """
        session = self.session
        if session is not None:
            await session.close(timeout)
        await self._service.stopService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return defer.ensureDeferred(self.close())

    # Backoff. ClientService counts failed attempts itself but restarts the count at
    # every handshake that succeeds, so a broker that accepts the connection and then
    # refuses the topology was retried at the minimum delay forever. The count here
    # restarts only when the consumer says consuming has started (reset_backoff).

    def reset_backoff(self) -> None:
        self._backoff.reset()

    def _plan_retry(self) -> float:
        """The delay before the next attempt, fixed now so the failure's log line can say it."""
        if self._planned is None:
            self._planned = self._backoff.next()
        return self._planned

    def _retry_delay(self, _attempt: int) -> float:
        delay = self._plan_retry()
        self._planned = None
        return delay

    def _handshake(self, protocol: IProtocol) -> Deferred[None]:
        # ClientService hands over a proxy that forwards every attribute to the
        # _Protocol that _RoundRobin.buildProtocol made.
        proto = cast(_Protocol, protocol)
        ready: Deferred[Any] | None = proto.ready
        assert ready is not None
        timer = self._reactor.callLater(self._config.connect_timeout, proto.transport.abortConnection)

        def opened(_: Any) -> None:
            if timer.active():
                timer.cancel()
            proto.watch_for_stalls(self._reactor)
            session = Session(proto, self._reactor, self._rr.current.address)
            log.info("connected to {url} ({broker})", url=self.target, broker=session.node.describe())
            self.session = session
            session.closed.addCallback(self._lost, session)
            self._on_session(session)

        def failed(f: Failure) -> Failure | None:
            if timer.active():
                timer.cancel()
            error = _translate(f)
            refused = _refused_at_login(error)
            if refused is not None:
                log.error("{url}: {why}", url=self.target, why=refused)
                self._give_up(ready)
                self._on_fatal(refused)
                return None
            log.warn(
                "AMQP handshake with {url} failed: {why}; retrying in {delay:.1f} s",
                url=self.target,
                why=error,
                delay=self._plan_retry(),
            )
            self._on_failure(str(error))
            self._rr.advance()
            if proto.transport is not None:
                proto.transport.loseConnection()
            return f

        return ready.addCallbacks(opened, failed)

    def _give_up(self, ready: Deferred[Any]) -> None:
        """Stop ClientService after a refused login, with no retry and no NoTransition error.

        A failed prepareConnection sends ClientService to "Waiting" (it plans a
        retry), and the socket closing afterwards is an input no state but
        Connected or Disconnecting takes (automat's NoTransition, logged as an
        unhandled error). So the handshake ends as a success for ClientService
        (the caller returns None), and this callback, added behind the ones
        ClientService chained on ``ready``, stops it once it counts as
        connected: it closes the socket and ends in Stopped.
        """

        def stop(_: Any) -> None:
            self._service.stopService()

        ready.addCallback(stop)

    def _lost(self, reason: Exception | None, session: Session) -> None:
        if self.session is session:
            self.session = None
        error = _translate(reason) if reason is not None else AMQPError("closed")
        if self.running and not session.closing:
            delay = self._plan_retry()
            explained = self.explain_loss(error) if isinstance(error, AMQPError) else None
            if explained:
                log.error("{why}; reconnecting in {delay:.1f} s", why=explained, delay=delay)
            else:
                log.warn("connection to {url} lost: {why}; reconnecting in {delay:.1f} s", url=self.target, why=error, delay=delay)
            # A lost node is likely still down: the next attempt goes to the next URL
            # (a cluster's next node) rather than spending a backoff step on it.
            self._rr.advance()
            self._on_failure(explained or f"connection lost: {error}")


class Session:
    """One open AMQP connection."""

    def __init__(self, proto: _Protocol, reactor: IReactorTime, address: str) -> None:
        self._proto = proto
        self._reactor = reactor
        self.node = _broker_node(address, proto._impl.server_properties or {})
        self.closing = False
        # Fires with why the connection closed (None: no reason known).
        self.closed: Deferred[Exception | None] = proto.closed if proto.closed is not None else defer.succeed(None)
        self.blocked: Callable[[bool, str], None] = lambda blocked, why: None
        impl = proto._impl
        impl.add_on_connection_blocked_callback(
            lambda _c, frame: self.blocked(True, getattr(frame.method, "reason", "") or "")
        )
        impl.add_on_connection_unblocked_callback(lambda _c, _frame: self.blocked(False, ""))

    @property
    def is_open(self) -> bool:
        return not self.closing and bool(self._proto._impl.is_open)

    async def channel(self) -> Channel:
        try:
            tc = await self._proto.channel()
        except Exception as e:
            raise _translate(e) from None
        return Channel(tc)

    async def close(self, timeout: float) -> None:
        """Close every channel, then the connection, each with its close-ok; at most timeout seconds.

        pika closes the channels first and sends connection.close once they are
        all closed. A broker that does not answer in time (a stalled link, a
        blocked connection it no longer reads) gets the socket aborted.
        """
        if self.closing:
            return
        self.closing = True
        if self._proto.is_closed:
            return
        done: Deferred[bool] = Deferred()
        self.closed.addBoth(lambda r: done.callback(True) if not done.called else None)
        timer = self._reactor.callLater(timeout, lambda: done.callback(False) if not done.called else None)
        try:
            self._proto.close()
        except pika_exc.ConnectionWrongStateError:
            pass
        answered = await done
        if timer.active():
            timer.cancel()
        transport = self._proto.transport
        if transport is not None and transport.connected:
            if answered:
                transport.loseConnection()
            else:
                log.warn("the broker did not answer connection.close within {t:g} s; dropping the connection", t=timeout)
                transport.abortConnection()


def _broker_node(address: str, props: Mapping[str, Any]) -> BrokerNode:
    """What connection.start told us about the broker; text only, as brokers may send bytes."""

    def text(key: str) -> str:
        value = props.get(key, "")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    return BrokerNode(address, text("product"), text("version"), text("cluster_name"))


class Channel:
    """One AMQP channel. Acks go straight to pika's channel: no Deferred per message."""

    def __init__(self, tc: TwistedChannel) -> None:
        self._tc = tc
        self._ch = tc._channel
        self.number: int = tc.channel_number
        self._cancel_handlers: dict[str, Callable[[str], None]] = {}
        self._on_message: dict[str, Callable[..., None]] = {}  # per consumer tag, to answer a broker's cancel
        self._ch.add_on_cancel_callback(self._on_cancel)
        self.close_reason: ChannelClosed | None = None
        self._close_listeners: list[Callable[[ChannelClosed], None]] = []
        tc.on_closed.addBoth(self._on_closed)

    def __repr__(self) -> str:
        return f"<Channel {self.number}>"

    @property
    def is_open(self) -> bool:
        return bool(self._ch.is_open)

    def on_close(self, listener: Callable[[ChannelClosed], None]) -> None:
        """Call listener once with the reason when the channel closes (at once if it has)."""
        if self.close_reason is not None:
            listener(self.close_reason)
        else:
            self._close_listeners.append(listener)

    def _on_closed(self, reason: object) -> None:
        error = _translate(reason) if reason is not None else None
        if not isinstance(error, ChannelClosed):
            error = ChannelClosed(0, str(error or "closed"), False)
        self.close_reason = error
        listeners, self._close_listeners = self._close_listeners, []
        for listener in listeners:
            listener(error)

    def _on_cancel(self, frame: Any) -> None:
        tag = frame.method.consumer_tag
        handler = self._cancel_handlers.pop(tag, None)
        if handler is not None:
            handler(tag)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._tc, method)(*args, **kwargs)
        except Exception as e:
            raise _translate(e) from None

    async def declare(self, config: Config) -> dict[str, str]:
        """Declare exchanges, queues, bindings and quarantine queues; map configured queue names to real ones."""
        for x in config.exchanges:
            await self._call(
                "exchange_declare",
                exchange=x.name,
                exchange_type=x.type,
                durable=x.durable,
                auto_delete=x.auto_delete,
                arguments=dict(x.arguments),
            )
        names: dict[str, str] = {}
        for q in config.queues:
            frame = await self._call(
                "queue_declare",
                queue=q.name,
                durable=q.durable,
                auto_delete=q.auto_delete,
                exclusive=q.exclusive,
                arguments=dict(q.arguments),
            )
            names[q.name] = frame.method.queue
        for b in config.bindings:
            for key in b.routing_keys:
                await self._call(
                    "queue_bind", queue=names[b.queue], exchange=b.exchange, routing_key=key, arguments=dict(b.arguments)
                )
        for consumed in config.consumed_queues:
            names.setdefault(consumed, consumed)
            await self.declare_queue(quarantine_queue(consumed))
        return names

    async def declare_queue(self, queue: str) -> None:
        """Declare a durable queue with no arguments (a quarantine queue)."""
        await self._call("queue_declare", queue=queue, durable=True)

    async def qos(self, prefetch: int) -> None:
        await self._call("basic_qos", prefetch_count=prefetch)

    async def consume(self, queue: str, on_delivery: OnDelivery, on_cancel: Callable[[str], None]) -> str:
        """Start a consumer; deliveries go to on_delivery on the reactor thread."""
        ch = self._ch
        done: Deferred[str] = Deferred()
        channel = self
        partly_read = _PartlyRead

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            msg = Message(
                body=body,
                exchange=method.exchange,
                routing_key=method.routing_key,
                queue=queue,
                headers=props.headers,
                id=props.message_id,
                correlation_id=props.correlation_id,
                reply_to=props.reply_to,
                content_type=props.content_type,
                priority=props.priority,
                timestamp=props.timestamp,
                redelivered=method.redelivered,
                delivery_tag=method.delivery_tag,
                content_encoding=props.content_encoding,
                delivery_mode=props.delivery_mode,
                expiration=props.expiration,
                type=props.type,
                user_id=props.user_id,
                app_id=props.app_id,
                cluster_id=props.cluster_id,
                unreadable=props.unreadable if type(props) is partly_read else None,
            )
            on_delivery(channel, method.delivery_tag, msg)

        def ok(frame: Any) -> None:
            tag: str = frame.method.consumer_tag
            # Keep TwistedChannel's bookkeeping consistent so a broker cancel is not logged as unknown.
            self._tc._consumers[tag] = ClosableDeferredQueue()
            self._cancel_handlers[tag] = on_cancel
            self._on_message[tag] = on_message
            done.callback(tag)

        self.on_close(lambda error: done.errback(error) if not done.called else None)
        try:
            ch.basic_consume(queue=queue, on_message_callback=on_message, auto_ack=False, callback=ok)
        except Exception as e:
            raise _translate(e) from None
        return await done

    async def cancel(self, consumer_tag: str) -> None:
        self._cancel_handlers.pop(consumer_tag, None)
        self._on_message.pop(consumer_tag, None)
        if self.is_open:
            await self._call("basic_cancel", consumer_tag)

    async def answer_cancel(self, consumer_tag: str) -> bool:
        """Answer the broker's basic.cancel with our own and wait for its cancel-ok (False if the
        channel closed first).

        RabbitMQ 4.3 keeps a consumer it cancelled for an ack timeout until the client answers
        so; pika forgets the consumer on the broker's cancel and would then send nothing, so the
        consumer is put back in pika's books first (a delivery racing in is still handled, and
        pika rejects any after our cancel). For a consumer the broker no longer has (queue
        deleted) RabbitMQ answers cancel-ok all the same.
        """
        on_message = self._on_message.pop(consumer_tag, None)
        if on_message is None or not self.is_open:
            return False
        self._ch._consumers[consumer_tag] = on_message
        self._tc._consumers[consumer_tag] = ClosableDeferredQueue()
        try:
            await self._call("basic_cancel", consumer_tag)
        except ChannelClosed:
            return False
        return True

    def ack(self, tag: int, multiple: bool = False) -> None:
        self._ch.basic_ack(tag, multiple)

    def nack(self, tag: int, requeue: bool = True) -> None:
        self._ch.basic_nack(tag, False, requeue)

    def reject(self, tag: int, requeue: bool = False) -> None:
        self._ch.basic_reject(tag, requeue)

    async def enable_confirms(self) -> None:
        await self._call("confirm_delivery")

    @property
    def user(self) -> str | None:
        """The user this connection logged in as (None with EXTERNAL: the certificate says)."""
        user: str | None = getattr(self._ch.connection.params.credentials, "username", None)
        return user

    @property
    def max_properties_size(self) -> int:
        """The most bytes a message's encoded properties may take: its content header is one frame."""
        return _max_properties_size(self._ch.connection.params.frame_max)

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Mapping[str, Any], mandatory: bool = True
    ) -> None:
        """Publish and wait for the broker's confirm (the channel must have confirms on).

        Properties that cannot be encoded, or that would not fit in one frame
        (the broker would close the whole connection with 501 FRAME_ERROR),
        raise PublishFailed before anything is sent.
        """
        size = properties_size(properties)
        if size > self.max_properties_size:
            raise PublishFailed(f"its properties take {size} bytes, more than a frame holds ({self.max_properties_size})")
        props = pika.spec.BasicProperties(**properties)
        try:
            await self._tc.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
        except Exception as e:
            error = _translate(e)
            raise error if isinstance(error, PublishFailed) else PublishFailed(str(error)) from None

    async def close(self) -> None:
        if self.is_open:
            try:
                self._tc.close()
            except pika_exc.ChannelWrongStateError:
                return
        if self.close_reason is None:
            closed: Deferred[ChannelClosed] = Deferred()
            self.on_close(closed.callback)
            await closed


def _max_properties_size(frame_max: int) -> int:
    # frame header (7), class id, weight and body size (12), frame end (1)
    size: int = frame_max - pika.spec.FRAME_HEADER_SIZE - 12 - pika.spec.FRAME_END_SIZE
    return size


def properties_size(properties: Mapping[str, Any]) -> int:
    """Encoded size of these message properties; PublishFailed when pika cannot encode them."""
    try:
        return sum(len(piece) for piece in pika.spec.BasicProperties(**properties).encode())
    except Exception as e:
        raise PublishFailed(f"its properties cannot be encoded ({_why(e)})") from None


def header_fault(key: Any, value: Any) -> str | None:
    """Why a header cannot be sent as it is (pika cannot encode it), or None."""
    try:
        pika.data.encode_short_string([], key)
        pika.data.encode_value([], value)
    except pika_exc.UnsupportedAMQPFieldException as e:
        return f"pika cannot send a {type(e.args[-1]).__name__}"
    except struct.error:
        return "a number out of range for its AMQP type"
    except pika_exc.ShortStringTooLong:
        return "its name is longer than 255 bytes"
    except Exception as e:
        return _why(e)
    return None


def header_size(key: Any, value: Any) -> int:
    """Bytes one (encodable) header takes in the properties."""
    pieces: list[bytes] = []
    size: int = pika.data.encode_short_string(pieces, key) + pika.data.encode_value(pieces, value)
    return size


def quarantine_queue(configured: str) -> str:
    """Named after the configured queue; a server-named queue's name changes on every
    connection, so its quarantine is the stable 'amqp-consumer.quarantine'."""
    return f"{configured or 'amqp-consumer'}.quarantine"


# --- content headers pika cannot decode ---------------------------------------------
#
# pika decodes a delivery's content header inside its frame reader; a value it
# cannot turn into a Python object (a timestamp beyond year 9999, an infinite
# double) raises there, Twisted drops the connection, and the broker hands the
# same message out first again: the queue is stuck for good. So a header frame
# pika refuses is read again here, keeping every value that can be read and
# saying what could not; the delivery then goes to quarantine instead of its
# callback (Message.unreadable).


class _PartlyRead(pika.spec.BasicProperties):  # type: ignore[misc]  # pika's class is Any
    """Properties read as far as possible; ``unreadable`` says what was lost."""

    unreadable: str = ""


_UNREADABLE = object()
_FIXED_WIDTH = {b"T": 8, b"d": 8, b"f": 4}  # kinds whose bad values can be skipped
_KIND_NAME = {b"T": "timestamp", b"d": "double", b"f": "float"}
_PROPERTY_FIELDS: tuple[tuple[str, int, str], ...] = tuple(
    (name, getattr(pika.spec.BasicProperties, "FLAG_" + name.upper()), kind)
    for name, kind in (
        ("content_type", "s"), ("content_encoding", "s"), ("headers", "F"), ("delivery_mode", "o"),
        ("priority", "o"), ("correlation_id", "s"), ("reply_to", "s"), ("expiration", "s"),
        ("message_id", "s"), ("timestamp", "T"), ("type", "s"), ("user_id", "s"), ("app_id", "s"),
        ("cluster_id", "s"),
    )
)


def _read_frame(buffer: bytes) -> tuple[int, Any]:
    """pika's frame decoder, except that a content header it refuses is read leniently."""
    try:
        decoded: tuple[int, Any] = pika.frame.decode_frame(buffer)
        return decoded
    except Exception as error:
        header = _salvage_header(buffer, error)
        if header is None:
            raise
        return header


def _salvage_header(buffer: bytes, error: Exception) -> tuple[int, Any] | None:
    if buffer[:1] != bytes([pika.spec.FRAME_HEADER]):
        return None
    try:
        _, channel_number, size = struct.unpack_from(">BHL", buffer)
        end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
        payload = buffer[pika.spec.FRAME_HEADER_SIZE : end - 1]
        class_id, _, body_size = struct.unpack_from(">HHQ", payload)
    except struct.error:
        return None
    if class_id != pika.spec.Basic.INDEX or len(buffer) < end:
        return None
    props = _PartlyRead()
    problems = _read_properties(props, payload[12:])
    props.unreadable = "; ".join(problems) or f"the properties could not be read ({_why(error)})"
    return end, pika.frame.Header(channel_number, body_size, props)


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _read_properties(props: Any, encoded: bytes) -> list[str]:
    """Fill props field by field, as pika's BasicProperties.decode does; return what could not be read."""
    problems: list[str] = []
    name = "property flags"
    try:
        offset = flags = index = 0
        while True:
            partial = struct.unpack_from(">H", encoded, offset)[0]
            offset += 2
            flags |= partial << (index * 16)
            if not partial & 1:
                break
            index += 1
        for name, flag, kind in _PROPERTY_FIELDS:
            if not flags & flag:
                continue
            value: Any
            if kind == "s":
                value, offset = pika.data.decode_short_string(encoded, offset)
            elif kind == "o":
                value = struct.unpack_from("B", encoded, offset)[0]
                offset += 1
            elif kind == "T":
                value = struct.unpack_from(">Q", encoded, offset)[0]
                offset += 8
            else:
                value, offset = _read_table(encoded, offset, problems, "")
            setattr(props, name, value)
    except Exception as e:
        problems.append(f"the properties from {name} on ({_why(e)})")
    return problems


def _read_table(encoded: bytes, offset: int, problems: list[str], path: str) -> tuple[dict[str, Any], int]:
    size = struct.unpack_from(">I", encoded, offset)[0]
    offset += 4
    end = offset + size
    table: dict[str, Any] = {}
    while offset < end:
        key, offset = pika.data.decode_short_string(encoded, offset)
        name = f"{path}{key}"
        try:
            value, offset = _read_value(encoded, offset, problems, name)
        except Exception as e:
            problems.append(f"header {name!r} and the rest of its table ({_why(e)})")
            return table, end
        if value is not _UNREADABLE:
            table[key] = value
    return table, end


def _read_value(encoded: bytes, offset: int, problems: list[str], name: str) -> tuple[Any, int]:
    kind = encoded[offset : offset + 1]
    if kind == b"F":
        return _read_table(encoded, offset + 1, problems, name + ".")
    if kind == b"A":
        length = struct.unpack_from(">I", encoded, offset + 1)[0]
        offset += 5
        end = offset + length
        items: list[Any] = []
        while offset < end:
            value, offset = _read_value(encoded, offset, problems, f"{name}[{len(items)}]")
            items.append(None if value is _UNREADABLE else value)
        return items, end
    try:
        decoded: tuple[Any, int] = pika.data.decode_value(encoded, offset)
        return decoded
    except Exception as e:
        width = _FIXED_WIDTH.get(kind)
        if width is None:
            raise
        raw = encoded[offset + 1 : offset + 1 + width]
        if kind == b"T":
            shown = str(int.from_bytes(raw, "big"))
        else:
            shown = repr(struct.unpack(">d" if kind == b"d" else ">f", raw)[0])
        problems.append(f"header {name!r}: {_KIND_NAME[kind]} {shown} cannot be read ({_why(e)})")
        return _UNREADABLE, offset + 1 + width


# --- channel numbers ------------------------------------------------------------------


class _ChannelNumbers:
    """A channel number the broker closed is not used again until the broker has surely read our close-ok.

    pika frees a number as soon as it has sent Channel.CloseOk for a close the
    broker started. A broker that is not reading from us (a connection blocked
    by a memory alarm) still holds its side of that channel and may send more
    frames for it (RabbitMQ repeats the close of a consumer that timed out); a
    new channel with the same number takes them for its own and closes, and once
    the broker reads again it finds a close-ok for a channel it had just opened
    and closes the whole connection (503). So such a number is held until a
    channel opened after its close-ok has been answered: the broker reads in
    order, so it has read the close-ok by then. Frames for a held number are dropped.
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        self.held: set[int] = set()
        cleanup = impl._on_channel_cleanup
        deliver = impl._deliver_frame_to_channel

        def on_cleanup(channel: Any) -> None:
            if isinstance(channel._closing_reason, pika_exc.ChannelClosedByBroker):
                self.held.add(channel.channel_number)
            cleanup(channel)

        def to_channel(frame: Any) -> None:
            if frame.channel_number in self.held:
                log.debug("dropped a frame for channel {n}, closed and not yet reusable", n=frame.channel_number)
                return
            deliver(frame)

        impl._on_channel_cleanup = on_cleanup
        impl._deliver_frame_to_channel = to_channel
        impl._next_channel_number = self._next

    def _next(self) -> int:
        impl = self._impl
        limit = impl.params.channel_max or pika.channel.MAX_CHANNELS
        for number in range(1, limit + 1):
            if number not in impl._channels and number not in self.held:
                return number
        raise pika_exc.NoFreeChannels()

    def opening(self, opened: Deferred[Any]) -> Deferred[Any]:
        """opened fires once the broker answered a channel.open sent now: what is held now is free then."""
        held = set(self.held)

        def release(channel: Any) -> Any:
            self.held -= held
            return channel

        return opened.addCallback(release)

