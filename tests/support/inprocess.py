"""Daemons and consumers built in the test process (as tap assembles them), not as twistd."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from amqp_consumer import tap
from amqp_consumer.config import Config, load
from amqp_consumer.consumer import Consumer
from amqp_consumer.daemon import Daemon
from amqp_consumer.message import Message
from amqp_consumer.metrics import Metrics
from amqp_consumer.state import State


def in_process(reactor: Any, config: Config, callback: Callable[[Message], Any], on_exit: Callable[[int], None]) -> Daemon:
    """The daemon as tap.assemble builds it, on the test's reactor: no signal handlers, and no
    systemd notifier whatever this process's environment says."""
    return tap.assemble(reactor, config, callback, on_exit=on_exit, environ={})


def assembled_consumer(
    reactor: Any,
    config: Config,
    callback: Callable[[Message], Any],
    state: State,
    metrics: Metrics,
    on_halt: Callable[[int], None],
    on_fatal: Callable[[int, str], None],
) -> Consumer:
    """The consumer and its parts as tap.assemble_consumer builds them; metrics stays at hand as c.metrics."""
    c = tap.assemble_consumer(reactor, config, callback, state, metrics, on_halt, on_fatal)
    c.metrics = metrics  # type: ignore[attr-defined]
    return c


def inprocess_config(tmp_path: Path, queue: str, url: str, arguments: str = "{}") -> Config:
    """One queue (with these TOML arguments) on the broker at `url` (the broker fixture's or a node's),
    quick reconnects, no health listener."""
    p = tmp_path / "c.toml"
    p.write_text(
        f"""
[amqp]
urls = ["{url}"]
reconnect_min_delay = 0.1
reconnect_max_delay = 1.0
[[queues]]
name = "{queue}"
arguments = {arguments}
[consumer]
callback = "x:y"
[health]
listen = ""
"""
    )
    return load(p)
