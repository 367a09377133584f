"""Signals and the exit status: twistd has no notion of either, so the daemon keeps them.

twistd re-raises the signal that stopped the reactor (exit status 143 on SIGTERM);
an operator expects 0 after a clean drain, so the daemon installs its own handlers.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any, Callable

from twisted.logger import Logger

log = Logger(namespace="amqp_consumer.lifecycle")


class Lifecycle:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.exit_code = 0
        self._stopping = False
        self.on_second_signal: Callable[[], None] = lambda: None

    def install_signal_handlers(self) -> None:
        """Must run after the reactor started: it installs its own handlers at startup."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._reactor.callFromThread(self._stop_requested, signal.Signals(signum).name)

    def _stop_requested(self, name: str) -> None:
        if self._stopping:
            self.on_second_signal()
            return
        log.info("{signal} received: draining and stopping", signal=name)
        self.stop(0)

    def stop(self, code: int) -> None:
        """Stop the reactor (services drain first) and exit with code; the first code wins."""
        if self._stopping:
            return
        self._stopping = True
        self.exit_code = code
        if code:
            atexit.register(_exit_with, code)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)


def _exit_with(code: int) -> None:
    # Runs at interpreter exit, after twistd removed its pid file; os._exit is the
    # only way to set a status under twistd.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
