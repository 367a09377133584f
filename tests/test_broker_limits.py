"""The broker's consumer ack timeout and quorum delivery counts, against RabbitMQ 3.10 and 4.3.

The two brokers time a consumer out differently (3.x closes the channel, 4.3 cancels the
consumer and leaves the channel open; see amqp_consumer/brokerlimits.py): the daemon must
give the same result on both.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pika
import pytest
from pika import spec

from tests.support.broker import Broker, read_rows, unique
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for, wait_until
from tests.support.ops import HEALTH_ANYWHERE, health_port, http, http_json, metric_value
from tests.support.rabbitnode import RabbitNode

TIMEOUT_MS = 3000
LIMIT = TIMEOUT_MS / 1000
SLOW = 8.0  # seconds the first message's callback takes: well past the timeout


def _timeout_broker(broker_version: str, broker: Broker, request: pytest.FixtureRequest) -> tuple[Broker, dict, str]:
    """(admin connection, queue arguments, [consumer] lines) for a broker whose consumer timeout is 3 s."""
    if broker_version == "3.10":
        admin = Broker(_timeout_node(broker_version, request).url)
        request.addfinalizer(admin.close)
        return admin, {}, f"ack_timeout = {LIMIT:g}"
    # 4.3 enforces it on quorum queues only, set per queue: the run's node will do.
    return broker, {"x-queue-type": "quorum", "x-consumer-timeout": TIMEOUT_MS}, ""


def _timeout_node(broker_version: str, request: pytest.FixtureRequest) -> RabbitNode:
    return request.getfixturevalue("timeout_node_3_10" if broker_version == "3.10" else "rabbitmq43")


def _toml_table(arguments: dict) -> str:
    return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in arguments.items()) + "}"


class RawConsumer:
    """pika's asynchronous channel driven step by step from the test, to see the broker's own frames."""

    def __init__(self, url: str) -> None:
        self.conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=lambda c: c.ioloop.stop())
        self.run_until(lambda: self.conn.is_open, "connection open")
        opened: list = []
        self.conn.channel(on_open_callback=opened.append)
        self.run_until(lambda: opened, "channel open")
        self.ch = opened[0]
        self.tags: dict[bytes, int] = {}
        self.cancels: list[str] = []
        self.closes: list[Exception] = []
        self.ch.add_on_cancel_callback(lambda frame: self.cancels.append(frame.method.consumer_tag))
        self.ch.add_on_close_callback(lambda _ch, why: self.closes.append(why))

    def run(self, seconds: float) -> None:
        self.conn.ioloop.call_later(seconds, self.conn.ioloop.stop)
        self.conn.ioloop.start()

    def run_until(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.run(0.05)

    def consume(self, queue: str) -> str:
        self.ch.basic_qos(prefetch_count=10)
        return self.ch.basic_consume(queue, lambda _ch, method, _p, body: self.tags.__setitem__(body, method.delivery_tag))

    def answer_cancel(self, consumer_tag: str) -> None:
        """Our own basic.cancel for a consumer the broker cancelled (pika would not send it)."""
        done: list = []
        self.ch._rpc(spec.Basic.Cancel(consumer_tag=consumer_tag, nowait=False), done.append,
                     [(spec.Basic.CancelOk, {"consumer_tag": consumer_tag})])
        self.run_until(lambda: done, "cancel-ok")

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()
            self.run_until(lambda: self.conn.is_closed, "connection closed")


def test_what_the_broker_does_with_a_timed_out_consumers_other_deliveries(broker_version, broker, request) -> None:
    """The facts amqp_consumer/brokerlimits.py acts on. m0 reaches the limit while m1, delivered later
    to the same consumer, has not: 3.10 closes the channel and requeues both; 4.3 cancels the
    consumer, returns m0 only, keeps m1 on the open channel (an ack still settles it) and keeps the
    consumer on the queue until the client answers the cancel and holds nothing."""
    admin, arguments, _ = _timeout_broker(broker_version, broker, request)
    q = unique("acktimeout-facts")
    admin.declare(q, arguments=arguments)
    raw = RawConsumer(admin.url)
    try:
        admin.publish_json(q, [{"m": 0}])
        tag = raw.consume(q)
        raw.run_until(lambda: len(raw.tags) == 1, "m0 delivered")
        raw.run(1.5)
        admin.publish_json(q, [{"m": 1}])
        raw.run_until(lambda: len(raw.tags) == 2, "m1 delivered")
        raw.run_until(lambda: raw.cancels or raw.closes, "the consumer timeout", timeout=20)
        ready, consumers = admin.counts(q)
        node = _timeout_node(broker_version, request)
        if broker_version == "3.10":
            assert raw.closes and "406" in str(raw.closes[0]) and not raw.cancels
            assert (ready, consumers) == (2, 0)  # everything back, the consumer gone with the channel
            assert node.consumers(q) == []
            return
        assert raw.cancels == [tag] and raw.ch.is_open
        assert (ready, consumers) == (1, 1)  # m0 back; m1 still held by the cancelled consumer
        m1 = next(t for body, t in raw.tags.items() if b'"m": 1' in body)
        raw.ch.basic_ack(m1)  # before m1's own limit: the broker takes it
        raw.run(0.2)
        assert admin.counts(q) == (1, 1)  # holding nothing, but not answered yet
        assert [c["consumer_tag"] for c in node.consumers(q)] == [tag]
        raw.answer_cancel(tag)
        wait_until(lambda: admin.counts(q) == (1, 0), timeout=10, what="the cancelled consumer gone")
        assert node.consumers(q) == []
        raw.run(2.0)  # past m1's limit: nothing more happens to it
        assert raw.ch.is_open and admin.counts(q) == (1, 0)
    finally:
        raw.close()


def test_a_callback_outliving_the_consumer_ack_timeout(broker_version, broker, request, tmp_path, daemons) -> None:
    """20 messages, the first one's callback sleeps past the timeout, one worker. The 19 others run
    exactly once, the slow one twice (its late result dropped), the queue never has more than one
    consumer of ours, and the log, the metric and /status say what happened."""
    admin, arguments, consumer_lines = _timeout_broker(broker_version, broker, request)
    q = unique("acktimeout")
    admin.declare(q, arguments=arguments)
    admin.publish_json(q, [{"n": 0, "sleep": SLOW}] + [{"n": n} for n in range(1, 20)])
    out = tmp_path / "seen.jsonl"
    config = daemon_config(
        q, "testcb:slow_first_time", url=admin.url, queue_args=_toml_table(arguments), health=HEALTH_ANYWHERE
    )
    config = config.replace("[consumer]\n", f"[consumer]\n{consumer_lines}\n", 1)
    d = DaemonProcess(tmp_path / "d", config, env=env_for(TEST_OUT=str(out)))
    daemons.append(d)
    d.start()
    port = health_port(d)

    consumers_seen: list[int] = []
    status_during: list[dict] = []

    def finished() -> bool:
        consumers_seen.append(admin.counts(q)[1])
        runs = Counter(r["body"]["n"] for r in read_rows(out))
        if runs[0] == 1 and not status_during:  # the slow callback runs: how near is the limit?
            nearest = http_json(port, "/status")[1]["inflight"]["ack_timeout"]
            if nearest:
                status_during.append(nearest)
        return len(runs) == 20 and runs[0] >= 2

    wait_until(finished, timeout=SLOW + 60, interval=0.1, what="every message processed")
    timeouts = metric_value(http(port, "/metrics")[2].decode(), "amqp_consumer_ack_timeouts_total", queue=q)
    assert d.stop() == 0
    assert admin.depth(q) == 0  # everything acked in the end

    runs = Counter(r["body"]["n"] for r in read_rows(out))
    assert {n: runs[n] for n in range(1, 20)} == {n: 1 for n in range(1, 20)}, runs
    assert runs[0] == 2  # once too slow (its result dropped), once more when redelivered
    assert max(consumers_seen) == 1, consumers_seen
    lines = [x for x in d.output.splitlines() if "consumer ack timeout on" in x]
    assert lines and all(f"on '{q}': the oldest delivery was" in x for x in lines), d.output
    assert timeouts == len(lines)
    assert f"over 75 % of the consumer ack timeout ({LIMIT:g} s)" in d.output
    assert status_during and status_during[0]["queue"] == q and status_during[0]["limit_seconds"] == LIMIT


def test_delivery_count_after_a_nack_and_after_a_crash(broker, tmp_path, daemons) -> None:
    """message.delivery_count gives the same history the same number on 3.10 and 4.3 (quorum queue);
    the quorum queue without a dead-letter exchange is named at start."""
    q = unique("dcount")
    broker.created.add(q)
    out = tmp_path / "seen.jsonl"
    config = daemon_config(q, "testcb:outcomes", url=broker.url, queue_args='{"x-queue-type" = "quorum"}')
    first = DaemonProcess(tmp_path / "first", config, env=env_for(TEST_OUT=str(out)))
    daemons.append(first)
    first.start()
    warning = first.wait_for_log(r"WARN\w* .*quorum queue without a dead-letter exchange.*").group(0)
    assert f"'{q}'" in warning and '"x-dead-letter-exchange"' in warning
    first.wait_for_log("consuming from")

    def counts(do: str, runs: int) -> list[tuple[bool, int | None]]:
        """(redelivered, delivery_count) of each run of the message, once it has run `runs` times."""

        def rows() -> list[dict] | None:
            found = [r for r in read_rows(out) if r["do"] == do]
            return found if len(found) >= runs else None

        return [(r["redelivered"], r["delivery_count"]) for r in wait_until(rows, 30, what=f"{do} run {runs} times")]

    broker.publish_json(q, [{"do": "nack-once"}])
    assert counts("nack-once", 2) == [(False, 0), (True, 1)]

    broker.publish_json(q, [{"do": "hang-once"}])
    counts("hang-once", 1)
    first.proc.kill()  # kill -9: the broker gets the message back when the connection drops
    first.proc.wait(10)
    second = DaemonProcess(tmp_path / "second", config, env=env_for(TEST_OUT=str(out)))
    daemons.append(second)
    second.start()
    assert counts("hang-once", 2) == [(False, 0), (True, 1)]
    assert second.stop() == 0
    assert broker.depth(q) == 0
    assert len(read_rows(out)) == 4  # nothing ran a third time
