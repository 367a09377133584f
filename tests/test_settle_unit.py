"""Unit tests of the settle path and its timing, on a MemoryReactorClock with a fake channel."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from amqp_consumer.config import load
from amqp_consumer.connection import ChannelClosed
from amqp_consumer.consumer import Consumer
from amqp_consumer.dispatch import classify, halt, quarantine
from amqp_consumer.inflight import INFLIGHT
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.outcomes import ACK, NOT_RUN, REJECT, REQUEUE, HaltConsumer, Nack, Quarantine, RetryAfter
from amqp_consumer.state import State
from amqp_consumer.status import Status
from tests.support.inprocess import assembled_consumer


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.is_open = True

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append(("ack", tag, multiple))

    def nack(self, tag: int, requeue: bool = True) -> None:
        self.sent.append(("nack", tag, requeue))

    def reject(self, tag: int, requeue: bool = False) -> None:
        self.sent.append(("reject", tag, requeue))


@pytest.fixture
def consumer(tmp_path: Path):
    p = tmp_path / "c.toml"
    p.write_text('[[queues]]\nname="q"\n[consumer]\ncallback="m:f"\ndrain_timeout = 30\n[health]\nlisten=""\n')
    config = load(p)
    reactor = MemoryReactorClock()
    halts: list[int] = []
    c = assembled_consumer(reactor, config, lambda m: None, State(reactor.seconds, ("q",)), Metrics(["q"]), halts.append, lambda code, why: None)
    c.halts = halts  # type: ignore[attr-defined]
    return reactor, c


def deliver(c: Consumer, ch: FakeChannel, tags: list[int]) -> list:
    c.dispatcher.submit = lambda d: None  # as if running: the test settles them by hand
    on_delivery = c.pipeline.on_delivery("q")
    for tag in tags:
        on_delivery(ch, tag, Message(body=b"{}", queue="q", delivery_tag=tag))
    return sorted((d for by in c.inflight._by_channel.values() for d in by.values()), key=lambda d: d.tag)


def test_acks_of_one_turn_go_out_as_one_multiple_ack(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [1, 2, 3, 4, 5])
    c.settler.results(ds, [ACK] * 5)
    assert ch.sent == []  # nothing before the reactor turns
    reactor.advance(0)
    assert ch.sent == [("ack", 5, True)]
    assert len(c.inflight) == 0
    assert c.metrics.value("acked", "q") == 5


def test_acks_above_an_unfinished_delivery_are_sent_one_by_one(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [1, 2, 3, 4])
    c.settler.results([ds[1], ds[2]], [ACK, ACK])  # tag 1 still running: a multiple ack would cover it
    reactor.advance(0)
    assert ch.sent == [("ack", 2, False), ("ack", 3, False)]
    c.settler.results([ds[0]], [ACK])
    reactor.advance(0)
    assert ch.sent[-1] == ("ack", 1, True)  # safe: 2 and 3 are already acked, 4 is above
    c.settler.results([ds[3]], [ACK])
    reactor.advance(0)
    assert ch.sent[-1] == ("ack", 4, True)


def test_requeue_reject_and_not_run_are_sent_at_once_and_counted(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [1, 2, 3])
    c.settler.results(ds, [REQUEUE, REJECT, NOT_RUN])
    assert ch.sent == [("nack", 1, True), ("reject", 2, False), ("nack", 3, True)]
    assert (c.metrics.value("requeued", "q"), c.metrics.value("rejected", "q")) == (1, 1)


def test_nothing_is_sent_on_a_closed_channel(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [1, 2])
    ch.is_open = False
    c.settler.results(ds, [ACK, REQUEUE])
    reactor.advance(0)
    assert ch.sent == []
    assert len(c.inflight) == 0


def test_halt_acks_its_message_and_asks_to_stop(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [7])
    c.settler.results(ds, [halt(HaltConsumer(exit_code=4))])
    reactor.advance(0)
    assert ch.sent == [("ack", 7, True)]
    assert c.halts == [4] and c.state.readiness() == (False, "halted")


def test_classify_maps_exceptions_to_outcomes():
    assert classify(Nack()) == REQUEUE
    q = classify(ValueError("boom"))
    assert isinstance(q, Quarantine) and "ValueError: boom" in q.detail


def test_channel_retry_delay_grows_and_is_capped(consumer):
    _, c = consumer
    delays = [c.subscription._next_retry_delay() for _ in range(12)]
    assert delays[0] <= 1.2 and delays[3] > delays[0]
    assert max(delays) <= 60 * 1.2


def test_drain_waits_for_in_flight_then_gives_up_after_drain_timeout(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    c.startService()
    ds = deliver(c, ch, [1, 2])
    stopping = c.stopService()
    assert not stopping.called  # draining: two deliveries in flight
    assert c.state.readiness() == (False, "draining")
    c.settler.results([ds[0]], [ACK])  # one finishes during the drain and is acked
    reactor.advance(29.9)
    assert not stopping.called
    reactor.advance(0.2)  # drain_timeout (30 s) is over
    assert stopping.called
    assert ("ack", 1, True) in ch.sent and all(s[1] != 2 for s in ch.sent)  # the unfinished one is left to the broker


def test_drain_ends_as_soon_as_in_flight_work_is_done(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    c.startService()
    ds = deliver(c, ch, [1])
    stopping = c.stopService()
    c.settler.results(ds, [ACK])
    assert stopping.called
    assert ch.sent == [("ack", 1, True)]  # flushed before closing, not left for the next turn


def test_second_stop_request_skips_the_wait(consumer):
    reactor, c = consumer
    c.startService()
    deliver(c, FakeChannel(), [1])
    stopping = c.stopService()
    c.skip_drain()
    assert stopping.called


def test_prefetched_deliveries_that_never_started_go_back_at_once_on_stop(consumer):
    reactor, c = consumer
    ch = FakeChannel()
    c.startService()
    on_delivery = c.pipeline.on_delivery("q")
    for tag in (1, 2):
        on_delivery(ch, tag, Message(body=b"{}", queue="q", delivery_tag=tag))  # pending in the dispatcher
    stopping = c.stopService()
    assert stopping.called
    assert ch.sent == [("nack", 1, True), ("nack", 2, True)]


def connected_but_idle(c: Consumer) -> list:
    """Start c as if connected with queue q not consuming; returns the list of channel re-opens."""
    opened: list = []

    async def fake_open(session):
        opened.append(session)

    c.subscription._open = fake_open  # type: ignore[method-assign]
    c.startService()
    c.subscription._session = object()  # type: ignore[assignment]
    c.state.set_connection("connected")
    c.state.set_consuming("q", False, "lost track")
    return opened


def test_connected_but_not_consuming_for_a_minute_reopens_the_channel(consumer):
    """Whatever the cause, the daemon does not stay up without consuming."""
    reactor, c = consumer
    opened = connected_but_idle(c)
    for _ in range(6):
        reactor.advance(10)
    assert opened == []  # 50 s: not yet
    reactor.advance(10)
    reactor.advance(10)
    assert len(opened) == 1
    c.state.set_consuming("q", True)
    for _ in range(12):
        reactor.advance(10)
    assert len(opened) == 1  # consuming again: nothing more to do


def test_a_pending_retry_or_a_pause_is_not_mistaken_for_being_stuck(consumer):
    reactor, c = consumer
    opened = connected_but_idle(c)
    c.state.set_flag("paused", True)
    for _ in range(20):
        reactor.advance(10)
    assert opened == []
    c.state.set_flag("paused", False)
    c.subscription._retry_call = reactor.callLater(300, lambda: None)
    for _ in range(20):
        reactor.advance(10)
    assert opened == []


def inflight_gauge(c: Consumer) -> float:
    """amqp_consumer_inflight as a scrape reads it: its definition, from the status snapshot."""
    return INFLIGHT.value(Status(c.state, c.inflight).snapshot())  # type: ignore[misc]


def close(c: Consumer, ch: FakeChannel) -> None:
    """The channel closes (connection lost): the consumer's close listener runs."""
    ch.is_open = False
    c.subscription._channel_closed(ch, None, ChannelClosed(0, "connection lost", False))  # type: ignore[arg-type]


def test_deliveries_of_a_closed_channel_are_no_longer_in_flight(consumer):
    """The broker requeued them; counting them would show work that exists elsewhere."""
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [1, 2, 3])
    assert inflight_gauge(c) == 3
    close(c, ch)
    assert inflight_gauge(c) == 0
    assert c.inflight.snapshot() == []
    c.settler.results(ds, [ACK, REQUEUE, ACK])  # their callbacks finish later: nothing to send, nothing breaks
    reactor.advance(0)
    assert ch.sent == [] and len(c.inflight) == 0


def test_closed_channels_do_not_pile_up_in_the_in_flight_registry(consumer):
    reactor, c = consumer
    for _ in range(40):  # 40 reconnects, each after its deliveries were settled
        ch = FakeChannel()
        c.settler.results(deliver(c, ch, [1]), [ACK])
        reactor.advance(0)
        close(c, ch)
    assert c.inflight._by_channel == {}


def test_the_drain_waits_for_a_callback_still_running_on_a_lost_channel(consumer):
    """Not in flight any more, but its thread is busy: the pool must not be joined under it."""
    reactor, c = consumer
    ch = FakeChannel()
    c.startService()
    ds = deliver(c, ch, [1])
    close(c, ch)
    c.dispatcher._busy = 1  # its callback is still running
    stopping = c.stopService()
    reactor.advance(10)
    assert not stopping.called
    c.dispatcher._busy = 0
    c.settler.results(ds, [ACK])
    assert stopping.called and ch.sent == []


def test_reconnect_delay_keeps_growing_until_consuming_starts(consumer):
    """ClientService asks with attempt 1 after every handshake that worked; the delay grows anyway."""
    _, c = consumer
    connector = c.connector
    first = [connector._retry_delay(1) for _ in range(6)]
    assert first[0] <= 1.2 and first[5] >= 0.8 * 32
    said = connector._plan_retry()  # the failure's log line names the delay ClientService then uses
    assert connector._retry_delay(1) == said
    connector.reset_backoff()  # consuming started
    assert connector._retry_delay(1) <= 1.2


def test_a_failure_while_settling_one_delivery_does_not_stop_the_others(consumer, logged_errors):
    reactor, c = consumer
    ch = FakeChannel()
    ds = deliver(c, ch, [1, 2, 3])

    def broken(d, error, detail):
        raise RuntimeError("a bug in the quarantine path")

    c.quarantine.submit = broken
    c.settler.results(ds, [ACK, quarantine(ValueError("x"), "tb"), ACK])
    reactor.advance(0)
    assert ch.sent == [("nack", 2, True), ("ack", 3, True)]  # 2 goes back; 1 and 3 are acked
    assert len(c.inflight) == 0
    [said] = logged_errors.flush(r"settling message tag:2 \(quarantine\) failed; it goes back to its queue")
    assert "a bug in the quarantine path" in said


class FakePublishingChannel:
    """The publisher's confirm-mode channel: every publish is confirmed at once."""

    max_properties_size = 131052
    user = "guest"
    is_open = True

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, dict]] = []

    async def publish(self, exchange: str, routing_key: str, body: bytes, properties: dict, mandatory: bool = True) -> None:
        self.published.append((exchange, routing_key, body, properties))


def test_a_retry_without_a_retry_policy_is_quarantined_never_requeued(consumer):
    """RetryAfter reaches the failure policy; with no delay queue it ends as a confirmed quarantine copy and an ack."""
    reactor, c = consumer
    c.startService()  # a stopping consumer hands originals back instead of publishing
    ch = FakeChannel()
    publishing = FakePublishingChannel()

    async def confirm_channel() -> FakePublishingChannel:
        return publishing

    c.publisher.channel = confirm_channel
    asked: list[RetryAfter] = []
    policy_retry = c.quarantine.retry
    c.quarantine.retry = lambda d, outcome: (asked.append(outcome), policy_retry(d, outcome))
    [d] = deliver(c, ch, [3])
    retry = RetryAfter(5.0, "the database is down")
    c.settler.results([d], [retry])
    reactor.advance(0)
    assert asked == [retry]  # the settler handed it to the policy
    [(exchange, routing_key, body, props)] = publishing.published
    assert (exchange, routing_key, body) == ("", "q.quarantine", b"{}")
    assert props["headers"]["amqp-consumer-exception"] == "NoRetryPolicy"
    assert props["headers"]["amqp-consumer-error"] == (
        "retry requested in 5 s (the database is down), but no retry policy is configured"
    )
    assert ch.sent == [("ack", 3, True)]  # acked once the copy is confirmed; never nacked back to a hot loop
    assert c.metrics.value("quarantined", "q") == 1 and len(c.inflight) == 0
