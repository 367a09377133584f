"""The one answer to "are we consuming, and if not, why": health, metrics, manhole and sd_notify read it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable


STANDBY_REASON = (
    "single active consumer: no delivery on this consumer yet; another consumer is active, "
    "or this one is and the queue has been empty (AMQP 0-9-1 does not say which)"
)


def _node_dict(node: BrokerNode | None) -> dict[str, str | None]:
    if node is None:
        return {"node": None, "broker_product": None, "broker_version": None, "cluster_name": None}
    return {
        "node": node.node,
        "broker_product": node.product,
        "broker_version": node.version,
        "cluster_name": node.cluster_name,
    }


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


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


class State:
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

    def standby(self) -> list[str]:
        """Single-active-consumer queues we consume but have had no delivery from yet."""
        return [q for q, active in self.single_active.items() if not active and self.consuming[q]]

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
        """(ready, why not); ready means connected and consuming on every configured queue."""
        if self.stop_reason:
            # "closed" is the consumer's last step on stop: the connection is gone.
            return False, f"{'stopped' if self.connection == 'closed' else 'stopping'}: {self.stop_reason}"
        if self.halted:
            return False, "halted"
        if self.draining:
            return False, "draining"
        if self.paused:
            return False, "paused"
        if self.connection == "connecting":
            return False, "connecting"
        if self.connection != "connected":
            return False, f"{self.connection} since {_iso(self.connection_since)}" + (
                f": {self.connection_detail}" if self.connection_detail else ""
            )
        idle = [q for q, on in self.consuming.items() if not on]
        if idle:
            return False, "; ".join(f"queue {q or '(server-named)'!r}: {self.queue_reason[q]}" for q in idle)
        if self.standby():
            return True, "standby"
        return True, "consuming"

    def summary(self) -> str:
        """One line for sd_notify STATUS= and logs."""
        ready, why = self.readiness()
        if ready:
            waiting = f", standby on {len(self.standby())} (single active consumer)" if why == "standby" else ""
            return f"consuming {len(self.consuming)} queue(s) from {self.broker}{waiting}"
        return why

    def _queue_dict(self, q: str, on: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {"consuming": on, "reason": self.queue_reason[q]}
        if q in self.single_active:
            role = "active" if self.single_active[q] else "standby"
            doc["single_active_consumer"] = role if on else None
            if on and role == "standby":
                doc["reason"] = STANDBY_REASON
        return doc

    def as_dict(self) -> dict[str, Any]:
        ready, why = self.readiness()
        return {
            "ready": ready,
            "reason": why,
            "connection": {
                "state": self.connection,
                "since": _iso(self.connection_since),
                "detail": self.connection_detail,
                "broker": self.broker,
                **_node_dict(self.node),
                "reconnects": self.reconnects,
                "blocked": self.blocked,
                "blocked_reason": self.blocked_reason,
            },
            "queues": {q or "(server-named)": self._queue_dict(q, on) for q, on in self.consuming.items()},
            "paused": self.paused,
            "draining": self.draining,
            "halted": self.halted,
            "last_delivery": _iso(self.last_delivery),
        }
