"""The trivial callbacks the benchmark runs: decode the JSON body once, count it.

amqp-consumer and fedora-messaging decode application/json bodies themselves
(``message.body`` is the parsed value), so their callbacks only touch it; the
raw pika consumer (bench/pika_consumer.py) calls json.loads itself. Every
variant therefore does exactly one JSON parse per message.
"""

from __future__ import annotations

from bench_probe import PROBE

_hit = PROBE.hit


def sync_callback(message):
    """amqp-consumer, sync: runs on the worker pool."""
    _hit(message.body)


async def async_callback(message):
    """amqp-consumer, async: runs on the reactor."""
    _hit(message.body)


def fm_callback(message):
    """fedora-messaging: its Message has the parsed (and schema-validated) body."""
    _hit(message.body)
