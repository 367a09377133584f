"""The consumer survives the broker: restarts, closed channels, deleted queues, long callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import Broker, read_rows, unique
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for, wait_until


def cfg(url: str, queue: str, callback: str = "testcb:record", heartbeat: int = 10, extra: str = "") -> str:
    return daemon_config(queue, callback, url=url, heartbeat=heartbeat, reconnect=(0.2, 2.0), prefetch=50, extra=extra)



@pytest.mark.broker_node
def test_broker_killed_and_restarted_twice_consumption_resumes(tmp_path: Path, running_node, out_file, daemons):
    node = running_node
    queue = unique("kill")
    pub = Broker(node.url)
    pub.declare(queue)
    d = DaemonProcess(tmp_path / "d", cfg(node.url, queue), env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    d.wait_for_log("consuming from")
    published: list[str] = []
    for round_ in range(3):
        published += pub.publish_json(queue, [{"n": round_ * 1000 + i} for i in range(400)])
        wait_until(lambda: len(read_rows(out_file)) > len(published) - 300, 30, what="consumption under way")
        if round_ == 2:
            break
        pub._conn = None  # its connection dies with the node
        pub._ch = None
        node.kill()
        node.restart()
        d.wait_for_log(f"(?s)(connected to.*){{{round_ + 2}}}", timeout=60)
    wait_until(lambda: set(published) <= {r["id"] for r in read_rows(out_file)}, 60, what="every published message processed")
    assert d.output.count("connection to") >= 2 and "lost" in d.output
    assert d.stop() == 0
    pub.delete(queue)
    pub.delete(queue + ".quarantine")


def test_deleted_queue_consumer_comes_back(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    d = DaemonProcess(tmp_path / "d", cfg(broker.url, queue), env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    d.wait_for_log("consuming from")
    broker.delete(queue)
    d.wait_for_log("cancelled our consumer")
    wait_until(lambda: broker.counts(queue) == (0, 1), 20, what="queue re-declared and consumed again")
    ids = broker.publish_json(queue, [{"n": 1}, {"n": 2}])
    wait_until(lambda: {r["id"] for r in read_rows(out_file)} >= set(ids), 20, what="messages after the re-create")
    assert d.stop() == 0


def test_heartbeats_flow_while_a_sync_callback_runs_long(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    broker.publish_json(queue, [{"sleep": 7}])
    d = DaemonProcess(tmp_path / "d", cfg(broker.url, queue, "testcb:slow", heartbeat=1), env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    wait_until(lambda: [r for r in read_rows(out_file) if r.get("event") == "end"], 20, what="the long callback finished")
    wait_until(lambda: broker.counts(queue) == (0, 1), 10, what="acked on the same connection")
    assert "lost" not in d.output and "heartbeat" not in d.output
    assert d.stop() == 0


def test_server_named_queue_bindings_follow_its_new_name_after_reconnect(tmp_path: Path, broker: Broker, out_file, daemons):
    from tests.support.tcpproxy import TCPProxy

    exchange = unique("x")
    text = f"""
[amqp]
urls = ["amqp://guest:guest@127.0.0.1:{{port}}/%2F"]
reconnect_min_delay = 0.2
reconnect_max_delay = 1.0

[[exchanges]]
name = "{exchange}"
type = "topic"
durable = false
auto_delete = true

[[queues]]
name = ""
durable = false
exclusive = true

[[bindings]]
queue = ""
exchange = "{exchange}"
routing_keys = ["a.*", "b.#"]

[consumer]
callback = "testcb:record"

[health]
listen = ""
"""
    with TCPProxy(broker.port) as proxy:
        d = DaemonProcess(tmp_path / "d", text.replace("{port}", str(proxy.port)), env=env_for(TEST_OUT=str(out_file)))
        d.start()
        daemons.append(d)
        first = d.wait_for_log(r"consuming from '(amq\.gen-[^']+)'").group(1)
        ch = broker.channel()
        ch.basic_publish(exchange, "a.one", b"1")
        wait_until(lambda: len(read_rows(out_file)) == 1, 20, what="first message")
        proxy.cut()
        d.wait_for_log(r"(?s)connection to .* lost")
        second = d.wait_for_log(rf"consuming from '(amq\.gen-(?!{first[8:]})[^']+)'").group(1)
        assert second != first
        ch.basic_publish(exchange, "b.x.y", b"2")
        wait_until(lambda: len(read_rows(out_file)) == 2, 20, what="message through the re-made bindings")
        assert [r["queue"] for r in read_rows(out_file)] == [first, second]
        assert d.stop() == 0
    broker.delete("amqp-consumer.quarantine")


def test_topology_refused_by_the_broker_is_explained_and_retried_with_backoff(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue, arguments={"x-max-length": 5})  # exists with other arguments than the config's
    d = DaemonProcess(tmp_path / "d", cfg(broker.url, queue), env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    d.wait_for_log(r"declaring the topology failed: 406 PRECONDITION_FAILED .*x-max-length.*make \[\[exchanges\]\]/\[\[queues\]\] match")
    d.wait_for_log(r"(?s)(opening a new channel in [0-9.]+ s.*){3}", timeout=30)
    delays = [float(x) for x in __import__("re").findall(r"opening a new channel in ([0-9.]+) s", d.output)]
    assert delays[2] > delays[0]  # backing off, not a hot loop
    assert "Traceback" not in d.output
    broker.delete(queue)  # the operator fixes the broker side; no restart needed
    d.wait_for_log("consuming from", timeout=30)
    ids = broker.publish_json(queue, [{"n": 1}])
    wait_until(lambda: [r["id"] for r in read_rows(out_file)] == ids, 20, what="consumed after the fix")
    assert d.stop() == 0


def test_stalled_connection_is_detected_by_heartbeat_and_replaced(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    from tests.support.tcpproxy import TCPProxy

    broker.declare(queue)
    with TCPProxy(broker.port) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        d = DaemonProcess(tmp_path / "d", cfg(url, queue, heartbeat=1), env=env_for(TEST_OUT=str(out_file)))
        d.start()
        daemons.append(d)
        d.wait_for_log("consuming from")
        proxy.stall()  # a partition: nothing flows, nothing is closed
        d.wait_for_log(r"connection to .* lost", timeout=20)
        proxy.resume()
        d.wait_for_log(r"(?s)lost.*consuming from", timeout=30)
        ids = broker.publish_json(queue, [{"n": 1}])
        wait_until(lambda: [r["id"] for r in read_rows(out_file)] == ids, 20, what="consumed after the partition")
        assert d.stop() == 0
