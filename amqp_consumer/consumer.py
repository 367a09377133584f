"""Deliveries in, outcomes out: the consumer's state machine, in-flight registry and ack batching.

Every ack, nack and reject is sent from here, on the reactor thread, on the
channel the delivery came from. A delivery whose channel has closed is never
acked: the broker has already put it back in its queue.
"""

from __future__ import annotations

from time import monotonic, time
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from amqp_consumer import exitcodes, refusals
from amqp_consumer.backoff import Backoff
from amqp_consumer.config import Config
from amqp_consumer.connection import (
    AMQPError,
    Channel,
    ChannelClosed,
    ConnectionClosed,
    Connector,
    Session,
)
from amqp_consumer.dispatch import NOT_RUN, Dispatcher
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.publisher import Publisher
from amqp_consumer.quarantine import Quarantine
from amqp_consumer.state import State

log = Logger(namespace="amqp_consumer.consumer")

# Connected yet not consuming on some queue for this long, with no retry pending:
# a state no code path should leave us in, so reopen the channel rather than trust it.
STUCK_AFTER = 60.0
STUCK_CHECK_EVERY = 10.0


def queue_label(configured: str) -> str:
    return configured or "(server-named)"


def configured_name(label: str) -> str:
    return "" if label == "(server-named)" else label


def single_active_queues(config: Config) -> list[str]:
    """Consumed queues declared with x-single-active-consumer (one consumer gets deliveries, the rest wait)."""
    declared = {q.name: q for q in config.queues}
    return [
        q for q in config.consumed_queues if q in declared and declared[q].arguments.get("x-single-active-consumer") is True
    ]


class Delivery:
    __slots__ = ("channel", "tag", "message", "label", "received", "started", "finished")

    def __init__(self, channel: Channel, tag: int, message: Message, label: str) -> None:
        self.channel = channel
        self.tag = tag
        self.message = message
        self.label = label
        self.received = monotonic()
        self.started: float | None = None
        self.finished: float | None = None


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
        self.dispatcher = Dispatcher(reactor, callback, config.consumer.workers, self._results)
        self.publisher = Publisher()
        self.quarantine = Quarantine(reactor, self.publisher, metrics, self, self._has_dead_letter)
        self.connector = Connector(reactor, config.amqp, self._session_up, self._connection_failed, self._on_fatal)
        self.connector.explain_loss = self._explain_loss
        self._session: Session | None = None
        self._channel: Channel | None = None
        self._names: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._acks: dict[Channel, list[int]] = {}
        self._ack_scheduled = False
        # The channel retries' backoff; like the connector's, it restarts only once
        # consuming has started on every queue (see _consume).
        self._retry = Backoff(config.amqp.reconnect_min_delay, config.amqp.reconnect_max_delay)
        self._retry_call: Any = None
        # The set-up step in progress on the current channel, worded as the start of
        # its failure line: a refusal closes the channel or the connection, and the
        # close handler says what was refused.
        self._setup: str | None = None
        self._stuck_since: float | None = None
        self._stuck_check = task.LoopingCall(self._check_consuming)
        self._stuck_check.clock = reactor
        self._drained: Deferred | None = None
        self._skip_wait: Deferred | None = None
        self.halt_code: int | None = None
        state.broker = self.connector.target
        state.watch_single_active(single_active_queues(config))
        metrics.watch(self._live_metrics, lambda: state.connection)
        metrics.watch_node(lambda: state.node)

    # --- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.dispatcher.start()
        self.connector.startService()
        self._stuck_check.start(STUCK_CHECK_EVERY, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        return defer.ensureDeferred(self._shutdown())

    def skip_drain(self) -> None:
        """Second signal: stop waiting for in-flight callbacks."""
        if self._skip_wait is not None and not self._skip_wait.called:
            log.warn("second stop request: not waiting for {n} in-flight deliveries", n=len(self.inflight))
            self._skip_wait.callback(None)

    async def _shutdown(self) -> None:
        if self._stuck_check.running:
            self._stuck_check.stop()
        self.state.set_flag("draining", True)
        self._skip_wait = Deferred()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        ch = self._channel
        if ch is not None and ch.is_open:
            for queue, tag in list(self._tags.items()):
                try:
                    await _within(self._reactor, ch.cancel(tag), 5.0)
                except Exception as e:
                    log.warn("cancelling the consumer on {queue} failed: {why}", queue=queue, why=e)
        self._tags.clear()
        for d in self.dispatcher.take_pending():
            self._settle(d, NOT_RUN)
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
            await _first(self._reactor, [self._drained, self._skip_wait], timeout)
            if not self._drained_now():
                timed_out = True
                log.warn(
                    "drain ended with {n} deliveries unfinished; the broker requeues them", n=len(self.inflight)
                )
        self._flush_acks()
        await self.connector.close()
        self.state.set_connection("closed", "stopped")
        self.dispatcher.stop(join=not timed_out)

    def halt(self, code: int) -> None:
        if self.halt_code is None:
            self.halt_code = code
            self.state.set_flag("halted", True)
            self._on_halt(code)

    # --- connection and channel ---------------------------------------------------

    def _connection_failed(self, why: str) -> None:
        was = self.state.connection
        self._session = None
        self._channel = None
        self._setup = None
        self._tags.clear()
        self.publisher.attach(None)
        self._acks.clear()  # the channels' close listeners have dropped their deliveries
        if self.running:
            new = "reconnecting" if was != "connecting" else "connecting"
            self.state.set_connection(new, why)

    def _session_up(self, session: Session) -> None:
        self._session = session
        self.publisher.attach(session)
        session.blocked = self._blocked
        self.state.set_connection("connected", "", broker=self.connector.target, node=session.node)
        defer.ensureDeferred(self._open(session))

    def _blocked(self, blocked: bool, reason: str) -> None:
        if blocked:
            log.warn("the broker blocks this connection: {reason}", reason=reason or "resource alarm")
        else:
            log.info("the broker unblocked this connection")
        self.state.set_blocked(blocked, reason)

    async def _open(self, session: Session) -> None:
        """Open a channel, declare the topology, set QoS and consume; on failure retry with backoff."""
        if session is not self._session or not self.running:
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
        if session is not self._session or not self.running or ch is not self._channel:
            return
        self._names = names
        self._setup = None
        if not self.state.paused:
            await self._consume_all(ch)

    async def _consume_all(self, ch: Channel) -> None:
        for q in self.state.consuming:
            if ch is not self._channel or not ch.is_open:
                return  # a refusal closed it: the retry starts over
            await self._consume(ch, q)

    def _refused(self, error: ConnectionClosed | ChannelClosed) -> str | None:
        """The set-up step that the broker refused, with what to do about it; None outside set-up."""
        setup, self._setup = self._setup, None
        if setup is None:
            return None
        return f"{setup}: {error.code} {error.text} ({refusals.hint(error.code, error.text)})"

    def _explain_loss(self, error: AMQPError) -> str | None:
        """A hard error during set-up (503 for an unknown exchange type, say) closes the whole connection."""
        return self._refused(error) if isinstance(error, ConnectionClosed) else None

    async def _consume(self, ch: Channel, q: str) -> None:
        real = self._names.get(q, q)
        label = queue_label(q)
        on_delivery = self._make_on_delivery(label)
        if q in self.state.single_active:
            self.state.set_active(q, False)
            on_delivery = self._first_delivery_marks_active(q, on_delivery)
        self._setup = f"cannot consume {real!r}"
        try:
            tag = await ch.consume(real, on_delivery, on_cancel=lambda: self._cancelled(ch, q))
        except AMQPError:
            return  # refused (403 while another client holds it exclusively, 404, ...): the close handler explains and retries
        if ch is not self._channel:
            return
        self._setup = None
        self._tags[q] = tag
        self.state.set_consuming(q, True)
        log.info("consuming from {queue!r} (prefetch {prefetch})", queue=real, prefetch=self.config.consumer.prefetch)
        if all(self.state.consuming.values()):
            # Consuming has started: only now do both backoffs start again from the minimum.
            self._retry.reset()
            self.connector.reset_backoff()

    def _channel_closed(self, ch: Channel, session: Session, error: ChannelClosed) -> None:
        for d in self.dispatcher.discard(lambda d: d.channel is not ch):
            self._done(d)  # never started; the broker requeues it
        returned = self.inflight.drop_channel(ch)
        self._acks.pop(ch, None)
        self._check_drained()
        if ch is not self._channel:
            return
        self._channel = None
        self._tags.clear()
        if not error.by_broker or not self.running or session is not self._session or session.closing:
            return  # our own close, or the whole connection went: the connection handler takes over
        delay = self._next_retry_delay()
        refused = self._refused(error)
        if refused is not None:
            for q in self.state.consuming:
                self.state.set_consuming(q, False, refused)
            log.error("{why}; opening a new channel in {delay:.1f} s", why=refused, delay=delay)
        else:
            for q in self.state.consuming:
                self.state.set_consuming(q, False, f"channel closed: {error}")
            log.warn(
                "the broker closed our channel: {why}; {n} unsettled deliveries go back to the queue; "
                "opening a new channel in {delay:.1f} s",
                why=error,
                n=returned,
                delay=delay,
            )
        self._retry_call = self._reactor.callLater(delay, lambda: defer.ensureDeferred(self._open(session)))

    def _cancelled(self, ch: Channel, q: str) -> None:
        self._tags.pop(q, None)
        if not self.running or ch is not self._channel:
            return
        real = self._names.get(q, q)
        self.state.set_consuming(q, False, "consumer cancelled by the broker")
        delay = self._next_retry_delay()
        log.warn(
            "the broker cancelled our consumer on {queue!r} (queue deleted or its node failed); "
            "declaring and consuming again in {delay:.1f} s",
            queue=real,
            delay=delay,
        )

        async def again() -> None:
            if ch is not self._channel or not ch.is_open or not self.running or self.state.paused:
                return
            self._setup = "declaring the topology failed"
            try:
                self._names = await ch.declare(self.config)
            except AMQPError:
                return  # the channel's or the connection's close handler explains and retries
            await self._consume(ch, q)

        self._retry_call = self._reactor.callLater(delay, lambda: defer.ensureDeferred(again()))

    def _check_consuming(self) -> None:
        """The last line of defence against being up without consuming."""
        session = self._session
        s = self.state
        if session is None or s.paused or s.draining or s.halted or s.connection != "connected":
            self._stuck_since = None
            return
        idle = [q for q, on in s.consuming.items() if not on]
        if not idle or (self._retry_call is not None and self._retry_call.active()):
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
        return self._retry.next()

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

    # --- the hot path -------------------------------------------------------------------

    def _make_on_delivery(self, label: str) -> Callable[[Channel, int, Message], None]:
        received = self.metrics.counters["received"]
        add = self.inflight.add
        submit = self.dispatcher.submit
        state = self.state
        quarantine = self.quarantine
        owed = quarantine.owed

        def on_delivery(channel: Channel, tag: int, message: Message) -> None:
            d = Delivery(channel, tag, message, label)
            add(d)
            received[label] += 1
            state.last_delivery = time()
            if message.redelivered and owed and quarantine.redelivered(d):
                return  # its callback failed before; only its quarantine was left to do
            submit(d)

        return on_delivery

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

    def _results(self, batch: Sequence[Delivery], results: Sequence[tuple]) -> None:
        observe = self.metrics.duration.observe
        for d, result in zip(batch, results):
            if d.finished is not None and d.started is not None:
                observe(d.finished - d.started)
            try:
                self._settle(d, result)
            except Exception:
                self._settle_failed(d, result)

    def _settle_failed(self, d: Delivery, result: tuple) -> None:
        """A bug while settling one delivery: say so, requeue it, and go on with the others."""
        log.failure(
            "settling message {message_id} ({outcome}) failed; it goes back to its queue",
            message_id=d.message.id or f"tag:{d.tag}",
            outcome=result[0],
        )
        if d not in self.inflight:
            return  # it was settled before the failure
        try:
            self.requeue(d)
        except Exception:
            log.failure("requeueing message {message_id} failed too", message_id=d.message.id or f"tag:{d.tag}")
            self._done(d)

    def _settle(self, d: Delivery, result: tuple) -> None:
        kind = result[0]
        if kind == "ack":
            self._ack(d)
        elif kind == "requeue":
            self._send(d, "requeued", lambda: d.channel.nack(d.tag, requeue=True))
        elif kind == "reject":
            self._send(d, "rejected", lambda: d.channel.reject(d.tag, requeue=False))
        elif kind == "not-run":
            self._send(d, None, lambda: d.channel.nack(d.tag, requeue=True))
        elif kind == "halt":
            exc = result[1]
            if exc.requeue:
                self._send(d, "requeued", lambda: d.channel.nack(d.tag, requeue=True))
            else:
                self._ack(d)
            log.warn(
                "the callback asked to halt (exit code {code}) on message {message_id}",
                code=exc.exit_code,
                message_id=d.message.id,
            )
            self.halt(exc.exit_code)
        elif kind == "quarantine":
            self.quarantine.submit(d, result[1], result[2])

    def _done(self, d: Delivery) -> None:
        self.inflight.remove(d)
        if self._drained is not None:
            self._check_drained()

    def _drained_now(self) -> bool:
        """Nothing in flight and no callback running, not even one whose channel is gone."""
        return not len(self.inflight) and not self.dispatcher.busy

    def _check_drained(self) -> None:
        if self._drained is not None and not self._drained.called and self._drained_now():
            self._drained.callback(None)

    def _send(self, d: Delivery, outcome: str | None, send: Callable[[], None]) -> None:
        if d.channel.is_open:
            send()
            if outcome:
                self.metrics.counters[outcome][d.label] += 1
        else:
            log.debug("delivery {tag} came from a closed channel; the broker has requeued it", tag=d.tag)
        self._done(d)

    def _ack(self, d: Delivery) -> None:
        """Acks are gathered for one reactor turn, then sent with multiple=True where the tags allow."""
        if d.channel.is_open:
            tags = self._acks.get(d.channel)
            if tags is None:
                tags = self._acks[d.channel] = []
            tags.append(d.tag)
            self.metrics.counters["acked"][d.label] += 1
            if not self._ack_scheduled:
                self._ack_scheduled = True
                self._reactor.callLater(0, self._flush_acks)
        self._done(d)

    def _flush_acks(self) -> None:
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

    # --- settling for the quarantine ---------------------------------------------------

    def ack(self, d: Delivery) -> None:
        self._ack(d)

    def requeue(self, d: Delivery) -> None:
        self._send(d, "requeued", lambda: d.channel.nack(d.tag, requeue=True))

    def reject(self, d: Delivery) -> None:
        self._send(d, "rejected", lambda: d.channel.reject(d.tag, requeue=False))

    def forget(self, d: Delivery) -> None:
        """Nothing to send (its channel is closed or closes with us): the broker requeues it."""
        self._done(d)

    def _has_dead_letter(self, label: str) -> bool:
        configured = configured_name(label)
        return any(q.name == configured and "x-dead-letter-exchange" in q.arguments for q in self.config.queues)

    # --- live figures -------------------------------------------------------------------

    def _live_metrics(self) -> dict[str, float]:
        s = self.state
        return {
            "amqp_consumer_inflight": len(self.inflight),
            "amqp_consumer_oldest_inflight_seconds": self.inflight.oldest_age(),
            "amqp_consumer_connected": 1.0 if s.connection == "connected" else 0.0,
            "amqp_consumer_ready": 1.0 if s.readiness()[0] else 0.0,
            "amqp_consumer_standby": 1.0 if s.standby() else 0.0,
            "amqp_consumer_blocked": 1.0 if s.blocked else 0.0,
            "amqp_consumer_reconnects_total": s.reconnects,
            "amqp_consumer_last_delivery_timestamp_seconds": s.last_delivery or 0.0,
            "amqp_consumer_workers_busy": self.dispatcher.busy,
            "amqp_consumer_workers_total": 0 if self.dispatcher.is_async else self.dispatcher.workers,
        }


def _first(reactor: Any, ds: list[Deferred], timeout: float) -> Deferred:
    """Fires with the first result among ds, or None after timeout; nothing is cancelled
    (pika's Deferreds must not be)."""
    out: Deferred = Deferred()

    def settle(result: Any) -> None:
        if not out.called:
            out.callback(result) if not isinstance(result, Failure) else out.errback(result)
        return None

    for d in ds:
        d.addBoth(settle)
    call = reactor.callLater(timeout, settle, None)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return out.addBoth(done)


def _within(reactor: Any, coro: Any, timeout: float) -> Deferred:
    """Wait for coro at most timeout seconds."""
    return _first(reactor, [defer.ensureDeferred(coro)], timeout)
