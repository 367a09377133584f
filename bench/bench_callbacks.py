"""The trivial callbacks the benchmark runs: decode the JSON body once, count it.

amqp-consumer and fedora-messaging decode application/json bodies themselves
(``message.body`` is the parsed value), so their callbacks only touch it; the
raw pika consumer (bench/pika_consumer.py) calls json.loads itself. Every
variant therefore does exactly one JSON parse per message.

In latency mode, for amqp-consumer only, the moment each delivery reaches the
daemon's dispatcher is noted (one clock read and one dict entry per message),
so that the report can split the end-to-end latency into what happened before
the daemon had the delivery (publisher, broker, kernel) and the daemon's own
hand-off to the callback.
"""

from __future__ import annotations

import os
import time

from bench_probe import PROBE

_hit = PROBE.hit
_arrived: dict[int, float] = {}


def _note_arrivals() -> None:
    try:
        from amqp_consumer.dispatch import Dispatcher
    except ImportError:  # fedora-messaging's venv: nothing to patch
        return
    submit = Dispatcher.submit
    clock = time.perf_counter

    def noting_submit(self, delivery):
        _arrived[id(delivery.message)] = clock()
        submit(self, delivery)

    Dispatcher.submit = noting_submit  # before the consumer binds it: this module is imported first


if os.environ.get("BENCH_MODE") == "latency":
    _note_arrivals()

    def sync_callback(message):
        """amqp-consumer, sync: runs on the worker pool."""
        _hit(message.body, _arrived.pop(id(message), None))

    async def async_callback(message):
        """amqp-consumer, async: runs on the reactor."""
        _hit(message.body, _arrived.pop(id(message), None))

else:  # throughput: nothing but the parse and the count

    def sync_callback(message):
        """amqp-consumer, sync: runs on the worker pool."""
        _hit(message.body)

    async def async_callback(message):
        """amqp-consumer, async: runs on the reactor."""
        _hit(message.body)


def fm_callback(message):
    """fedora-messaging: its Message has the parsed (and schema-validated) body."""
    _hit(message.body)
