"""The daemon's one publisher: a confirm-mode channel per connection (quarantine now; retries and replies later)."""

from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from amqp_consumer.connection import Channel, PublishFailed, Session

log = Logger(namespace="amqp_consumer.publisher")


class Publisher:
    """Publishes only with broker confirms, so a caller acks the original only once the copy is safe."""

    def __init__(self) -> None:
        self._session: Session | None = None
        self._channel: Channel | None = None
        self._opening: Any = None

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
        ch = await session.channel()
        await ch.enable_confirms()
        if self._session is session:
            self._channel = ch
        return ch

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Mapping[str, Any], mandatory: bool = True
    ) -> None:
        """Return once the broker has confirmed; raise PublishFailed otherwise."""
        try:
            ch = await self._ready_channel()
        except PublishFailed:
            raise
        except Exception as e:
            raise PublishFailed(f"cannot open a publishing channel: {e}") from None
        await ch.publish(exchange, routing_key, body, properties, mandatory=mandatory)
