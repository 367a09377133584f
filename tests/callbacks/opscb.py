"""Callbacks for the operations tests (health, manhole, logging, exit codes)."""

from __future__ import annotations

import os
import time

from amqp_consumer import HaltConsumer


def ack(message) -> None:
    """Accept every message, say nothing."""


def gate(message) -> None:
    """Hold each message until the file named by $TEST_GATE exists (at most 30 s)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(os.environ["TEST_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.02)


def halt(message) -> None:
    """Ask the daemon to stop with the exit code in the body (a number)."""
    raise HaltConsumer(exit_code=int(message.raw_body or b"0"))


def explode(message) -> None:
    """Fail every message: each goes to quarantine."""
    raise ValueError("cannot handle this message")


class BrokenInit:
    """A class callback whose constructor fails: the daemon cannot start."""

    def __init__(self, config) -> None:
        raise RuntimeError("the database is unreachable")

    def __call__(self, message) -> None:  # pragma: no cover
        pass
