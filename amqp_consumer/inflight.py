"""The in-flight registry and the settler: the only place that decides what the broker hears about a delivery.

Every ack, nack and reject is sent from here, on the reactor thread, on the
channel the delivery came from. A delivery whose channel has closed is never
acked: the broker has already put it back in its queue. Acks are gathered for
one reactor turn and sent with multiple=True where no unsettled tag lies below.
"""

from __future__ import annotations

from time import monotonic
from typing import Any, Callable, Iterator, Protocol, Sequence, assert_never

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from amqp_consumer.connection import Channel
from amqp_consumer.message import Message
from amqp_consumer.metricdefs import METRICS
from amqp_consumer.metrics import Metrics
from amqp_consumer.outcomes import NOT_RUN, Ack, Halt, NotRun, Outcome, Quarantine, Reject, Requeue, RetryAfter

log = Logger(namespace="amqp_consumer.consumer")


class Delivery:
    __slots__ = (
        "channel", "tag", "message", "label", "received", "started", "finished", "withdrawn", "taken_back", "warned",
    )

    def __init__(self, channel: Channel, tag: int, message: Message, label: str) -> None:
        self.channel = channel
        self.tag = tag
        self.message = message
        self.label = label
        self.received = monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.withdrawn = False  # taken from the dispatcher before it started (see Dispatcher.withdraw)
        self.taken_back = False  # the broker returned it to its queue (ack timeout): its result is not sent
        self.warned = False  # the 75 % ack-timeout warning covered it


class InFlight:
    """Deliveries received and not yet settled, per channel, in delivery-tag order."""

    def __init__(self) -> None:
        self._by_channel: dict[Channel, dict[int, Delivery]] = {}

    def add(self, d: Delivery) -> None:
        by_tag = self._by_channel.get(d.channel)
        if by_tag is None:
            by_tag = self._by_channel[d.channel] = {}
        by_tag[d.tag] = d

    def remove(self, d: Delivery) -> bool:
        by_tag = self._by_channel.get(d.channel)
        return by_tag is not None and by_tag.pop(d.tag, None) is not None

    def drop_channel(self, channel: Channel) -> int:
        """Forget a closed channel and what it held: the broker has requeued those
        deliveries, so they are no longer in flight here (a callback still running
        on one is the dispatcher's to count). Returns how many there were."""
        by_tag = self._by_channel.pop(channel, None)
        return len(by_tag) if by_tag else 0

    def __contains__(self, d: Delivery) -> bool:
        return self._by_channel.get(d.channel, {}).get(d.tag) is d

    def lowest_tag(self, channel: Channel) -> int | None:
        by_tag = self._by_channel.get(channel)
        return next(iter(by_tag), None) if by_tag else None

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_channel.values())

    def held(self, channel: Channel, label: str | None = None) -> list[Delivery]:
        """The unsettled deliveries of one channel (and queue), oldest first."""
        return [d for d in self._by_channel.get(channel, {}).values() if label is None or d.label == label]

    def __iter__(self) -> Iterator[Delivery]:
        for by_tag in list(self._by_channel.values()):
            yield from list(by_tag.values())

    def oldest_age(self) -> float:
        firsts = [next(iter(v.values())).received for v in self._by_channel.values() if v]
        return monotonic() - min(firsts) if firsts else 0.0

    def snapshot(self) -> list[dict[str, Any]]:
        now = monotonic()
        out = []
        for by_tag in self._by_channel.values():
            for d in by_tag.values():
                out.append(
                    {
                        "queue": d.label,
                        "message_id": d.message.id,
                        "routing_key": d.message.routing_key,
                        "delivery_tag": d.tag,
                        "age_seconds": round(now - d.received, 3),
                        "running_seconds": None if d.started is None or d.finished is not None else round(now - d.started, 3),
                        "channel_open": d.channel.is_open,
                    }
                )
        return sorted(out, key=lambda r: -r["age_seconds"])


class FailurePolicy(Protocol):
    """What happens to a message the daemon cannot handle (today: quarantine.Quarantine).

    The seam for the retry feature: a RetryAfter outcome goes here too (retry),
    and the policy decides between a delay queue and quarantine. It settles the
    original through the Settler's ack/requeue/reject/forget, never on the
    channel itself.
    """

    owed: Any  # truthy while some redelivered original's handling is still owed

    def submit(self, d: Delivery, error: BaseException, detail: str) -> None: ...
    def retry(self, d: Delivery, outcome: RetryAfter) -> None: ...
    def redelivered(self, d: Delivery) -> bool: ...
    def stop(self) -> None: ...


class Settler:
    """Turns outcomes into acks, nacks and rejects (or hands them to the failure policy).

    ``on_settled`` runs after each delivery leaves the registry (the consumer checks
    its drain and the subscription its waiting queues there); ``on_halt`` gets the
    exit code a HaltConsumer asked for; ``is_running`` says whether the consumer
    still runs. ``failures`` is wired in by the assembly (the policy settles through
    this object, so neither can be built with the other).
    """

    failures: FailurePolicy

    def __init__(
        self,
        reactor: IReactorTime,
        inflight: InFlight,
        metrics: Metrics,
        on_halt: Callable[[int], None],
        on_settled: Callable[[], None],
        is_running: Callable[[], bool],
    ) -> None:
        self._reactor = reactor
        self.inflight = inflight
        self.metrics = metrics
        self._on_halt = on_halt
        self._on_settled = on_settled
        self._is_running = is_running
        self._acks: dict[Channel, list[int]] = {}
        self._ack_scheduled = False

    @property
    def running(self) -> bool:
        return self._is_running()

    def results(self, batch: Sequence[Delivery], results: Sequence[Outcome]) -> None:
        """The dispatcher's report, on the reactor thread: one outcome per delivery."""
        observe = self.metrics.duration.observe
        for d, result in zip(batch, results):
            if d.finished is not None and d.started is not None:
                observe(d.finished - d.started)
            try:
                self.settle(d, result)
            except Exception:
                self._settle_failed(d, result)

    def _settle_failed(self, d: Delivery, result: Outcome) -> None:
        """A bug while settling one delivery: say so, requeue it, and go on with the others."""
        log.failure(
            "settling message {message_id} ({outcome}) failed; it goes back to its queue",
            message_id=d.message.id or f"tag:{d.tag}",
            outcome=result.kind,
        )
        if d not in self.inflight:
            return  # it was settled before the failure
        try:
            self.requeue(d)
        except Exception:
            log.failure("requeueing message {message_id} failed too", message_id=d.message.id or f"tag:{d.tag}")
            self.forget(d)

    def settle(self, d: Delivery, outcome: Outcome) -> None:
        """The one place an outcome becomes what the broker hears."""
        if d.taken_back and type(outcome) is not Halt:  # no copy to quarantine either: it runs again
            self._send(d, None, None)
            return
        match outcome:
            case Ack():
                self.ack(d)
            case Requeue():
                self.requeue(d)
            case Reject():
                self.reject(d)
            case NotRun():
                self._send(d, None, True)
            case Halt(exit_code=code, requeue=requeue):
                if requeue:
                    self.requeue(d)
                else:
                    self.ack(d)
                log.warn(
                    "the callback asked to halt (exit code {code}) on message {message_id}",
                    code=code,
                    message_id=d.message.id,
                )
                self._on_halt(code)
            case Quarantine(error=error, detail=detail):
                self.failures.submit(d, error, detail)
            case RetryAfter():
                self.failures.retry(d, outcome)
            case _:
                assert_never(outcome)

    def not_run(self, d: Delivery) -> None:
        self.settle(d, NOT_RUN)

    # --- what the failure policy (and settle) send -----------------------------------

    def ack(self, d: Delivery) -> None:
        """Acks are gathered for one reactor turn, then sent with multiple=True where the tags allow."""
        ch = d.channel
        if d.taken_back and ch.is_open:
            self._give_back(d)
        elif ch.is_open:
            tags = self._acks.get(ch)
            if tags is None:
                tags = self._acks[ch] = []
            tags.append(d.tag)
            self.metrics.counters["acked"][d.label] += 1
            if not self._ack_scheduled:
                self._ack_scheduled = True
                self._reactor.callLater(0, self.flush_acks)
        self.forget(d)

    def requeue(self, d: Delivery) -> None:
        self._send(d, "requeued", True)

    def reject(self, d: Delivery) -> None:
        self._send(d, "rejected", False)

    def forget(self, d: Delivery) -> None:
        """Out of the registry with nothing (more) to send: a closed channel's delivery is back in its queue."""
        self.inflight.remove(d)
        self._on_settled()

    def _send(self, d: Delivery, counted: str | None, requeue: bool | None) -> None:
        """nack (requeue True), reject (False) or nothing (None); counted names the metric."""
        ch = d.channel
        if not ch.is_open:
            log.debug("delivery {tag} came from a closed channel; the broker has requeued it", tag=d.tag)
        elif d.taken_back:
            self._give_back(d)
        elif requeue is not None:
            if requeue:
                ch.nack(d.tag, requeue=True)
            else:
                ch.reject(d.tag, requeue=False)
            if counted:
                self.metrics.counters[counted][d.label] += 1
        self.forget(d)

    def _give_back(self, d: Delivery) -> None:
        """The broker took this delivery back at its ack timeout, so its result no longer counts.

        A nack for it is ignored by RabbitMQ 4.3 (no channel error), and returns it should it
        still be held after all; either way a later multiple ack never covers it.
        """
        if d.started is not None:
            log.info(
                "message {message_id} from {queue!r} finished after the broker took it back (consumer ack "
                "timeout): its result is dropped and it runs again",
                message_id=d.message.id or f"tag:{d.tag}",
                queue=d.label,
            )
        d.channel.nack(d.tag, requeue=True)

    def flush_acks(self) -> None:
        self._ack_scheduled = False
        acks, self._acks = self._acks, {}
        for ch, tags in acks.items():
            if not ch.is_open:
                continue
            low = self.inflight.lowest_tag(ch)
            if low is None:
                ch.ack(max(tags), multiple=True)
                continue
            below = [t for t in tags if t < low]
            if below:
                ch.ack(max(below), multiple=True)
            for t in tags:
                if t > low:
                    ch.ack(t)

    def drop_channel(self, ch: Channel) -> None:
        """A closed channel: its pending acks can no longer be sent (the broker requeued those deliveries)."""
        self._acks.pop(ch, None)
        self.inflight.drop_channel(ch)

    def disconnected(self) -> None:
        """The connection went: every channel's close listener has dropped its deliveries."""
        self._acks.clear()


# --- the figures owned here, for /metrics (read from the status snapshot at scrape time) ----

INFLIGHT = METRICS.gauge(
    "amqp_consumer_inflight", "Deliveries received and not yet settled", value=lambda s: float(s.inflight.count)
)
OLDEST_INFLIGHT = METRICS.gauge(
    "amqp_consumer_oldest_inflight_seconds",
    "Age of the oldest unsettled delivery",
    value=lambda s: s.inflight.oldest_seconds,
)
