"""Callbacks the tests run inside the daemon. Each writes what it saw as JSON lines to $TEST_OUT."""

from __future__ import annotations

import json
import os
import threading
import time

from amqp_consumer import Drop, HaltConsumer, Nack

_lock = threading.Lock()


def _record(message, **extra) -> None:
    row = {
        "id": message.id,
        "body": message.body if not isinstance(message.body, bytes) else message.body.decode("utf-8", "replace"),
        "queue": message.queue,
        "routing_key": message.routing_key,
        "redelivered": message.redelivered,
        "delivery_count": message.delivery_count,
        "thread": threading.current_thread().name,
        **extra,
    }
    with _lock, open(os.environ["TEST_OUT"], "a") as f:
        f.write(json.dumps(row) + "\n")


def record(message) -> None:
    _record(message)


def slow(message) -> None:
    """Sleeps body['sleep'] seconds, recording start and end."""
    start = time.time()
    _record(message, event="start", t=start)
    time.sleep(float(message.body.get("sleep", 0)))
    _record(message, event="end", t=time.time(), start=start)


_barriers: dict[int, threading.Barrier] = {}


def meet(message) -> None:
    """Waits until body['parties'] callbacks run at once (up to 20 s; then it raises and the message is
    quarantined), recording each that met: concurrency shown without comparing clocks."""
    parties = int(message.body["parties"])
    with _lock:
        barrier = _barriers.setdefault(parties, threading.Barrier(parties, timeout=20))
    barrier.wait()
    _record(message, event="met")


class Unprintable(Exception):
    """An exception that cannot describe itself: its __str__ and __repr__ raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


def slow_first_time(message) -> None:
    """Sleeps body['sleep'] seconds on a first delivery only: a callback that outlives the
    consumer ack timeout once, then runs quickly when the broker delivers the message again."""
    _record(message, event="start", t=time.time())
    if not message.redelivered:
        time.sleep(float(message.body.get("sleep", 0)))


def outcomes(message) -> None:
    """body['do'] picks the outcome: ack, nack-once, hang-once (until killed), drop, halt, raise, raise-unprintable."""
    do = message.body.get("do", "ack")
    _record(message, do=do)
    if do == "nack-once" and not message.redelivered:
        raise Nack()
    if do == "hang-once" and not message.redelivered:
        time.sleep(600)
    if do == "drop":
        raise Drop()
    if do == "halt":
        raise HaltConsumer(exit_code=int(message.body.get("code", 0)), requeue=bool(message.body.get("requeue", False)))
    if do == "raise":
        raise ValueError(f"cannot handle {message.body.get('what', 'this')}")
    if do == "raise-unprintable":
        raise Unprintable()


async def async_record(message) -> None:
    """Awaits a Deferred on the reactor (default reactor)."""
    from twisted.internet import reactor, task

    await task.deferLater(reactor, 0.01, lambda: None)
    _record(message, kind="async")


async def asyncio_record(message) -> None:
    """Awaits asyncio (under twistd -r asyncio)."""
    import asyncio

    await asyncio.sleep(0.01)
    _record(message, kind="asyncio")


class Configured:
    """A class callback: built once with [consumer.config]."""

    def __init__(self, config) -> None:
        self.prefix = config["prefix"]

    def __call__(self, message) -> None:
        _record(message, prefix=self.prefix)


class AsyncConfigured:
    def __init__(self, config) -> None:
        self.prefix = config.get("prefix", "")

    async def __call__(self, message) -> None:
        _record(message, prefix=self.prefix, kind="async-class")


class BrokenInit:
    def __init__(self, config) -> None:
        raise RuntimeError("database unreachable")

    def __call__(self, message) -> None:  # pragma: no cover
        pass


def record_properties(message) -> None:
    """Every attribute of the message, as the callback sees it."""
    _record(
        message,
        raw=message.raw_body.decode(),
        topic=message.topic,
        exchange=message.exchange,
        # A Decimal header (the AMQP decimal type) is recorded as its type and value.
        headers={k: f"{type(v).__name__}({v})" if type(v).__name__ == "Decimal" else v for k, v in message.headers.items()},
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        content_type=message.content_type,
        priority=message.priority,
        timestamp=message.timestamp.isoformat() if message.timestamp else None,
        text=str(message),
    )


def leak_thread(message) -> None:
    """Leaves a non-daemon thread behind that outlives any stop."""
    threading.Thread(target=time.sleep, args=(3600,), name=f"leaky-{message.body['n']}", daemon=False).start()
    _record(message)


def large_block(message) -> None:
    """Where a 3 MiB block goes in the daemon's process after an 8 MiB one was freed (memory.py)."""
    from tests.support.malloc import own_mapping_after_a_larger_one

    _record(message, own_mapping=own_mapping_after_a_larger_one(3 << 20))
