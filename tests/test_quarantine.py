"""Quarantine end to end: whatever a message or a callback's error holds, the message is settled,
its copy lands in the quarantine queue, and the callback does not run again because of it."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pika

from tests.support import rawprops
from tests.support.broker import Broker, read_rows
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for, wait_until


def start(tmp_path: Path, broker: Broker, queue: str, out_file: Path, **kwargs) -> DaemonProcess:
    d = DaemonProcess(tmp_path / "d", daemon_config(queue, "testcb:outcomes", url=broker.url, **kwargs),
                      env=env_for(TEST_OUT=str(out_file)))
    d.start()
    d.wait_for_log(r"consuming from")
    return d


def runs(out_file: Path, do: str) -> int:
    return sum(1 for r in read_rows(out_file) if r["do"] == do)


def test_a_header_pika_cannot_read_is_quarantined_and_the_queue_moves_on(tmp_path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    rawprops.publish(
        broker.channel(),
        queue,
        b'{"do": "ack"}',
        {"sent-at": rawprops.timestamp(1_700_000_000_000), "source": rawprops.value("billing")},
        content_type="application/json",
        message_id="bad-header",
        app_id="billing",
    )
    ids = broker.publish_json(queue, [{"do": "ack"}] * 3)
    d = start(tmp_path, broker, queue, out_file)
    daemons.append(d)
    wait_until(lambda: broker.depth(queue + ".quarantine") == 1, 20, what="the unreadable message quarantined")
    wait_until(lambda: runs(out_file, "ack") == 3, 10, what="the messages behind it processed")
    (props, body), = broker.get_all(queue + ".quarantine")
    assert body == b'{"do": "ack"}'
    assert props.message_id == "bad-header" and props.app_id == "billing"
    assert props.headers["source"] == "billing"  # what could be read is kept
    assert "sent-at" not in props.headers
    assert props.headers["amqp-consumer-exception"] == "PropertiesDecodeError"
    assert "'sent-at': timestamp 1700000000000" in props.headers["amqp-consumer-error"]
    assert sorted(r["id"] for r in read_rows(out_file)) == sorted(ids)  # the bad one never reached the callback
    assert "connection to" not in d.output and "lost" not in d.output
    assert d.stop() == 0
    assert broker.depth(queue) == 0


def test_an_error_that_cannot_describe_itself_is_quarantined_and_the_rest_of_its_batch_is_settled(
    tmp_path, broker: Broker, queue, out_file, daemons
):
    broker.declare(queue)
    broker.publish_json(queue, [{"do": "ack"}, {"do": "raise-unprintable"}, {"do": "ack"}, {"do": "ack"}])
    d = start(tmp_path, broker, queue, out_file, drain=30)
    daemons.append(d)
    wait_until(lambda: broker.depth(queue + ".quarantine") == 1, 20, what="quarantined")
    wait_until(lambda: len(read_rows(out_file)) == 4, 10, what="all four run")
    assert d.stop() == 0
    assert "draining: waiting" not in d.output  # nothing was left in flight
    assert broker.depth(queue) == 0  # the successes were acked, none came back
    (props, _), = broker.get_all(queue + ".quarantine")
    assert props.headers["amqp-consumer-exception"] == "Unprintable"
    assert props.headers["amqp-consumer-error"] == "(Unprintable.__str__ and __repr__ failed)"


def test_copies_that_pika_cannot_encode_still_reach_quarantine_once(tmp_path, broker: Broker, queue, out_file, daemons):
    """A lone surrogate in the error text, a double pika cannot write back, and headers that
    would push the copy past the frame size: each copy is made to fit, each callback runs once."""
    broker.declare(queue)
    broker.publish_json(queue, [{"do": "raise", "what": "bad \udc80 byte"}], message_id="surrogate")
    rawprops.publish(broker.channel(), queue, b'{"do": "raise"}', {"ratio": rawprops.double(1e300)},
                     content_type="application/json", message_id="double")
    def big(n: int) -> pika.BasicProperties:
        return pika.BasicProperties(content_type="application/json", message_id="big", delivery_mode=2,
                                    headers={"big": "x" * n, "small": 1})

    # 100 bytes short of a frame (131072, less 20 bytes of framing): the copy's own headers would not fit
    n = 131052 - 100 - sum(len(piece) for piece in big(0).encode())
    broker.channel().basic_publish("", queue, b'{"do": "raise"}', big(n))
    broker.publish_json(queue, [{"do": "ack"}])
    d = start(tmp_path, broker, queue, out_file)
    daemons.append(d)
    wait_until(lambda: broker.depth(queue + ".quarantine") == 3, 30, what="three copies")
    wait_until(lambda: broker.depth(queue) == 0 and runs(out_file, "ack") == 1, 10, what="queue empty")
    copies = {p.message_id: p.headers for p, _ in broker.get_all(queue + ".quarantine")}
    assert copies["surrogate"]["amqp-consumer-error"] == "cannot handle bad \\udc80 byte"
    assert "ratio" not in copies["double"] and "'ratio'=" in copies["double"]["amqp-consumer-dropped-headers"]
    assert "big" not in copies["big"] and copies["big"]["small"] == 1
    assert "'big' (" in copies["big"]["amqp-consumer-dropped-headers"]
    assert runs(out_file, "raise") == 3  # each ran once
    assert "connection to" not in d.output  # no 501 FRAME_ERROR from the broker
    assert d.stop() == 0


def test_a_deleted_quarantine_queue_is_declared_again(tmp_path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    d = start(tmp_path, broker, queue, out_file)
    daemons.append(d)
    broker.delete(queue + ".quarantine")  # an operator cleans up
    broker.publish_json(queue, [{"do": "raise", "what": "poison"}], message_id="poison")
    wait_until(lambda: broker.depth(queue + ".quarantine") == 1, 20, what="the copy in a new quarantine queue")
    wait_until(lambda: broker.depth(queue) == 0, 10, what="original acked")
    assert runs(out_file, "raise") == 1
    assert "is missing; declaring it again" in d.output
    assert d.stop() == 0


def test_the_copy_keeps_every_property(tmp_path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.channel().basic_publish("", queue, b'{"do": "raise"}', pika.BasicProperties(
        content_type="application/json", content_encoding="identity", message_id="m-1", correlation_id="c-1",
        reply_to="replies", priority=4, timestamp=1_700_000_000, type="order.created", app_id="shop",
        user_id="guest", expiration="600000", delivery_mode=1, headers={"h": "v", "price": Decimal("-12.34")}))
    d = start(tmp_path, broker, queue, out_file)
    daemons.append(d)
    wait_until(lambda: broker.depth(queue + ".quarantine") == 1, 20, what="quarantined")
    (p, _), = broker.get_all(queue + ".quarantine")
    assert (p.content_type, p.content_encoding, p.message_id, p.correlation_id, p.reply_to) == (
        "application/json", "identity", "m-1", "c-1", "replies")
    assert (p.priority, p.timestamp, p.type, p.app_id, p.user_id) == (4, 1_700_000_000, "order.created", "shop", "guest")
    assert p.expiration is None and p.headers["amqp-consumer-expiration"] == "600000"  # the copy never expires
    assert p.delivery_mode == 2 and p.headers["h"] == "v"
    assert p.headers["price"] == Decimal("-12.34")  # the AMQP decimal type, decoded and sent again as one
    assert d.stop() == 0
