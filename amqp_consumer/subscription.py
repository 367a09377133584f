"""The subscription: open a channel, declare, set QoS, consume, and recover when the broker says no.

It owns the consuming channel and its consumer tags. A channel the broker
closes (a refused declaration, a consumer ack timeout on RabbitMQ 3.x) is
reopened after a delay from the one backoff it shares with the connection: the
count restarts only once every queue is consumed again, so a broker that
accepts the connection and then refuses the topology is not retried at the
minimum delay, neither by reconnecting nor by reopening channels. A consumer
the broker cancels (a deleted queue, a failed node, RabbitMQ 4.3's ack timeout)
is consumed again once its cancel is answered and, after a timeout, once the
old consumer holds nothing. A last check reopens the channel should the daemon
ever stay connected without consuming. pause() and resume() serve the manhole.
"""

from __future__ import annotations

from time import monotonic
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from amqp_consumer import refusals
from amqp_consumer.backoff import Backoff
from amqp_consumer.brokerlimits import AckTimeoutWatch, is_ack_timeout_close, limit_in_close, near_limit
from amqp_consumer.config import Config
from amqp_consumer.connection import AMQPError, Channel, ChannelClosed, ConnectionClosed, Session
from amqp_consumer.deferreds import within
from amqp_consumer.dispatch import Dispatcher
from amqp_consumer.inflight import InFlight, Settler
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.pipeline import Pipeline
from amqp_consumer.publisher import Publisher
from amqp_consumer.state import State

log = Logger(namespace="amqp_consumer.consumer")

# Connected yet not consuming on some queue for this long, with no retry pending:
# a state no code path should leave us in, so reopen the channel rather than trust it.
STUCK_AFTER = 60.0
STUCK_CHECK_EVERY = 10.0
# Deliveries received this close to the one whose ack timeout fired were sent with it,
# so the broker took them back with it.
TIMED_OUT_TOGETHER = 0.5
ANSWER_TIMEOUT = 30.0  # for the broker's cancel-ok or close-ok


def queue_label(configured: str) -> str:
    return configured or "(server-named)"


def configured_name(label: str) -> str:
    return "" if label == "(server-named)" else label


class Subscription:
    """The consuming channel of the current connection, and its recovery.

    ``connector_target`` names the broker we dial (for the state); ``on_released``
    runs when a closed channel's deliveries leave the registry (the drain checks).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        state: State,
        metrics: Metrics,
        inflight: InFlight,
        settler: Settler,
        dispatcher: Dispatcher,
        pipeline: Pipeline,
        publisher: Publisher,
        ack_timeouts: AckTimeoutWatch,
        backoff: Backoff,
        connector_target: Callable[[], str],
        running: Callable[[], bool],
        on_released: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self.config = config
        self.state = state
        self.metrics = metrics
        self.inflight = inflight
        self.settler = settler
        self.dispatcher = dispatcher
        self.pipeline = pipeline
        self.publisher = publisher
        self.ack_timeouts = ack_timeouts
        self._backoff = backoff
        self._target = connector_target
        self._running = running
        self._on_released = on_released
        self._session: Session | None = None
        self._channel: Channel | None = None
        self._names: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._retry_call: IDelayedCall | None = None
        # The set-up step in progress on the current channel, worded as the start of
        # its failure line: a refusal closes the channel or the connection, and the
        # close handler says what was refused.
        self._setup: str | None = None
        self._stuck_since: float | None = None
        self._stuck_check = task.LoopingCall(self._check_consuming)
        self._stuck_check.clock = reactor
        # Queues whose consumer the broker cancelled, each waiting to consume again (see resume_when_ready).
        self._rejoin: dict[str, _Rejoin] = {}
        # After an ack timeout closed the channel: the session to open a new one on, once a worker is free.
        self._reopen: Session | None = None

    def start(self) -> None:
        self._stuck_check.start(STUCK_CHECK_EVERY, now=False)

    @property
    def waiting(self) -> bool:
        """Some queue waits to consume again until in-flight work settles (see resume_when_ready)."""
        return bool(self._rejoin) or self._reopen is not None

    def stop_recovering(self) -> None:
        """Stopping: no more checks, retries or waiting queues."""
        if self._stuck_check.running:
            self._stuck_check.stop()
        self._rejoin.clear()
        self._reopen = None
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()

    async def cancel_consumers(self) -> None:
        """Stopping: tell the broker to send nothing more (at most 5 s per consumer)."""
        ch = self._channel
        if ch is not None and ch.is_open:
            for queue, tag in list(self._tags.items()):
                try:
                    await within(self._reactor, ch.cancel(tag), 5.0)
                except Exception as e:
                    log.warn("cancelling the consumer on {queue} failed: {why}", queue=queue, why=e)
        self._tags.clear()


    def connection_failed(self, why: str) -> None:
        was = self.state.connection
        self._session = None
        self._channel = None
        self._setup = None
        self._tags.clear()
        self._rejoin.clear()
        self._reopen = None
        self.publisher.attach(None)
        self.settler.disconnected()
        if self._running():
            new = "reconnecting" if was != "connecting" else "connecting"
            self.state.set_connection(new, why)

    def session_up(self, session: Session) -> None:
        self._session = session
        self.publisher.attach(session)
        session.blocked = self._blocked
        self.state.set_connection("connected", "", broker=self._target(), node=session.node)
        defer.ensureDeferred(self._open(session))

    def _blocked(self, blocked: bool, reason: str) -> None:
        if blocked:
            log.warn("the broker blocks this connection: {reason}", reason=reason or "resource alarm")
        else:
            log.info("the broker unblocked this connection")
        self.state.set_blocked(blocked, reason)

    async def _open(self, session: Session) -> None:
        """Open a channel, declare the topology, set QoS and consume; on failure retry with backoff."""
        if session is not self._session or not self._running():
            return
        try:
            ch = await session.channel()
            ch.on_close(lambda error: self._channel_closed(ch, session, error))
            self._channel = ch
            self._setup = "declaring the topology failed"
            names = await ch.declare(self.config)
            await ch.qos(self.config.consumer.prefetch)
        except ChannelClosed:
            return  # refused: the close listener explains it and schedules the retry
        except AMQPError as e:
            if session.is_open:  # else the connection went, and the connector reports it
                log.warn("opening a channel failed: {why}", why=e)
            return
        if session is not self._session or not self._running() or ch is not self._channel:
            return
        self._names = names
        self._setup = None
        if not self.state.paused:
            await self._consume_all(ch)

    async def _consume_all(self, ch: Channel) -> None:
        for q in self.state.consuming:
            if ch is not self._channel or not ch.is_open:
                return  # a refusal closed it: the retry starts over
            if q not in self._rejoin:  # that one waits for its cancelled consumer to let go
                await self._consume(ch, q)

    def _refused(self, error: ConnectionClosed | ChannelClosed) -> str | None:
        """The set-up step that the broker refused, with what to do about it; None outside set-up."""
        setup, self._setup = self._setup, None
        if setup is None:
            return None
        return f"{setup}: {error.code} {error.text} ({refusals.hint(error.code, error.text)})"

    def explain_loss(self, error: AMQPError) -> str | None:
        """A hard error during set-up (503 for an unknown exchange type, say) closes the whole connection."""
        return self._refused(error) if isinstance(error, ConnectionClosed) else None

    async def _consume(self, ch: Channel, q: str) -> None:
        real = self._names.get(q, q)
        label = queue_label(q)
        on_delivery = self.pipeline.on_delivery(label)
        if q in self.state.single_active:
            self.state.set_active(q, False)
            on_delivery = self._first_delivery_marks_active(q, on_delivery)
        self._setup = f"cannot consume {real!r}"
        try:
            tag = await ch.consume(real, on_delivery, on_cancel=lambda tag: self._cancelled(ch, q, tag))
        except AMQPError:
            return  # refused (403 while another client holds it exclusively, 404, ...): the close handler explains and retries
        if ch is not self._channel:
            return
        self._setup = None
        self._tags[q] = tag
        self.state.set_consuming(q, True)
        log.info("consuming from {queue!r} (prefetch {prefetch})", queue=real, prefetch=self.config.consumer.prefetch)
        if all(self.state.consuming.values()):
            # Consuming has started: only now does the backoff (shared with the connector) start again.
            self._backoff.reset()

    def _channel_closed(self, ch: Channel, session: Session, error: ChannelClosed) -> None:
        held = self.inflight.held(ch)
        # The broker requeued everything on the channel: what has not started runs under its redelivery.
        for d in self.dispatcher.withdraw(lambda d: d.channel is ch):
            self.settler.forget(d)
        self.settler.drop_channel(ch)
        self._on_released()
        for q in [q for q, r in self._rejoin.items() if r.channel is ch]:
            del self._rejoin[q]
        if ch is not self._channel or not self._running() or session is not self._session or session.closing:
            # Stopping, an older channel, or the whole connection went: nothing to reopen here
            # (the connection handler takes over), but a close by the broker is still said.
            if error.by_broker:
                log.warn("the broker closed our channel: {why}; {n} unsettled deliveries go back to the queue",
                         why=error, n=len(held))
            if ch is self._channel:
                self._channel = None
                self._tags.clear()
            return
        self._channel = None
        self._tags.clear()
        if not error.by_broker:
            return  # our own close
        delay = self._next_retry_delay()
        refused = self._refused(error)
        timed_out = refused is None and is_ack_timeout_close(error.code, error.text)
        if refused is not None:
            for q in self.state.consuming:
                self.state.set_consuming(q, False, refused)
            log.error("{why}; opening a new channel in {delay:.1f} s", why=refused, delay=delay)
        elif timed_out:
            # RabbitMQ 3.x (and classic queues): the whole channel goes, with every delivery on it.
            for q in self.state.consuming:
                self.state.set_consuming(q, False, "consumer ack timeout")
            oldest = held[0] if held else None
            label = oldest.label if oldest is not None else "?"
            if label in self.metrics.ack_timeouts:
                self.metrics.ack_timeouts[label] += 1
            log.warn(
                "consumer ack timeout on {queue!r}: the oldest delivery was {age:.1f} s old (limit {limit:g} s); "
                "the broker closed the channel and returned its {n} unsettled deliveries to their queues; "
                "callbacks still running finish, and their messages run again; consuming again in {delay:.1f} s"
                "{free}",
                queue=self._names.get(configured_name(label), label),
                age=monotonic() - oldest.received if oldest is not None else 0.0,
                limit=limit_in_close(error.text) or self.ack_timeouts.limit(label),
                n=len(held),
                delay=delay,
                free="" if self.dispatcher.is_async else " or, if later, once a worker is free",
            )

            def reopen() -> None:
                if session is self._session:  # else the connection went meanwhile: its recovery opens one
                    self._reopen = session
                    self.resume_when_ready()

            self._retry_call = self._reactor.callLater(delay, reopen)
            return
        else:
            for q in self.state.consuming:
                self.state.set_consuming(q, False, f"channel closed: {error}")
            log.warn(
                "the broker closed our channel: {why}; {n} unsettled deliveries go back to the queue; "
                "opening a new channel in {delay:.1f} s",
                why=error,
                n=len(held),
                delay=delay,
            )
        self._retry_call = self._reactor.callLater(delay, lambda: defer.ensureDeferred(self._open(session)))

    def _cancelled(self, ch: Channel, q: str, tag: str) -> None:
        """The broker cancelled our consumer: its queue was deleted, its node failed, or (RabbitMQ 4.x
        quorum queues) a delivery reached the consumer ack timeout. See brokerlimits for what 4.3 does."""
        if self._tags.get(q) == tag:
            del self._tags[q]
        label = queue_label(q)
        held = self.inflight.held(ch, label)
        now = monotonic()
        oldest = now - held[0].received if held else 0.0
        limit = self.ack_timeouts.limit(label)
        timed_out = bool(held) and near_limit(oldest, limit)
        if timed_out:
            self.metrics.ack_timeouts[label] += 1
            for d in held:
                if now - d.received >= oldest - TIMED_OUT_TOGETHER:
                    d.taken_back = True
        # What has not started goes back now and runs once, under its redelivery. A nack for one
        # the broker already took back is ignored; one it still holds must not wait for its timeout.
        returned = self.dispatcher.withdraw(lambda d: d.channel is ch and d.label == label)
        for d in returned:
            self.settler.not_run(d)
        # The broker (4.3) keeps a consumer it cancelled until we answer; then it is gone for good
        # once it holds no unsettled delivery, and only then do we consume again.
        answered = within(self._reactor, ch.answer_cancel(tag), ANSWER_TIMEOUT)
        if not self._running() or ch is not self._channel:
            answered.addErrback(lambda f: None)
            return
        real = self._names.get(q, q)
        delay = self._next_retry_delay()
        if timed_out:
            self.state.set_consuming(q, False, "consumer ack timeout")
            log.warn(
                "consumer ack timeout on {queue!r}: the oldest delivery was {age:.1f} s old (limit {limit:g} s); "
                "the broker cancelled our consumer and takes back what reached the limit; deliveries that had "
                "not started go back to the queue ({n}), running callbacks finish ({r}); consuming again in "
                "{delay:.1f} s or, if later, once the old consumer holds nothing{free}",
                queue=real,
                age=oldest,
                limit=limit,
                n=len(returned),
                r=len(held) - len(returned),
                delay=delay,
                free="" if self.dispatcher.is_async else " and a worker is free",
            )
        else:
            self.state.set_consuming(q, False, "consumer cancelled by the broker")
            log.warn(
                "the broker cancelled our consumer on {queue!r} (queue deleted or its node failed{hint}); "
                "declaring and consuming again in {delay:.1f} s",
                queue=real,
                hint=""
                if not held
                else f"; or a consumer timeout below [consumer] ack_timeout = {limit:g} s: the oldest of the "
                f"{len(held)} deliveries it held was {oldest:.1f} s old",
                delay=delay,
            )
        rejoin = self._rejoin[q] = _Rejoin(ch, after_timeout=timed_out)

        def ready(what: str) -> None:
            setattr(rejoin, what, True)
            self.resume_when_ready()

        def unanswered(why: Any) -> None:
            if self._rejoin.get(q) is not rejoin or ch is not self._channel or not ch.is_open:
                return  # the channel closed meanwhile: its own recovery consumes again
            # Closing the channel is the sure way to be rid of the old consumer.
            log.warn("the broker did not confirm cancelling our consumer on {queue!r} ({why}); opening a new channel",
                     queue=real, why=why)
            session = self._session
            self._rejoin.clear()
            self._channel = None
            self._tags.clear()
            if session is not None:
                defer.ensureDeferred(self._reopen_after(ch, session))

        answered.addCallbacks(
            lambda ok: ready("answered") if ok else unanswered("no cancel-ok"), lambda f: unanswered(f.value)
        )
        self._retry_call = self._reactor.callLater(delay, ready, "due")

    async def _reopen_after(self, old: Channel, session: Session) -> None:
        try:
            await within(self._reactor, old.close(), ANSWER_TIMEOUT)
        except Exception:  # closed already, or the connection went: _open sorts that out
            pass
        await self._open(session)

    def resume_when_ready(self) -> None:
        """Consume again where the broker's cancel or ack timeout stopped us, as soon as it makes sense.

        A queue whose consumer the broker cancelled waits for our cancel to be answered and
        for the old consumer to hold nothing still unsettled, so there is never more than
        one consumer per queue. After an ack timeout, consuming also waits (sync callbacks)
        until some worker is not stuck on a delivery the broker took back: whatever came in
        meanwhile could only wait for the timeout again.
        """
        if not self._running() or self.state.paused:
            return
        free = self.dispatcher.is_async or sum(
            1 for d in self.dispatcher.running() if d.taken_back or not d.channel.is_open
        ) < self.dispatcher.workers
        if self._reopen is not None and free:
            session, self._reopen = self._reopen, None
            defer.ensureDeferred(self._open(session))
        for q, rejoin in list(self._rejoin.items()):
            ch = rejoin.channel
            if ch is not self._channel or not ch.is_open:
                del self._rejoin[q]
                continue
            if not (rejoin.answered and rejoin.due):
                continue
            # Only a timed-out consumer lingers on the broker (4.3); a deleted queue's does not,
            # and a callback stuck on one of its messages must not keep the queue unconsumed.
            if rejoin.after_timeout and (
                not free or any(not d.taken_back for d in self.inflight.held(ch, queue_label(q)))
            ):
                continue
            del self._rejoin[q]
            defer.ensureDeferred(self._rejoin_queue(ch, q))

    async def _rejoin_queue(self, ch: Channel, q: str) -> None:
        if ch is not self._channel or not ch.is_open or not self._running() or self.state.paused:
            return
        self._setup = "declaring the topology failed"
        try:
            self._names = await ch.declare(self.config)
        except AMQPError:
            return  # the channel's or the connection's close handler explains and retries
        await self._consume(ch, q)

    def _check_consuming(self) -> None:
        """The last line of defence against being up without consuming."""
        session = self._session
        s = self.state
        if session is None or s.paused or s.draining or s.halted or s.connection != "connected":
            self._stuck_since = None
            return
        idle = [q for q, on in s.consuming.items() if not on]
        waiting = self._rejoin or self._reopen is not None  # after a broker cancel or ack timeout, on purpose
        if not idle or waiting or (self._retry_call is not None and self._retry_call.active()):
            self._stuck_since = None
            return
        now = self._reactor.seconds()
        if self._stuck_since is None:
            self._stuck_since = now
            return
        if now - self._stuck_since < STUCK_AFTER:
            return
        self._stuck_since = None
        log.warn(
            "connected but not consuming {queues} for {t:g} s; opening a new channel",
            queues=", ".join(repr(q or "(server-named)") for q in idle),
            t=STUCK_AFTER,
        )
        old, self._channel = self._channel, None
        self._tags.clear()
        if old is not None:
            defer.ensureDeferred(old.close()).addErrback(lambda f: None)
        defer.ensureDeferred(self._open(session))

    def _next_retry_delay(self) -> float:
        return self._backoff.next()

    # --- pause / resume (manhole) ----------------------------------------------------

    async def pause(self) -> None:
        self.state.set_flag("paused", True)
        ch = self._channel
        for q, tag in list(self._tags.items()):
            if ch is not None:
                await ch.cancel(tag)
            self._tags.pop(q, None)
            self.state.set_consuming(q, False, "paused")

    async def resume(self) -> None:
        self.state.set_flag("paused", False)
        ch = self._channel
        if ch is not None and ch.is_open:
            await self._consume_all(ch)
        self.resume_when_ready()

    def _first_delivery_marks_active(self, q: str, inner: Callable[[Channel, int, Message], None]) -> Callable[[Channel, int, Message], None]:
        """A delivery is the only sign a single-active-consumer queue gives that our consumer is the active one."""
        state = self.state
        first = [True]

        def on_delivery(channel: Channel, tag: int, message: Message) -> None:
            if first[0]:
                first[0] = False
                state.set_active(q, True)
            inner(channel, tag, message)

        return on_delivery


class _Rejoin:
    """A queue whose consumer the broker cancelled: consuming again waits for both flags."""

    __slots__ = ("channel", "after_timeout", "answered", "due")

    def __init__(self, channel: Channel, after_timeout: bool) -> None:
        self.channel = channel
        self.after_timeout = after_timeout  # the consumer ack timeout, not a deleted queue
        self.answered = False  # the broker confirmed our basic.cancel
        self.due = False  # the retry delay has passed
