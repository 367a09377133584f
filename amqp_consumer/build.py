"""Assemble the daemon for a reactor: the consumer, health, manhole and systemd notifier.

Start order is the order below: the consumer starts connecting, then the
listeners, then systemd hears READY=1 (not gated on the broker). On stop the
Daemon drains the consumer first while health keeps answering ("draining").
"""

from __future__ import annotations

import gc
from typing import Any, Callable

from amqp_consumer import exitcodes, health, systemd
from amqp_consumer.config import Config, ConfigError
from amqp_consumer.daemon import Daemon
from amqp_consumer.lifecycle import Lifecycle
from amqp_consumer.message import Message


def build(reactor: Any, config: Config, callback: Callable[[Message], Any], lifecycle: Lifecycle | None = None) -> Daemon:
    lifecycle = lifecycle or Lifecycle(reactor)
    daemon = Daemon(reactor, config, callback, on_exit=lifecycle.stop)
    lifecycle.on_second_signal = daemon.consumer.skip_drain
    if config.health.listen:
        health.service(reactor, daemon, config.health.listen).setServiceParent(daemon)
    if config.manhole.listen:
        from amqp_consumer import manhole  # Conch is a heavy import: only when asked for

        try:
            manhole.service(reactor, daemon, config.manhole).setServiceParent(daemon)
        except ConfigError as e:
            daemon.fatal(exitcodes.CONFIG, f"config error: {e}")
    notifier = systemd.service(reactor, daemon)
    if notifier is not None:
        notifier.setServiceParent(daemon)
    reactor.callWhenRunning(lifecycle.install_signal_handlers)
    reactor.addSystemEventTrigger("after", "shutdown", lifecycle.exit_despite_threads)
    # Start-up objects (Twisted, pika, the config) live for the whole run: keep the
    # cyclic collector from walking them again on every full collection.
    reactor.callWhenRunning(gc.freeze)
    return daemon
