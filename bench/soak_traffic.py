"""What the soak test publishes: the mix of message kinds, their poison bodies and headers, and the publisher.

Every message carries its soak id three times (``message_id``, the header
``soak-id`` and ``"sid"`` in the body, even in a body that is not valid JSON),
so it can be recognised wherever it ends up, even when its properties could
not be decoded. Each kind has one expected outcome:

- ``acked``: the callback returned (at least once), and the message is in no queue;
- ``quarantined``: in ``<queue>.quarantine``, with the daemon's headers;
- ``dead-lettered``: in the dead-letter queue (the callback raised ``Drop``);
- ``settled-poison``: properties the client library cannot decode; the daemon
  must still settle it: quarantined, or dead-lettered.
"""

from __future__ import annotations

import decimal
import json
import random
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pika
import pika.data

from tests.support import rawprops


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float  # percent of the messages
    expect: str
    runs: str  # what the callback sees: "yes", "no" (never called) or "any"
    exception: str = ""  # the amqp-consumer-exception header a quarantined copy must carry


KINDS = [
    Kind("ok", 65.0, "acked", "yes"),
    Kind("raise", 8.0, "quarantined", "yes", "ValueError"),
    Kind("raise-weird", 1.0, "quarantined", "yes", "WeirdError"),
    Kind("nack-once", 5.0, "acked", "yes"),
    Kind("drop", 5.0, "dead-lettered", "yes"),
    Kind("slow", 1.0, "acked", "yes"),
    Kind("bad-json", 4.0, "quarantined", "no", "BodyDecodeError"),
    Kind("odd-headers-ok", 6.0, "acked", "yes"),
    Kind("odd-headers-raise", 3.0, "quarantined", "yes", "ValueError"),
    Kind("huge-ok", 0.5, "acked", "yes"),
    Kind("huge-raise", 0.3, "quarantined", "yes", "ValueError"),
    Kind("bad-timestamp", 0.2, "settled-poison", "any"),
]
BY_NAME = {k.name: k for k in KINDS}

# RabbitMQ's default frame_max, which pika accepts: the largest frame either side sends.
FRAME_MAX = 131072


# --- header values pika would not write, or not read back -----------------------------
# Headers are sent as already encoded field values (tests/support/rawprops.py), so
# a message can carry a double, a float, unsigned integers, non-UTF-8 text or a
# timestamp no datetime can hold.


def field(kind: bytes, fmt: str, value: Any) -> bytes:
    return kind + struct.pack(fmt, value)


def timestamp_beyond_9999() -> bytes:
    """A timestamp in milliseconds where AMQP wants seconds: year ~58,000, which datetime cannot hold."""
    return rawprops.timestamp(int(time.time() * 1000))


_decode_value = pika.data.decode_value


def _decode_value_lenient(encoded: bytes, offset: int) -> tuple[Any, int]:
    """As pika's, but a timestamp datetime cannot hold is returned as its number."""
    if encoded[offset:offset + 1] == b"T":
        seconds = struct.unpack_from(">Q", encoded, offset + 1)[0]
        try:
            return datetime.fromtimestamp(seconds, timezone.utc), offset + 9
        except (ValueError, OverflowError, OSError):
            return seconds, offset + 9
    return _decode_value(encoded, offset)


def read_any_timestamp() -> None:
    """Let this process's pika read back a message whose timestamp header it cannot represent.

    A dead-lettered poison message keeps its headers as sent. decode_table
    looks decode_value up in its module at every call; the soak harness calls
    this for its own process only, never for the daemon's.
    """
    pika.data.decode_value = _decode_value_lenient


def odd_headers(rng: random.Random) -> dict[str, bytes]:
    """Headers a broker accepts and a consumer must survive, a random few at a time."""
    value = rawprops.value
    choices: list[Callable[[], tuple[str, bytes]]] = [
        lambda: ("long-text", value("x" * rng.choice([1_000, 20_000, 60_000]))),
        lambda: ("nested", value(_nested(rng.randint(3, 12)))),
        lambda: ("array", value([1, "two", None, True, [3, [4, {"five": 5}]], b"\x00\xff"])),
        lambda: ("bytes", value(bytes(range(256)))),
        lambda: ("not-utf8-text", field(b"S", ">I", 3) + b"\xff\xfe\xfd"),
        lambda: ("decimal", value(decimal.Decimal("9.99"))),
        lambda: ("double-huge", rawprops.double(1e300)),
        lambda: ("double", rawprops.double(2.5)),
        lambda: ("float", field(b"f", ">f", 1.5)),
        lambda: ("short-short", field(b"b", ">b", -5)),
        lambda: ("unsigned-short", field(b"u", ">H", 65535)),
        lambda: ("unsigned-long", field(b"i", ">I", 4_000_000_000)),
        lambda: ("long-long", value(2**62)),
        lambda: ("void", value(None)),
        lambda: ("bool", value(False)),
        lambda: ("when", value(datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone.utc))),
        lambda: ("k" * 255, value("key of 255 characters")),
        lambda: ("ünïcødé-kéy ✓", value("välue ✓")),
        lambda: ("", value("empty key")),
    ]
    out: dict[str, bytes] = {}
    for make in rng.sample(choices, rng.randint(2, 6)):
        key, encoded = make()
        out[key] = encoded
    return out


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": "bottom"}
    for i in range(depth):
        value = {f"level{i}": value, "n": i}
    return value


# --- messages --------------------------------------------------------------------------


@dataclass
class Outgoing:
    sid: str
    kind: Kind
    body: bytes
    properties: rawprops.RawHeaderProperties


def make_message(sid: str, kind: Kind, rng: random.Random) -> Outgoing:
    headers = {"soak-id": rawprops.value(sid), "soak-kind": rawprops.value(kind.name)}
    content_type = "application/json"
    doc: dict[str, Any] = {"sid": sid, "do": "ok", "sent": time.time()}
    name = kind.name
    if name in ("raise", "nack-once", "drop", "slow"):
        doc["do"] = name
    elif name == "raise-weird":
        doc["do"] = "raise-weird"
        doc["style"] = rng.choice(["str-raises", "surrogate", "long"])
    elif name.startswith("odd-headers"):
        doc["do"] = "raise" if name.endswith("raise") else "ok"
        headers.update(odd_headers(rng))
    elif name.startswith("huge"):
        doc["do"] = "raise" if name.endswith("raise") else "ok"
        doc["pad"] = "h" * rng.randint(1_000_000, 4_000_000)
    elif name == "bad-timestamp":
        headers["sent-at"] = timestamp_beyond_9999()
    if name == "bad-json":
        body = rng.choice(
            [
                f'{{"sid": "{sid}", "do": "ok", broken'.encode(),
                f'{{"sid": "{sid}"}} trailing'.encode(),
                f'{{"sid": "{sid}", "bad": "\xff\xfe"}}'.encode("latin-1"),
            ]
        )
    else:
        body = json.dumps(doc).encode()
    props = rawprops.RawHeaderProperties(
        headers,
        content_type=content_type,
        delivery_mode=2,
        message_id=sid,
        app_id="soak",
        timestamp=int(time.time()),
    )
    if name.startswith("odd-headers") and rng.random() < 0.15:
        fill_frame(props, spare=rng.choice([100, 600, 1500]))
    return Outgoing(sid, kind, body, props)


def properties_size(props: pika.BasicProperties) -> int:
    return len(b"".join(props.encode()))


def fill_frame(props: rawprops.RawHeaderProperties, spare: int) -> None:
    """Pad the headers until the content header frame is `spare` bytes short of the frame size.

    The message itself fits; a copy that adds a few headers (a quarantined
    copy carries the error text) may not, unless its publisher cuts it down.
    """
    # A content header frame: 7 bytes of frame header, 12 of class, weight and
    # body size, the properties, and the frame-end octet.
    room = FRAME_MAX - 8 - 12 - spare
    props.raw_headers["filler"] = rawprops.value("")
    props.raw_headers["filler"] = rawprops.value("f" * max(0, room - properties_size(props)))


class Mix:
    """Picks kinds by weight; kinds named in `skip` are never sent."""

    def __init__(self, rng: random.Random, skip: set[str] | None = None) -> None:
        self._rng = rng
        self.kinds = [k for k in KINDS if k.name not in (skip or set())]
        self._weights = [k.weight for k in self.kinds]

    def pick(self) -> Kind:
        return self._rng.choices(self.kinds, self._weights)[0]


# --- the publisher ---------------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes at a steady rate with confirms until `stop` is set, through kills and restarts.

    Every attempt is written to `record` as one JSON line before the answer is
    known and one after: ``confirmed`` true (the broker has it), or false with
    the error (the broker may or may not have it: the node died in between).
    A message is never published twice, so a second run of it can only be a
    redelivery.
    """

    def __init__(self, url: str, queue: str, rate: float, mix: Mix, rng: random.Random, record: Path, stop: threading.Event) -> None:
        super().__init__(name="soak-publisher", daemon=True)
        self._url = url
        self._queue = queue
        self._interval = 1.0 / rate
        self._mix = mix
        self._rng = rng
        self._record = open(record, "a", encoding="utf-8")  # noqa: SIM115 - closed in run()
        self._halt = stop
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self.sent = 0
        self.confirmed = 0
        self.unconfirmed = 0
        self.connect_failures = 0

    def _write(self, row: dict[str, Any]) -> None:
        self._record.write(json.dumps(row) + "\n")
        self._record.flush()

    def _channel(self) -> Any:
        if self._ch is None or not self._ch.is_open:
            self._close()
            params = pika.URLParameters(self._url)
            params.heartbeat = 0
            params.connection_attempts = 1
            params.socket_timeout = 5
            params.blocked_connection_timeout = 30
            params.client_properties = {"connection_name": "soak-publisher"}
            self._conn = pika.BlockingConnection(params)
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        return self._ch

    def _close(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is going anyway
                pass

    def run(self) -> None:
        n = 0
        due = time.monotonic()
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                if now < due:
                    self._halt.wait(due - now)
                    continue
                due = max(due + self._interval, now - 1.0)  # no burst to catch up after an outage
                try:
                    ch = self._channel()
                except Exception:  # noqa: BLE001 - the node is down: try again shortly
                    self.connect_failures += 1
                    self._ch = None
                    self._halt.wait(1.0)
                    due = time.monotonic()
                    continue
                n += 1
                out = make_message(f"s{n:07d}", self._mix.pick(), self._rng)
                self._write(
                    {"sid": out.sid, "kind": out.kind.name, "expect": out.kind.expect, "t": time.time(), "ev": "publish",
                     "size": len(out.body)}
                )
                self.sent += 1
                try:
                    ch.basic_publish("", self._queue, out.body, out.properties, mandatory=True)
                except Exception as e:  # noqa: BLE001 - confirmed or not, never sent again
                    self.unconfirmed += 1
                    self._write({"sid": out.sid, "ev": "unconfirmed", "t": time.time(), "error": f"{type(e).__name__}: {e}"})
                    self._ch = None
                else:
                    self.confirmed += 1
                    self._write({"sid": out.sid, "ev": "confirmed", "t": time.time()})
        finally:
            self._close()
            self._record.close()
