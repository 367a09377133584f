"""Signals and the exit status: twistd has no notion of either, so the daemon keeps them.

twistd re-raises the signal that stopped the reactor (exit status 143 on SIGTERM);
an operator expects 0 after a clean drain, so the daemon installs its own handlers.
Once the reactor has stopped, the process exits even if a callback or a library
left a non-daemon thread running: Python would otherwise wait for it forever.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger

log = Logger(namespace="amqp_consumer.lifecycle")


class Lifecycle:
    def __init__(self, reactor: IReactorCore) -> None:
        self._reactor = reactor
        self.exit_code = 0
        self._stopping = False
        self.on_second_signal: Callable[[], None] = lambda: None

    def install_signal_handlers(self) -> None:
        """Must run after the reactor started: it installs its own handlers at startup."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Every reactor that handles signals runs code from other threads too.
        IReactorFromThreads(self._reactor).callFromThread(self._stop_requested, signal.Signals(signum).name)

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


    def exit_despite_threads(self) -> None:
        """Run after the reactor stopped: name any non-daemon thread left, and do not wait for it.

        Python joins every non-daemon thread before it exits, so one that never
        ends (a callback's, a library's) would keep a stopped daemon alive, and
        a second signal could not help: the reactor that handled signals is gone.
        """
        main = threading.main_thread()
        left = [t.name for t in threading.enumerate() if not t.daemon and t is not main]
        if not left:
            return
        log.warn(
            "exiting with {n} non-daemon thread(s) still running, without waiting for them: {names}",
            n=len(left),
            names=", ".join(sorted(left)),
        )
        waiter = threading.Thread(target=_exit_after_main, args=(main, self.exit_code), name="amqp-consumer-exit")
        waiter.daemon = True
        waiter.start()


def _exit_after_main(main: threading.Thread, code: int) -> None:
    # The main thread counts as ended once the interpreter starts to shut down,
    # which is after twistd has logged its last line and removed its pid file;
    # from there the interpreter would only wait for the threads named above.
    main.join()
    _exit_with(code)


def _exit_with(code: int) -> None:
    # Runs at interpreter exit, after twistd removed its pid file; os._exit is the
    # only way to set a status under twistd.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
