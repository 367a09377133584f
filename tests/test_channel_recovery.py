"""In-process: the broker closes our channel (406, as on a consumer ack timeout); the consumer comes back."""

from __future__ import annotations

import pytest_twisted

from tests.conftest import until
from tests.support.broker import Broker
from tests.support.inprocess import in_process, inprocess_config


@pytest_twisted.ensureDeferred
async def test_channel_closed_by_broker_reopens_and_consumes(reactor, tmp_path, broker: Broker, queue):
    seen: list[str] = []
    exits: list[int] = []
    daemon = in_process(reactor, inprocess_config(tmp_path, queue, broker.url), lambda m: seen.append(m.id), on_exit=exits.append)
    daemon.startService()
    try:
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready")
        old = daemon.consumer.subscription._channel
        old.ack(987654)  # an unknown delivery tag: the broker closes the channel with 406 PRECONDITION_FAILED
        await until(reactor, lambda: not daemon.state.readiness()[0], what="not ready after the close")
        assert "channel closed: 406" in daemon.state.readiness()[1]
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready again")
        assert daemon.consumer.subscription._channel is not old
        ids = broker.publish_json(queue, [{"n": 1}, {"n": 2}])
        await until(reactor, lambda: set(ids) <= set(seen), what="messages on the new channel")
        await until(reactor, lambda: broker.depth(queue) == 0, what="acked")
        assert exits == []
    finally:
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_delivery_from_a_closed_channel_is_never_acked_on_the_new_one(reactor, tmp_path, broker: Broker, queue):
    """A callback that finishes after its channel died must not ack on the new channel (406 unknown tag)."""
    import threading

    gate = threading.Event()
    seen: list[tuple[str, bool]] = []

    def cb(m):
        seen.append((m.id, m.redelivered))
        if not m.redelivered:
            gate.wait(10)

    daemon = in_process(reactor, inprocess_config(tmp_path, queue, broker.url), cb, on_exit=lambda c: None)
    daemon.startService()
    try:
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready")
        (mid,) = broker.publish_json(queue, [{"n": 1}])
        await until(reactor, lambda: seen, what="first delivery running")
        old = daemon.consumer.subscription._channel
        old.ack(987654)  # the broker closes the channel; the running message is requeued
        await until(reactor, lambda: daemon.consumer.subscription._channel not in (None, old), what="new channel")
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready again")
        gate.set()  # the old callback finishes now
        await until(reactor, lambda: (mid, True) in seen, what="redelivery on the new channel")
        await until(reactor, lambda: broker.depth(queue) == 0 and len(daemon.consumer.inflight) == 0, what="settled")
        new = daemon.consumer.subscription._channel
        assert new.is_open and daemon.state.readiness()[0]  # no 406 on the new channel
        assert daemon.metrics.value("acked", queue) == 1
    finally:
        gate.set()
        await daemon.stopService()
