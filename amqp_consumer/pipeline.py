"""One message's path, socket to ack, and the handler pipeline's stages.

Read top to bottom, a delivery goes through these hops:

1. **connection.py** (pika, reactor thread): the frames of a basic.deliver become
   ``Channel.consume``'s ``on_delivery(channel, tag, Message)``. The body stays raw
   bytes: decoding costs time the reactor should not spend.
2. **subscription.py** made that ``on_delivery`` with ``Pipeline.on_delivery(label)``
   when it consumed the queue (one per queue, so the label is bound once, not looked
   up per message).
3. **Pipeline.on_delivery** (below): registers the delivery in flight (inflight.py),
   counts it, and, if it is a redelivered original whose quarantine is owed, hands
   it to the failure policy without running the callback; otherwise it goes to
4. **dispatch.Dispatcher.submit**: queued, then handed over at the next reactor turn
   (``callLater(0)``) so every delivery of a read is taken in one batch: one thread
   hop per batch, not per message (sync callbacks), or run as a coroutine on the
   reactor (async callbacks).
5. **the stages before the callback**, composed once by ``before_callback``: today
   ``decode`` (on the worker thread, off the reactor). Later: deduplication, schema
   validation, choosing one of several handlers. Each is a plain function of the
   Message that raises to say "do not run the callback" (the raise becomes an
   outcome like any other).
6. **the callback**; what it returns or raises becomes an outcome value
   (outcomes.py) via ``dispatch.classify``.
7. **back on the reactor thread** (``deferToThreadPool``'s result, or the
   coroutine's end): ``inflight.Settler.results`` -> ``Settler.settle``, the one
   ``match`` over outcomes and the one place deciding what the broker hears. The
   stages after the callback belong there: a reply or a publish awaiting its
   confirm becomes an outcome whose case publishes and then acks; a failure goes
   to the failure policy (quarantine.py; the retry feature extends it).
8. **acks** are gathered for one reactor turn (``callLater(0)``) and sent as one
   multiple ack where no unsettled tag lies below; nacks and rejects go at once.
"""

from __future__ import annotations

from time import time
from typing import Any, Callable, Protocol, Sequence

from amqp_consumer.connection import Channel
from amqp_consumer.inflight import Delivery, FailurePolicy, InFlight
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.state import State

Stage = Callable[[Message], None]


class Runner(Protocol):
    """What runs the callback (dispatch.Dispatcher)."""

    def submit(self, delivery: Delivery) -> None: ...


def decode(message: Message) -> None:
    """Parse the body (and unreadable properties): a failure here quarantines the message."""
    message.decode()


BEFORE_CALLBACK: tuple[Stage, ...] = (decode,)


def before_callback(stages: Sequence[Stage], callback: Callable[[Message], Any]) -> Callable[[Message], Any]:
    """The stages, then the callback, as one function: built once, so a message pays one call per stage."""
    if tuple(stages) == (decode,):  # today's pipeline, without a loop per message

        def run(message: Message) -> Any:
            message.decode()
            return callback(message)

        return run
    chain = tuple(stages)

    def run_all(message: Message) -> Any:
        for stage in chain:
            stage(message)
        return callback(message)

    return run_all


class Pipeline:
    """Where a delivery enters: registered, counted, then to the dispatcher (or to the failure policy)."""

    def __init__(
        self,
        inflight: InFlight,
        metrics: Metrics,
        state: State,
        failures: FailurePolicy,
        runner: Runner,
    ) -> None:
        self._inflight = inflight
        self._metrics = metrics
        self._state = state
        self._failures = failures
        self._runner = runner

    def on_delivery(self, label: str) -> Callable[[Channel, int, Message], None]:
        """The hot path for one queue: local names only, no lookups per message."""
        received = self._metrics.counters["received"]
        add = self._inflight.add
        submit = self._runner.submit
        state = self._state
        failures = self._failures
        owed = failures.owed

        def on_delivery(channel: Channel, tag: int, message: Message) -> None:
            d = Delivery(channel, tag, message, label)
            add(d)
            received[label] += 1
            state.last_delivery = time()
            if message.redelivered and owed and failures.redelivered(d):
                return  # its callback failed before; only its quarantine was left to do
            submit(d)

        return on_delivery
