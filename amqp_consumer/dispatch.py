"""Load the operator's callback and run it: sync ones on a bounded thread pool, async ones on the reactor.

Sync callbacks are handed over in batches (one thread hop for every ready
delivery, not one per message); with one worker that also keeps delivery order.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import traceback
from contextvars import Context, copy_context
from time import monotonic
from types import MappingProxyType
from typing import Any, Callable, Coroutine, Final, Generator, Mapping, Sequence, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from amqp_consumer.config import ConfigError
from amqp_consumer.message import BodyDecodeError, Message, PropertiesDecodeError
from amqp_consumer.metricdefs import METRICS
from amqp_consumer.pipeline import BEFORE_CALLBACK, Stage, before_callback
from amqp_consumer.outcomes import (
    ACK,
    NOT_RUN,
    REJECT,
    REQUEUE,
    Drop,
    Halt,
    HaltConsumer,
    Nack,
    Outcome,
    Quarantine,
)

log = Logger(namespace="amqp_consumer.dispatch")


class CallbackInitError(Exception):
    """The callback could not be set up (its module exited on import, its class's constructor raised)."""


# --- outcomes -------------------------------------------------------------------
# Values from outcomes.py; the argument-less ones are shared singletons.


class _Withdrawn:
    """Taken back by withdraw() and settled there; never reported."""


WITHDRAWN: Final = _Withdrawn()


def quarantine(error: BaseException, detail: str) -> Quarantine:
    return Quarantine(error, detail)


def halt(exc: HaltConsumer) -> Halt:
    return Halt(exc.exit_code, exc.requeue)


def classify(error: BaseException, tb: str | None = None) -> Outcome:
    """Map what a callback raised to what happens to its message."""
    if isinstance(error, Nack):
        return REQUEUE
    if isinstance(error, Drop):
        return REJECT
    if isinstance(error, HaltConsumer):
        return halt(error)
    if isinstance(error, (BodyDecodeError, PropertiesDecodeError)):
        return Quarantine(error, str(error))
    return Quarantine(error, tb or "".join(traceback.format_exception(error)).rstrip())


# --- loading --------------------------------------------------------------------


def load_callback(ref: str) -> Any:
    """Import 'module:object'; a failure is a one-line ConfigError (CallbackInitError if the module exits)."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(
                "consumer.callback", f"cannot import module {module_name!r}: not found (is it on PYTHONPATH?)"
            ) from None
        raise ConfigError("consumer.callback", f"importing {module_name!r} failed: {e}") from None
    except Exception as e:
        raise ConfigError("consumer.callback", f"importing {module_name!r} raised {type(e).__name__}: {e}") from None
    except SystemExit as e:
        # sys.exit() at import time (a script's main guard gone wrong): the
        # daemon must not exit quietly with the module's status.
        raise CallbackInitError(f"importing {module_name!r} called sys.exit({e.code!r})") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError("consumer.callback", f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError("consumer.callback", f"{ref!r} is not callable (expected a function or a class)")
    return obj


def instantiate(obj: Any, config: Mapping[str, Any]) -> Callable[[Message], Any]:
    """A class is built once, as Class(config) (or Class() when it takes no argument)."""
    if not inspect.isclass(obj):
        return cast("Callable[[Message], Any]", obj)
    try:
        params = [
            p for p in inspect.signature(obj).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        params = []
    try:
        cls: Any = obj
        built: Callable[[Message], Any] = cls(MappingProxyType(dict(config))) if params else cls()
        return built
    except Exception as e:
        raise CallbackInitError(f"{obj.__module__}.{obj.__qualname__}() raised {type(e).__name__}: {e}") from e


def is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


# --- running ----------------------------------------------------------------------


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A callback stuck past drain_timeout must not keep the process alive.
    t = threading.Thread(*args, **kwargs)
    t.daemon = True
    return t


class WorkerPool(ThreadPool):
    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


def worker_pool(workers: int) -> WorkerPool:
    """The bounded pool sync callbacks run on (daemon threads).

    Its threads start with the first messages and then stay: a daemon that has not
    had a message yet holds none of them.
    """
    return WorkerPool(minthreads=0, maxthreads=workers, name="amqp-consumer-worker")


class Dispatcher:
    """Runs deliveries through the callback and reports (delivery, outcome) pairs on the reactor thread.

    ``deliveries`` are objects with ``message``, ``channel`` (with ``is_open``),
    ``started``/``finished`` and ``withdrawn`` attributes (see consumer.Delivery);
    the dispatcher only fills in times and marks what ``withdraw`` takes back. A
    delivery whose channel has closed by the time its callback would start is
    reported NOT_RUN: the broker has already requeued it, so running it would run
    it twice.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        callback: Callable[[Message], Any],
        workers: int,
        on_results: Callable[[Sequence[Any], Sequence[Outcome]], None],
        stages: Sequence[Stage] = BEFORE_CALLBACK,
        *,
        pool: ThreadPool | None,
    ) -> None:
        self._reactor = reactor
        # The daemon's reactor provides both interfaces; only the thread hop needs the second.
        self._threads = cast(IReactorFromThreads, reactor)
        # The stages before the callback and the callback, as one function (see pipeline.py).
        self._fn = before_callback(stages, callback)
        self.workers = workers
        self._on_results = on_results
        self.is_async = is_async(callback)
        self._pending: list[Any] = []
        self._busy = 0  # batches (sync) or coroutines (async) running
        self._batches: dict[int, list[Any]] = {}  # handed to worker threads, not yet reported (by id)
        # A worker starts a delivery, or withdraw() takes it back: this lock makes it one or the other.
        self._claim = threading.Lock()
        self._pump_scheduled = False
        self.accepting = True
        self._pool: ThreadPool | None = None
        self._asyncio_loop: Any = None
        if not self.is_async:
            # The pool is the assembly's to build (tap.py: worker_pool), like every collaborator.
            if pool is None:
                raise TypeError("a sync callback needs a thread pool: pass pool=worker_pool(workers)")
            self._pool = pool
        elif type(reactor).__name__ == "AsyncioSelectorReactor":
            self._asyncio_loop = getattr(reactor, "_asyncioEventloop")

    # lifecycle

    def start(self) -> None:
        if self._pool is not None:
            self._pool.start()

    def stop(self, join: bool) -> None:
        """Stop the pool; with join=False stuck threads are left to die with the process."""
        if self._pool is not None and self._pool.started and join:
            self._pool.stop()

    @property
    def busy(self) -> int:
        """Worker threads (sync) or callbacks (async) running now."""
        return self._busy

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, delivery: Any) -> None:
        self._pending.append(delivery)
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._reactor.callLater(0, self._pump)

    def withdraw(self, which: Callable[[Any], bool]) -> list[Any]:
        """Take back the deliveries for which which() is true and whose callback has not started.

        That includes those waiting in a batch a worker thread is running: each
        delivery either starts or is returned here, never both. The caller settles
        what this returns; the batch reports nothing for them.
        """
        keep: list[Any] = []
        gone: list[Any] = []
        for d in self._pending:
            (gone if which(d) else keep).append(d)
        if gone:
            self._pending = keep
            for d in gone:
                d.withdrawn = True
        with self._claim:
            for batch in self._batches.values():
                for d in batch:
                    if d.started is None and not d.withdrawn and which(d):
                        d.withdrawn = True
                        gone.append(d)
        return gone

    def running(self) -> list[Any]:
        """Deliveries whose sync callback is running now (async ones are not tracked here)."""
        return [d for b in self._batches.values() for d in b if d.started is not None and d.finished is None]

    def take_pending(self) -> list[Any]:
        """Stop accepting work and hand back what never started."""
        self.accepting = False
        pending, self._pending = self._pending, []
        return pending

    # sync path

    def _pump(self) -> None:
        self._pump_scheduled = False
        if not self._pending or not self.accepting:
            return
        if self.is_async:
            pending, self._pending = self._pending, []
            for delivery in pending:
                if self.accepting and delivery.channel.is_open:
                    self._run_async(delivery)
                else:  # a HaltConsumer earlier in this turn, or a lost channel: not run
                    self._on_results((delivery,), (NOT_RUN,))
            return
        pool = self._pool
        assert pool is not None  # sync callbacks always have one
        free = self.workers - self._busy
        while free > 0 and self._pending:
            if self.workers == 1:
                batch, self._pending = self._pending, []
            else:
                # Even shares keep every worker busy; the cap stops one slow message
                # from holding many others behind it in its batch.
                size = max(1, min(32, -(-len(self._pending) // free)))
                batch, self._pending = self._pending[:size], self._pending[size:]
            self._busy += 1
            free -= 1
            self._batches[id(batch)] = batch
            d = deferToThreadPool(self._threads, pool, self._run_batch, batch)
            d.addCallback(self._batch_done, batch)
            d.addErrback(lambda f: log.failure("worker batch failed", f))

    def _run_batch(self, batch: list[Any]) -> list[Outcome | _Withdrawn]:
        fn = self._fn
        claim = self._claim
        out: list[Outcome | _Withdrawn] = []
        append = out.append
        for delivery in batch:
            with claim:
                if delivery.withdrawn:
                    append(WITHDRAWN)
                    continue
                # Read on this worker thread, but only ever set on the reactor's: a
                # channel lost while the batch waited or ran turns the rest of it away.
                if not self.accepting or not delivery.channel.is_open:
                    delivery.withdrawn = True  # reported as not run here, so withdraw() must not take it too
                    append(NOT_RUN)
                    continue
                delivery.started = monotonic()
            result: Outcome
            try:
                fn(delivery.message)
                result = ACK
            except BaseException as e:  # noqa: BLE001 - every failure has an outcome
                result = classify(e)
                if type(result) is Halt:
                    self.accepting = False
            delivery.finished = monotonic()
            append(result)
        return out

    def _batch_done(self, results: list[Outcome | _Withdrawn], batch: list[Any]) -> None:
        self._busy -= 1
        del self._batches[id(batch)]
        if any(r is WITHDRAWN for r in results):
            kept = [(d, r) for d, r in zip(batch, results) if not isinstance(r, _Withdrawn)]
            self._on_results([d for d, _ in kept], [r for _, r in kept])
        else:
            self._on_results(batch, cast("list[Outcome]", results))  # no _Withdrawn in it
        if self._pending and not self._pump_scheduled:
            self._pump_scheduled = True
            self._reactor.callLater(0, self._pump)

    # async path

    def _run_async(self, delivery: Any) -> None:
        delivery.started = monotonic()
        self._busy += 1
        try:
            coro = self._fn(delivery.message)
            d: defer.Deferred[Any] | None
            if self._asyncio_loop is not None:
                import asyncio

                d = defer.Deferred.fromFuture(asyncio.ensure_future(coro, loop=self._asyncio_loop))
            else:
                d = _start(coro)
        except BaseException as e:  # noqa: BLE001
            self._async_done_error(e, delivery)
            return
        if d is None:
            self._async_done(None, delivery)
        else:
            d.addCallbacks(self._async_done, self._async_failed, callbackArgs=(delivery,), errbackArgs=(delivery,))

    def _async_done(self, _result: Any, delivery: Any) -> None:
        self._busy -= 1
        delivery.finished = monotonic()
        self._on_results((delivery,), (ACK,))

    def _async_failed(self, failure: Any, delivery: Any) -> None:
        self._async_done_error(failure.value, delivery, failure.getTraceback().rstrip())

    def _async_done_error(self, error: BaseException, delivery: Any, tb: str | None = None) -> None:
        self._busy -= 1
        delivery.finished = monotonic()
        result = classify(error, tb)
        if type(result) is Halt:
            self.accepting = False
        self._on_results((delivery,), (result,))


# --- coroutines without a Deferred when they never wait ---------------------------


def _start(coro: Coroutine[Any, Any, Any]) -> defer.Deferred[Any] | None:
    """Run a coroutine up to its first wait, as ensureDeferred would.

    Most callbacks finish without ever waiting; for those no Deferred and no
    inlineCallbacks trampoline is built (None is returned). One that does wait
    is handed to ensureDeferred from where it stopped, so awaiting Deferreds,
    cancellation and errors behave exactly as before. The coroutine runs in a
    copy of the current context throughout, again as ensureDeferred does, so a
    context variable it sets is neither lost at its first await nor leaked.
    """
    ctx = copy_context()
    try:
        first = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return defer.ensureDeferred(_resume(coro, first, ctx))


def _resume(coro: Coroutine[Any, Any, Any], yielded: Any, ctx: Context) -> Generator[Any, Any, Any]:
    """Drive the rest of a started coroutine under inlineCallbacks: pass on what it waits for, and back what comes."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - a failed wait (or cancellation) goes into the coroutine
            try:
                yielded = ctx.run(coro.throw, e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = ctx.run(coro.send, sent)
            except StopIteration as stop:
                return stop.value


# --- the figures owned here, for /metrics (read from the status snapshot at scrape time) ----

WORKERS_BUSY = METRICS.gauge(
    "amqp_consumer_workers_busy", "Worker threads (or async callbacks) running", value=lambda s: float(s.workers.busy)
)
WORKERS_TOTAL = METRICS.gauge(
    "amqp_consumer_workers_total", "Worker threads configured", value=lambda s: float(s.workers.total)
)
