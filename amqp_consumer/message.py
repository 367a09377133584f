"""The message a callback receives: a plain object, no pika types leak out."""

from __future__ import annotations

import functools
import json
from datetime import datetime, timezone
from typing import Any


class BodyDecodeError(Exception):
    """The body does not match its content type; the message goes to quarantine."""


class PropertiesDecodeError(Exception):
    """Some of the message's properties or headers could not be read; the message goes to quarantine."""


@functools.lru_cache(maxsize=64)
def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/json" or base.endswith("+json")


class Message:
    """One delivery, decoded.

    ``body`` is the JSON value for JSON content types and the raw bytes
    otherwise; ``raw_body`` is always the bytes as received.
    """

    __slots__ = (
        "raw_body", "exchange", "routing_key", "queue", "headers", "id",
        "correlation_id", "reply_to", "content_type", "priority", "_timestamp",
        "redelivered", "delivery_tag", "content_encoding", "delivery_mode",
        "expiration", "type", "user_id", "app_id", "cluster_id", "unreadable",
        "_body", "_decoded",
    )

    def __init__(
        self,
        *,
        body: bytes,
        exchange: str = "",
        routing_key: str = "",
        queue: str = "",
        headers: dict[str, Any] | None = None,
        id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        content_type: str | None = None,
        priority: int | None = None,
        timestamp: datetime | int | None = None,
        redelivered: bool = False,
        delivery_tag: int = 0,
        content_encoding: str | None = None,
        delivery_mode: int | None = None,
        expiration: str | None = None,
        type: str | None = None,
        user_id: str | None = None,
        app_id: str | None = None,
        cluster_id: str | None = None,
        unreadable: str | None = None,
    ) -> None:
        self.raw_body = body
        self.exchange = exchange
        self.routing_key = routing_key
        self.queue = queue
        self.headers = headers if headers is not None else {}  # pika hands over a fresh dict
        self.id = id
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.content_type = content_type
        self.priority = priority
        self._timestamp = timestamp  # as on the wire (seconds) until read
        self.redelivered = redelivered
        self.delivery_tag = delivery_tag
        self.content_encoding = content_encoding
        self.delivery_mode = delivery_mode
        self.expiration = expiration
        self.type = type
        self.user_id = user_id
        self.app_id = app_id
        self.cluster_id = cluster_id
        self.unreadable = unreadable
        self._body: Any = None
        self._decoded = False

    @property
    def delivery_count(self) -> int | None:
        """How many times the broker delivered this message before; None when it cannot be known.

        Quorum queues send ``x-delivery-count``. RabbitMQ 4.3 adds ``x-acquired-count``
        (every earlier delivery) and from then on counts in ``x-delivery-count`` only the
        returns that count towards the queue's delivery limit (rejects, lost connections;
        not a Nack, not a consumer ack timeout). ``x-acquired-count`` wins when both are
        there: it counts what 3.x's ``x-delivery-count`` counts, so one history gives one
        number on either broker. Without either header (classic queues; 4.3 on a first
        delivery) a message that is not ``redelivered`` was never delivered before: 0;
        a redelivered one gives None.
        """
        headers = self.headers
        for key in ("x-acquired-count", "x-delivery-count"):
            value = headers.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None if self.redelivered else 0

    @property
    def topic(self) -> str:
        """Alias of routing_key, for code written against topic exchanges."""
        return self.routing_key

    @property
    def timestamp(self) -> datetime | None:
        """An aware UTC datetime, or None (also for a value no datetime can hold)."""
        stamp = self._timestamp
        return stamp if stamp is None or isinstance(stamp, datetime) else utc_from_epoch(stamp)

    @property
    def amqp_timestamp(self) -> int | None:
        """The timestamp property as sent: whole seconds since the epoch, even out of datetime's range."""
        stamp = self._timestamp
        return int(stamp.timestamp()) if isinstance(stamp, datetime) else stamp

    @property
    def body(self) -> Any:
        if not self._decoded:
            self.decode()
        return self._body

    def decode(self) -> None:
        """Decode once; raises BodyDecodeError for a body its content type cannot describe
        (PropertiesDecodeError when even its properties could not be read)."""
        if self.unreadable is not None:
            raise PropertiesDecodeError(self.unreadable)
        if _is_json(self.content_type):
            try:
                self._body = json.loads(self.raw_body)
            except (ValueError, UnicodeDecodeError) as e:
                raise BodyDecodeError(f"body is not valid JSON ({self.content_type}): {e}") from None
        else:
            self._body = self.raw_body
        self._decoded = True

    def __str__(self) -> str:
        body = self.raw_body
        shown = body[:200].decode("utf-8", "replace") + ("..." if len(body) > 200 else "")
        parts = [
            f"Message id={self.id or '-'}",
            f"exchange={self.exchange!r}",
            f"routing_key={self.routing_key!r}",
            f"queue={self.queue!r}",
        ]
        if self.correlation_id:
            parts.append(f"correlation_id={self.correlation_id!r}")
        if self.redelivered:
            parts.append("redelivered")
        return " ".join(parts) + f" body={shown}"

    def __repr__(self) -> str:
        return f"<{self}>"


def utc_from_epoch(seconds: int | None) -> datetime | None:
    """AMQP timestamps are whole seconds since the epoch."""
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
