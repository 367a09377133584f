"""The publisher says when the broker closes its channel (pika's own line about it is debug only)."""

from __future__ import annotations

from typing import Any

from pika import exceptions as pika_exc
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from amqp_consumer.connection import Channel
from amqp_consumer.publisher import Publisher
from tests.test_connection_unit import FakeTwistedChannel


class ConfirmingChannel(FakeTwistedChannel):
    def confirm_delivery(self) -> Any:
        return defer.succeed(None)

    def closed(self, reason: Exception) -> None:
        self._channel.is_open = False
        self.on_closed.callback(reason)


class FakeSession:
    def __init__(self) -> None:
        self.opened: list[ConfirmingChannel] = []

    async def channel(self) -> Channel:
        tc = ConfirmingChannel()
        self.opened.append(tc)
        return Channel(tc)


def _warnings(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "amqp_consumer.publisher" and e["log_level"] is LogLevel.warn]


def test_a_publishing_channel_the_broker_closes_is_said_once_and_replaced() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = FakeSession()
        publisher = Publisher()
        publisher.attach(session)  # type: ignore[arg-type]
        first = defer.ensureDeferred(publisher.channel()).result
        session.opened[0].closed(pika_exc.ChannelClosedByBroker(406, "PRECONDITION_FAILED - something"))
        second = defer.ensureDeferred(publisher.channel()).result
        session.opened[1].closed(pika_exc.ChannelClosedByClient(200, "Normal shutdown"))  # our own close
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert second is not first
    assert _warnings(events) == [
        "the broker closed the publishing channel: 406 PRECONDITION_FAILED - something; the next publish opens a new one"
    ]
