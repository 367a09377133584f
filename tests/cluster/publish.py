"""Publish numbered persistent messages with publisher confirms, many in flight at once."""

from __future__ import annotations

import json
import threading
from typing import Any

import pika


class ConfirmedPublisher(threading.Thread):
    """Publishes bodies {"n": i} for i in range(count) to a queue; each is counted once the broker confirms it.

    Up to ``window`` messages are unconfirmed at a time, so a quorum queue's
    replication round trip is paid per batch rather than per message.  A
    nacked message is published again; ``confirmed`` and ``error`` tell how it went.
    Run it as a thread; ``join()`` returns once all are confirmed or it failed.
    """

    def __init__(self, url: str, queue: str, count: int, window: int = 500) -> None:
        super().__init__(daemon=True, name=f"publish-{queue}")
        self.url, self.queue, self.count, self.window = url, queue, count, window
        self.confirmed = 0
        self.nacked = 0
        self.error: BaseException | None = None
        self._next = 0
        self._pending: dict[int, int] = {}  # delivery tag -> n
        self._retry: list[int] = []
        self._tag = 0
        self._channel: Any = None
        self._connection: Any = None

    @property
    def done(self) -> bool:
        return self.confirmed >= self.count

    def run(self) -> None:
        try:
            params = pika.URLParameters(self.url)
            params.heartbeat = 30
            self._connection = pika.SelectConnection(
                params,
                on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
                on_open_error_callback=lambda c, e: self._fail(e),
                on_close_callback=self._on_closed,
            )
            self._connection.ioloop.start()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def _fail(self, error: BaseException | str) -> None:
        self.error = error if isinstance(error, BaseException) else RuntimeError(str(error))
        self._connection.ioloop.stop()

    def _on_closed(self, _connection: Any, error: BaseException) -> None:
        if not self.done:
            self.error = error
        self._connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.confirm_delivery(self._on_confirm)
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self.window:
            if self._retry:
                n = self._retry.pop()
            elif self._next < self.count:
                n = self._next
                self._next += 1
            else:
                break
            self._tag += 1
            self._pending[self._tag] = n
            props = pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=str(n))
            self._channel.basic_publish("", self.queue, json.dumps({"n": n}).encode(), props)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            n = self._pending.pop(tag, None)
            if n is None:
                continue
            if isinstance(method, pika.spec.Basic.Nack):
                self.nacked += 1
                self._retry.append(n)
            else:
                self.confirmed += 1
        if self.done:
            self._connection.close()  # the ioloop stops once it is closed
        else:
            self._fill()
