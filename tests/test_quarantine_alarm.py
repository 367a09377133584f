"""A memory alarm while a quarantine copy waits for its confirm, then the consumer ack timeout:
the copy's wait is bounded, the connection survives, and the message is quarantined once.
The session's private node with a 3 s consumer timeout (conftest.timeout_node_3_10): the test
raises a memory alarm on it and clears it again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest_twisted

from amqp_consumer import quarantine
from tests.conftest import until
from tests.support.broker import Broker, unique
from tests.support.inprocess import in_process, inprocess_config


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest_twisted.ensureDeferred
async def test_a_copy_held_by_a_memory_alarm_then_an_ack_timeout_is_quarantined_once_on_one_connection(reactor, tmp_path: Path, timeout_node_3_10, monkeypatch):
    monkeypatch.setattr(quarantine, "PUBLISH_TIMEOUT", 8.0)
    broker = Broker(timeout_node_3_10.url)
    queue = unique("q")
    runs: list[str] = []

    def callback(message):
        runs.append(message.id)
        raise ValueError("cannot handle it")

    pika_log = Captured()
    logging.getLogger("pika").addHandler(pika_log)
    broker.declare(queue)
    broker.publish_json(queue, [{"n": 1}], message_id="poison")
    timeout_node_3_10.ctl("set_vm_memory_high_watermark", "0")  # publishing blocks from now on
    daemon = in_process(reactor, inprocess_config(tmp_path, queue, timeout_node_3_10.url), callback, on_exit=lambda c: None)
    daemon.startService()
    alarmed = True
    try:
        await until(reactor, lambda: runs, what="the callback ran")
        # its copy cannot be confirmed; 3 s on, the broker closes the channel for the ack timeout
        await until(reactor, lambda: daemon.metrics.quarantine_failures[queue] == 1, timeout=30, what="the copy's deadline")
        assert not daemon.state.readiness()[0]  # the broker closed the channel for its ack timeout
        timeout_node_3_10.ctl("set_vm_memory_high_watermark", "0.4")
        alarmed = False
        await until(
            reactor,
            lambda: daemon.state.readiness()[0] and broker.depth(queue) == 0 and not len(daemon.consumer.inflight)
            and daemon.metrics.value("quarantined", queue) + daemon.metrics.value("acked", queue) >= 1,
            timeout=30,
            what="consuming again with the message settled",
        )
        assert broker.depth(queue + ".quarantine") == 1  # quarantined once
        assert runs == ["poison"]  # and never run again
        assert daemon.state.reconnects == 0  # the connection lived through it all
        assert not [line for line in pika_log.lines if "unregistered channel" in line]
    finally:
        if alarmed:
            timeout_node_3_10.ctl("set_vm_memory_high_watermark", "0.4")
        await daemon.stopService()
        logging.getLogger("pika").removeHandler(pika_log)
        broker.delete(queue)
        broker.delete(queue + ".quarantine")
        broker.close()
