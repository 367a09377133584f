"""Waiting on Deferreds with a time limit, without cancelling them (pika's must never be cancelled)."""

from __future__ import annotations

from typing import Any, Coroutine, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

def first(reactor: IReactorTime, ds: list[Deferred[Any]], timeout: float) -> Deferred[Any]:
    """Fires with the first result among ds, or None after timeout; nothing is cancelled
    (pika's Deferreds must not be)."""
    out: Deferred[Any] = Deferred()

    def settle(result: Any) -> None:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        return None

    for d in ds:
        d.addBoth(settle)
    call = reactor.callLater(timeout, settle, None)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return out.addBoth(done)


def within(reactor: IReactorTime, coro: Union[Coroutine[Any, Any, Any], Deferred[Any]], timeout: float) -> Deferred[Any]:
    """Wait for coro at most timeout seconds."""
    return first(reactor, [defer.ensureDeferred(coro)], timeout)
