"""HTTP health and metrics: /live, /ready (with reasons), /metrics, /status; no access log, no secrets.

In-process tests drive the real State behind a real HTTP listener; subprocess
tests run ``twistd -n amqp-consumer`` behind a TCP proxy that cuts the broker.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from amqp_consumer import __version__, exitcodes, health, tap
from amqp_consumer.config import AMQPConfig, Config, ConsumerConfig, HealthConfig, QueueConfig
from amqp_consumer.inflight import Delivery
from amqp_consumer.daemon import Daemon
from amqp_consumer.message import Message
from tests.support.broker import Broker
from tests.support.daemonproc import DaemonProcess, env_for, wait_until
from tests.support.daemonproc import daemon_config as shared_config
from tests.support.inprocess import in_process
from tests.support.ops import HEALTH_ANYWHERE, health_port, http, http_json, metric_value, poll
from tests.support.tcpproxy import TCPProxy

SECRET = "pw-4711-do-not-print"


def make_config(queues: tuple[str, ...] = ("q1", "q2"), listen: str = HEALTH_ANYWHERE, **consumer: Any) -> Config:
    return Config(
        amqp=AMQPConfig(urls=(f"amqp://guest:{SECRET}@127.0.0.1:1/%2F",)),
        queues=tuple(QueueConfig(name=q) for q in queues),
        consumer=ConsumerConfig(callback="opscb:ack", config={"db_password": SECRET}, **consumer),
        health=HealthConfig(listen=listen),
    )


class _Channel:
    is_open = True


@pytest.fixture
def served(reactor) -> Iterator[tuple[Daemon, int, list[int]]]:
    """A Daemon that is never started (no broker), with its HTTP listener on a free port."""
    exits: list[int] = []
    daemon = in_process(reactor, make_config(), lambda m: None, on_exit=exits.append)
    listener = health.service(reactor, daemon, HEALTH_ANYWHERE)
    listener.startService()
    port = pytest_twisted.blockon(listener.when_listening()).getHost().port
    yield daemon, port, exits
    pytest_twisted.blockon(listener.stopService())


def get(port: int, path: str) -> Any:
    """The request runs in a thread: the reactor must keep turning to answer it."""
    return threads.deferToThread(http, port, path)


# --- in-process -------------------------------------------------------------------------


def _connected_and_consuming(daemon: Daemon) -> None:
    daemon.state.set_connection("connected", broker="amqp://guest:***@127.0.0.1:1/%2F")
    for q in daemon.state.consuming:
        daemon.state.set_consuming(q, True)


SCENARIOS = {
    "connecting": (lambda d: None, r"^connecting$"),
    "reconnecting": (
        lambda d: d.state.set_connection("reconnecting", "connection lost: ConnectionLost"),
        r"^reconnecting since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00: connection lost",
    ),
    "reconnected, not consuming": (
        lambda d: (d.state.set_connection("reconnecting"), d.state.set_connection("connected")),
        r"queue 'q1': connected, not consuming yet; queue 'q2': connected, not consuming yet",
    ),
    "channel closed": (
        lambda d: (_connected_and_consuming(d), d.state.set_consuming("q2", False, "channel closed: 406 PRECONDITION_FAILED")),
        r"^queue 'q2': channel closed: 406 PRECONDITION_FAILED$",
    ),
    "consumer cancelled": (
        lambda d: (_connected_and_consuming(d), d.state.set_consuming("q1", False, "consumer cancelled by the broker")),
        r"^queue 'q1': consumer cancelled by the broker$",
    ),
    "paused": (lambda d: (_connected_and_consuming(d), d.state.set_flag("paused", True)), r"^paused$"),
    "draining": (lambda d: (_connected_and_consuming(d), d.state.set_flag("draining", True)), r"^draining$"),
    "halted": (lambda d: (_connected_and_consuming(d), d.state.set_flag("halted", True)), r"^halted$"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest_twisted.ensureDeferred
async def test_ready_is_503_with_the_reason(served, scenario: str) -> None:
    daemon, port, _ = served
    change, reason = SCENARIOS[scenario]
    change(daemon)
    status, headers, body = await get(port, "/ready")
    assert status == 503
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["ready"] is False
    assert re.search(reason, doc["reason"]), doc
    live_status, _, _ = await get(port, "/live")
    assert live_status == 200


@pytest_twisted.ensureDeferred
async def test_ready_is_200_when_consuming_every_queue(served) -> None:
    daemon, port, _ = served
    daemon.state.set_connection("connected")
    daemon.state.set_consuming("q1", True)
    status, _, _ = await get(port, "/ready")
    assert status == 503  # q2 is not consumed yet
    daemon.state.set_consuming("q2", True)
    status, _, body = await get(port, "/ready")
    assert status == 200
    assert json.loads(body) == {"ready": True, "reason": "consuming"}


@pytest_twisted.ensureDeferred
async def test_status_has_state_inflight_counters_workers_and_version(served) -> None:
    daemon, port, _ = served
    _connected_and_consuming(daemon)
    daemon.metrics.counters["acked"]["q1"] += 3
    daemon.metrics.counters["received"]["q1"] += 4
    daemon.metrics.counters["quarantined"]["q2"] += 1
    old = Delivery(_Channel(), 7, Message(body=b"x", id="m-7", queue="q1"), "q1")
    old.received -= 12.5
    daemon.consumer.inflight.add(old)
    status, headers, body = await get(port, "/status")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["ready"] is True and doc["reason"] == "consuming"
    assert doc["connection"]["state"] == "connected"
    assert doc["queues"]["q1"] == {"consuming": True, "reason": ""}
    assert doc["inflight"]["count"] == 1 and 12.5 <= doc["inflight"]["oldest_seconds"] < 60
    assert doc["messages"]["q1"] == {"received": 4, "acked": 3, "requeued": 0, "rejected": 0, "quarantined": 0}
    assert doc["messages"]["q2"]["quarantined"] == 1
    assert doc["workers"] == {"kind": "threads", "busy": 0, "total": 1, "waiting": 0}
    assert doc["version"] == __version__
    for key in ("paused", "draining", "halted", "last_delivery"):
        assert key in doc
    # The manhole's status() is the same document.
    same = health.status_document(daemon)
    moving = ("time", "inflight")  # the clock and the in-flight age moved on
    assert {k: v for k, v in same.items() if k not in moving} == {k: v for k, v in doc.items() if k not in moving}
    assert same.keys() == doc.keys()


@pytest_twisted.ensureDeferred
async def test_metrics_cover_every_figure(served) -> None:
    daemon, port, _ = served
    _connected_and_consuming(daemon)
    daemon.metrics.counters["requeued"]["q2"] += 2
    daemon.metrics.duration.observe(0.003)
    daemon.state.last_delivery = 1_700_000_000.0
    daemon.state.set_blocked(True, "low on memory")
    daemon.consumer.inflight.add(Delivery(_Channel(), 1, Message(body=b""), "q1"))
    status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    text = body.decode()
    for q in ("q1", "q2"):
        for outcome in ("received", "acked", "requeued", "rejected", "quarantined"):
            assert metric_value(text, "amqp_consumer_messages_total", outcome=outcome, queue=q) is not None
    assert metric_value(text, "amqp_consumer_messages_total", outcome="requeued", queue="q2") == 2
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_count") == 1
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_bucket", le="0.005") == 1
    assert metric_value(text, "amqp_consumer_inflight") == 1
    assert metric_value(text, "amqp_consumer_oldest_inflight_seconds") is not None
    assert metric_value(text, "amqp_consumer_connected") == 1
    assert metric_value(text, "amqp_consumer_ready") == 1
    assert metric_value(text, "amqp_consumer_reconnects_total") == 0
    assert metric_value(text, "amqp_consumer_last_delivery_timestamp_seconds") == 1_700_000_000
    assert metric_value(text, "amqp_consumer_workers_busy") == 0
    assert metric_value(text, "amqp_consumer_workers_total") == 1
    assert metric_value(text, "amqp_consumer_blocked") == 1
    assert "amqp_consumer_connection_state" in text
    assert "_created" not in text


@pytest_twisted.ensureDeferred
async def test_no_access_log_and_no_secret_in_any_answer(served) -> None:
    daemon, port, _ = served
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bodies = [(await get(port, path))[2] for path in ("/", "/live", "/ready", "/status", "/metrics", "/nope")]
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e for e in events if "/ready" in repr(e) or "GET" in repr(e)]
    assert logged == []
    for body in bodies:
        assert SECRET.encode() not in body


def test_health_is_on_by_default_and_off_with_an_empty_listen() -> None:
    assert HealthConfig().listen == "tcp:9100:interface=127.0.0.1"
    fake = MemoryReactorClock()  # build() must not install signal handlers in the test process
    on = tap.build(fake, make_config(listen="tcp:9100:interface=127.0.0.1"), lambda m: None)
    assert on.getServiceNamed("health").description == "tcp:9100:interface=127.0.0.1"
    off = tap.build(fake, make_config(listen=""), lambda m: None)
    with pytest.raises(KeyError):
        off.getServiceNamed("health")


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_stops_the_daemon_with_78(reactor, served) -> None:
    _daemon, busy_port, _ = served
    exits: list[int] = []
    other = in_process(reactor, make_config(), lambda m: None, on_exit=exits.append)
    listener = health.service(reactor, other, f"tcp:{busy_port}:interface=127.0.0.1")
    listener.startService()
    await listener.stopService()
    assert exits == [exitcodes.CONFIG]


# --- a real daemon behind a proxy ---------------------------------------------------------


def daemon_config(url: str, queue: str, callback: str = "opscb:ack", extra: str = "") -> str:
    return shared_config(queue, callback, url=url, heartbeat=5, reconnect=(0.3, 1.0), drain=20, health=HEALTH_ANYWHERE, extra=extra)



@pytest.fixture
def proxy(broker: Broker) -> Iterator[TCPProxy]:
    with TCPProxy(broker.port) as p:
        yield p


def _ready(port: int) -> tuple[int, dict[str, Any]]:
    return http_json(port, "/ready")


def test_ready_follows_the_broker_connection(tmp_path: Path, broker: Broker, queue: str, proxy: TCPProxy, daemons) -> None:
    broker.declare(queue)
    d = DaemonProcess(tmp_path / "d", daemon_config(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", queue))
    d.start()
    daemons.append(d)
    port = health_port(d)
    poll(lambda: _ready(port)[0] == 200, 15, "/ready 200 once consuming")

    proxy.refuse(True)
    proxy.cut()
    status, doc = poll(lambda: (r := _ready(port))[0] == 503 and r, 5, "/ready 503 within 5 s of losing the broker")
    assert doc["reason"].startswith("reconnecting since "), doc
    assert http(port, "/live")[0] == 200
    assert http_json(port, "/status")[1]["connection"]["state"] == "reconnecting"
    # Still down a while later: it stays 503 while the broker is unreachable.
    wait_until(lambda: re.search("cannot connect|handshake", d.output), 10, what="a failed retry")
    assert _ready(port)[0] == 503

    proxy.refuse(False)
    poll(lambda: _ready(port)[0] == 200, 15, "/ready 200 after the broker came back")
    doc = http_json(port, "/status")[1]
    assert doc["connection"]["reconnects"] == 1
    metrics = http(port, "/metrics")[2].decode()
    assert metric_value(metrics, "amqp_consumer_reconnects_total") == 1

    assert d.stop() == 0
    out = d.output
    assert "GET /" not in out and '"GET' not in out, "access log lines in the output"
    assert "guest:guest" not in out


def test_reconnected_but_not_consuming_is_503(tmp_path: Path, broker: Broker, queue: str, daemons) -> None:
    broker.declare(queue)
    d = DaemonProcess(
        tmp_path / "d",
        # The consumer comes back after 0.8-1.2 s: long enough to look at /ready in between.
        daemon_config(broker.url, queue).replace("reconnect_min_delay = 0.3", "reconnect_min_delay = 1.0").replace(
            "reconnect_max_delay = 1.0", "reconnect_max_delay = 2.0"
        ),
    )
    d.start()
    daemons.append(d)
    port = health_port(d)
    poll(lambda: _ready(port)[0] == 200, 15, "/ready 200 once consuming")
    broker.delete(queue)  # the broker cancels our consumer; the connection stays up
    d.wait_for_log("cancelled our consumer")
    status, doc = _ready(port)
    assert status == 503
    assert doc["reason"] == f"queue '{queue}': consumer cancelled by the broker"
    assert http_json(port, "/status")[1]["connection"]["state"] == "connected"
    poll(lambda: _ready(port)[0] == 200, 15, "/ready 200 once the queue is declared and consumed again")
    assert d.stop() == 0


def test_health_answers_draining_during_the_drain(tmp_path: Path, broker: Broker, queue: str, daemons) -> None:
    gate = tmp_path / "gate"
    broker.declare(queue)
    d = DaemonProcess(
        tmp_path / "d", daemon_config(broker.url, queue, "opscb:gate"), env=env_for(TEST_GATE=str(gate))
    )
    d.start()
    daemons.append(d)
    port = health_port(d)
    poll(lambda: _ready(port)[0] == 200, 15, "/ready 200 once consuming")
    broker.publish_raw(queue, b"held")
    poll(lambda: http_json(port, "/status")[1]["inflight"]["count"] == 1, 10, "one delivery in flight")
    d.send_signal(signal.SIGTERM)
    d.wait_for_log("draining: waiting")
    status, doc = _ready(port)
    assert (status, doc["reason"]) == (503, "draining")
    assert http(port, "/live")[0] == 200
    gate.touch()
    assert d.wait(20) == 0


def test_duration_buckets_follow_prometheus_le_convention():
    """A value equal to a bucket's bound counts in that bucket; one above every bound only in +Inf."""
    from amqp_consumer.metrics import Metrics

    m = Metrics(["q"])
    m.duration.observe(0.005)
    m.duration.observe(400.0)
    text = m.exposition().decode()
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_bucket", le="0.0025") == 0
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_bucket", le="0.005") == 1
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_bucket", le="300.0") == 1
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_bucket", le="+Inf") == 2
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_count") == 2
    assert metric_value(text, "amqp_consumer_callback_duration_seconds_sum") == pytest.approx(400.005)
