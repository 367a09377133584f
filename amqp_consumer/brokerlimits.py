"""The broker's limits on a delivery: how long it may stay unacknowledged, how often it may come back.

Consumer ack timeout (``consumer_timeout``, default 30 minutes; per queue since
RabbitMQ 3.12 with the ``x-consumer-timeout`` argument or a policy). What the
broker does when a delivery reaches it, as seen with RabbitMQ 3.10.8 and 4.3.6:

- 3.x, and classic queues: the channel is closed with 406 PRECONDITION_FAILED
  "delivery acknowledgement on channel N timed out"; everything unacknowledged
  on it goes back to the queue. 3.10 checks once per ``channel_tick_interval``
  (a minute by default), so the close comes up to a minute late.
- 4.3 quorum queues (only those enforce it on 4.3): the broker returns the
  delivery that timed out to its queue (``x-acquired-count`` goes up,
  ``x-delivery-count`` does not) and sends ``basic.cancel`` for its consumer,
  leaving the channel open. The consumer's other deliveries stay with it; each
  is returned, with another ``basic.cancel``, when it reaches the limit in turn.
  Settling one of them before that still works; a late ack or nack for one the
  broker has returned is ignored, with no channel error.
- 4.3 keeps the cancelled consumer (``rabbitmqctl list_consumers``) until the
  client answers with its own ``basic.cancel``, and counts it in the queue's
  consumer count until it also holds no unsettled delivery. Once answered, a
  delivery it still holds that reaches the limit closes the whole channel with
  406 ("Timeout value used: -1 ms").

Delivery limit: a quorum queue returns a message at most ``x-delivery-limit``
times (20 by default since RabbitMQ 4.0); then it is dead-lettered, or dropped
without a trace when the queue has no dead-letter exchange.
"""

from __future__ import annotations

import re
from time import monotonic
from typing import Any, Callable, Iterable, Protocol

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from amqp_consumer.config import Config
from amqp_consumer.message import Message
from amqp_consumer.metricdefs import METRICS

log = Logger(namespace="amqp_consumer.brokerlimits")

DEFAULT_ACK_TIMEOUT = 1800.0  # RabbitMQ's consumer_timeout default
WARN_AT = 0.75  # of the ack timeout: time left to notice and act before the broker does

_TIMEOUT_CLOSE = re.compile(r"delivery acknowledge?ment on channel \d+ timed out", re.IGNORECASE)
_TIMEOUT_USED = re.compile(r"Timeout value used: (-?\d+) ms")


def ack_timeouts(config: Config) -> dict[str, float]:
    """Seconds before the broker takes a delivery back, per consumed queue (configured names).

    ``[consumer] ack_timeout`` when set; else the queue's declared
    ``x-consumer-timeout`` (milliseconds); else RabbitMQ's default.
    """
    if config.consumer.ack_timeout > 0:
        return {q: config.consumer.ack_timeout for q in config.consumed_queues}
    declared = {q.name: q.arguments.get("x-consumer-timeout") for q in config.queues}
    out = {}
    for q in config.consumed_queues:
        ms = declared.get(q)
        out[q] = ms / 1000.0 if isinstance(ms, int) and not isinstance(ms, bool) and ms > 0 else DEFAULT_ACK_TIMEOUT
    return out


def is_ack_timeout_close(code: int, text: str) -> bool:
    """Whether a channel close is the broker's consumer ack timeout."""
    return code == 406 and _TIMEOUT_CLOSE.search(text) is not None


def limit_in_close(text: str) -> float | None:
    """The limit the broker says it applied ("Timeout value used: 5000 ms"), in seconds; None when
    it does not say (4.3 says -1 for a consumer that was already cancelled)."""
    m = _TIMEOUT_USED.search(text)
    return int(m.group(1)) / 1000.0 if m and int(m.group(1)) > 0 else None


def near_limit(age: float, limit: float) -> bool:
    """Whether a delivery this old may have reached the limit: the broker starts its
    clock when it sends, a little before we receive, so allow for that lag."""
    return age >= limit - max(1.0, 0.05 * limit)


def warn_quorum_without_dead_letter(config: Config) -> None:
    """Once at start: a quorum queue without a dead-letter exchange drops messages silently."""
    for q in config.queues:
        args = q.arguments
        if str(args.get("x-queue-type", "")).lower() != "quorum" or args.get("x-dead-letter-exchange") is not None:
            continue
        limit = args.get("x-delivery-limit")
        log.warn(
            "queue {queue!r} is a quorum queue without a dead-letter exchange: the broker drops a message "
            "without a trace once it has been returned {limit}; add \"x-dead-letter-exchange\" (and a queue "
            "bound to that exchange) to its arguments, or set a dead-letter policy on it",
            queue=q.name or "(server-named)",
            limit=f"{limit} times (x-delivery-limit)" if limit is not None else "20 times (the default delivery limit since RabbitMQ 4.0)",
        )


class Watched(Protocol):
    """What the watch reads of an in-flight delivery; ``received`` is on the watch's ``now`` clock."""

    label: str
    received: float
    message: Message
    warned: bool


class AckTimeoutWatch:
    """Warns once per delivery at 75 % of its queue's ack timeout, and reports the one nearest it.

    ``deliveries()`` yields the deliveries in flight; ``limits`` maps queue
    labels to seconds.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        limits: dict[str, float],
        deliveries: Callable[[], Iterable[Watched]],
        now: Callable[[], float] = monotonic,
    ) -> None:
        self.limits = limits
        self._deliveries = deliveries
        self._now = now
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        # Often enough to warn well before the limit; never a busy loop.
        self.interval = min(5.0, max(0.1, min(limits.values(), default=DEFAULT_ACK_TIMEOUT) / 40))

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def limit(self, label: str) -> float:
        return self.limits.get(label, DEFAULT_ACK_TIMEOUT)

    def check(self) -> None:
        """One line per queue for the deliveries that newly passed 75 % of the limit, naming the oldest."""
        now = self._now()
        crossed: dict[str, list[Watched]] = {}
        for d in self._deliveries():
            if not d.warned and now - d.received >= WARN_AT * self.limit(d.label):
                d.warned = True
                crossed.setdefault(d.label, []).append(d)
        for label, ds in crossed.items():
            oldest = min(ds, key=lambda d: d.received)
            limit = self.limit(label)
            log.warn(
                "{n} deliveries from {queue!r} have waited over 75 % of the consumer ack timeout ({limit:g} s), "
                "the oldest (message {message_id}) {age:.0f} s: unless settled within {left:.0f} s the broker "
                "takes them back and they run again",
                n=len(ds),
                queue=label,
                limit=limit,
                message_id=oldest.message.id or "-",
                age=now - oldest.received,
                left=max(0.0, limit - (now - oldest.received)),
            )

    def nearest(self) -> dict[str, Any] | None:
        """The in-flight delivery closest to its queue's ack timeout, for /status."""
        now = self._now()
        best: Watched | None = None
        best_used = -1.0
        for d in self._deliveries():
            used = (now - d.received) / self.limit(d.label)
            if used > best_used:
                best, best_used = d, used
        if best is None:
            return None
        return {
            "queue": best.label,
            "message_id": best.message.id,
            "age_seconds": round(now - best.received, 3),
            "limit_seconds": self.limit(best.label),
            "percent": round(100 * best_used, 1),
        }


# --- the figure owned here, for /metrics (read from the status snapshot at scrape time) -----

ACK_TIMEOUTS = METRICS.counter(
    "amqp_consumer_ack_timeouts_total",
    "Times the broker took deliveries back because they stayed unacknowledged past its consumer timeout",
    labels=("queue",),
    series=lambda s: [((queue,), float(n)) for queue, n in s.counters.ack_timeouts.items()],
)
