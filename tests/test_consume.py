"""End to end through `twistd -n amqp-consumer`: what a user sees in queues, outputs and exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.broker import Broker, read_rows, unique
from tests.support.daemonproc import RUNNERS, DaemonProcess, daemon_config, env_for, wait_until


def config(broker: Broker, queue: str, callback: str, *, workers: int = 1, prefetch: int = 100, drain: float = 30.0,
           queue_args: str = "{}", extra: str = "") -> str:
    return daemon_config(queue, callback, url=broker.url, workers=workers, prefetch=prefetch, drain=drain,
                         queue_args=queue_args, extra=extra)


def start(tmp_path: Path, text: str, out_file: Path, args: list[str] | None = None, runner: str = "twistd") -> DaemonProcess:
    d = DaemonProcess(tmp_path / "d", text, args, env=env_for(TEST_OUT=str(out_file)), runner=runner)
    d.start()
    d.wait_for_log(r"consuming from")
    return d



def test_every_message_processed_once_and_sigterm_exits_0(tmp_path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    ids = broker.publish_json(queue, [{"n": i} for i in range(300)])
    d = start(tmp_path, config(broker, queue, "testcb:record"), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) >= 300, 30, what="300 messages processed")
    wait_until(lambda: broker.counts(queue) == (0, 1), 10, what="queue empty")
    assert d.stop(signal.SIGTERM) == 0
    rows = read_rows(out_file)
    assert sorted(r["id"] for r in rows) == sorted(ids)  # exactly once
    assert broker.depth(queue) == 0  # nothing came back on close: all were acked
    assert all("amqp-consumer-worker" in r["thread"] for r in rows)  # never on the reactor thread
    assert "Traceback" not in d.output


def test_workers_1_keeps_order(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"n": i} for i in range(500)])
    d = start(tmp_path, config(broker, queue, "testcb:record", workers=1), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) >= 500, 30, what="500 processed")
    assert [r["body"]["n"] for r in read_rows(out_file)] == list(range(500))
    assert d.stop() == 0


def test_workers_4_run_four_at_once(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"parties": 4, "n": i} for i in range(4)])
    # Each callback waits until four are running at once; with fewer workers they give up and are quarantined.
    d = start(tmp_path, config(broker, queue, "testcb:meet", workers=4), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) == 4, 30, what="4 callbacks that met")
    rows = read_rows(out_file)
    assert len({r["thread"] for r in rows}) == 4
    wait_until(lambda: broker.depth(queue) == 0, 10, what="queue empty")
    assert broker.depth(queue + ".quarantine") <= 0  # none quarantined (-1: never declared)
    assert d.stop() == 0


@pytest.mark.parametrize("callback,kind", [("testcb:async_record", "async"), ("testcb:AsyncConfigured", "async-class")])
def test_async_callbacks_run_on_the_reactor(tmp_path, broker, queue, out_file, daemons, callback, kind):
    broker.declare(queue)
    ids = broker.publish_json(queue, [{"n": i} for i in range(50)])
    d = start(tmp_path, config(broker, queue, callback), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) >= 50, 20, what="50 async messages")
    rows = read_rows(out_file)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {r["kind"] for r in rows} == {kind}
    assert {r["thread"] for r in rows} == {"MainThread"}
    wait_until(lambda: broker.depth(queue) == 0, 10, what="queue empty")
    assert d.stop() == 0


def test_asyncio_callback_under_the_asyncio_reactor(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    ids = broker.publish_json(queue, [{"n": i} for i in range(20)])
    d = DaemonProcess(tmp_path / "d", config(broker, queue, "testcb:asyncio_record"), env=env_for(TEST_OUT=str(out_file)))
    d.command = lambda: [  # type: ignore[method-assign]
        *DaemonProcess.command(d)[:1], "-r", "asyncio", *DaemonProcess.command(d)[1:]
    ]
    d.start()
    daemons.append(d)
    d.wait_for_log(r"AsyncioSelectorReactor")
    wait_until(lambda: len(read_rows(out_file)) >= 20, 20, what="20 asyncio messages")
    assert sorted(r["id"] for r in read_rows(out_file)) == sorted(ids)
    assert d.stop() == 0


def test_class_callback_gets_consumer_config(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"n": 1}])
    text = config(broker, queue, "testcb:Configured") + '\n[consumer.config]\nprefix = "hello"\n'
    d = start(tmp_path, text, out_file)
    daemons.append(d)
    wait_until(lambda: read_rows(out_file), 20, what="one message")
    assert read_rows(out_file)[0]["prefix"] == "hello"
    assert d.stop() == 0


def test_outcomes_nack_drop_and_ack(tmp_path, broker, queue, out_file, daemons):
    dlq = unique("dlq")
    broker.declare(dlq)
    broker.declare(queue, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    broker.publish_json(queue, [{"do": "ack"}, {"do": "nack-once"}, {"do": "drop"}])
    args = f'{{"x-dead-letter-exchange" = "", "x-dead-letter-routing-key" = "{dlq}"}}'
    d = start(tmp_path, config(broker, queue, "testcb:outcomes", queue_args=args), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) >= 4, 20, what="4 callback runs (nack-once runs twice)")
    wait_until(lambda: broker.depth(queue) == 0, 10, what="queue empty")
    rows = read_rows(out_file)
    nacked = [r for r in rows if r["do"] == "nack-once"]
    assert [r["redelivered"] for r in nacked] == [False, True]  # back in the queue, delivered again
    dead = broker.get_all(dlq)
    assert len(dead) == 1 and b'"drop"' in dead[0][1]  # rejected without requeue -> dead-lettered
    assert d.stop() == 0
    broker.delete(dlq)


def test_unexpected_exception_quarantines_and_keeps_consuming(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    ids = broker.publish_json(queue, [{"do": "raise", "what": "poison"}, {"do": "ack"}, {"do": "ack"}])
    d = start(tmp_path, config(broker, queue, "testcb:outcomes"), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) >= 3, 20, what="3 messages")
    wait_until(lambda: broker.depth(queue + ".quarantine") == 1, 10, what="one quarantined message")
    wait_until(lambda: broker.depth(queue) == 0, 10, what="queue empty")
    (props, body), = broker.get_all(queue + ".quarantine")
    assert props.message_id == ids[0]
    assert props.headers["amqp-consumer-exception"] == "ValueError"
    assert props.headers["amqp-consumer-error"] == "cannot handle poison"
    assert props.headers["amqp-consumer-queue"] == queue
    assert props.headers["amqp-consumer-quarantined-at"].startswith("20")
    assert b"poison" in body
    # the traceback is logged with the message id
    assert f"message {ids[0]} from '{queue}' goes to quarantine" in d.output
    assert "ValueError: cannot handle poison" in d.output
    assert d.stop() == 0


def test_undecodable_json_goes_to_quarantine(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_raw(queue, b'{"broken": ', content_type="application/json", message_id="bad-json")
    broker.publish_json(queue, [{"do": "ack"}])
    d = start(tmp_path, config(broker, queue, "testcb:outcomes"), out_file)
    daemons.append(d)
    wait_until(lambda: broker.depth(queue + ".quarantine") == 1, 20, what="quarantined body")
    wait_until(lambda: len(read_rows(out_file)) == 1, 10, what="the good message processed")
    (props, body), = broker.get_all(queue + ".quarantine")
    assert body == b'{"broken": '
    assert props.headers["amqp-consumer-exception"] == "BodyDecodeError"
    assert "not valid JSON" in props.headers["amqp-consumer-error"]
    assert "message bad-json" in d.output
    assert d.stop() == 0


def test_halt_consumer_exits_with_its_code(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"do": "ack"}, {"do": "halt", "code": 3}, {"do": "ack"}, {"do": "ack"}])
    d = start(tmp_path, config(broker, queue, "testcb:outcomes", workers=1), out_file)
    daemons.append(d)
    assert d.wait(30) == 3
    rows = read_rows(out_file)
    assert [r["do"] for r in rows] == ["ack", "halt"]  # nothing after the halt ran
    assert broker.depth(queue) == 2  # the two after it are back in the queue; the halting one was acked
    assert "asked to halt (exit code 3)" in d.output


def test_halt_consumer_with_requeue(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"do": "halt", "code": 0, "requeue": True}])
    d = start(tmp_path, config(broker, queue, "testcb:outcomes"), out_file)
    daemons.append(d)
    assert d.wait(30) == 0
    assert broker.depth(queue) == 1


@pytest.mark.parametrize("runner", RUNNERS)  # twistd, and the command the systemd unit runs
def test_sigterm_drains_in_flight_and_returns_prefetched(tmp_path, broker, queue, out_file, daemons, runner):
    broker.declare(queue)
    broker.publish_json(queue, [{"sleep": 2.0, "n": i} for i in range(5)])
    d = start(tmp_path, config(broker, queue, "testcb:slow", workers=1, prefetch=10), out_file, runner=runner)
    daemons.append(d)
    wait_until(lambda: read_rows(out_file), 20, what="the first slow callback started")
    d.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0
    rows = read_rows(out_file)
    assert [r["event"] for r in rows] == ["start", "end"]  # the in-flight one finished, no other started
    assert broker.depth(queue) == 4  # it was acked; the 4 prefetched ones are back


def test_second_sigterm_skips_the_drain(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"sleep": 60, "n": 0}])
    d = start(tmp_path, config(broker, queue, "testcb:slow", drain=120), out_file)
    daemons.append(d)
    wait_until(lambda: read_rows(out_file), 20, what="slow callback started")
    d.send_signal(signal.SIGTERM)
    d.wait_for_log(r"draining: waiting")
    d.send_signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert broker.depth(queue) == 1  # unfinished: back in the queue


def test_many_failures_at_once_all_reach_quarantine(tmp_path, broker, queue, out_file, daemons):
    broker.declare(queue)
    poison = broker.publish_json(queue, [{"do": "raise", "what": i} for i in range(40)])
    d = start(tmp_path, config(broker, queue, "testcb:outcomes"), out_file)
    daemons.append(d)
    wait_until(lambda: broker.depth(queue + ".quarantine") == 40, 30, what="40 quarantined")
    wait_until(lambda: broker.depth(queue) == 0, 10, what="originals acked")
    assert sorted(p.message_id for p, _ in broker.get_all(queue + ".quarantine")) == sorted(poison)
    assert d.stop() == 0


def test_urls_are_tried_in_order_the_next_on_failure(tmp_path, broker, queue, out_file, daemons):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()  # nothing listens there now
    text = config(broker, queue, "testcb:record").replace(
        f'urls = ["{broker.url}"]',
        f'urls = ["amqp://guest:secret1@127.0.0.1:{dead}/%2F", "{broker.url}"]',
    )
    broker.declare(queue)
    d = start(tmp_path, text, out_file)
    daemons.append(d)
    assert f"cannot connect to amqp://guest:***@127.0.0.1:{dead}/%2F" in d.output
    assert f"connected to {broker.redacted_url}" in d.output
    assert "secret1" not in d.output
    assert d.stop() == 0


def test_twistd_lists_the_plugin(tmp_path):
    import subprocess

    from tests.support.daemonproc import TWISTD

    result = subprocess.run([TWISTD, "--help"], env=env_for(), capture_output=True, text=True, timeout=60)
    assert "amqp-consumer" in result.stdout
    sub = subprocess.run([TWISTD, "amqp-consumer", "--help"], env=env_for(), capture_output=True, text=True, timeout=60)
    for option in ("--config=", "--callback=", "--check"):
        assert option in sub.stdout


def test_the_message_carries_every_property(tmp_path, broker, queue, out_file, daemons):
    from decimal import Decimal

    import pika

    broker.declare(queue, arguments={"x-max-priority": 5})
    broker.channel().basic_publish(
        "",
        queue,
        b'{"a": [1, 2]}',
        pika.BasicProperties(
            content_type="application/vnd.example+json; charset=utf-8",
            message_id="m-1",
            correlation_id="c-1",
            reply_to="replies",
            priority=3,
            timestamp=1_700_000_000,
            headers={"h": "v", "n": 7, "d": Decimal("1.25")},
        ),
    )
    broker.publish_raw(queue, b"\x00\x01binary", content_type="application/octet-stream", message_id="m-2")
    d = start(tmp_path, config(broker, queue, "testcb:record_properties", queue_args='{"x-max-priority" = 5}'), out_file)
    daemons.append(d)
    wait_until(lambda: len(read_rows(out_file)) == 2, 20, what="two messages")
    first, second = read_rows(out_file)
    assert first["body"] == {"a": [1, 2]} and first["raw"] == '{"a": [1, 2]}'
    assert (first["id"], first["correlation_id"], first["reply_to"], first["priority"]) == ("m-1", "c-1", "replies", 3)
    # The decimal field type arrives as a Decimal, though an idle daemon holds no decimal module.
    assert first["headers"] == {"h": "v", "n": 7, "d": "Decimal(1.25)"}
    assert first["timestamp"] == "2023-11-14T22:13:20+00:00"
    assert first["topic"] == first["routing_key"] == queue and first["exchange"] == ""
    assert first["text"].startswith("Message id=m-1 exchange='' routing_key=") and 'body={"a": [1, 2]}' in first["text"]
    assert second["body"] == "\x00\x01binary"  # bytes (shown decoded by the recorder), not JSON-decoded
    assert second["headers"] == {} and second["timestamp"] is None
    assert d.stop() == 0
