"""The daemon's one publisher: a confirm-mode channel per connection (quarantine now; retries and replies later)."""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from amqp_consumer.connection import Channel, ChannelClosed, PublishFailed, Session

log = Logger(namespace="amqp_consumer.publisher")


class Publisher:
    """Publishes only with broker confirms, so a caller acks the original only once the copy is safe."""

    def __init__(self) -> None:
        self._session: Session | None = None
        self._channel: Channel | None = None
        self._waiters: list[Deferred[Channel]] = []

    def attach(self, session: Session | None) -> None:
        """Use this connection from now on (None: disconnected)."""
        self._session = session
        self._channel = None

    async def _ready_channel(self) -> Channel:
        session = self._session
        if session is None:
            raise PublishFailed("not connected to the broker")
        ch = self._channel
        if ch is not None and ch.is_open:
            return ch
        # One channel for every publish waiting on it, not one each.
        waiting: Deferred[Channel] = Deferred()
        self._waiters.append(waiting)
        if len(self._waiters) == 1:
            defer.ensureDeferred(self._open(session)).addBoth(self._opened)
        return await waiting

    async def _open(self, session: Session) -> Channel:
        ch = await session.channel()
        ch.on_close(_say_if_refused)
        await ch.enable_confirms()
        if self._session is session:
            self._channel = ch
        return ch

    def _opened(self, result: Channel | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)

    async def channel(self) -> Channel:
        """The confirm-mode channel of this connection, opened when needed; PublishFailed if it cannot be."""
        try:
            return await self._ready_channel()
        except PublishFailed:
            raise
        except Exception as e:
            raise PublishFailed(f"cannot open a publishing channel: {e}") from None

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Mapping[str, Any], mandatory: bool = True
    ) -> None:
        """Return once the broker has confirmed; raise PublishFailed otherwise."""
        ch = await self.channel()
        await ch.publish(exchange, routing_key, body, properties, mandatory=mandatory)

    async def declare(self, queue: str) -> None:
        """Declare a durable queue (a quarantine queue an operator deleted, say)."""
        ch = await self.channel()
        await ch.declare_queue(queue)


def _say_if_refused(error: ChannelClosed) -> None:
    """The broker closed the publishing channel (pika's own line about it is debug only)."""
    if error.by_broker:
        log.warn("the broker closed the publishing channel: {why}; the next publish opens a new one", why=error)
