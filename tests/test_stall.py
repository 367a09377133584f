"""A stalled broker link is noticed two heartbeat intervals after the last byte received."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet.task import Clock

from amqp_consumer.stall import StallWatch
from tests.support.broker import Broker
from tests.support.daemonproc import DaemonProcess, daemon_config
from tests.support.ops import HEALTH_ANYWHERE, health_port, http_json, poll
from tests.support.tcpproxy import TCPProxy


def test_the_watch_fires_two_intervals_after_the_last_byte_and_not_before():
    clock = Clock()
    fired: list[float] = []
    watch = StallWatch(clock, 10.0, fired.append)  # heartbeat 5
    for _ in range(30):  # bytes every 4 s (the broker's heartbeats): never a stall
        clock.advance(4)
        watch.received()
    assert fired == []
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [10.0]
    clock.advance(100)
    assert fired == [10.0]  # once


def test_bytes_waiting_unread_after_a_busy_reactor_are_not_a_stall():
    clock = Clock()
    fired: list[float] = []
    watch = StallWatch(clock, 10.0, fired.append)
    clock.callLater(10.0, watch.received)  # due with the check: read in the same turn, after it
    clock.advance(10.0)
    assert fired == []
    clock.advance(10.0)
    assert fired == [10.0]


def test_a_stopped_watch_never_fires():
    clock = Clock()
    fired: list[float] = []
    watch = StallWatch(clock, 4.0, fired.append)
    clock.advance(3)
    watch.stop()
    clock.advance(10)
    assert fired == [] and clock.getDelayedCalls() == []


def test_ready_turns_503_within_two_heartbeats_of_a_stall(tmp_path: Path, broker: Broker, queue: str, daemons):
    heartbeat = 2  # pika alone notices after 7 to 14 s (its check runs every heartbeat + 5 s)
    broker.declare(queue)
    with TCPProxy(broker.port) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        d = DaemonProcess(tmp_path / "d", daemon_config(queue, url=url, heartbeat=heartbeat, health=HEALTH_ANYWHERE))
        d.start()
        daemons.append(d)
        port = health_port(d)
        poll(lambda: http_json(port, "/ready")[0] == 200, 20, "/ready 200 once consuming")
        proxy.stall()
        stalled = time.monotonic()
        _, doc = poll(lambda: (r := http_json(port, "/ready"))[0] == 503 and r, 15, "/ready 503 after the stall")
        took = time.monotonic() - stalled
        assert took <= 2 * heartbeat + 2, f"503 only {took:.1f} s after the stall"  # 2 s of room for a busy machine
        assert "nothing received from the broker" in doc["reason"], doc
        d.wait_for_log(r"connection to .* lost: nothing received from the broker for [0-9.]+ s \(two heartbeat intervals\)")
        proxy.resume()
        poll(lambda: http_json(port, "/ready")[0] == 200, 30, "/ready 200 after the link came back")
        assert d.stop() == 0
