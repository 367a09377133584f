"""The consumer ack timeout and broker cancels, on a MemoryReactorClock with a fake channel.

The broker's side of these (what 3.10 and 4.3 really do) is in test_broker_limits.py;
here the daemon's reaction is checked step by step: what goes back, what is settled,
when it consumes again.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from time import monotonic
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from amqp_consumer.brokerlimits import AckTimeoutWatch, ack_timeouts, is_ack_timeout_close, limit_in_close
from amqp_consumer.config import load
from amqp_consumer.connection import ChannelClosed
from amqp_consumer.consumer import Consumer
from amqp_consumer.inflight import Delivery
from amqp_consumer.dispatch import Dispatcher, worker_pool
from amqp_consumer.outcomes import ACK, Outcome
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.state import State
from tests.support.inprocess import assembled_consumer
from tests.test_settle_unit import FakeChannel as SettleChannel

TIMEOUT_CLOSE = (
    "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 5000 ms. "
    "This timeout value can be configured, see consumers doc guide to learn more"
)


class FakeChannel(SettleChannel):
    """Records what the consumer sends; the test answers basic.cancel when it wants."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Deferred] = {}
        self.consumed: list[str] = []

    def answer_cancel(self, tag: str) -> Deferred:
        self.answers[tag] = Deferred()
        return self.answers[tag]

    async def declare(self, config: Any) -> dict[str, str]:
        return {}

    async def consume(self, queue: str, on_delivery: Any, on_cancel: Any) -> str:
        self.consumed.append(queue)
        return f"ctag-{len(self.consumed)}"

    async def close(self) -> None:
        self.is_open = False


class FakeSession:
    closing = False


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def make_consumer(tmp_path: Path, workers: int = 1, queue_args: str = '{"x-consumer-timeout" = 5000}') -> tuple:
    p = tmp_path / "c.toml"
    p.write_text(
        f'[amqp]\nreconnect_min_delay = 0.1\nreconnect_max_delay = 1.0\n'
        f'[[queues]]\nname = "q"\narguments = {queue_args}\n'
        f'[consumer]\ncallback = "m:f"\nworkers = {workers}\n[health]\nlisten = ""\n'
    )
    config = load(p)
    reactor = MemoryReactorClock()
    c = assembled_consumer(reactor, config, lambda m: None, State(reactor.seconds, ("q",)), Metrics(["q"]), lambda code: None,
                 lambda code, why: None)
    c.dispatcher.submit = c.dispatcher._pending.append  # type: ignore[method-assign]  # waiting, never pumped
    c.startService()
    ch = FakeChannel()
    c.subscription._session = FakeSession()  # type: ignore[assignment]
    c.subscription._channel = ch  # type: ignore[assignment]
    c.state.set_connection("connected")
    c.subscription._tags["q"] = "ctag-0"
    c.state.set_consuming("q", True)
    return reactor, c, ch


def record_opens(c: Consumer) -> list:
    """Channel (re)opens the consumer asks for, instead of opening them."""
    opened: list = []

    async def fake_open(session: Any) -> None:
        opened.append(session)

    c.subscription._open = fake_open  # type: ignore[method-assign]
    return opened


def receive(c: Consumer, ch: FakeChannel, tag: int, age: float, running: bool = False) -> Delivery:
    """A delivery received `age` seconds ago: waiting in the dispatcher, or with its callback running."""
    c.pipeline.on_delivery("q")(ch, tag, Message(body=b"{}", id=f"m{tag}", queue="q", delivery_tag=tag))
    d = c.dispatcher._pending[-1]
    d.received = monotonic() - age
    if running:
        c.dispatcher._pending.remove(d)
        c.dispatcher._batches[id(d)] = [d]  # as if a worker thread ran it
        d.started = monotonic()
    return d


def finish(c: Consumer, d: Delivery, result: Outcome = ACK) -> None:
    """Its callback returns: the dispatcher reports it on the reactor thread."""
    del c.dispatcher._batches[id(d)]
    d.finished = monotonic()
    c.settler.results([d], [result])


def test_ack_timeout_defaults_to_the_queues_argument_else_1800_and_ack_timeout_wins(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[[queues]]\nname = "a"\narguments = {"x-consumer-timeout" = 5000}\n[[queues]]\nname = "b"\n'
                 '[consumer]\ncallback = "m:f"\n')
    assert ack_timeouts(load(p)) == {"a": 5.0, "b": 1800.0}
    p.write_text(p.read_text() + "ack_timeout = 60\n")
    assert ack_timeouts(load(p)) == {"a": 60.0, "b": 60.0}


def test_the_broker_timeout_close_is_told_from_other_closes() -> None:
    assert is_ack_timeout_close(406, TIMEOUT_CLOSE) and limit_in_close(TIMEOUT_CLOSE) == 5.0
    assert limit_in_close(TIMEOUT_CLOSE.replace("5000 ms", "-1 ms")) is None  # 4.3, consumer already cancelled
    assert not is_ack_timeout_close(406, "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q'")
    assert not is_ack_timeout_close(404, "NOT_FOUND - no queue 'q'")


def test_a_timeout_cancel_returns_unstarted_work_and_consumes_again_only_when_the_old_consumer_is_gone(
    tmp_path: Path, logged: list[str]
) -> None:
    """RabbitMQ 4.3 quorum queue: basic.cancel, channel left open (the scenario of the issue, workers = 1)."""
    reactor, c, ch = make_consumer(tmp_path)
    slow = receive(c, ch, 1, age=5.0, running=True)
    for tag in (2, 3, 4):
        receive(c, ch, tag, age=5.0)
    c.subscription._cancelled(ch, "q", "ctag-0")  # type: ignore[arg-type]

    assert ch.sent == [("nack", 2, True), ("nack", 3, True), ("nack", 4, True)]  # each runs once, redelivered
    assert c.dispatcher._pending == []
    assert list(ch.answers) == ["ctag-0"]  # our basic.cancel answers the broker's
    assert c.metrics.ack_timeouts["q"] == 1
    assert c.state.readiness() == (False, "queue 'q': consumer ack timeout")
    line = next(x for x in logged if "consumer ack timeout" in x)
    assert "on 'q'" in line and "the oldest delivery was 5.0 s old (limit 5 s)" in line

    reactor.advance(1.0)  # the retry delay is over, but the broker has not confirmed our cancel
    assert ch.consumed == []
    ch.answers["ctag-0"].callback(True)
    assert ch.consumed == []  # the only worker still runs the message the broker took back
    finish(c, slow)  # it finishes after the timeout: the broker has it back, so no ack
    assert ch.sent[-1] == ("nack", 1, True)
    assert c.metrics.value("acked", "q") == 0
    assert any("finished after the broker took it back" in x for x in logged)
    assert ch.consumed == ["q"]  # one consumer again, and only now


def test_running_deliveries_within_the_limit_are_settled_before_the_queue_is_consumed_again(tmp_path: Path) -> None:
    """4.3 counts a cancelled consumer as long as it holds deliveries: wait for those to settle."""
    reactor, c, ch = make_consumer(tmp_path, workers=2)
    receive(c, ch, 1, age=5.0)
    young = receive(c, ch, 2, age=1.0, running=True)
    c.subscription._cancelled(ch, "q", "ctag-0")  # type: ignore[arg-type]
    assert ch.sent == [("nack", 1, True)]
    ch.answers["ctag-0"].callback(True)
    reactor.advance(1.0)
    assert ch.consumed == []
    finish(c, young)
    reactor.advance(0)
    assert ("ack", 2, True) in ch.sent and c.metrics.value("acked", "q") == 1  # within its limit: the broker takes it
    assert ch.consumed == ["q"]


def test_a_cancel_with_nothing_outstanding_is_a_deleted_queue_not_a_timeout(tmp_path: Path, logged: list[str]) -> None:
    reactor, c, ch = make_consumer(tmp_path)
    c.subscription._cancelled(ch, "q", "ctag-0")  # type: ignore[arg-type]
    assert c.metrics.ack_timeouts["q"] == 0
    assert any("cancelled our consumer on 'q' (queue deleted or its node failed)" in x for x in logged)
    assert c.state.readiness() == (False, "queue 'q': consumer cancelled by the broker")
    ch.answers["ctag-0"].callback(True)
    reactor.advance(1.0)
    assert ch.consumed == ["q"]


def test_after_a_deleted_queue_a_stuck_callback_does_not_hold_back_consuming(tmp_path: Path) -> None:
    reactor, c, ch = make_consumer(tmp_path)
    receive(c, ch, 1, age=0.5, running=True)  # far from the limit: not a timeout
    c.subscription._cancelled(ch, "q", "ctag-0")  # type: ignore[arg-type]
    ch.answers["ctag-0"].callback(True)
    reactor.advance(1.0)
    assert ch.consumed == ["q"] and c.metrics.ack_timeouts["q"] == 0


def test_an_unconfirmed_cancel_is_settled_by_a_new_channel(tmp_path: Path, logged: list[str]) -> None:
    reactor, c, ch = make_consumer(tmp_path)
    opened = record_opens(c)
    c.subscription._cancelled(ch, "q", "ctag-0")  # type: ignore[arg-type]
    reactor.advance(31)  # no cancel-ok within 30 s
    assert not ch.is_open and len(opened) == 1 and ch.consumed == []
    assert any("did not confirm cancelling our consumer" in x for x in logged)


def test_a_timeout_channel_close_is_counted_and_reopens_once_a_worker_is_free(tmp_path: Path, logged: list[str]) -> None:
    """RabbitMQ 3.x: 406 and the channel is gone, with everything on it."""
    reactor, c, ch = make_consumer(tmp_path)
    opened = record_opens(c)
    slow = receive(c, ch, 1, age=5.3, running=True)
    receive(c, ch, 2, age=5.3)
    ch.is_open = False
    c.subscription._channel_closed(ch, c.subscription._session, ChannelClosed(406, TIMEOUT_CLOSE, by_broker=True))  # type: ignore[arg-type]
    assert c.dispatcher._pending == [] and len(c.inflight) == 0  # the broker has everything back
    assert c.dispatcher.running() == [slow]
    assert c.metrics.ack_timeouts["q"] == 1
    line = next(x for x in logged if "consumer ack timeout" in x)
    assert "on 'q': the oldest delivery was 5.3 s old (limit 5 s)" in line
    reactor.advance(1.0)
    assert opened == []  # the only worker is stuck on a message the broker took back
    finish(c, slow)
    assert ch.sent == [] and len(opened) == 1


def test_other_channel_closes_reopen_as_before(tmp_path: Path) -> None:
    reactor, c, ch = make_consumer(tmp_path)
    opened = record_opens(c)
    receive(c, ch, 1, age=5.3, running=True)
    ch.is_open = False
    c.subscription._channel_closed(ch, c.subscription._session, ChannelClosed(406, "PRECONDITION_FAILED - unknown delivery tag 9", True))  # type: ignore[arg-type]
    reactor.advance(1.0)
    assert len(opened) == 1 and c.metrics.ack_timeouts["q"] == 0


class _D:
    def __init__(self, label: str, age: float, now: float) -> None:
        self.label = label
        self.received = now - age
        self.message = Message(body=b"", id=f"{label}-{age:g}")
        self.warned = False


def test_the_watch_warns_once_per_delivery_at_75_percent_and_reports_the_nearest(logged: list[str]) -> None:
    clock = Clock()
    now = [1000.0]
    ds = [_D("a", 10, now[0]), _D("a", 70, now[0]), _D("b", 40, now[0])]
    watch = AckTimeoutWatch(clock, {"a": 100.0, "b": 60.0}, lambda: ds, now=lambda: now[0])
    assert watch.interval == 1.5  # a fortieth of the shortest limit
    watch.start()
    clock.advance(watch.interval)
    assert [x for x in logged if "75 %" in x] == []
    now[0] += 10  # a: 20 s and 80 s of 100 s; b: 50 s of 60 s
    clock.advance(watch.interval)
    warned = [x for x in logged if "75 %" in x]
    assert len(warned) == 2
    assert any("1 deliveries from 'a'" in x and "a-70" in x and "(100 s)" in x for x in warned)
    assert watch.nearest() == {"queue": "b", "message_id": "b-40", "age_seconds": 50.0, "limit_seconds": 60.0,
                               "percent": 83.3}
    clock.advance(watch.interval)
    assert len([x for x in logged if "75 %" in x]) == 2  # once per delivery
    watch.stop()


class ThreadReactor(Clock):
    """A Clock whose callFromThread hands calls to the test, which runs them on its own thread."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.from_threads.put((f, args, kwargs))

    def run_from_thread(self) -> None:
        f, args, kwargs = self.from_threads.get(timeout=10)
        f(*args, **kwargs)


class _Work:
    def __init__(self, n: int) -> None:
        self.n = n
        self.channel = FakeChannel()
        self.message = Message(body=b"{}", delivery_tag=n)
        self.started: float | None = None
        self.finished: float | None = None
        self.withdrawn = False


def test_withdraw_takes_back_what_waits_in_a_running_batch_and_never_runs_it() -> None:
    """With one worker, the whole prefetch goes to the thread as one batch: the ones behind a
    slow callback must be returnable without ever running, and each runs or returns, never both."""
    reactor = ThreadReactor()
    entered, release = threading.Event(), threading.Event()
    ran: list[int] = []
    results: list[tuple[int, tuple]] = []

    def callback(message: Message) -> None:
        ran.append(message.delivery_tag)
        if message.delivery_tag == 1:
            entered.set()
            release.wait(10)

    dispatcher = Dispatcher(
        reactor, callback, 1, lambda batch, rs: results.extend((d.n, r) for d, r in zip(batch, rs)), pool=worker_pool(1)
    )
    dispatcher.start()
    try:
        works = [_Work(n) for n in (1, 2, 3, 4)]
        for w in works:
            dispatcher.submit(w)
        reactor.advance(0)  # one batch of four goes to the worker
        assert entered.wait(10)
        dispatcher.submit(_Work(5))  # waits in the dispatcher itself
        back = dispatcher.withdraw(lambda w: w.n in (1, 3, 5))
        assert sorted(w.n for w in back) == [3, 5]  # 1 has started: it is not taken back
        release.set()
        reactor.run_from_thread()  # the batch's result
        assert ran == [1, 2, 4]
        assert results == [(1, ACK), (2, ACK), (4, ACK)]
    finally:
        release.set()
        dispatcher.stop(join=True)


@pytest.mark.parametrize(
    ("headers", "redelivered", "count"),
    [
        ({"x-delivery-count": 2}, True, 2),  # a quorum queue on 3.x
        ({"x-acquired-count": 3, "x-delivery-count": 1}, True, 3),  # 4.3: every earlier delivery wins
        ({"x-acquired-count": 1}, True, 1),  # 4.3 after a Nack
        ({}, False, 0),  # a first delivery
        ({}, True, None),  # a classic queue: redelivered, but how often is not known
    ],
)
def test_delivery_count_from_the_broker_headers(headers: dict, redelivered: bool, count: int | None) -> None:
    assert Message(body=b"", headers=headers, redelivered=redelivered).delivery_count == count


def test_a_quorum_queue_without_dead_letter_exchange_is_named_at_start(tmp_path: Path, logged: list[str]) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        '[[queues]]\nname = "plain"\n'
        '[[queues]]\nname = "qq"\narguments = {"x-queue-type" = "quorum"}\n'
        '[[queues]]\nname = "qq-dlx"\narguments = {"x-queue-type" = "quorum", "x-dead-letter-exchange" = "dlx"}\n'
        '[consumer]\ncallback = "m:f"\n[health]\nlisten = ""\n'
    )
    config = load(p)
    reactor = MemoryReactorClock()
    c = assembled_consumer(reactor, config, lambda m: None, State(reactor.seconds, config.consumed_queues),
                 Metrics(config.consumed_queues), lambda code: None, lambda code, why: None)
    c.startService()
    warned = [x for x in logged if "without a dead-letter exchange" in x]
    assert len(warned) == 1 and "'qq'" in warned[0] and "x-dead-letter-exchange" in warned[0]
