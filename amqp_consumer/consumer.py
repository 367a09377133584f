"""The consumer: lifecycle and drain of the parts that do the work.

The parts are built and wired by the assembly (tap.assemble_consumer) and
passed in; this module builds none of them. A message's path from socket to ack is told in pipeline.py. The parts, each
in a module named for its concern: the subscription (subscription.py: channel,
declare, QoS, consume, recovery), the callback runner (dispatch.py), the
in-flight registry and the settler (inflight.py: the only place deciding what
the broker hears), the failure policy (quarantine.py) and the ack-timeout
watch (brokerlimits.py). The connection (connection.py) and the subscription
share one backoff.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from amqp_consumer.brokerlimits import AckTimeoutWatch, warn_quorum_without_dead_letter
from amqp_consumer.config import Config
from amqp_consumer.connection import Connector
from amqp_consumer.deferreds import first
from amqp_consumer.dispatch import Dispatcher
from amqp_consumer.inflight import FailurePolicy, InFlight, Settler
from amqp_consumer.pipeline import Pipeline
from amqp_consumer.publisher import Publisher
from amqp_consumer.state import State
from amqp_consumer.subscription import Subscription, configured_name, queue_label

log = Logger(namespace="amqp_consumer.consumer")

__all__ = ["Consumer", "has_dead_letter", "queue_label", "single_active_queues"]


def single_active_queues(config: Config) -> list[str]:
    """Consumed queues declared with x-single-active-consumer (one consumer gets deliveries, the rest wait)."""
    declared = {q.name: q for q in config.queues}
    return [
        q for q in config.consumed_queues if q in declared and declared[q].arguments.get("x-single-active-consumer") is True
    ]


def has_dead_letter(config: Config, label: str) -> bool:
    """Whether the queue behind a label is declared with a dead-letter exchange (the quarantine asks)."""
    configured = configured_name(label)
    return any(q.name == configured and "x-dead-letter-exchange" in q.arguments for q in config.queues)


class Consumer(Service):
    """Starts the parts that consume, and on stop cancels, drains, flushes and closes them in order.

    Every part is built by the assembly (tap.py) and passed in; the settler and
    the subscription report back through ``halt``, ``settled``, ``check_drained``
    and ``is_running``. The parts are kept as attributes for the operator's shell.
    """

    name = "consumer"

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        state: State,
        *,
        inflight: InFlight,
        settler: Settler,
        dispatcher: Dispatcher,
        quarantine: FailurePolicy,
        pipeline: Pipeline,
        publisher: Publisher,
        subscription: Subscription,
        connector: Connector,
        ack_timeouts: AckTimeoutWatch,
        on_halt: Callable[[int], None],
    ) -> None:
        self._reactor = reactor
        self.config = config
        self.state = state
        self.inflight = inflight
        self.settler = settler
        self.dispatcher = dispatcher
        self.quarantine = quarantine
        self.pipeline = pipeline
        self.publisher = publisher
        self.subscription = subscription
        self.connector = connector
        self.ack_timeouts = ack_timeouts
        self._on_halt = on_halt
        self._drained: Deferred[None] | None = None
        self._skip_wait: Deferred[None] | None = None
        self.halt_code: int | None = None

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

    def is_running(self) -> bool:
        return bool(self.running)

    def halt(self, code: int) -> None:
        """A callback asked to stop the daemon with this exit code (HaltConsumer); the first code wins."""
        if self.halt_code is None:
            self.halt_code = code
            self.state.set_flag("halted", True)
            self._on_halt(code)

    def settled(self) -> None:
        """After each delivery leaves the registry (the settler calls it)."""
        if self._drained is not None:
            self.check_drained()
        if self.subscription.waiting:
            self.subscription.resume_when_ready()

    def _drained_now(self) -> bool:
        """Nothing in flight and no callback running, not even one whose channel is gone."""
        return not len(self.inflight) and not self.dispatcher.busy

    def check_drained(self) -> None:
        """The drain ends once nothing is in flight and no callback runs."""
        if self._drained is not None and not self._drained.called and self._drained_now():
            self._drained.callback(None)
