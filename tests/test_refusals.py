"""What the broker refuses at run time is explained once per attempt, shown in /ready and retried with a growing delay.

Only a refused login or virtual host stops the daemon (exit 77, tested in
test_logging_exit); a refusal on a queue or exchange can clear by itself or be
fixed on the broker, so the daemon keeps trying.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.broker import Broker, read_rows, unique
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for, wait_until
from tests.support.ops import HEALTH_ANYWHERE, health_port, http_json, poll


def delays(output: str, pattern: str) -> list[float]:
    return [float(x) for x in re.findall(pattern + r".*; (?:reconnecting|opening a new channel) in ([0-9.]+) s", output)]


def test_a_queue_held_exclusively_by_another_client_is_waited_for_not_fatal(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    holder = Broker(broker.url)
    holder.channel().basic_consume(queue, lambda *a: None, exclusive=True)  # another client's exclusive consumer
    d = DaemonProcess(
        tmp_path / "d",
        daemon_config(queue, url=broker.url, reconnect=(0.2, 2.0), health=HEALTH_ANYWHERE),
        env=env_for(TEST_OUT=str(out_file)),
    )
    d.start()
    daemons.append(d)
    port = health_port(d)
    line = rf"ERROR amqp_consumer.consumer: cannot consume '{queue}': 403 ACCESS_REFUSED - .*exclusive use \(another client consumes it exclusively"
    d.wait_for_log(rf"(?s)({line}.*){{3}}", timeout=30)
    status, doc = http_json(port, "/ready")
    assert status == 503 and "403 ACCESS_REFUSED" in doc["reason"] and "exclusive" in doc["reason"], doc
    assert d.proc.poll() is None  # still running: not exit 77
    found = delays(d.output, "exclusive use")
    assert found[2] > found[0]  # backing off
    holder.close()  # the other client lets go
    poll(lambda: http_json(port, "/ready")[0] == 200, 30, "/ready 200 once the queue is free")
    ids = broker.publish_json(queue, [{"n": 1}])
    wait_until(lambda: [r["id"] for r in read_rows(out_file)] == ids, 20, what="consumed")
    assert d.stop() == 0
    assert "exit status 77" not in d.output


def test_an_exchange_type_the_broker_lacks_backs_off_with_one_line_per_attempt(tmp_path: Path, broker: Broker, queue, daemons):
    exchange = unique("x")
    extra = f'''
[[exchanges]]
name = "{exchange}"
type = "x-bogus"
auto_delete = true
'''
    text = daemon_config(queue, url=broker.url, reconnect=(0.2, 2.0), health=HEALTH_ANYWHERE) + extra
    d = DaemonProcess(tmp_path / "d", text)
    d.start()
    daemons.append(d)
    port = health_port(d)
    if broker.version == "3.10":  # refused on the connection: each attempt is a new connection
        refusal = r"amqp_consumer.connection: declaring the topology failed: 503 COMMAND_INVALID"
    else:  # 4.3 refuses it on the channel: each attempt is a new channel
        refusal = r"amqp_consumer.consumer: declaring the topology failed: 406 PRECONDITION_FAILED"
    line = (
        rf"ERROR {refusal} - unknown exchange type "
        r"'x-bogus' \(the broker has no such exchange type; enable the plugin that provides it"
    )
    d.wait_for_log(r"(?s)(unknown exchange type 'x-bogus'.*){5}", timeout=40)
    assert re.search(line, d.output), d.output
    status, doc = http_json(port, "/ready")
    assert status == 503 and "unknown exchange type 'x-bogus'" in doc["reason"], doc
    found = delays(d.output, "unknown exchange type")
    assert found[3] > 2 * found[0], found  # the delay grows although every handshake succeeds
    out = d.output
    attempts = out.count("connected to ") + out.count("opening a new channel in")
    assert out.count("unknown exchange type") in (attempts, attempts - 1)  # one line per attempt (the last may be under way)
    assert "connection to" not in out and "Scheduling retry" not in out and "Traceback" not in out
    assert d.stop() == 0


def test_a_binding_to_a_missing_exchange_is_explained_and_consumed_once_it_exists(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    exchange = unique("x")
    extra = f'''
[[bindings]]
queue = "{queue}"
exchange = "{exchange}"
routing_keys = ["k"]
'''
    text = daemon_config(queue, url=broker.url, reconnect=(0.2, 2.0), health=HEALTH_ANYWHERE) + extra
    d = DaemonProcess(tmp_path / "d", text, env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    port = health_port(d)
    line = r"ERROR amqp_consumer.consumer: declaring the topology failed: 404 NOT_FOUND - no exchange .*declare it in \[\[queues\]\] or \[\[exchanges\]\]\); opening a new channel in"
    d.wait_for_log(rf"(?s)({line}.*){{2}}", timeout=30)
    assert "404 NOT_FOUND" in http_json(port, "/ready")[1]["reason"]
    assert "the broker closed our channel" not in d.output  # one line per attempt, not two
    broker.channel().exchange_declare(exchange, "direct", auto_delete=True)  # the operator's fix, no restart
    poll(lambda: http_json(port, "/ready")[0] == 200, 30, "/ready 200 once the exchange exists")
    broker.channel().basic_publish(exchange, "k", b"{}")
    wait_until(lambda: len(read_rows(out_file)) == 1, 20, what="a message through the binding")
    assert d.stop() == 0
