"""The status snapshot (status.take) and the surfaces that read it: /ready, /status, /metrics, STATUS=, the manhole.

No broker and no network: a State driven by hand, fake figures for the other
parts, and each surface fed the same snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

import amqp_consumer.consumer  # noqa: F401  (imports every part, so every metric is defined, as in the daemon)
from amqp_consumer import health, manhole, systemd
from amqp_consumer.config import AMQPConfig, Config, ConsumerConfig, QueueConfig
from amqp_consumer.metrics import Metrics
from amqp_consumer.state import BrokerNode, State
from amqp_consumer.status import STANDBY_REASON, Snapshot, Status, take
from tests.support.ops import metric_value

SECRET = "pw-4711-do-not-print"
URL = f"amqp://ops:{SECRET}@127.0.0.1:5672/%2F"


def make_state(queues: tuple[str, ...] = ("a", "b")) -> State:
    return State(lambda: 1_700_000_000.0, queues)


def consuming(state: State) -> State:
    state.set_connection("connected", broker="amqp://ops:***@127.0.0.1:5672/%2F", node=BrokerNode("127.0.0.1:5672"))
    for q in state.consuming:
        state.set_consuming(q, True)
    return state


class FakeInFlight:
    def __init__(self, n: int, oldest: float) -> None:
        self.n, self.oldest = n, oldest

    def __len__(self) -> int:
        return self.n

    def oldest_age(self) -> float:
        return self.oldest


class FakeWatch:
    def nearest(self) -> dict[str, Any] | None:
        return {"queue": "a", "message_id": "m-1", "age_seconds": 45.0, "limit_seconds": 60.0, "percent": 75.0}


class FakeDispatcher:
    is_async = False
    busy = 1
    workers = 4
    pending = 2


# --- take() --------------------------------------------------------------------------------


READINESS = {
    "connecting": (lambda s: None, False, "connecting"),
    "reconnecting": (
        lambda s: s.set_connection("reconnecting", "connection lost"),
        False,
        "reconnecting since 2023-11-14T22:13:20+00:00: connection lost",
    ),
    "one queue idle": (
        lambda s: (consuming(s), s.set_consuming("b", False, "channel closed: 406 PRECONDITION_FAILED")),
        False,
        "queue 'b': channel closed: 406 PRECONDITION_FAILED",
    ),
    "consuming": (consuming, True, "consuming"),
    "standby": (lambda s: (s.watch_single_active(["a"]), consuming(s)), True, "standby"),
    "active": (lambda s: (s.watch_single_active(["a"]), consuming(s), s.set_active("a", True)), True, "consuming"),
    "paused": (lambda s: (consuming(s), s.set_flag("paused", True)), False, "paused"),
    "draining beats paused": (
        lambda s: (consuming(s), s.set_flag("paused", True), s.set_flag("draining", True)), False, "draining"
    ),
    "halted beats draining": (
        lambda s: (consuming(s), s.set_flag("draining", True), s.set_flag("halted", True)), False, "halted"
    ),
    "stopping": (lambda s: (consuming(s), s.set_stop_reason("the broker refused")), False, "stopping: the broker refused"),
    "stopped": (
        lambda s: (s.set_stop_reason("the broker refused"), s.set_connection("closed", "stopped")),
        False,
        "stopped: the broker refused",
    ),
}


@pytest.mark.parametrize("case", list(READINESS))
def test_readiness_is_decided_by_the_snapshot(case: str) -> None:
    change, ready, reason = READINESS[case]
    state = make_state()
    change(state)
    snap = take(state)
    assert (snap.ready, snap.reason) == (ready, reason)
    assert state.readiness() == (ready, reason)  # State.readiness() reads the same function


def test_standby_names_the_queue_and_says_what_standby_means() -> None:
    state = make_state()
    state.watch_single_active(["a"])
    consuming(state)
    snap = take(state)
    assert snap.standby == ("a",)
    assert [(q.label, q.role, q.reason) for q in snap.queues] == [("a", "standby", STANDBY_REASON), ("b", None, "")]
    assert snap.status_line() == (
        "consuming 2 queue(s) from amqp://ops:***@127.0.0.1:5672/%2F, standby on 1 (single active consumer)"
    )
    doc = snap.document()
    assert doc["queues"]["a"] == {"consuming": True, "reason": STANDBY_REASON, "single_active_consumer": "standby"}
    assert doc["queues"]["b"] == {"consuming": True, "reason": ""}


def test_a_server_named_queue_has_a_label() -> None:
    state = make_state(("",))
    snap = take(state)
    assert snap.queues[0].label == "(server-named)"
    state.set_connection("connected")
    assert take(state).reason == "queue '(server-named)': connected, not consuming yet"


def test_every_figure_is_read_from_its_part() -> None:
    state = consuming(make_state())
    state.last_delivery = 1_700_000_100.0
    metrics = Metrics(["a", "b"])
    metrics.counters["received"]["a"] = 5
    metrics.counters["acked"]["a"] = 4
    metrics.ack_timeouts["b"] = 2
    metrics.quarantine_failed("a")
    snap = take(state, FakeInFlight(3, 12.5), FakeWatch(), metrics, FakeDispatcher(), wall_clock=lambda: 0.0)
    assert (snap.inflight.count, snap.inflight.oldest_seconds) == (3, 12.5)
    assert snap.inflight.nearest_ack_timeout is not None and snap.inflight.nearest_ack_timeout.percent == 75.0
    assert snap.counters.messages["acked"] == {"a": 4, "b": 0}
    assert dict(snap.counters.ack_timeouts) == {"a": 0, "b": 2}
    assert dict(snap.counters.quarantine_failures) == {"a": 1, "b": 0}
    assert (snap.workers.kind, snap.workers.busy, snap.workers.total, snap.workers.waiting) == ("threads", 1, 4, 2)
    doc = snap.document()
    assert doc["inflight"] == {
        "count": 3,
        "oldest_seconds": 12.5,
        "ack_timeout": {"queue": "a", "message_id": "m-1", "age_seconds": 45.0, "limit_seconds": 60.0, "percent": 75.0},
    }
    assert doc["messages"]["a"] == {"received": 5, "acked": 4, "requeued": 0, "rejected": 0, "quarantined": 0}
    assert doc["ack_timeouts"] == {"a": 0, "b": 2}
    assert doc["workers"] == {"kind": "threads", "busy": 1, "total": 4, "waiting": 2}
    assert doc["last_delivery"] == "2023-11-14T22:15:00+00:00" and doc["time"] == "1970-01-01T00:00:00+00:00"


def test_parts_not_given_read_as_empty() -> None:
    snap = take(make_state())
    assert snap.inflight.count == 0 and snap.inflight.nearest_ack_timeout is None
    assert dict(snap.counters.messages) == {} and snap.workers.total == 0


def test_the_snapshot_is_frozen_and_does_not_follow_the_state() -> None:
    state = consuming(make_state())
    metrics = Metrics(["a", "b"])
    snap = take(state, counters=metrics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.ready = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.connection.state = "closed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.counters.messages["acked"]["a"] = 9  # type: ignore[index]
    state.set_connection("reconnecting", "lost")
    metrics.counters["acked"]["a"] += 1
    assert snap.ready and snap.connection.state == "connected" and snap.counters.messages["acked"]["a"] == 0


def test_every_text_field_is_redacted_on_the_way_out() -> None:
    state = make_state()
    state.broker = URL
    state.set_blocked(True, f"alarm on {URL}")
    state.set_connection("reconnecting", f"cannot connect to {URL}: refused")
    state.set_consuming("a", False, f"queue behind {URL}")
    snap = take(state)
    texts = [snap.reason, snap.status_line(), json.dumps(snap.document()), repr(snap)]
    for text in texts:
        assert SECRET not in text
    assert snap.connection.broker == "amqp://ops:***@127.0.0.1:5672/%2F"
    assert snap.connection.detail == "cannot connect to amqp://ops:***@127.0.0.1:5672/%2F: refused"
    state.set_stop_reason(f"the broker at {URL} refused the login")
    assert take(state).reason == "stopping: the broker at amqp://ops:***@127.0.0.1:5672/%2F refused the login"


# --- the surfaces agree ---------------------------------------------------------------------


class Fixed:
    """A daemon as the surfaces see it (health.Reported, manhole.Operated, systemd.Fed), serving one snapshot."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.config = Config(
            amqp=AMQPConfig(urls=(URL,)), queues=(QueueConfig(name="a"),), consumer=ConsumerConfig(callback="m:f")
        )
        self.reactor = Clock()
        self.metrics = Metrics(["a", "b"])
        self.metrics.watch(self.snapshot)
        self.listeners: list[Callable[[], None]] = []

    def snapshot(self) -> Snapshot:
        return self.snap

    def subscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def exposition(self) -> bytes:
        return self.metrics.exposition()

    def fatal(self, code: int, why: str) -> None:
        raise AssertionError("not expected")

    def inflight(self) -> list[dict[str, Any]]:
        return []

    def pause(self) -> Deferred[None]:
        return succeed(None)

    def resume(self) -> Deferred[None]:
        return succeed(None)


def ready_answer(source: Fixed) -> tuple[int, dict[str, Any]]:
    request = DummyRequest([b"ready"])
    body = health.Root(source).getChildWithDefault(b"ready", request).render(request)
    return request.responseCode or 200, json.loads(body)


def status_answer(source: Fixed) -> dict[str, Any]:
    request = DummyRequest([b"status"])
    body = health.Root(source).getChildWithDefault(b"status", request).render(request)
    return json.loads(body)


def systemd_status(source: Fixed) -> str:
    sent: list[str] = []

    class Recorder:
        def send(self, *assignments: str) -> bool:
            sent.extend(assignments)
            return True

    notify = systemd.SystemdNotify(Clock(), source, Recorder(), None)
    notify.startService()
    [status] = [line for line in sent if line.startswith("STATUS=")]
    return status[len("STATUS=") :]


SURFACE_CASES = {
    "connecting": lambda s: None,
    "reconnecting, with a password in the reason": lambda s: s.set_connection("reconnecting", f"cannot reach {URL}"),
    "consuming": consuming,
    "standby": lambda s: (s.watch_single_active(["b"]), consuming(s)),
    "draining": lambda s: (consuming(s), s.set_flag("draining", True)),
    "stopped": lambda s: (s.set_stop_reason(f"the broker at {URL} refused"), s.set_connection("closed", "stopped")),
}


@pytest.mark.parametrize("case", list(SURFACE_CASES))
def test_the_surfaces_agree_on_one_snapshot(case: str) -> None:
    state = make_state()
    SURFACE_CASES[case](state)
    source = Fixed(Status(state, FakeInFlight(2, 3.0), FakeWatch(), None, FakeDispatcher()).snapshot())
    snap = source.snap

    code, ready = ready_answer(source)
    assert ready == {"ready": snap.ready, "reason": snap.reason}
    assert code == (200 if snap.ready else 503)

    status = status_answer(source)
    shell = manhole.namespace(source)["status"]()
    assert dict(shell) == status == health.status_document(source)
    assert (status["ready"], status["reason"]) == (ready["ready"], ready["reason"])

    line = systemd_status(source)
    if snap.ready:
        assert line.startswith(f"consuming 2 queue(s) from {snap.connection.broker}")
        assert ("standby on 1" in line) == (ready["reason"] == "standby")
    else:
        assert line == ready["reason"]  # a unit that is not ready says why, in /ready's words

    metrics = source.exposition().decode()
    assert metric_value(metrics, "amqp_consumer_ready") == (1.0 if ready["ready"] else 0.0)
    assert metric_value(metrics, "amqp_consumer_inflight") == status["inflight"]["count"] == 2
    assert metric_value(metrics, "amqp_consumer_standby") == (1.0 if ready["reason"] == "standby" else 0.0)
    assert metric_value(metrics, "amqp_consumer_connection_state", state=status["connection"]["state"]) == 1.0
    assert metric_value(metrics, "amqp_consumer_workers_total") == status["workers"]["total"]

    for text in (json.dumps(ready), json.dumps(status), repr(shell), line, metrics):
        assert SECRET not in text
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", status["time"])
