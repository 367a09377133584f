"""Running many daemons: URL order and shuffle, the node in /status and /metrics, single active consumer.

The cluster itself (three RabbitMQ 4.3 nodes, a node killed mid-stream) is
``make test-cluster`` (tests/cluster/); these run against one broker.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pika
from twisted.internet.testing import MemoryReactorClock

from amqp_consumer.config import AMQPConfig
from amqp_consumer.connection import Connector
from amqp_consumer.state import BrokerNode, State
from tests.support.broker import Broker, read_rows
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for
from tests.support.ops import HEALTH_ANYWHERE, health_port, http, http_json, metric_value, poll
from tests.support.tcpproxy import TCPProxy

URLS = tuple(f"amqp://guest:pw@node{i}.example:5672/%2F" for i in (1, 2, 3))


def _order(connector: Connector) -> list[str]:
    """The URLs in the order the connector tries them, starting with its first."""
    seen = []
    for _ in URLS:
        seen.append(connector.target)
        connector._rr.advance()
    return seen


def _connector(shuffle: bool, seed: int) -> Connector:
    config = AMQPConfig(urls=URLS, shuffle=shuffle)
    ignore = lambda *a: None  # noqa: E731
    return Connector(MemoryReactorClock(), config, ignore, ignore, ignore, rng=random.Random(seed))


def test_urls_keep_the_written_order_unless_shuffled() -> None:
    written = [u.replace(":pw@", ":***@") for u in URLS]
    assert all(_order(_connector(False, seed)) == written for seed in range(10))
    orders = [_order(_connector(True, seed)) for seed in range(30)]
    assert all(sorted(o) == sorted(written) for o in orders)  # every URL, each once
    assert {o[0] for o in orders} == set(written)  # first connections spread over every node


def test_standby_is_ready_with_its_reason_until_the_first_delivery() -> None:
    state = State(lambda: 0.0, ("sac", "plain"))
    state.watch_single_active(["sac"])
    state.set_connection("connected", broker="b", node=BrokerNode("h:5672", "RabbitMQ", "4.3.6", "c"))
    state.set_consuming("plain", True)
    state.set_consuming("sac", True)
    assert state.readiness() == (True, "standby")
    doc = state.as_dict()
    assert doc["queues"]["sac"]["single_active_consumer"] == "standby"
    assert "another consumer is active" in doc["queues"]["sac"]["reason"]
    assert "single_active_consumer" not in doc["queues"]["plain"]
    assert doc["connection"]["node"] == "h:5672" and doc["connection"]["broker_version"] == "4.3.6"
    state.set_active("sac", True)
    assert state.readiness() == (True, "consuming")
    assert state.as_dict()["queues"]["sac"]["single_active_consumer"] == "active"
    state.set_connection("reconnecting", "connection lost")
    assert state.readiness()[0] is False
    assert state.as_dict()["connection"]["node"] is None


def _server_version(url: str) -> str:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return conn._impl.server_properties["version"]
    finally:
        conn.close()


def test_a_lost_connection_moves_on_to_the_next_url_and_status_names_the_node(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    broker_port = urlsplit(broker.url).port
    first, second = TCPProxy(broker_port), TCPProxy(broker_port)
    first.start()
    second.start()
    try:
        urls = [f"amqp://guest:guest@127.0.0.1:{p.port}/%2F" for p in (first, second)]
        text = daemon_config(queue, url=urls, health=HEALTH_ANYWHERE)
        d = DaemonProcess(tmp_path / "d", text, env=env_for(TEST_OUT=str(out_file))).start()
        daemons.append(d)
        port = health_port(d)
        poll(lambda: http(port, "/ready")[0] == 200, 20, "consuming through the first URL")
        version = _server_version(broker.url)
        conn = http_json(port, "/status")[1]["connection"]
        assert conn["node"] == f"127.0.0.1:{first.port}" and conn["broker_version"] == version
        assert conn["broker_product"] == "RabbitMQ" and conn["cluster_name"]
        metrics = http(port, "/metrics")[2].decode()
        labels = {"node": f"127.0.0.1:{first.port}", "cluster": conn["cluster_name"], "version": version}
        assert metric_value(metrics, "amqp_consumer_connected_node", **labels) == 1.0
        assert f"(RabbitMQ {version}, cluster {conn['cluster_name']})" in d.output

        first.cut()  # the first URL still answers: only moving on takes the daemon to the second
        poll(lambda: http_json(port, "/status")[1]["connection"]["node"] == f"127.0.0.1:{second.port}", 20, "moved to the second URL")
        poll(lambda: http(port, "/ready")[0] == 200, 20, "consuming again")
        metrics = http(port, "/metrics")[2].decode()
        assert metric_value(metrics, "amqp_consumer_connected_node", **labels) is None  # the old node's series is gone
        ids = broker.publish_json(queue, [{"n": 1}])
        poll(lambda: {r["id"] for r in read_rows(out_file)} >= set(ids), 20, "the message consumed after the move")
        assert d.stop() == 0
    finally:
        first.stop()
        second.stop()


def test_single_active_consumer_standby_takes_over_when_the_active_daemon_dies(tmp_path: Path, broker: Broker, queue, daemons):
    sac = '{"x-single-active-consumer" = true}'
    outs = [tmp_path / f"out{i}.jsonl" for i in (0, 1)]
    ds = [
        DaemonProcess(tmp_path / f"d{i}", daemon_config(queue, url=broker.url, queue_args=sac, health=HEALTH_ANYWHERE, prefetch=10), env=env_for(TEST_OUT=str(outs[i])))
        for i in (0, 1)
    ]
    broker.created.add(queue)
    ds[0].start()
    daemons.extend(ds)
    ports = [health_port(ds[0]), 0]
    poll(lambda: http_json(ports[0], "/ready") == (200, {"ready": True, "reason": "standby"}), 20, "first daemon registered")
    ids = broker.publish_json(queue, [{"n": i} for i in range(5)])
    poll(lambda: len(read_rows(outs[0])) == 5, 20, "the first daemon, active, took every message")
    assert http_json(ports[0], "/ready") == (200, {"ready": True, "reason": "consuming"})
    assert http_json(ports[0], "/status")[1]["queues"][queue]["single_active_consumer"] == "active"

    ds[1].start()
    ports[1] = health_port(ds[1])
    poll(lambda: broker.counts(queue)[1] == 2, 20, "both consumers registered")
    status, ready = http_json(ports[1], "/ready")
    assert (status, ready) == (200, {"ready": True, "reason": "standby"})
    assert metric_value(http(ports[1], "/metrics")[2].decode(), "amqp_consumer_standby") == 1.0
    assert metric_value(http(ports[0], "/metrics")[2].decode(), "amqp_consumer_standby") == 0.0

    ds[0].send_signal(signal.SIGKILL)
    ds[0].wait(10)
    more = broker.publish_json(queue, [{"n": i} for i in range(5, 25)])
    poll(lambda: len(read_rows(outs[1])) == 20, 20, "the standby took over")
    assert [r["id"] for r in read_rows(outs[1])] == more  # in order
    assert not read_rows(outs[0])[5:] and [r["id"] for r in read_rows(outs[0])] == ids
    assert http_json(ports[1], "/ready") == (200, {"ready": True, "reason": "consuming"})
    assert ds[1].stop() == 0
