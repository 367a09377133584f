"""The consumer: lifecycle and drain; it wires the parts that do the work.

A message's path from socket to ack is told in pipeline.py. The parts, each
in a module named for its concern: the subscription (subscription.py: channel,
declare, QoS, consume, recovery), the callback runner (dispatch.py), the
in-flight registry and the settler (inflight.py: the only place deciding what
the broker hears), the failure policy (quarantine.py) and the ack-timeout
watch (brokerlimits.py). The connection (connection.py) and the subscription
share one backoff.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from amqp_consumer import exitcodes
from amqp_consumer.backoff import Backoff
from amqp_consumer.brokerlimits import AckTimeoutWatch, ack_timeouts, warn_quorum_without_dead_letter
from amqp_consumer.config import Config
from amqp_consumer.connection import Connector
from amqp_consumer.deferreds import first
from amqp_consumer.dispatch import Dispatcher
from amqp_consumer.inflight import InFlight, Settler
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.pipeline import Pipeline
from amqp_consumer.publisher import Publisher
from amqp_consumer.quarantine import Quarantine
from amqp_consumer.state import State
from amqp_consumer.subscription import Subscription, configured_name, queue_label

log = Logger(namespace="amqp_consumer.consumer")

__all__ = ["Consumer", "queue_label", "single_active_queues"]


def single_active_queues(config: Config) -> list[str]:
    """Consumed queues declared with x-single-active-consumer (one consumer gets deliveries, the rest wait)."""
    declared = {q.name: q for q in config.queues}
    return [
        q for q in config.consumed_queues if q in declared and declared[q].arguments.get("x-single-active-consumer") is True
    ]


class Consumer(Service):
    """Connects, declares, consumes and settles every delivery; drains on stop."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        callback: Callable[[Message], Any],
        state: State,
        metrics: Metrics,
        on_halt: Callable[[int], None],
        on_fatal: Callable[[int, str], None],
    ) -> None:
        self._reactor = reactor
        self.config = config
        self.state = state
        self.metrics = metrics
        self._on_halt = on_halt
        self._on_fatal = lambda error: on_fatal(exitcodes.NOPERM, str(error))
        self.inflight = InFlight()
        self.settler = Settler(reactor, self.inflight, metrics, self.halt, self._settled, lambda: bool(self.running))
        self.dispatcher = Dispatcher(reactor, callback, config.consumer.workers, self.settler.results)
        self.publisher = Publisher()
        self.quarantine = Quarantine(reactor, self.publisher, metrics, self.settler, self._has_dead_letter)
        self.settler.failures = self.quarantine
        self.pipeline = Pipeline(self.inflight, metrics, state, self.quarantine, self.dispatcher)
        self.ack_timeouts = AckTimeoutWatch(
            reactor, {queue_label(q): t for q, t in ack_timeouts(config).items()}, self.inflight.__iter__
        )
        # One backoff for reconnecting and for reopening channels: it restarts only
        # once consuming has started on every queue (see Subscription._consume).
        backoff = Backoff(config.amqp.reconnect_min_delay, config.amqp.reconnect_max_delay)
        self.subscription = Subscription(
            reactor, config, state, metrics, self.inflight, self.settler, self.dispatcher, self.pipeline,
            self.publisher, self.ack_timeouts, backoff, lambda: self.connector.target, lambda: bool(self.running),
            self._check_drained,
        )
        sub = self.subscription
        self.connector = Connector(
            reactor, config.amqp, sub.session_up, sub.connection_failed, self._on_fatal, backoff=backoff
        )
        self.connector.explain_loss = sub.explain_loss
        self._drained: Deferred[None] | None = None
        self._skip_wait: Deferred[None] | None = None
        self.halt_code: int | None = None
        state.broker = self.connector.target
        state.watch_single_active(single_active_queues(config))

    # --- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        warn_quorum_without_dead_letter(self.config)
        self.dispatcher.start()
        self.connector.startService()
        self.subscription.start()
        self.ack_timeouts.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return defer.ensureDeferred(self._shutdown())

    def skip_drain(self) -> None:
        """Second signal: stop waiting for in-flight callbacks."""
        if self._skip_wait is not None and not self._skip_wait.called:
            log.warn("second stop request: not waiting for {n} in-flight deliveries", n=len(self.inflight))
            self._skip_wait.callback(None)

    async def _shutdown(self) -> None:
        self.ack_timeouts.stop()
        self.subscription.stop_recovering()
        self.state.set_flag("draining", True)
        self._skip_wait = Deferred()
        await self.subscription.cancel_consumers()
        for d in self.dispatcher.take_pending():
            self.settler.not_run(d)
        self.quarantine.stop()
        timed_out = False
        if not self._drained_now():
            timeout = self.config.consumer.drain_timeout
            log.info(
                "draining: waiting up to {t:g} s for {n} in-flight deliveries ({b} running)",
                t=timeout,
                n=len(self.inflight),
                b=self.dispatcher.busy,
            )
            self._drained = Deferred()
            await first(self._reactor, [self._drained, self._skip_wait], timeout)
            if not self._drained_now():
                timed_out = True
                log.warn(
                    "drain ended with {n} deliveries unfinished; the broker requeues them", n=len(self.inflight)
                )
        self.settler.flush_acks()
        await self.connector.close()
        self.state.set_connection("closed", "stopped")
        self.dispatcher.stop(join=not timed_out)

    def halt(self, code: int) -> None:
        if self.halt_code is None:
            self.halt_code = code
            self.state.set_flag("halted", True)
            self._on_halt(code)

    def _settled(self) -> None:
        """After each delivery leaves the registry."""
        if self._drained is not None:
            self._check_drained()
        if self.subscription.waiting:
            self.subscription.resume_when_ready()

    def _drained_now(self) -> bool:
        """Nothing in flight and no callback running, not even one whose channel is gone."""
        return not len(self.inflight) and not self.dispatcher.busy

    def _check_drained(self) -> None:
        if self._drained is not None and not self._drained.called and self._drained_now():
            self._drained.callback(None)

    def _has_dead_letter(self, label: str) -> bool:
        configured = configured_name(label)
        return any(q.name == configured and "x-dead-letter-exchange" in q.arguments for q in self.config.queues)
