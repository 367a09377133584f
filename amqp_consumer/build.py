"""Assemble the daemon for a reactor: the consumer, health, manhole and systemd notifier."""

from __future__ import annotations

from typing import Any, Callable

from amqp_consumer.config import Config
from amqp_consumer.daemon import Daemon
from amqp_consumer.lifecycle import Lifecycle
from amqp_consumer.message import Message


def build(reactor: Any, config: Config, callback: Callable[[Message], Any], lifecycle: Lifecycle | None = None) -> Daemon:
    lifecycle = lifecycle or Lifecycle(reactor)
    daemon = Daemon(reactor, config, callback, on_exit=lifecycle.stop)
    lifecycle.on_second_signal = daemon.consumer.skip_drain
    reactor.callWhenRunning(lifecycle.install_signal_handlers)
    return daemon
