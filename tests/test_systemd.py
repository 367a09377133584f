"""sd_notify: READY=1 once the services are up, STATUS= on change, WATCHDOG=1 every WATCHDOG_USEC/2, STOPPING=1.

Unit tests use twisted.internet.task.Clock; the end-to-end tests run the daemon
with $NOTIFY_SOCKET pointing at a datagram socket the test bound (a path, and
an abstract '@name' socket).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


import pytest
from twisted.internet.task import Clock

from amqp_consumer import systemd
from amqp_consumer.state import State
from amqp_consumer.status import Status
from tests.support.broker import Broker
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for
from tests.support.ops import NotifySocket
from tests.support.tcpproxy import TCPProxy


class Recorder:
    """Stands in for systemd.Notifier."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def send(self, *assignments: str) -> bool:
        self.sent.append(assignments)
        return True

    def lines(self) -> list[str]:
        return [line for datagram in self.sent for line in datagram]


def make(watchdog: float | None = 1.5, queues: tuple[str, ...] = ("a", "b")) -> tuple[Clock, State, Recorder, systemd.SystemdNotify]:
    clock = Clock()
    state = State(clock.seconds, queues)
    recorder = Recorder()
    return clock, state, recorder, systemd.SystemdNotify(clock, Status(state), recorder, watchdog)


# --- environment -----------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 1.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_abstract_socket_names_start_with_at() -> None:
    assert systemd.socket_address("@sd-notify/1") == b"\0sd-notify/1"
    assert systemd.socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_no_notify_socket_no_service() -> None:
    clock = Clock()
    state = State(clock.seconds, ("q",))
    assert systemd.service(clock, state, environ={}) is None
    assert systemd.service(clock, state, environ={"NOTIFY_SOCKET": ""}) is None


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_one_datagram_per_call(abstract: bool) -> None:
    listener = NotifySocket(abstract=abstract)
    try:
        notifier = systemd.Notifier(listener.address)
        assert notifier.send("READY=1", "STATUS=connecting")
        assert listener.receive(2) == "READY=1\nSTATUS=connecting"
        notifier.close()
    finally:
        listener.close()


def test_notifier_survives_a_missing_socket(tmp_path: Path) -> None:
    notifier = systemd.Notifier(str(tmp_path / "gone"))
    assert notifier.send("WATCHDOG=1") is False
    assert notifier.send("WATCHDOG=1") is False
    notifier.close()


# --- the service, on a Clock -------------------------------------------------------------


def test_ready_at_start_not_gated_on_the_broker() -> None:
    _clock, state, rec, svc = make()
    svc.startService()
    assert rec.sent[0] == ("READY=1", "STATUS=connecting")
    assert state.connection == "connecting"


def test_watchdog_every_half_watchdog_usec_on_the_reactor() -> None:
    clock, _state, rec, svc = make(watchdog=1.5)
    svc.startService()
    assert rec.lines().count("WATCHDOG=1") == 1  # at once
    clock.advance(1.4)
    assert rec.lines().count("WATCHDOG=1") == 1
    clock.advance(0.1)
    assert rec.lines().count("WATCHDOG=1") == 2
    clock.pump([1.5] * 4)
    assert rec.lines().count("WATCHDOG=1") == 6
    svc.stopService()
    clock.advance(10)
    assert rec.lines().count("WATCHDOG=1") == 6
    assert not clock.getDelayedCalls()


def test_no_watchdog_without_watchdog_usec() -> None:
    clock, _state, rec, svc = make(watchdog=None)
    svc.startService()
    clock.advance(100)
    assert "WATCHDOG=1" not in rec.lines()


def test_status_follows_the_state_and_is_sent_only_on_change() -> None:
    _clock, state, rec, svc = make(watchdog=None)
    svc.startService()
    state.set_connection("connected", broker="amqp://guest:***@h:5672/%2F")
    state.set_consuming("a", True)
    state.set_consuming("b", True)
    state.set_consuming("b", True)  # no change
    state.set_blocked(True, "memory")  # the summary does not mention it: nothing sent
    state.set_connection("reconnecting", "connection lost")
    statuses = [line for line in rec.lines() if line.startswith("STATUS=")]
    assert statuses[0] == "STATUS=connecting"
    assert statuses[1].startswith("STATUS=queue 'a': connected, not consuming yet")
    assert statuses[2] == "STATUS=queue 'b': connected, not consuming yet"
    assert statuses[3] == "STATUS=consuming 2 queue(s) from amqp://guest:***@h:5672/%2F"
    assert statuses[4].startswith("STATUS=reconnecting since ") and statuses[4].endswith(": connection lost")
    assert len(statuses) == 5
    assert len(set(statuses)) == len(statuses)


def test_stopping_when_the_drain_starts_and_only_once() -> None:
    clock, state, rec, svc = make(watchdog=1.0)
    svc.startService()
    state.set_flag("draining", True)  # the first thing the consumer does on stop
    assert rec.sent[-1] == ("STOPPING=1", "STATUS=draining")
    clock.advance(1.0)  # the watchdog keeps going through the drain
    assert rec.sent[-1] == ("WATCHDOG=1",)
    svc.stopService()
    assert rec.lines().count("STOPPING=1") == 1


def test_stopping_on_stop_without_a_drain() -> None:
    _clock, _state, rec, svc = make(watchdog=None)
    svc.startService()
    svc.stopService()
    assert rec.sent[-1][0] == "STOPPING=1"


def test_a_fatal_stop_leaves_its_reason_as_the_last_status() -> None:
    """A unit that failed keeps its last STATUS=: it says why, not "draining"."""
    _clock, state, rec, svc = make(watchdog=None)
    svc.startService()
    state.set_stop_reason("the broker refused our credentials")  # what Daemon.fatal does
    state.set_flag("draining", True)
    state.set_connection("closed", "stopped")
    svc.stopService()
    assert rec.sent[1:] == [
        ("STATUS=stopping: the broker refused our credentials",),
        ("STOPPING=1",),
        ("STATUS=stopped: the broker refused our credentials",),
    ]


# --- the daemon, with a real notify socket ---------------------------------------------------


def config(url: str, queue: str) -> str:
    return daemon_config(queue, "opscb:ack", url=url)



def test_daemon_notifies_ready_watchdog_and_stopping_without_a_broker(tmp_path: Path, daemons) -> None:
    listener = NotifySocket()
    try:
        with TCPProxy(5672) as dead_broker:
            dead_broker.refuse(True)
            env = env_for(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
            d = DaemonProcess(tmp_path / "d", config(f"amqp://guest:guest@127.0.0.1:{dead_broker.port}/%2F", "q-sd"), env=env)
            d.start()
            daemons.append(d)
            ready = listener.wait_for(lambda m: "READY=1" in m.splitlines(), 15, "READY=1")
            assert "STATUS=connecting" in ready.splitlines()
            # Every 0.2 s: the interval itself is checked on a Clock above; here, that pings keep coming.
            listener.wait_for(lambda m: listener.lines().count("WATCHDOG=1") >= 4, 10, "four WATCHDOG=1")
            d.send_signal(signal.SIGTERM)
            listener.wait_for(lambda m: "STOPPING=1" in m.splitlines(), 15, "STOPPING=1")
            assert d.wait(20) == 0
    finally:
        listener.close()


@pytest.mark.single_broker  # what the daemon tells systemd
def test_daemon_status_lines_on_an_abstract_socket(tmp_path: Path, broker: Broker, queue: str, daemons) -> None:
    broker.declare(queue)
    listener = NotifySocket(abstract=True)
    try:
        d = DaemonProcess(tmp_path / "d", config(broker.url, queue), env=env_for(NOTIFY_SOCKET=listener.address))
        d.start()
        daemons.append(d)
        listener.wait_for(lambda m: "READY=1" in m.splitlines(), 15, "READY=1")
        consuming = listener.wait_for(lambda m: "STATUS=consuming" in m, 15, "STATUS=consuming ...")
        assert consuming == f"STATUS=consuming 1 queue(s) from {broker.redacted_url}"
        assert d.stop() == 0
        listener.wait_for(lambda m: "STOPPING=1" in m.splitlines(), 5, "STOPPING=1")
        statuses = [line for line in listener.lines() if line.startswith("STATUS=")]
        assert all(a != b for a, b in zip(statuses, statuses[1:])), statuses
        assert "WATCHDOG=1" not in listener.lines()  # not asked for
        assert "guest:guest" not in "".join(listener.datagrams)
    finally:
        listener.close()


def test_refused_login_claims_no_retry_and_its_last_status_says_why(tmp_path: Path, broker: Broker, queue: str, daemons) -> None:
    password = "wrong-pw-4242"
    listener = NotifySocket()
    try:
        url = broker.url.replace(":guest@", f":{password}@")
        text = config(url, queue) + '[logging]\nlevel = "debug"\n'  # Twisted's "Scheduling retry" shows at debug
        d = DaemonProcess(tmp_path / "d", text, env=env_for(NOTIFY_SOCKET=listener.address))
        d.start()
        daemons.append(d)
        assert d.wait(10) == 77, d.output
        while listener.receive(0.2) is not None:
            pass
        out = d.output
        after = out[out.index(" CRITICAL amqp_consumer.daemon: stopping: the broker refused") :]
        assert "retry" not in after.lower() and "Traceback" not in after, out
        statuses = [line for line in listener.lines() if line.startswith("STATUS=")]
        assert statuses[-1].startswith("STATUS=stopped: the broker refused "), statuses
        assert password not in "".join(listener.datagrams) and password not in out
    finally:
        listener.close()
