"""One status snapshot: everything the operations surfaces say about the daemon, taken by one function.

``take`` reads the parts that hold the figures (the state, the in-flight
registry, the ack-timeout watch, the counters, the dispatcher) and returns a
frozen ``Snapshot``. /ready, /status, the live gauges of /metrics, the
manhole's status() and systemd's STATUS= line all read a snapshot and nothing
else, so they cannot disagree, and each free-text field goes through
``redact.redact`` here, once, on its way out: no surface has its own path for a
password to leak through.

Readiness is decided here too: ready means connected and consuming on every
configured queue ("standby" for a single-active-consumer queue that has sent
this consumer nothing yet).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from amqp_consumer import __version__
from amqp_consumer.metricdefs import METRICS
from amqp_consumer.redact import redact

if TYPE_CHECKING:
    from amqp_consumer.state import BrokerNode, State

STANDBY_REASON = (
    "single active consumer: no delivery on this consumer yet; another consumer is active, "
    "or this one is and the queue has been empty (AMQP 0-9-1 does not say which)"
)


# --- the snapshot ---------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    state: str  # connecting | connected | reconnecting | closed
    since: float  # on the state's clock (the reactor's)
    detail: str
    broker: str  # the URL in use, password hidden
    node: BrokerNode | None  # while connected
    reconnects: int
    blocked: bool
    blocked_reason: str


@dataclass(frozen=True)
class Queue:
    label: str  # the configured name, or "(server-named)"
    consuming: bool
    reason: str  # why not consuming; for a consumer on standby, what standby means
    single_active_consumer: bool  # declared with x-single-active-consumer
    role: str | None  # "active" or "standby" while consuming such a queue, else None


@dataclass(frozen=True)
class NearestAckTimeout:
    """The in-flight delivery closest to its queue's consumer ack timeout."""

    queue: str
    message_id: str | None
    age_seconds: float
    limit_seconds: float
    percent: float


@dataclass(frozen=True)
class InFlight:
    count: int
    oldest_seconds: float
    nearest_ack_timeout: NearestAckTimeout | None


@dataclass(frozen=True)
class Counters:
    messages: Mapping[str, Mapping[str, int]]  # outcome -> queue -> count
    ack_timeouts: Mapping[str, int]  # queue -> count
    quarantine_failures: Mapping[str, int]  # queue -> count


@dataclass(frozen=True)
class Workers:
    kind: str  # "threads" or "async" ("" when no dispatcher was given)
    busy: int
    total: int  # 0 for async callbacks
    waiting: int


@dataclass(frozen=True)
class Snapshot:
    ready: bool
    reason: str
    connection: Connection
    queues: tuple[Queue, ...]
    paused: bool
    draining: bool
    halted: bool
    stop_reason: str  # why the daemon stops on its own with an error status, password hidden
    last_delivery: float | None  # Unix time
    inflight: InFlight
    counters: Counters
    workers: Workers
    taken_at: float  # Unix time

    @property
    def standby(self) -> tuple[str, ...]:
        """Single-active-consumer queues consumed here that have sent nothing yet."""
        return tuple(q.label for q in self.queues if q.role == "standby")

    def status_line(self) -> str:
        """One line for sd_notify STATUS=."""
        if not self.ready:
            return self.reason
        waiting = f", standby on {len(self.standby)} (single active consumer)" if self.reason == "standby" else ""
        return f"consuming {len(self.queues)} queue(s) from {self.connection.broker}{waiting}"

    def document(self) -> dict[str, Any]:
        """The JSON-ready document of GET /status and the manhole's status()."""
        c = self.connection
        node = c.node
        messages = self.counters.messages
        return {
            "ready": self.ready,
            "reason": self.reason,
            "connection": {
                "state": c.state,
                "since": _iso(c.since),
                "detail": c.detail,
                "broker": c.broker,
                "node": node.node if node else None,
                "broker_product": node.product if node else None,
                "broker_version": node.version if node else None,
                "cluster_name": node.cluster_name if node else None,
                "reconnects": c.reconnects,
                "blocked": c.blocked,
                "blocked_reason": c.blocked_reason,
            },
            "queues": {q.label: _queue_document(q) for q in self.queues},
            "paused": self.paused,
            "draining": self.draining,
            "halted": self.halted,
            "last_delivery": _iso(self.last_delivery),
            "inflight": {
                "count": self.inflight.count,
                "oldest_seconds": round(self.inflight.oldest_seconds, 3),
                "ack_timeout": _nearest_document(self.inflight.nearest_ack_timeout),
            },
            "messages": {
                label: {outcome: by_queue.get(label, 0) for outcome, by_queue in messages.items()}
                for label in messages.get("received", {})
            },
            "ack_timeouts": dict(self.counters.ack_timeouts),
            "workers": {
                "kind": self.workers.kind,
                "busy": self.workers.busy,
                "total": self.workers.total,
                "waiting": self.workers.waiting,
            },
            "version": __version__,
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.taken_at)),
        }


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def _queue_document(q: Queue) -> dict[str, Any]:
    doc: dict[str, Any] = {"consuming": q.consuming, "reason": q.reason}
    if q.single_active_consumer:
        doc["single_active_consumer"] = q.role
    return doc


def _nearest_document(n: NearestAckTimeout | None) -> dict[str, Any] | None:
    if n is None:
        return None
    return {
        "queue": n.queue,
        "message_id": n.message_id,
        "age_seconds": n.age_seconds,
        "limit_seconds": n.limit_seconds,
        "percent": n.percent,
    }


# --- what the snapshot is taken from ----------------------------------------------------


class InFlightFigures(Protocol):
    """inflight.InFlight, as the snapshot reads it."""

    def __len__(self) -> int: ...
    def oldest_age(self) -> float: ...


class AckTimeoutFigures(Protocol):
    """brokerlimits.AckTimeoutWatch, as the snapshot reads it."""

    def nearest(self) -> dict[str, Any] | None: ...


class CounterFigures(Protocol):
    """metrics.Metrics, as the snapshot reads it."""

    counters: dict[str, dict[str, int]]
    ack_timeouts: dict[str, int]
    quarantine_failures: dict[str, int]


class WorkerFigures(Protocol):
    """dispatch.Dispatcher, as the snapshot reads it."""

    @property
    def is_async(self) -> bool: ...
    @property
    def busy(self) -> int: ...
    @property
    def workers(self) -> int: ...
    @property
    def pending(self) -> int: ...


_NO_INFLIGHT = InFlight(0, 0.0, None)
_NO_COUNTERS = Counters(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))
_NO_WORKERS = Workers("", 0, 0, 0)


def take(
    state: State,
    inflight: InFlightFigures | None = None,
    ack_timeouts: AckTimeoutFigures | None = None,
    counters: CounterFigures | None = None,
    workers: WorkerFigures | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> Snapshot:
    """The snapshot: the one function every surface's figures come from. A part not given reads as empty."""
    connection = Connection(
        state=state.connection,
        since=state.connection_since,
        detail=redact(state.connection_detail),
        broker=redact(state.broker),
        node=state.node,
        reconnects=state.reconnects,
        blocked=state.blocked,
        blocked_reason=redact(state.blocked_reason),
    )
    queues = tuple(_queue(state, q, on) for q, on in state.consuming.items())
    stop_reason = redact(state.stop_reason)
    ready, reason = _readiness(state, connection, queues, stop_reason)
    return Snapshot(
        ready=ready,
        reason=reason,
        connection=connection,
        queues=queues,
        paused=state.paused,
        draining=state.draining,
        halted=state.halted,
        stop_reason=stop_reason,
        last_delivery=state.last_delivery,
        inflight=_inflight(inflight, ack_timeouts),
        counters=_counters(counters) if counters is not None else _NO_COUNTERS,
        workers=_workers(workers) if workers is not None else _NO_WORKERS,
        taken_at=wall_clock(),
    )


def _queue(state: State, q: str, on: bool) -> Queue:
    label = q or "(server-named)"
    if q not in state.single_active:
        return Queue(label, on, redact(state.queue_reason[q]), False, None)
    role = ("active" if state.single_active[q] else "standby") if on else None
    reason = STANDBY_REASON if role == "standby" else redact(state.queue_reason[q])
    return Queue(label, on, reason, True, role)


def _readiness(state: State, connection: Connection, queues: tuple[Queue, ...], stop_reason: str) -> tuple[bool, str]:
    """(ready, why not); ready means connected and consuming on every configured queue."""
    if stop_reason:
        # "closed" is the consumer's last step on stop: the connection is gone.
        return False, f"{'stopped' if connection.state == 'closed' else 'stopping'}: {stop_reason}"
    if state.halted:
        return False, "halted"
    if state.draining:
        return False, "draining"
    if state.paused:
        return False, "paused"
    if connection.state == "connecting":
        return False, "connecting"
    if connection.state != "connected":
        return False, f"{connection.state} since {_iso(connection.since)}" + (
            f": {connection.detail}" if connection.detail else ""
        )
    idle = [q for q in queues if not q.consuming]
    if idle:
        return False, "; ".join(f"queue {q.label!r}: {q.reason}" for q in idle)
    if any(q.role == "standby" for q in queues):
        return True, "standby"
    return True, "consuming"


def _inflight(inflight: InFlightFigures | None, ack_timeouts: AckTimeoutFigures | None) -> InFlight:
    if inflight is None:
        return _NO_INFLIGHT
    nearest = ack_timeouts.nearest() if ack_timeouts is not None else None
    return InFlight(
        count=len(inflight),
        oldest_seconds=inflight.oldest_age(),
        nearest_ack_timeout=NearestAckTimeout(**nearest) if nearest is not None else None,
    )


def _counters(c: CounterFigures) -> Counters:
    return Counters(
        messages=MappingProxyType({o: MappingProxyType(dict(by_queue)) for o, by_queue in c.counters.items()}),
        ack_timeouts=MappingProxyType(dict(c.ack_timeouts)),
        quarantine_failures=MappingProxyType(dict(c.quarantine_failures)),
    )


def _workers(w: WorkerFigures) -> Workers:
    return Workers(
        kind="async" if w.is_async else "threads",
        busy=w.busy,
        total=0 if w.is_async else w.workers,
        waiting=w.pending,
    )


class Status:
    """The snapshot source the assembly hands to the daemon: the parts, and change notices from the state."""

    def __init__(
        self,
        state: State,
        inflight: InFlightFigures | None = None,
        ack_timeouts: AckTimeoutFigures | None = None,
        counters: CounterFigures | None = None,
        workers: WorkerFigures | None = None,
    ) -> None:
        self._state = state
        self._parts = (inflight, ack_timeouts, counters, workers)

    def snapshot(self) -> Snapshot:
        return take(self._state, *self._parts)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """listener() runs after every change of connection or consuming state (not per message)."""
        self._state.subscribe(listener)


# --- the figure decided here ------------------------------------------------------------

READY = METRICS.gauge(
    "amqp_consumer_ready", "1 while consuming on every configured queue", value=lambda s: 1.0 if s.ready else 0.0
)
