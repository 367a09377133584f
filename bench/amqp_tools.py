"""The harness's side of the broker: declare, purge, fill (with confirms), publish at a fixed rate, poll depth.

Runs in the project venv (pika only). Every message is the same kind for every
variant: a persistent ~200-byte JSON object whose "sent" field is the
publisher's time.time(), with the properties fedora-messaging expects of a
base.message (schema and severity headers, content type and encoding), which
the other consumers simply carry along.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pika

BODY_SIZE = 200


def make_body(i: int, sent: float | None = None) -> bytes:
    d = {
        "id": i,
        "sent": time.time() if sent is None else sent,
        "kind": "order.created",
        "user": f"user-{i % 9973}",
        "items": [{"sku": f"SKU-{i % 101:04d}", "qty": 1 + i % 5}],
        "pad": "",
    }
    raw = json.dumps(d, separators=(",", ":"))
    d["pad"] = "x" * max(0, BODY_SIZE - len(raw))
    return json.dumps(d, separators=(",", ":")).encode()


def make_props(i: int) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=f"bench-{i}",
        headers={
            "fedora_messaging_schema": "base.message",
            "fedora_messaging_severity": 20,
            "sent-at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "priority": 0,
        },
    )


class Control:
    """A blocking connection for declare/purge/depth; no heartbeat, so it may sit idle between calls."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self._conn: pika.BlockingConnection | None = None
        self._ch = None

    def _channel(self):
        if self._conn is None or not self._conn.is_open or self._ch is None or not self._ch.is_open:
            params = pika.URLParameters(self.url)
            params.heartbeat = 0
            params.client_properties = {"connection_name": "bench-control"}
            self._conn = pika.BlockingConnection(params)
            self._ch = self._conn.channel()
        return self._ch

    def declare(self) -> None:
        """The bench queue: durable classic queue, no arguments (every variant declares it the same way)."""
        self._channel().queue_declare(self.queue, durable=True, auto_delete=False, exclusive=False)

    def purge(self) -> None:
        self._channel().queue_purge(self.queue)

    def status(self) -> tuple[int, int]:
        """(ready messages, consumers) from a passive declare."""
        frame = self._channel().queue_declare(self.queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count

    def wait_consumers(self, n: int, timeout: float, poll: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status()[1] == n:
                return True
            time.sleep(poll)
        return False

    def close(self) -> None:
        if self._conn is not None and self._conn.is_open:
            self._conn.close()
        self._conn = self._ch = None


def fill(url: str, queue: str, n: int, start: int = 0, window: int = 2000, timeout: float = 600.0) -> float:
    """Publish n persistent messages with publisher confirms, up to `window` unconfirmed; returns msg/s.

    Raises RuntimeError if the broker nacks or the connection fails.
    """
    state = {"published": 0, "upto": 0, "extra": set(), "error": None, "t0": 0.0, "t1": 0.0}

    def confirmed() -> int:
        return state["upto"] + len(state["extra"])

    def publish_more(ch) -> None:
        while state["published"] < n and state["published"] - confirmed() < window:
            i = start + state["published"]
            ch.basic_publish("", queue, make_body(i), make_props(i))
            state["published"] += 1

    def on_confirm(frame) -> None:
        m = frame.method
        if isinstance(m, pika.spec.Basic.Nack):
            state["error"] = f"broker nacked delivery tag {m.delivery_tag}"
            conn.close()
            return
        if m.multiple:
            state["upto"] = max(state["upto"], m.delivery_tag)
            state["extra"] = {t for t in state["extra"] if t > state["upto"]}
        else:
            state["extra"].add(m.delivery_tag)
            while state["upto"] + 1 in state["extra"]:
                state["upto"] += 1
                state["extra"].discard(state["upto"])
        if confirmed() >= n:
            state["t1"] = time.perf_counter()
            conn.close()
        else:
            publish_more(ch_box[0])

    ch_box: list = []

    def on_channel(ch) -> None:
        ch_box.append(ch)

        def confirms_on(_frame) -> None:
            state["t0"] = time.perf_counter()
            if n == 0:
                conn.close()
                return
            publish_more(ch)

        ch.confirm_delivery(ack_nack_callback=on_confirm, callback=confirms_on)

    def on_open(c) -> None:
        c.channel(on_open_callback=on_channel)

    def on_open_error(c, err) -> None:
        state["error"] = f"cannot connect: {err}"
        c.ioloop.stop()

    def on_closed(c, reason) -> None:
        if confirmed() < n and state["error"] is None:
            state["error"] = f"connection closed after {confirmed()} of {n} confirms: {reason}"
        c.ioloop.stop()

    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": "bench-fill"}
    conn = pika.SelectConnection(
        params, on_open_callback=on_open, on_open_error_callback=on_open_error, on_close_callback=on_closed
    )
    deadline = conn.ioloop.call_later(timeout, lambda: conn.close() if conn.is_open else conn.ioloop.stop())
    conn.ioloop.start()
    conn.ioloop.remove_timeout(deadline)
    if state["error"]:
        raise RuntimeError(f"fill: {state['error']}")
    took = (state["t1"] or time.perf_counter()) - state["t0"]
    return n / took if took > 0 else float("inf")


def publish_at_rate(url: str, queue: str, rate: float, seconds: float, start: int = 0) -> dict:
    """Publish rate msg/s for `seconds` from one blocking connection (no confirms: nothing to wait for
    between sends). Each body carries its own send time. Returns what was achieved."""
    params = pika.URLParameters(url)
    params.heartbeat = 0
    params.client_properties = {"connection_name": "bench-rate"}
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    total = int(rate * seconds)
    interval = 1.0 / rate
    props = make_props(start)  # one property set: the send time is in the body
    clock = time.perf_counter
    t0 = clock()
    max_lag = 0.0
    for k in range(total):
        due = t0 + k * interval
        now = clock()
        if due > now:
            time.sleep(due - now)
        else:
            max_lag = max(max_lag, now - due)
        ch.basic_publish("", queue, make_body(start + k), props)
    took = clock() - t0
    conn.close()
    return {"published": total, "seconds": took, "rate": total / took, "max_publisher_lag_ms": max_lag * 1e3}
