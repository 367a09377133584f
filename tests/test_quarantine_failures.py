"""A quarantine copy the broker keeps refusing: bounded tries, then the dead-letter exchange or the
queue, and never another run of the callback. A private node, since a policy makes the broker refuse."""

from __future__ import annotations

import json
import pytest
import pytest_twisted

from amqp_consumer import quarantine
from tests.conftest import until
from tests.support.broker import Broker, unique
from tests.support.inprocess import in_process, inprocess_config


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(quarantine, "RETRY_DELAYS", (0.1, 0.1, 0.1, 0.1))


def refuse_quarantine(node, queue: str) -> str:
    """A policy that makes the broker nack every publish to queue's quarantine queue."""
    name = unique("refuse")
    definition = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    node.ctl("set_policy", "--apply-to", "queues", name, f"^{queue}\\.quarantine$", definition)
    return name


def failing(runs: list[str]):
    def callback(message):
        runs.append(message.id)
        raise ValueError("cannot handle it")

    return callback


@pytest_twisted.ensureDeferred
async def test_after_bounded_tries_the_message_goes_to_its_dead_letter_exchange(reactor, tmp_path, running_node, quick_retries):
    broker = Broker(running_node.url)
    queue, dlq = unique("q"), unique("dlq")
    broker.declare(dlq)
    arguments = f'{{"x-dead-letter-exchange" = "", "x-dead-letter-routing-key" = "{dlq}"}}'
    policy = refuse_quarantine(running_node, queue)
    runs: list[str] = []
    daemon = in_process(reactor, inprocess_config(tmp_path, queue, running_node.url, arguments), failing(runs), on_exit=lambda c: None)
    daemon.startService()
    try:
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready")
        broker.publish_json(queue, [{"n": 1}], message_id="poison")
        await until(reactor, lambda: broker.depth(dlq) == 1, what="dead-lettered")
        assert runs == ["poison"]  # the callback ran once, not once per failed copy
        assert broker.depth(queue) == 0 and broker.depth(queue + ".quarantine") == 0
        assert daemon.metrics.quarantine_failures[queue] == 1
        assert daemon.metrics.value("rejected", queue) == 1
        assert b"amqp_consumer_quarantine_failures_total{queue=\"" + queue.encode() + b"\"} 1.0" in daemon.metrics.exposition()
    finally:
        await daemon.stopService()
        running_node.ctl("clear_policy", policy)
        for q in (queue, dlq, queue + ".quarantine"):
            broker.delete(q)
        broker.close()


@pytest_twisted.ensureDeferred
async def test_without_a_dead_letter_exchange_it_is_requeued_and_comes_back_to_quarantine_not_to_the_callback(
    reactor, tmp_path, running_node, quick_retries
):
    broker = Broker(running_node.url)
    queue = unique("q")
    policy = refuse_quarantine(running_node, queue)
    runs: list[str] = []
    daemon = in_process(reactor, inprocess_config(tmp_path, queue, running_node.url), failing(runs), on_exit=lambda c: None)
    daemon.startService()
    try:
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready")
        broker.publish_json(queue, [{"n": 1}], message_id="poison")
        await until(reactor, lambda: daemon.metrics.quarantine_failures[queue] >= 2, what="two rounds of failed copies")
        assert daemon.metrics.value("requeued", queue) >= 2
        running_node.ctl("clear_policy", policy)  # the operator fixes the broker
        await until(reactor, lambda: broker.depth(queue + ".quarantine") == 1, what="the copy at last")
        await until(reactor, lambda: broker.depth(queue) == 0 and not len(daemon.consumer.inflight), what="settled")
        assert runs == ["poison"]  # redeliveries went straight to quarantine
        assert daemon.metrics.value("quarantined", queue) == 1
    finally:
        await daemon.stopService()
        running_node.ctl("clear_policy", policy, check=False)
        for q in (queue, queue + ".quarantine"):
            broker.delete(q)
        broker.close()
