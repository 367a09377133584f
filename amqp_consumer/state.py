"""The one answer to "are we consuming, and if not, why": health, metrics, manhole and sd_notify read it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


class State:
    def __init__(self, clock: Callable[[], float], queues: tuple[str, ...]) -> None:
        self._clock = clock
        self.connection = "connecting"  # connecting | connected | reconnecting | closed
        self.connection_since = clock()
        self.connection_detail = ""
        self.broker = ""
        self.consuming: dict[str, bool] = {q: False for q in queues}
        self.queue_reason: dict[str, str] = {q: "not consuming yet" for q in queues}
        self.paused = False
        self.draining = False
        self.halted = False
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

    def set_connection(self, state: str, detail: str = "", broker: str | None = None) -> None:
        if state == "connected" and self.connection == "reconnecting":
            self.reconnects += 1
        if state != self.connection:
            self.connection_since = self._clock()
        self.connection = state
        self.connection_detail = detail
        if broker is not None:
            self.broker = broker
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

    def set_flag(self, name: str, value: bool) -> None:
        setattr(self, name, value)
        self._changed()

    def set_blocked(self, blocked: bool, reason: str) -> None:
        self.blocked = blocked
        self.blocked_reason = reason
        self._changed()

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not); ready means connected and consuming on every configured queue."""
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
        return True, "consuming"

    def summary(self) -> str:
        """One line for sd_notify STATUS= and logs."""
        ready, why = self.readiness()
        if ready:
            return f"consuming {len(self.consuming)} queue(s) from {self.broker}"
        return why

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
                "reconnects": self.reconnects,
                "blocked": self.blocked,
                "blocked_reason": self.blocked_reason,
            },
            "queues": {
                q or "(server-named)": {"consuming": on, "reason": self.queue_reason[q]}
                for q, on in self.consuming.items()
            },
            "paused": self.paused,
            "draining": self.draining,
            "halted": self.halted,
            "last_delivery": _iso(self.last_delivery),
        }
