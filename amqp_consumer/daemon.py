"""The service tree: consumer first, then the operations surface around it.

The operations surfaces (health, manhole, systemd) are handed this object, and
use only what it offers them: the status snapshot, change notices, the metrics
text, the operator controls, and ``fatal``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from amqp_consumer.config import Config
from amqp_consumer.consumer import Consumer, queue_label
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.redact import redact
from amqp_consumer.state import State
from amqp_consumer.status import Snapshot, Status

log = Logger(namespace="amqp_consumer.daemon")


class Daemon(MultiService):
    """Stops the consumer (which drains) before the services that report on it."""

    def __init__(self, reactor: Any, config: Config, callback: Callable[[Message], Any], on_exit: Callable[[int], None]) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.on_exit = on_exit
        self.state = State(reactor.seconds, config.consumed_queues)
        self.metrics = Metrics(queue_label(q) for q in config.consumed_queues)
        self.consumer = Consumer(reactor, config, callback, self.state, self.metrics, on_exit, self.fatal)
        self.consumer.setServiceParent(self)
        self.status = Status(self.state, self.consumer.inflight, self.consumer.ack_timeouts, self.metrics,
                             self.consumer.dispatcher)
        self.metrics.watch(self.status.snapshot)
        self.fatal_code: int | None = None

    def fatal(self, code: int, why: str) -> None:
        """Stop with exit status code; the first reason wins and is logged once."""
        if self.fatal_code is None:
            self.fatal_code = code
            log.critical("stopping: {why} (exit status {code})", why=why, code=code)
            self.state.set_stop_reason(redact(why))
            self.on_exit(code)

    def stopService(self) -> Deferred:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.consumer.stopService()
        others = [s for s in reversed(list(self)) if s is not self.consumer and s.running]
        self.running = 0
        await defer.gatherResults([defer.maybeDeferred(s.stopService) for s in others], consumeErrors=True)

    # --- what the operations surfaces use ------------------------------------------------

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
