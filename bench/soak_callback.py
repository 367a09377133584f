"""The callback the soak test runs inside the daemon (``soak_callback:SoakCallback``).

Each message's body says what to do (``"do"``); the callback writes one JSON
line when a run starts and one when it ends, so the harness can count every
run of every message and see which ones were cut short. Lines are flushed, not
fsynced: the daemon is never killed during a soak, only the broker.

``[consumer.config]`` keys: ``runs_file`` (where the lines go) and
``slow_seconds`` (how long a "slow" message sleeps on its first run: longer
than the broker's consumer timeout plus its check interval).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Mapping

from amqp_consumer import Drop, Nack


class WeirdError(Exception):
    """An error that is hard to describe: its text raises, or cannot be encoded."""

    def __init__(self, style: str) -> None:
        super().__init__(style)
        self.style = style

    def __str__(self) -> str:
        if self.style == "str-raises":
            raise RuntimeError("this error cannot describe itself")
        if self.style == "surrogate":
            return "lone surrogate \udc80 in the text"
        return "long error text " + "y" * 100_000


class SoakCallback:
    """Records every run and does what the body asks."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._runs = open(config["runs_file"], "a", encoding="utf-8")  # noqa: SIM115 - open for the daemon's life
        self._slow = float(config.get("slow_seconds", 35))
        self._lock = threading.Lock()
        self._went_slow: set[str] = set()
        self._nacked: set[str] = set()

    def _write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        with self._lock:
            self._runs.write(line)
            self._runs.flush()

    def _first(self, seen: set[str], sid: str) -> bool:
        with self._lock:
            if sid in seen:
                return False
            seen.add(sid)
            return True

    def __call__(self, message: Any) -> None:
        body = message.body
        sid = body.get("sid") if isinstance(body, dict) else None
        sid = sid or message.id or "?"
        do = body.get("do", "ok") if isinstance(body, dict) else "ok"
        start = time.time()
        base = {"sid": sid, "do": do, "redelivered": message.redelivered, "thread": threading.current_thread().name}
        self._write({**base, "ev": "start", "t": start})
        result = "ok"
        try:
            if do == "slow" and self._first(self._went_slow, sid):
                result = "ok-slow"
                time.sleep(self._slow)
            elif do == "raise":
                result = "raise"
                raise ValueError(f"soak: {sid} fails on purpose")
            elif do == "raise-weird":
                result = "raise"
                raise WeirdError(str(body.get("style", "str-raises")))
            elif do == "nack-once" and self._first(self._nacked, sid):
                result = "nack"
                raise Nack()
            elif do == "drop":
                result = "drop"
                raise Drop()
        finally:
            self._write({**base, "ev": "end", "t": time.time(), "start": start, "result": result})
