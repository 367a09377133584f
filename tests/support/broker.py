"""Talk to a real broker from a test: publish, count, read back. Synchronous pika, test side only."""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable
from urllib.parse import urlsplit

import pika

SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Broker:
    """A test-side client of one broker; ``version`` says which (``3.10`` is the shared one on 5672)."""

    def __init__(self, url: str = SHARED_URL, version: str = "3.10") -> None:
        self.url = url
        self.version = version
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self.created: set[str] = set()

    @property
    def port(self) -> int:
        """The broker's AMQP port (for a TCPProxy in front of it)."""
        port = urlsplit(self.url).port
        assert port is not None, self.url
        return port

    @property
    def redacted_url(self) -> str:
        """The URL as the daemon logs it: ``amqp://guest:***@127.0.0.1:PORT/%2F``."""
        parts = urlsplit(self.url)
        return self.url.replace(f"{parts.username}:{parts.password}@", f"{parts.username}:***@", 1)

    def channel(self) -> Any:
        if self._ch is None or not self._ch.is_open:
            if self._conn is None or not self._conn.is_open:
                self._conn = pika.BlockingConnection(pika.URLParameters(self.url))
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        return self._ch

    def declare(self, queue: str, **kwargs: Any) -> None:
        self.channel().queue_declare(queue, durable=kwargs.pop("durable", True), **kwargs)
        self.created.add(queue)

    def publish_json(self, queue: str, bodies: Iterable[Any], exchange: str = "", **props: Any) -> list[str]:
        ids = []
        ch = self.channel()
        for i, body in enumerate(bodies):
            mid = props.pop("message_id", None) or f"{queue}-{i}-{uuid.uuid4().hex[:6]}"
            ids.append(mid)
            ch.basic_publish(
                exchange,
                queue,
                json.dumps(body).encode(),
                pika.BasicProperties(content_type="application/json", message_id=mid, delivery_mode=2, **props),
            )
        return ids

    def publish_raw(self, queue: str, body: bytes, exchange: str = "", **props: Any) -> None:
        self.channel().basic_publish(exchange, queue, body, pika.BasicProperties(delivery_mode=2, **props))

    def counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers); (−1, −1) if the queue does not exist."""
        try:
            frame = self.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self._ch = None
            return -1, -1
        return frame.method.message_count, frame.method.consumer_count

    def depth(self, queue: str) -> int:
        return self.counts(queue)[0]

    def get_all(self, queue: str) -> list[tuple[Any, bytes]]:
        """Take every ready message (acking them): [(properties, body)]."""
        ch = self.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))

    def delete(self, queue: str) -> None:
        try:
            self.channel().queue_delete(queue)
        except pika.exceptions.ChannelClosedByBroker:
            self._ch = None

    def close(self) -> None:
        for q in sorted(self.created):
            self.delete(q)
            self.delete(q + ".quarantine")
        if self._conn is not None and self._conn.is_open:
            self._conn.close()


def read_rows(path: Any) -> list[dict[str, Any]]:
    """The callbacks' JSON lines so far; a last line still being written (no newline yet) waits for the next read."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
    except FileNotFoundError:
        return []
