"""The daemon's mutable state: connection, per-queue consuming and its reason, flags, and change notices.

It only records; status.take() turns it (with the other parts' figures) into
the frozen snapshot every surface reads, and decides readiness there. The
connection figures of /metrics are defined here, next to what they count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from amqp_consumer.metricdefs import METRICS
from amqp_consumer.status import take


@dataclass(frozen=True)
class BrokerNode:
    """The broker at the other end of the connection, as far as a client can know it.

    RabbitMQ names its product, version and cluster in connection.start, but not the
    node: the address we dialled (host:port of the URL) is what identifies it.
    """

    node: str
    product: str = ""
    version: str = ""
    cluster_name: str = ""

    def describe(self) -> str:
        what = " ".join(p for p in (self.product or "broker", self.version) if p)
        return f"{what}, cluster {self.cluster_name}" if self.cluster_name else what


CONNECTION_STATES = ("connecting", "connected", "reconnecting", "closed")


class State:
    """What the consumer's parts report as it happens; read through status.take, never by the surfaces."""

    def __init__(self, clock: Callable[[], float], queues: tuple[str, ...]) -> None:
        self._clock = clock
        self.connection = "connecting"  # connecting | connected | reconnecting | closed
        self.connection_since = clock()
        self.connection_detail = ""
        self.broker = ""
        self.node: BrokerNode | None = None  # while connected
        # Queues with single active consumer: True once the current consumer got a
        # delivery, False while it waits (AMQP 0-9-1 never says which consumer is active).
        self.single_active: dict[str, bool] = {}
        self.consuming: dict[str, bool] = {q: False for q in queues}
        self.queue_reason: dict[str, str] = {q: "not consuming yet" for q in queues}
        self.paused = False
        self.draining = False
        self.halted = False
        # Why the daemon stops on its own with an error status (Daemon.fatal): the
        # last STATUS= a failed unit keeps, and /ready's reason until then.
        self.stop_reason = ""
        self.blocked = False
        self.blocked_reason = ""
        self.reconnects = 0
        self.last_delivery: float | None = None
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Called after every change of connection or consuming state (not per message)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def set_connection(
        self, state: str, detail: str = "", broker: str | None = None, node: BrokerNode | None = None
    ) -> None:
        if state == "connected" and self.connection == "reconnecting":
            self.reconnects += 1
        if state != self.connection:
            self.connection_since = self._clock()
        self.connection = state
        self.connection_detail = detail
        if broker is not None:
            self.broker = broker
        self.node = node if state == "connected" else None
        for q in self.consuming:
            if state != "connected":
                self.consuming[q] = False
                self.queue_reason[q] = state
            elif not self.consuming[q]:
                self.queue_reason[q] = "connected, not consuming yet"
        self._changed()

    def set_consuming(self, queue: str, consuming: bool, reason: str = "") -> None:
        self.consuming[queue] = consuming
        self.queue_reason[queue] = "" if consuming else reason
        self._changed()

    def watch_single_active(self, queues: Iterable[str]) -> None:
        """Queues declared with x-single-active-consumer: a consumer there may wait its turn."""
        for q in queues:
            if q in self.consuming:
                self.single_active[q] = False

    def set_active(self, queue: str, active: bool) -> None:
        """For a single-active-consumer queue: False when consuming starts, True at its first delivery."""
        if self.single_active.get(queue, active) != active:
            self.single_active[queue] = active
            self._changed()

    def set_flag(self, name: str, value: bool) -> None:
        setattr(self, name, value)
        self._changed()

    def set_stop_reason(self, why: str) -> None:
        self.stop_reason = why
        self._changed()

    def set_blocked(self, blocked: bool, reason: str) -> None:
        self.blocked = blocked
        self.blocked_reason = reason
        self._changed()

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not) as the snapshot decides it, from the state alone."""
        snap = take(self)
        return snap.ready, snap.reason

    def as_dict(self) -> dict[str, Any]:
        """The /status document, as far as the state alone knows it."""
        return take(self).document()


# --- the figures owned here, for /metrics (read from the snapshot at scrape time) -----------

CONNECTED = METRICS.gauge(
    "amqp_consumer_connected",
    "1 while an AMQP connection is open",
    value=lambda s: 1.0 if s.connection.state == "connected" else 0.0,
)
CONNECTION_STATE = METRICS.gauge(
    "amqp_consumer_connection_state",
    "1 for the current connection state",
    labels=("state",),
    series=lambda s: [((state,), 1.0 if state == s.connection.state else 0.0) for state in CONNECTION_STATES],
)
CONNECTED_NODE = METRICS.gauge(
    "amqp_consumer_connected_node",
    "1 for the broker node (host:port of its URL) of the open AMQP connection",
    labels=("node", "cluster", "version"),
    series=lambda s: [] if (n := s.connection.node) is None else [((n.node, n.cluster_name, n.version), 1.0)],
)
STANDBY = METRICS.gauge(
    "amqp_consumer_standby",
    "1 while a single-active-consumer queue has sent this consumer nothing yet",
    value=lambda s: 1.0 if s.standby else 0.0,
)
BLOCKED = METRICS.gauge(
    "amqp_consumer_blocked",
    "1 while the broker blocks publishing (memory or disk alarm)",
    value=lambda s: 1.0 if s.connection.blocked else 0.0,
)
RECONNECTS = METRICS.counter(
    "amqp_consumer_reconnects_total",
    "Reconnections after a lost connection",
    value=lambda s: float(s.connection.reconnects),
)
LAST_DELIVERY = METRICS.gauge(
    "amqp_consumer_last_delivery_timestamp_seconds",
    "Unix time of the last delivery",
    value=lambda s: s.last_delivery or 0.0,
)
