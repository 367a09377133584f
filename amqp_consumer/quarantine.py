"""Quarantine: a copy of a message the daemon cannot handle, confirmed by the broker before the original is acked.

Two promises live here. The copy always encodes and fits in one frame: texts are
made safe, headers pika cannot send are moved into a text summary and the copy is
cut to the connection's frame size, because a copy that can never be published
would otherwise be retried forever (and one too big for a frame makes the broker
close the whole connection). And a copy that still cannot be published never
runs the callback again: only the publish is retried, a bounded number of times;
then the original goes to its queue's dead-letter exchange, or back to its queue
with a loud error, remembered so that its redelivery goes straight to quarantine.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from amqp_consumer.connection import (
    Channel,
    PublishFailed,
    Unroutable,
    header_fault,
    header_size,
    properties_size,
    quarantine_queue,
)
from amqp_consumer.inflight import Delivery
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.outcomes import RetryAfter
from amqp_consumer.publisher import Publisher

log = Logger(namespace="amqp_consumer.consumer")

ERROR_TEXT_LIMIT = 2000  # characters of the error text kept in the copy's header
SUMMARY_LIMIT = 2000  # characters of the summary of headers the copy could not carry
PUBLISH_TIMEOUT = 30.0  # one try, from the publish to the broker's confirm
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # between tries: five tries in about 15 s
REMEMBERED = 10_000  # originals handed back to their queue whose quarantine is still owed

PREFIX = "amqp-consumer-"


# --- describing errors -------------------------------------------------------------


def describe(error: BaseException) -> str:
    """The error's text; never fails, whatever its __str__ does."""
    name = type(error).__name__
    try:
        return str(error)
    except BaseException:  # noqa: BLE001 - user code: anything can come out of __str__
        pass
    try:
        return f"({name}.__str__ failed) {error!r}"
    except BaseException:  # noqa: BLE001
        return f"({name}.__str__ and __repr__ failed)"


def safe_text(text: str, limit: int) -> str:
    """Text that encodes as UTF-8 (lone surrogates escaped), at most limit characters."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(text) > limit:
            text = text[: limit - 3] + "..."
    return text


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except BaseException:  # noqa: BLE001
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


# --- the copy ------------------------------------------------------------------------


def copy_properties(
    message: Message,
    error_name: str,
    error_text: str,
    *,
    limit: int,
    own_user: str | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The original's properties for its quarantined copy, plus the amqp-consumer-* headers.

    Every property is kept, except that ``expiration`` moves into a header (a
    quarantined copy must not expire) and ``user_id`` does too unless it is the
    user we logged in as (the broker refuses a publish claiming another user).
    The copy is always persistent. The result encodes in at most ``limit`` bytes.
    """
    props: dict[str, Any] = {"delivery_mode": 2}
    for attr, theirs in (
        ("content_type", "content_type"),
        ("content_encoding", "content_encoding"),
        ("priority", "priority"),
        ("correlation_id", "correlation_id"),
        ("reply_to", "reply_to"),
        ("id", "message_id"),
        ("amqp_timestamp", "timestamp"),
        ("type", "type"),
        ("app_id", "app_id"),
        ("cluster_id", "cluster_id"),
    ):
        value = getattr(message, attr)
        if value is not None:
            props[theirs] = value
    ours: dict[str, Any] = {
        PREFIX + "exception": safe_text(error_name, 255),
        PREFIX + "error": safe_text(error_text, ERROR_TEXT_LIMIT),
        PREFIX + "quarantined-at": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        PREFIX + "queue": message.queue,
        PREFIX + "exchange": message.exchange,
        PREFIX + "routing-key": message.routing_key,
    }
    if message.expiration is not None:
        ours[PREFIX + "expiration"] = message.expiration
    if message.user_id is not None:
        if message.user_id == own_user:
            props["user_id"] = message.user_id
        else:
            ours[PREFIX + "user-id"] = message.user_id

    kept: dict[Any, Any] = {}
    dropped: list[str] = []
    for key, value in message.headers.items():
        if isinstance(key, str) and key.startswith(PREFIX) and key in ours:
            continue  # a copy of a copy: ours win
        why = header_fault(key, value)
        if why is None:
            kept[key] = value
        else:
            dropped.append(f"{_shown(key)}={_shown(value)} ({why})")

    def assemble() -> dict[str, Any]:
        headers = dict(kept)
        headers.update(ours)
        if dropped:
            headers[PREFIX + "dropped-headers"] = safe_text("; ".join(dropped), SUMMARY_LIMIT)
        return {**props, "headers": headers}

    copy = assemble()
    size = properties_size(copy)
    if size <= limit:
        return copy
    # Too big for one frame: the original's biggest headers go first, then our texts shrink.
    for key in sorted(kept, key=lambda k: header_size(k, kept[k]), reverse=True):
        dropped.append(f"{_shown(key)} ({header_size(key, kept[key])} bytes: too big for the frame)")
        del kept[key]
        copy = assemble()
        if properties_size(copy) <= limit:
            return copy
    for short in (200, 0):
        ours[PREFIX + "error"] = safe_text(error_text, short) if short else ""
        dropped[:] = [safe_text("; ".join(dropped), short)] if short else []
        copy = assemble()
        if properties_size(copy) <= limit:
            return copy
    return copy  # still too big: Channel.publish refuses it and the copy counts as failed


# --- publishing it, settling the original --------------------------------------------


class Settle(Protocol):
    """What the consumer does with an original once its copy is safe, or cannot be made so."""

    @property
    def running(self) -> bool: ...

    def ack(self, d: Delivery) -> None: ...
    def requeue(self, d: Delivery) -> None: ...
    def reject(self, d: Delivery) -> None: ...
    def forget(self, d: Delivery) -> None: ...


class _Copy:
    """One publish of a copy; any number of observers learn its outcome (None: confirmed)."""

    __slots__ = ("done", "error", "_observers")

    def __init__(self, publishing: Deferred[None]) -> None:
        self.done = False
        self.error: BaseException | None = None
        self._observers: list[Callable[[BaseException | None], None]] = []
        publishing.addBoth(self._fire)

    def _fire(self, result: Failure | None) -> None:
        self.done = True
        self.error = result.value if isinstance(result, Failure) else None
        observers, self._observers = self._observers, []
        for observe in observers:
            observe(self.error)

    def observe(self, fn: Callable[[BaseException | None], None]) -> None:
        if self.done:
            fn(self.error)
        else:
            self._observers.append(fn)


class _Owed:
    """An original handed back to its queue before its copy was confirmed: its quarantine is owed."""

    __slots__ = ("error_name", "error_text", "copy", "copied")

    def __init__(self, error_name: str, error_text: str, copy: _Copy | None) -> None:
        self.error_name = error_name
        self.error_text = error_text
        self.copy = copy  # a publish still waiting for its confirm
        self.copied = False
        if copy is not None:
            copy.observe(self._settled)

    def _settled(self, error: BaseException | None) -> None:
        self.copy = None
        self.copied = error is None


class _Job:
    __slots__ = ("d", "error_name", "error_text", "tries", "copy", "timer")

    def __init__(self, d: Delivery, error_name: str, error_text: str) -> None:
        self.d = d
        self.error_name = error_name
        self.error_text = error_text
        self.tries = 0
        self.copy: _Copy | None = None  # the publish this job waits on
        self.timer: IDelayedCall | None = None  # its confirm deadline, or its next try

    def cancel_timer(self) -> bool:
        """Cancel the pending deadline or try; False when none was pending."""
        timer, self.timer = self.timer, None
        if timer is None or not timer.active():
            return False
        timer.cancel()
        return True


# (queue label, message id, exchange, routing key, body length, body hash)
Fingerprint = tuple[str, str | None, str, str, int, int]


def fingerprint(label: str, message: Message) -> Fingerprint:
    """Recognises a redelivered original: its delivery tag changes, its content does not."""
    return (label, message.id, message.exchange, message.routing_key, len(message.raw_body), hash(message.raw_body))


class NoRetryPolicy(Exception):
    """A retry was asked for, but no retry policy is configured: the reason a copy was quarantined."""


class Quarantine:
    """Publishes copies with confirms and settles their originals; remembers the originals it hands back."""

    def __init__(
        self,
        reactor: IReactorTime,
        publisher: Publisher,
        metrics: Metrics,
        settle: Settle,
        has_dead_letter: Callable[[str], bool],
    ) -> None:
        self._reactor = reactor
        self._publisher = publisher
        self._metrics = metrics
        self._settle = settle
        self._has_dead_letter = has_dead_letter
        self.owed: OrderedDict[Fingerprint, _Owed] = OrderedDict()
        self._retrying: set[_Job] = set()

    def submit(self, d: Delivery, error: BaseException, detail: str) -> None:
        """Quarantine d's message: its callback raised error (detail: the traceback or reason)."""
        msg = d.message
        log.error(
            "message {message_id} from {queue!r} goes to quarantine: {detail}",
            message_id=_id(d),
            queue=msg.queue,
            detail=detail,
        )
        self._try(_Job(d, type(error).__name__, describe(error)))

    def retry(self, d: Delivery, outcome: RetryAfter) -> None:
        """A retry after a delay, with no delay queue to hold the message meanwhile: quarantine it.

        Of what this policy can do, only quarantine loses nothing and cannot
        loop: a requeue would bring the message straight back with no delay
        (a hot loop on the same failure), an ack or a reject would lose it.
        The copy's headers say a retry was asked for and why, so an operator
        can shovel it back once the cause is fixed. No callback can ask for a
        retry yet: the retry feature brings both the way to ask and a policy
        that holds the message for the delay.
        """
        error = NoRetryPolicy(
            f"retry requested in {outcome.delay:g} s ({outcome.reason or 'no reason given'}), "
            "but no retry policy is configured"
        )
        self.submit(d, error, str(error))

    def redelivered(self, d: Delivery) -> bool:
        """Take over a redelivered original whose quarantine is owed; False if it is not one."""
        owed = self.owed.pop(fingerprint(d.label, d.message), None)
        if owed is None:
            return False
        job = _Job(d, owed.error_name, owed.error_text)
        if owed.copied:
            log.info("message {message_id}: its quarantine copy was confirmed late; acking the original", message_id=_id(d))
            self._copied(job)
        elif owed.copy is not None:
            log.warn("message {message_id} is back while its quarantine copy waits for a confirm", message_id=_id(d))
            self._wait(job, owed.copy)
        else:
            log.warn(
                "message {message_id} is back after its quarantine failed; quarantining it without running the callback",
                message_id=_id(d),
            )
            self._try(job)
        return True

    def stop(self) -> None:
        """Stopping: retries due later run now, and hand their originals back instead of publishing."""
        retrying, self._retrying = self._retrying, set()
        for job in retrying:
            if job.cancel_timer():
                self._try(job)

    # --- one try ---

    def _try(self, job: _Job) -> None:
        if not self._settle.running or not job.d.channel.is_open:
            self._hand_back(job, None)
            return
        job.tries += 1
        self._wait(job, _Copy(defer.ensureDeferred(self._publish(job))))

    async def _publish(self, job: _Job) -> None:
        ch: Channel = await self._publisher.channel()
        msg = job.d.message
        props = copy_properties(msg, job.error_name, job.error_text, limit=ch.max_properties_size, own_user=ch.user)
        await ch.publish("", quarantine_queue(_configured(job.d.label)), msg.raw_body, props, mandatory=True)

    def _wait(self, job: _Job, copy: _Copy) -> None:
        """Wait for the copy's confirm, at most PUBLISH_TIMEOUT: a broker blocking publishers confirms nothing."""
        job.copy = copy
        job.timer = self._reactor.callLater(PUBLISH_TIMEOUT, self._timed_out, job, copy)
        copy.observe(lambda error: self._outcome(job, copy, error))

    def _outcome(self, job: _Job, copy: _Copy, error: BaseException | None) -> None:
        if job.copy is not copy:
            return  # timed out before: the original has gone back, its _Owed follows this copy
        job.copy = None
        job.cancel_timer()
        if error is None:
            self._copied(job)
        else:
            self._failed(job, error)

    def _copied(self, job: _Job) -> None:
        d = job.d
        if d.channel.is_open:
            self._metrics.counters["quarantined"][d.label] += 1
            self._settle.ack(d)
        else:  # its channel closed meanwhile: the original is back in its queue, and its copy is safe
            self._hand_back(job, None).copied = True

    def _timed_out(self, job: _Job, copy: _Copy) -> None:
        if job.copy is not copy:
            return
        job.copy = None
        job.timer = None  # this call was it
        log.error(
            "message {message_id}: the broker has not confirmed its quarantine copy in {t:g} s "
            "(is it blocking publishers?); the original goes back to its queue",
            message_id=_id(job.d),
            t=PUBLISH_TIMEOUT,
        )
        self._metrics.quarantine_failed(job.d.label)
        self._hand_back(job, copy, requeue=True)

    def _failed(self, job: _Job, error: BaseException) -> None:
        d = job.d
        if not self._settle.running or not d.channel.is_open:
            self._hand_back(job, None)
            return
        why = error if isinstance(error, PublishFailed) else describe(error)
        if job.tries <= len(RETRY_DELAYS):
            unroutable = isinstance(error, Unroutable)
            delay = 0.0 if unroutable else RETRY_DELAYS[job.tries - 1]
            log.warn(
                "could not quarantine message {message_id} (try {n} of {total}): {why}; trying again in {delay:g} s",
                message_id=_id(d),
                n=job.tries,
                total=len(RETRY_DELAYS) + 1,
                why=why,
                delay=delay,
            )
            if unroutable:  # its quarantine queue is gone (deleted by an operator, say): declare it again
                self._redeclare(d).addBoth(lambda _: self._try(job))
            else:
                job.timer = self._reactor.callLater(delay, self._retry, job)
                self._retrying.add(job)
            return
        self._metrics.quarantine_failed(d.label)
        if self._has_dead_letter(d.label):
            log.error(
                "could not quarantine message {message_id} after {n} tries ({why}); "
                "rejecting it to its queue's dead-letter exchange",
                message_id=_id(d),
                n=job.tries,
                why=why,
            )
            self._settle.reject(d)
        else:
            log.error(
                "could not quarantine message {message_id} after {n} tries ({why}); its queue has no "
                "dead-letter exchange, so it goes back to the queue and, when delivered again, "
                "to quarantine without running the callback",
                message_id=_id(d),
                n=job.tries,
                why=why,
            )
            self._hand_back(job, None, requeue=True)

    def _retry(self, job: _Job) -> None:
        job.timer = None  # this call was it
        self._retrying.discard(job)
        self._try(job)

    def _redeclare(self, d: Delivery) -> Deferred[None]:
        """Declare d's quarantine queue again; fires (with None) whether or not that worked."""
        queue = quarantine_queue(_configured(d.label))
        log.warn("the quarantine queue {queue!r} is missing; declaring it again", queue=queue)

        def failed(f: Failure) -> None:
            log.warn("declaring {queue!r} failed: {why}", queue=queue, why=f.value)

        return defer.ensureDeferred(self._publisher.declare(queue)).addErrback(failed)

    def _hand_back(self, job: _Job, copy: _Copy | None, requeue: bool = False) -> _Owed:
        """The original goes (or has gone) back to its queue with its quarantine owed:
        when it comes back it is quarantined (or just acked, if this copy gets confirmed), never run."""
        d = job.d
        owed = _Owed(job.error_name, job.error_text, copy)
        key = fingerprint(d.label, d.message)
        self.owed[key] = owed
        self.owed.move_to_end(key)
        while len(self.owed) > REMEMBERED:
            self.owed.popitem(last=False)
        if requeue:
            self._settle.requeue(d)
        else:
            self._settle.forget(d)  # its channel is closed (or closing with the daemon): the broker requeues it
        return owed


def _id(d: Delivery) -> str:
    return d.message.id or f"tag:{d.tag}"


def _configured(label: str) -> str:
    return "" if label == "(server-named)" else label
