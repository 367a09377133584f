"""The dispatcher's async path on a Clock: what each kind of coroutine callback leads to."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from amqp_consumer.dispatch import Dispatcher, worker_pool
from amqp_consumer.message import Message
from amqp_consumer.outcomes import ACK, REQUEUE, HaltConsumer, Nack


class Ch:
    is_open = True


class D:
    """A delivery as the dispatcher sees it."""

    def __init__(self, n: int, channel: Ch | None = None) -> None:
        self.message = Message(body=b'{"n": %d}' % n, content_type="application/json", delivery_tag=n)
        self.channel = channel or Ch()
        self.started: float | None = None
        self.finished: float | None = None
        self.withdrawn = False


def run(callback: Any, *deliveries: D) -> tuple[Clock, Dispatcher, list[tuple[int, tuple]]]:
    clock = Clock()
    results: list[tuple[int, tuple]] = []

    def on_results(batch, outcomes):
        results.extend((d.message.delivery_tag, o) for d, o in zip(batch, outcomes))

    dispatcher = Dispatcher(clock, callback, workers=1, on_results=on_results, pool=None)
    assert dispatcher.is_async
    dispatcher.start()
    for d in deliveries:
        dispatcher.submit(d)
    clock.advance(0)
    return clock, dispatcher, results


def test_a_callback_that_never_waits_is_acked_in_the_same_turn():
    seen = []

    async def cb(message):
        seen.append(message.body["n"])

    _, dispatcher, results = run(cb, D(1), D(2))
    assert seen == [1, 2]
    assert results == [(1, ACK), (2, ACK)]
    assert dispatcher.busy == 0


def test_a_callback_waiting_on_a_deferred_is_acked_when_it_fires():
    waits: list[Deferred] = []
    got = []

    async def cb(message):
        d: Deferred = Deferred()
        waits.append(d)
        got.append(await d)
        got.append(await waits[0])  # an already-fired Deferred: no second wait

    _, dispatcher, results = run(cb, D(1))
    assert results == [] and dispatcher.busy == 1
    waits[0].callback("row")
    assert got == ["row", "row"]
    assert results == [(1, ACK)] and dispatcher.busy == 0


def test_a_failed_wait_raises_inside_the_callback():
    waits: list[Deferred] = []

    async def cb(message):
        d: Deferred = Deferred()
        waits.append(d)
        try:
            await d
        except KeyError:
            raise Nack() from None

    _, _, results = run(cb, D(1))
    waits[0].errback(KeyError("gone"))
    assert results == [(1, REQUEUE)]


def test_an_error_after_a_wait_is_quarantined_with_its_traceback():
    waits: list[Deferred] = []

    async def store_order(message):
        d: Deferred = Deferred()
        waits.append(d)
        await d
        raise ValueError("no such customer")

    _, _, results = run(store_order, D(1))
    waits[0].callback(None)
    [(tag, outcome)] = results
    assert tag == 1 and outcome.kind == "quarantine"
    assert "ValueError: no such customer" in outcome.detail and "store_order" in outcome.detail


def test_an_error_before_any_wait_is_quarantined_with_its_traceback():
    async def parse_order(message):
        raise ValueError("bad order")

    _, _, results = run(parse_order, D(1))
    [(tag, outcome)] = results
    assert outcome.kind == "quarantine" and "parse_order" in outcome.detail and "bad order" in outcome.detail


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_a_context_variable_lives_across_waits_and_stays_inside_the_callback():
    waits: list[Deferred] = []
    seen = []

    async def cb(message):
        VAR.set(f"request-{message.body['n']}")
        d: Deferred = Deferred()
        waits.append(d)
        await d
        seen.append(VAR.get())

    run(cb, D(1), D(2))
    assert VAR.get() == "unset"  # nothing leaked into the reactor's context
    waits[1].callback(None)
    waits[0].callback(None)
    assert seen == ["request-2", "request-1"]


def test_halt_stops_the_callbacks_after_it_in_the_same_turn():
    ran = []

    async def cb(message):
        ran.append(message.body["n"])
        if message.body["n"] == 1:
            raise HaltConsumer(exit_code=3)

    _, dispatcher, results = run(cb, D(1), D(2), D(3))
    assert ran == [1]
    assert [(tag, o.kind) for tag, o in results] == [(1, "halt"), (2, "not-run"), (3, "not-run")]
    assert dispatcher.busy == 0


def test_no_callback_starts_on_a_delivery_whose_channel_closed_meanwhile():
    """The broker requeued it when the channel closed: running it would run it twice."""
    ch = Ch()
    ran = []

    async def cb(message):
        ran.append(message.body["n"])
        ch.is_open = False  # say the connection dropped while this one ran

    _, dispatcher, results = run(cb, D(1, ch), D(2, ch), D(3))
    assert ran == [1, 3]
    assert [(tag, o.kind) for tag, o in results] == [(1, "ack"), (2, "not-run"), (3, "ack")]


def test_a_sync_batch_skips_the_deliveries_of_a_channel_closed_while_it_ran():
    ch = Ch()
    ran = []

    def cb(message):
        ran.append(message.body["n"])
        ch.is_open = False

    dispatcher = Dispatcher(Clock(), cb, workers=1, on_results=lambda batch, outcomes: None, pool=worker_pool(1))
    outcomes = dispatcher._run_batch([D(1, ch), D(2, ch), D(3, ch), D(4)])  # as the worker thread runs it
    assert ran == [1, 4]
    assert [o.kind for o in outcomes] == ["ack", "not-run", "not-run", "ack"]


def test_a_sync_callback_gets_its_pool_from_the_assembly() -> None:
    """The dispatcher builds no pool of its own: a sync callback without one is a wiring mistake."""
    with pytest.raises(TypeError, match="needs a thread pool"):
        Dispatcher(Clock(), lambda message: None, workers=1, on_results=lambda batch, outcomes: None, pool=None)
