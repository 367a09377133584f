"""The root service: its children's start and stop order, the exit on a fatal error, and the operator surface.

Start: the children start in the order the assembly (tap.assemble) adds them:
the consumer starts connecting, then the listeners (health, then manhole), then
systemd hears READY=1, which is not gated on the broker.

Stop: the consumer stops first and drains while every other child still runs:
health answers "draining", systemd has sent STOPPING=1 and the watchdog keeps
pinging. Only once the drain is over do the others stop, in reverse start order.

The operations surfaces (health, manhole, systemd) are handed this object, and
use only what it offers them: the status snapshot, change notices, the metrics
text, the operator controls, and ``fatal``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from amqp_consumer.config import Config
from amqp_consumer.consumer import Consumer
from amqp_consumer.metrics import Metrics
from amqp_consumer.redact import redact
from amqp_consumer.state import State
from amqp_consumer.status import Snapshot, Status

log = Logger(namespace="amqp_consumer.daemon")


class FatalStop:
    """Stop with an exit status and a reason: the first reason wins, is logged once, and /ready and
    the last STATUS= show it."""

    def __init__(self, state: State, on_exit: Callable[[int], None]) -> None:
        self._state = state
        self._on_exit = on_exit
        self.code: int | None = None

    def __call__(self, code: int, why: str) -> None:
        if self.code is None:
            self.code = code
            log.critical("stopping: {why} (exit status {code})", why=why, code=code)
            self._state.set_stop_reason(redact(why))
            self._on_exit(code)


class Daemon(MultiService):
    """Stops the consumer (which drains) before the services that report on it."""

    def __init__(
        self,
        reactor: object,
        config: Config,
        state: State,
        metrics: Metrics,
        status: Status,
        consumer: Consumer,
        fatal: FatalStop,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self.reactor = reactor  # for the operator's shell
        self.config = config
        self.state = state
        self.metrics = metrics
        self.status = status
        self.consumer = consumer
        self._fatal = fatal

    # --- start and stop ------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # MultiService would stop every child at once, in reverse order: the consumer last.
        await self.consumer.stopService()
        others: list[IService] = [s for s in reversed(list(self)) if s is not self.consumer and s.running]
        self.running = 0
        await defer.gatherResults([defer.maybeDeferred(s.stopService) for s in others], consumeErrors=True)

    # --- what the operations surfaces use ------------------------------------------------

    def fatal(self, code: int, why: str) -> None:
        """Stop with exit status code; the first reason wins and is logged once."""
        self._fatal(code, why)

    def snapshot(self) -> Snapshot:
        """The status snapshot (status.take) every surface reads."""
        return self.status.snapshot()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """listener() runs after each change of connection or consuming state."""
        self.status.subscribe(listener)

    def exposition(self) -> bytes:
        """The /metrics text."""
        return self.metrics.exposition()

    def inflight(self) -> list[dict[str, Any]]:
        """Deliveries received and not yet settled, oldest first."""
        return self.consumer.inflight.snapshot()

    def pause(self) -> Deferred[None]:
        """Stop consuming on every queue; in-flight deliveries still finish."""
        return defer.ensureDeferred(self.consumer.subscription.pause())

    def resume(self) -> Deferred[None]:
        """Consume again after pause()."""
        return defer.ensureDeferred(self.consumer.subscription.resume())
