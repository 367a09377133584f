"""``twistd amqp-consumer``: Options, makeService, and the one place the daemon is assembled.

Options does all the checking (config, callback import) while twistd is still
parsing the command line, so a bad config fails before anything starts or
daemonizes, with one line and exit status 78.

``makeService`` calls ``build``, which calls ``assemble``, which calls
``assemble_consumer``: between them they build every object of the running
daemon, and no other module builds a collaborator of its own (each takes its
parts as arguments). Read top to bottom, they are the object graph:

- ``assemble_consumer``: the in-flight registry, the settler, the callback
  runner, the failure policy (quarantine), the pipeline, the ack-timeout watch,
  the subscription and the connection, sharing one backoff, and the consumer
  that starts them and drains them on stop.
- ``assemble``: the state, the counters, the status snapshot source, the
  consumer, and the root service with its children in start order (see
  daemon.py): consumer, health, manhole, systemd.
- ``build``: the process-wide parts: signal handlers, the exit status, the exit
  that does not wait for stray threads, the collector freeze, and the malloc
  setting that gives large bodies' memory back (memory.py).

The heavy imports (pika, twisted.web, conch) happen in these functions, not
when twistd imports this module to parse the command line.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, cast

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTCP, IReactorTime
from twisted.logger import LogLevel
from twisted.python import usage

from amqp_consumer import exitcodes, logs
from amqp_consumer.config import Config, ConfigError, load
from amqp_consumer.dispatch import CallbackInitError, instantiate, load_callback
from amqp_consumer.message import Message

if TYPE_CHECKING:
    from amqp_consumer.consumer import Consumer
    from amqp_consumer.daemon import Daemon
    from amqp_consumer.lifecycle import Lifecycle
    from amqp_consumer.metrics import Metrics
    from amqp_consumer.state import State


class IDaemonReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorFromThreads):
    """The reactor as the daemon uses it: its run state, timers, TCP, and calls from worker threads.

    Every reactor Twisted ships provides all four; each part is typed by the one it uses.
    """


def _die(line: str, code: int) -> None:
    # Critical, like the daemon's own "stopping: ..." line, for journalctl -p err.
    prefix = logs.journal_prefix(LogLevel.critical) if logs.is_journal(sys.stderr) else ""
    print(f"{prefix}amqp-consumer: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class Options(usage.Options):
    synopsis = "--config=FILE [--callback=module:object] [--check]"
    longdesc = (
        "Consume RabbitMQ messages and run a Python callback on each one. "
        "Exit status: 0 clean stop, 70 unrecoverable failure, 77 broker refused the login "
        "or virtual host, 78 bad configuration; see amqp-consumer(1)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (required); see amqp-consumer.toml(5)."],
        ["callback", None, None, "The callback as module:object; overrides consumer.callback."],
    ]
    optFlags = [
        ["check", None, "Validate the config and import the callback, print a verdict, exit 0 or 78."],
    ]

    config: Config
    callback_object: Any

    def postOptions(self) -> None:
        if not self["config"]:
            _die("--config=FILE is required", exitcodes.CONFIG)
        try:
            self.config = load(self["config"], self["callback"])
            self.callback_object = load_callback(self.config.consumer.callback)
        except ConfigError as e:
            where = e.where if e.where.startswith(str(self["config"])) else f"{self['config']}: {e.where}"
            _die(f"config error: {where}: {e.problem}", exitcodes.CONFIG)
        except CallbackInitError as e:
            _die(f"the callback could not start: {e}", exitcodes.SOFTWARE)
        if self["check"]:
            queues = ", ".join(q or "(server-named)" for q in self.config.consumed_queues)
            print(f"amqp-consumer: {self['config']}: OK (callback {self.config.consumer.callback}; queues: {queues})")
            raise SystemExit(exitcodes.OK)
        lc = self.config.logging
        settings = logs.LogSettings(level=lc.level, format=lc.format, pika_level=lc.pika_level)
        logs.use_for_runner(getattr(self, "parent", None), settings)


def makeService(options: Options) -> Daemon:
    from twisted.internet import reactor

    try:
        callback = instantiate(options.callback_object, options.config.consumer.config)
    except CallbackInitError as e:
        _die(f"the callback could not start: {e}", exitcodes.SOFTWARE)
    return build(cast(IDaemonReactor, reactor), options.config, callback)


# --- the assembly ---------------------------------------------------------------------------


def build(
    reactor: IDaemonReactor,
    config: Config,
    callback: Callable[[Message], Any],
    lifecycle: Lifecycle | None = None,
    environ: Mapping[str, str] | None = None,
) -> Daemon:
    """The daemon as twistd runs it: ``assemble`` plus what belongs to the process (signals, exit status)."""
    from amqp_consumer.lifecycle import Lifecycle
    from amqp_consumer.memory import return_large_blocks

    return_large_blocks()  # glibc read the real environment, whatever environ says

    lifecycle = lifecycle or Lifecycle(reactor)
    daemon = assemble(reactor, config, callback, on_exit=lifecycle.stop, environ=environ)
    lifecycle.on_second_signal = daemon.consumer.skip_drain
    reactor.callWhenRunning(lifecycle.install_signal_handlers)
    reactor.addSystemEventTrigger("after", "shutdown", lifecycle.exit_despite_threads)
    # Start-up objects (Twisted, pika, the config) live for the whole run: keep the
    # cyclic collector from walking them again on every full collection.
    reactor.callWhenRunning(gc.freeze)
    return daemon


def assemble(
    reactor: IDaemonReactor,
    config: Config,
    callback: Callable[[Message], Any],
    on_exit: Callable[[int], None],
    environ: Mapping[str, str] | None = None,
) -> Daemon:
    """The root service and everything under it; on_exit(code) stops the process with that status.

    The children are added in start order (daemon.py says why): the consumer,
    then the health and manhole listeners, then the systemd notifier (only with
    $NOTIFY_SOCKET in environ, which defaults to the process's environment).
    """
    from amqp_consumer import health, systemd
    from amqp_consumer.consumer import single_active_queues
    from amqp_consumer.daemon import Daemon, FatalStop
    from amqp_consumer.metrics import Metrics
    from amqp_consumer.state import State
    from amqp_consumer.status import Status
    from amqp_consumer.subscription import queue_label

    state = State(reactor.seconds, config.consumed_queues)
    state.watch_single_active(single_active_queues(config))
    metrics = Metrics(queue_label(q) for q in config.consumed_queues)
    fatal = FatalStop(state, on_exit)
    consumer = assemble_consumer(reactor, config, callback, state, metrics, on_halt=on_exit, on_fatal=fatal)
    status = Status(state, consumer.inflight, consumer.ack_timeouts, metrics, consumer.dispatcher)
    metrics.watch(status.snapshot)
    daemon = Daemon(reactor, config, state, metrics, status, consumer, fatal)

    consumer.setServiceParent(daemon)  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    if config.health.listen:
        health.service(reactor, daemon, config.health.listen).setServiceParent(daemon)  # type: ignore[no-untyped-call]
    if config.manhole.listen:
        from amqp_consumer import manhole  # conch is a heavy import: only when asked for

        try:
            manhole.service(reactor, daemon, config.manhole).setServiceParent(daemon)  # type: ignore[no-untyped-call]
        except ConfigError as e:
            daemon.fatal(exitcodes.CONFIG, f"config error: {e}")
    notifier = systemd.service(reactor, daemon, environ)
    if notifier is not None:
        notifier.setServiceParent(daemon)  # type: ignore[no-untyped-call]
    return daemon


def assemble_consumer(
    reactor: IDaemonReactor,
    config: Config,
    callback: Callable[[Message], Any],
    state: State,
    metrics: Metrics,
    on_halt: Callable[[int], None],
    on_fatal: Callable[[int, str], None],
) -> Consumer:
    """The consumer and its parts. on_halt(code) runs when a callback asks to stop (HaltConsumer),
    on_fatal(code, why) when the broker refuses the login for good.

    The settler and the subscription report back to the consumer, which is built
    last from all the parts: they reach it through ``consumer`` below, bound once
    it exists (nothing calls them before the consumer starts).
    """
    from amqp_consumer.backoff import Backoff
    from amqp_consumer.brokerlimits import AckTimeoutWatch, ack_timeouts
    from amqp_consumer.connection import Connector
    from amqp_consumer.consumer import Consumer, has_dead_letter
    from amqp_consumer.dispatch import Dispatcher, is_async, worker_pool
    from amqp_consumer.inflight import InFlight, Settler
    from amqp_consumer.pipeline import Pipeline
    from amqp_consumer.publisher import Publisher
    from amqp_consumer.quarantine import Quarantine
    from amqp_consumer.subscription import Subscription, queue_label

    consumer: Consumer
    inflight = InFlight()
    settler = Settler(
        reactor,
        inflight,
        metrics,
        on_halt=lambda code: consumer.halt(code),
        on_settled=lambda: consumer.settled(),
        is_running=lambda: consumer.is_running(),
    )
    workers = config.consumer.workers
    pool = None if is_async(callback) else worker_pool(workers)
    dispatcher = Dispatcher(reactor, callback, workers, settler.results, pool=pool)
    publisher = Publisher()
    quarantine = Quarantine(reactor, publisher, metrics, settler, lambda label: has_dead_letter(config, label))
    settler.failures = quarantine
    pipeline = Pipeline(inflight, metrics, state, quarantine, dispatcher)
    watch = AckTimeoutWatch(reactor, {queue_label(q): t for q, t in ack_timeouts(config).items()}, inflight.__iter__)
    # One backoff for reconnecting and for reopening channels: it restarts only
    # once consuming has started on every queue (see Subscription._consume).
    backoff = Backoff(config.amqp.reconnect_min_delay, config.amqp.reconnect_max_delay)
    connector: Connector
    subscription = Subscription(
        reactor, config, state, metrics, inflight, settler, dispatcher, pipeline, publisher, watch, backoff,
        connector_target=lambda: connector.target,
        running=lambda: consumer.is_running(),
        on_released=lambda: consumer.check_drained(),
    )
    connector = Connector(
        reactor,
        config.amqp,
        subscription.session_up,
        subscription.connection_failed,
        lambda error: on_fatal(exitcodes.NOPERM, str(error)),
        backoff=backoff,
    )
    connector.explain_loss = subscription.explain_loss
    state.broker = connector.target
    consumer = Consumer(
        reactor,
        config,
        state,
        inflight=inflight,
        settler=settler,
        dispatcher=dispatcher,
        quarantine=quarantine,
        pipeline=pipeline,
        publisher=publisher,
        subscription=subscription,
        connector=connector,
        ack_timeouts=watch,
        on_halt=on_halt,
    )
    return consumer
