"""The service tree: consumer first, then the operations surface around it."""

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
