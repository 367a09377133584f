"""Publish messages with header values pika cannot write, or cannot read back: the wire bytes are made here.

pika has no float encoding and refuses nothing it writes, so a message carrying
a double, or a timestamp beyond year 9999 (milliseconds written where seconds
belong, as some clients do), is built from its encoded field values.
"""

from __future__ import annotations

import struct
from typing import Any

import pika
import pika.data


def timestamp(seconds: int) -> bytes:
    """An AMQP timestamp field value (unsigned 64-bit seconds), whatever year it means."""
    return b"T" + struct.pack(">Q", seconds)


def double(value: float) -> bytes:
    return b"d" + struct.pack(">d", value)


def value(v: Any) -> bytes:
    """A field value as pika encodes it."""
    pieces: list[bytes] = []
    pika.data.encode_value(pieces, v)
    return b"".join(pieces)


def table(entries: dict[str, bytes]) -> bytes:
    """An AMQP field table from already encoded values."""
    body = b""
    for key, encoded in entries.items():
        name = key.encode()
        body += bytes([len(name)]) + name + encoded
    return struct.pack(">I", len(body)) + body


class RawHeaderProperties(pika.BasicProperties):
    """BasicProperties whose headers table is written from encoded values."""

    def __init__(self, raw_headers: dict[str, bytes], **props: Any) -> None:
        super().__init__(headers={}, **props)
        self.raw_headers = raw_headers

    def encode(self) -> list[bytes]:
        pieces = super().encode()
        # the empty table pika wrote for headers={} is the first 4-byte zero piece
        # (a short string is written as two pieces: its 1-byte length, then its bytes)
        pieces[pieces.index(struct.pack(">I", 0))] = table(self.raw_headers)
        return pieces


def publish(channel: Any, queue: str, body: bytes, raw_headers: dict[str, bytes], **props: Any) -> None:
    """Publish to queue (default exchange) on a pika BlockingChannel."""
    props.setdefault("delivery_mode", 2)
    channel.basic_publish("", queue, body, RawHeaderProperties(raw_headers, **props))
