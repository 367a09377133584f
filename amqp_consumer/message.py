"""The message a callback receives: a plain object, no pika types leak out."""

from __future__ import annotations

import functools
import json
from datetime import datetime, timezone
from typing import Any


class BodyDecodeError(Exception):
    """The body does not match its content type; the message goes to quarantine."""


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
        "correlation_id", "reply_to", "content_type", "priority", "timestamp",
        "redelivered", "delivery_tag", "_body", "_decoded",
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
        timestamp: datetime | None = None,
        redelivered: bool = False,
        delivery_tag: int = 0,
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
        self.timestamp = timestamp
        self.redelivered = redelivered
        self.delivery_tag = delivery_tag
        self._body: Any = None
        self._decoded = False

    @property
    def topic(self) -> str:
        """Alias of routing_key, for code written against topic exchanges."""
        return self.routing_key

    @property
    def body(self) -> Any:
        if not self._decoded:
            self.decode()
        return self._body

    def decode(self) -> None:
        """Decode once; raises BodyDecodeError for a body its content type cannot describe."""
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
