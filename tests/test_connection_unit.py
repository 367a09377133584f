"""connection.py without a broker: pika's errors in our words, channel close and cancel, URL rotation, a refused login.

A fake pika channel stands in for the broker's side; the broker-backed tests
(test_consume, test_channel_recovery, test_refusals) show the same paths end to end.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import pytest
from pika import exceptions as pika_exc
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from amqp_consumer.config import AMQPConfig
from amqp_consumer.connection import (
    AccessRefused,
    AMQPError,
    Channel,
    ChannelClosed,
    ConnectionClosed,
    Connector,
    PublishFailed,
    Unroutable,
    _refused_at_login,
    _RoundRobin,
    _Target,
    _translate,
)
from amqp_consumer.message import Message

# --- error translation ------------------------------------------------------------------


def test_a_refused_login_is_access_refused_and_names_what() -> None:
    creds = _translate(pika_exc.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"))
    assert isinstance(creds, AccessRefused) and "credentials" in str(creds) and "Login was refused" in str(creds)
    vhost = _translate(pika_exc.ProbableAccessDeniedError("NOT_ALLOWED - vhost nope not found"))
    assert isinstance(vhost, AccessRefused) and "virtual host" in str(vhost) and "nope" in str(vhost)


@pytest.mark.parametrize(
    ("code", "text", "fatal"),
    [
        (403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN", True),
        (530, "NOT_ALLOWED - access to vhost 'x' refused for user 'guest'", True),
        (530, "NOT_ALLOWED - vhost x is down", False),  # a vhost restarting: retried
        (320, "CONNECTION_FORCED - broker forced connection closure", False),
    ],
)
def test_a_broker_close_at_login_is_fatal_only_for_403_and_530(code: int, text: str, fatal: bool) -> None:
    error = _translate(Failure(pika_exc.ConnectionClosedByBroker(code, text)))
    assert isinstance(error, ConnectionClosed) and (error.code, error.text) == (code, text)
    assert str(error) == f"the broker closed the connection: {code} {text}"
    refused = _refused_at_login(error)
    assert (refused is not None) is fatal
    if refused is not None:
        assert str(refused) == f"the broker refused access: {code} {text}"


def test_a_channel_closed_by_the_broker_is_told_from_one_we_closed() -> None:
    by_broker = _translate(pika_exc.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'q'"))
    assert isinstance(by_broker, ChannelClosed) and by_broker.by_broker and by_broker.code == 404
    assert str(by_broker) == "404 NOT_FOUND - no queue 'q'"
    by_us = _translate(pika_exc.ChannelClosedByClient(200, "Normal shutdown"))
    assert isinstance(by_us, ChannelClosed) and not by_us.by_broker and by_us.code == 200


def test_heartbeat_timeout_unroutable_and_nack() -> None:
    heartbeat = _translate(pika_exc.AMQPHeartbeatTimeout("no heartbeat"))
    assert type(heartbeat) is AMQPError and "no heartbeat from the broker" in str(heartbeat)
    unroutable = _translate(pika_exc.UnroutableError([]))
    assert isinstance(unroutable, Unroutable) and "NO_ROUTE" in str(unroutable)
    nacked = _translate(pika_exc.NackError([]))
    assert type(nacked) is PublishFailed and str(nacked) == "the broker nacked it"


def test_our_own_errors_pass_and_anything_else_gets_its_type_name() -> None:
    ours = ChannelClosed(406, "PRECONDITION_FAILED", True)
    assert _translate(Failure(ours)) is ours
    other = _translate(ConnectionRefusedError("127.0.0.1:1"))
    assert type(other) is AMQPError and str(other).startswith("ConnectionRefusedError: ")


# --- a channel over a fake pika channel ----------------------------------------------------


class FakePikaChannel:
    """What connection.Channel calls on pika's Channel; the test plays the broker."""

    def __init__(self) -> None:
        self.is_open = True
        self._consumers: dict[str, Callable[..., None]] = {}
        self.on_cancel: Callable[[Any], None] | None = None
        self.sent: list[tuple[Any, ...]] = []

    def add_on_cancel_callback(self, callback: Callable[[Any], None]) -> None:
        self.on_cancel = callback

    def basic_consume(self, queue: str, on_message_callback: Callable[..., None], auto_ack: bool, callback: Callable[[Any], None]) -> None:
        tag = f"ctag-{queue}"
        self._consumers[tag] = on_message_callback
        self.sent.append(("basic.consume", queue, auto_ack))
        self.consume_ok = lambda: callback(SimpleNamespace(method=SimpleNamespace(consumer_tag=tag)))

    def basic_ack(self, tag: int, multiple: bool) -> None:
        self.sent.append(("basic.ack", tag, multiple))

    def basic_nack(self, tag: int, multiple: bool, requeue: bool) -> None:
        self.sent.append(("basic.nack", tag, multiple, requeue))

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.sent.append(("basic.reject", tag, requeue))

    def broker_cancels(self, tag: str) -> None:
        self._consumers.pop(tag, None)  # as pika does on the broker's basic.cancel
        assert self.on_cancel is not None
        self.on_cancel(SimpleNamespace(method=SimpleNamespace(consumer_tag=tag)))


class FakeTwistedChannel:
    def __init__(self) -> None:
        self._channel = FakePikaChannel()
        self._consumers: dict[str, Any] = {}
        self.channel_number = 7
        self.on_closed: Deferred[Any] = Deferred()
        self.cancelled: list[str] = []

    def basic_cancel(self, consumer_tag: str) -> Deferred[None]:
        self.cancelled.append(consumer_tag)
        assert consumer_tag in self._channel._consumers, "pika sends no basic.cancel for a consumer it forgot"
        return defer.succeed(None)


def _channel() -> tuple[Channel, FakeTwistedChannel]:
    tc = FakeTwistedChannel()
    return Channel(tc), tc


def _method(tag: int) -> SimpleNamespace:
    return SimpleNamespace(exchange="x", routing_key="rk", redelivered=False, delivery_tag=tag)


def _props() -> SimpleNamespace:
    names = ("headers", "message_id", "correlation_id", "reply_to", "content_type", "priority", "timestamp",
             "content_encoding", "delivery_mode", "expiration", "type", "user_id", "app_id", "cluster_id")
    return SimpleNamespace(**{n: None for n in names})


@pytest.mark.parametrize(
    ("reason", "code", "by_broker"),
    [
        (pika_exc.ChannelClosedByBroker(406, "PRECONDITION_FAILED - delivery acknowledgement timed out"), 406, True),
        (pika_exc.ChannelClosedByClient(200, "Normal shutdown"), 200, False),
        (None, 0, False),
    ],
)
def test_a_closed_channel_tells_every_listener_once_with_its_reason(reason: Any, code: int, by_broker: bool) -> None:
    channel, tc = _channel()
    heard: list[ChannelClosed] = []
    channel.on_close(heard.append)
    tc.on_closed.callback(reason)
    assert [(e.code, e.by_broker) for e in heard] == [(code, by_broker)]
    assert channel.close_reason is heard[0]
    late: list[ChannelClosed] = []
    channel.on_close(late.append)  # after the close: told at once
    assert late == heard


def test_consume_delivers_messages_and_settles_on_the_pika_channel() -> None:
    channel, tc = _channel()
    got: list[tuple[Channel, int, Message]] = []
    consuming = defer.ensureDeferred(channel.consume("q", lambda ch, tag, msg: got.append((ch, tag, msg)), lambda tag: None))
    assert not consuming.called  # waits for consume-ok
    tc._channel.consume_ok()
    assert consuming.result == "ctag-q"
    assert "ctag-q" in tc._consumers  # TwistedChannel's books kept in step
    tc._channel._consumers["ctag-q"](tc._channel, _method(5), _props(), b"body")
    [(ch, tag, msg)] = got
    assert ch is channel and tag == 5 and msg.queue == "q" and msg.routing_key == "rk"
    channel.ack(5)
    channel.nack(6)
    channel.reject(7)
    assert tc._channel.sent[1:] == [("basic.ack", 5, False), ("basic.nack", 6, False, True), ("basic.reject", 7, False)]


def test_a_channel_closing_before_consume_ok_fails_the_consume() -> None:
    channel, tc = _channel()
    consuming = defer.ensureDeferred(channel.consume("q", lambda *a: None, lambda tag: None))
    tc.on_closed.callback(pika_exc.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'q'"))
    failure = consuming.result
    consuming.addErrback(lambda f: None)
    assert isinstance(failure, Failure) and failure.check(ChannelClosed) and failure.value.code == 404


def test_a_broker_cancel_reaches_its_consumer_and_can_be_answered() -> None:
    channel, tc = _channel()
    cancelled: list[str] = []
    consuming = defer.ensureDeferred(channel.consume("q", lambda *a: None, cancelled.append))
    tc._channel.consume_ok()
    assert consuming.result == "ctag-q"
    tc._channel.broker_cancels("unknown-tag")  # not ours: ignored
    tc._channel.broker_cancels("ctag-q")
    assert cancelled == ["ctag-q"]
    tc._channel.broker_cancels("ctag-q")  # a repeated cancel reaches nobody twice
    assert cancelled == ["ctag-q"]
    answered = defer.ensureDeferred(channel.answer_cancel("ctag-q"))
    assert answered.result is True and tc.cancelled == ["ctag-q"]
    again = defer.ensureDeferred(channel.answer_cancel("ctag-q"))  # answered already
    assert again.result is False and tc.cancelled == ["ctag-q"]


def test_answer_cancel_on_a_closed_channel_sends_nothing() -> None:
    channel, tc = _channel()
    consuming = defer.ensureDeferred(channel.consume("q", lambda *a: None, lambda tag: None))
    tc._channel.consume_ok()
    assert consuming.called
    tc._channel.broker_cancels("ctag-q")
    tc._channel.is_open = False
    answered = defer.ensureDeferred(channel.answer_cancel("ctag-q"))
    assert answered.result is False and tc.cancelled == []


# --- round-robin over the URLs ----------------------------------------------------------------


class FakeEndpoint:
    def __init__(self, name: str, log: list[str], ok: bool) -> None:
        self.name, self.log, self.ok = name, log, ok

    def connect(self, factory: Any) -> Deferred[Any]:
        self.log.append(self.name)
        return defer.succeed(object()) if self.ok else defer.fail(ConnectionRefusedError(self.name))


def test_each_failed_attempt_moves_to_the_next_url_and_wraps_around() -> None:
    tried: list[str] = []
    delays: list[float] = []
    targets = [
        _Target(f"amqp://node{i}/", f"node{i}:5672", FakeEndpoint(f"node{i}", tried, ok=(i == 3)), None)  # type: ignore[arg-type]
        for i in (1, 2, 3)
    ]
    rr = _RoundRobin(targets, None, lambda: delays.append(1.5) or 1.5)  # type: ignore[arg-type]
    for _ in range(4):
        rr.connect(Factory()).addErrback(lambda f: None)
    # node3 accepts, so the fourth attempt stays on it; a success does not advance
    assert tried == ["node1", "node2", "node3", "node3"]
    assert rr.current.display == "amqp://node3/" and len(delays) == 2
    rr.advance()
    assert rr.current.display == "amqp://node1/"  # after the last URL, the first again


# --- which endpoint a URL's host gets ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "resolved", "connected_to"),
    [
        ("amqp://u:p@127.0.0.1:5673/%2F", [], [("127.0.0.1", 5673, 7.0)]),
        ("amqp://u:p@[::1]:5673/%2F", [], [("::1", 5673, 7.0)]),
        ("amqp://u:p@rabbit.example:5673/%2F", ["rabbit.example"], []),  # connected to once resolved
    ],
)
def test_only_a_host_name_goes_through_the_resolver(url: str, resolved: list[str], connected_to: list[Any]) -> None:
    """An address is connected to as it is: the resolver runs on a thread that would then stay."""
    reactor = MemoryReactorClock()
    names: list[str] = []
    reactor.nameResolver = SimpleNamespace(resolveHostName=lambda receiver, name, *a, **k: names.append(name))  # type: ignore[assignment]
    connector = Connector(reactor, AMQPConfig(urls=(url,), connect_timeout=7.0), lambda s: None, lambda f: None, lambda e: None)
    connector.startService()
    assert names == resolved
    assert [(host, port, timeout) for host, port, _factory, timeout, _bind in reactor.tcpClients] == connected_to


# --- a login the broker refuses ---------------------------------------------------------------


class HandshakeEndpoint:
    """Connects at once to a StringTransport; the test then plays the broker's answer."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        proto = factory.buildProtocol(None)  # ClientService's proxy around our _Protocol
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)
        return defer.succeed(proto)


@pytest.mark.parametrize("lost_first", [False, True], ids=["refused-then-closed", "closed-while-refusing"])
def test_a_refused_login_stops_reconnecting_with_nothing_left_to_retry(lost_first: bool) -> None:
    """No retry planned or logged, no NoTransition from ClientService, one fatal call."""
    reactor = MemoryReactorClock()
    fatal: list[Exception] = []
    failures: list[str] = []
    connector = Connector(reactor, AMQPConfig(urls=("amqp://u:p@h:5672/%2F",)), lambda s: None, failures.append, fatal.append)
    endpoint = HandshakeEndpoint()
    connector._rr._targets[0] = _Target("amqp://u:***@h:5672/%2F", "h:5672", endpoint, connector._rr.current.params)  # type: ignore[arg-type]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        connector.startService()
        [proxy] = endpoint.protocols
        pika_proto = proxy._protocol
        ready, pika_proto.ready = pika_proto.ready, None
        refusal = Failure(pika_exc.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused"))
        if lost_first:
            # pika fails `ready` from inside connectionLost, before ClientService hears of the loss
            pika_proto.connectionLost = lambda reason: ready.errback(refusal)
        else:
            ready.errback(refusal)
        proxy.connectionLost(Failure(ConnectionDone()))  # would raise automat's NoTransition
        reactor.advance(120)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [str(e) for e in fatal] == ["the broker refused access: 403 ACCESS_REFUSED - Login was refused"]
    assert failures == [] and len(endpoint.protocols) == 1  # never tried again
    assert not reactor.getDelayedCalls()
    assert not [e for e in events if "retry" in str(e.get("log_format", "")).lower() or e.get("isError")], events
