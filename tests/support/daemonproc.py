"""Run the daemon as a subprocess, the way an operator does, and watch it.

Either runner: ``twistd -n amqp-consumer`` (the default here) or the
``amqp-consumer`` command that the systemd unit runs (``runner="command"``).

The daemon's output goes to a file the test reads; waits poll for a condition
with a deadline rather than sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import signal as sig_module
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))
# What the amqp-consumer console script runs, without depending on the script being installed.
COMMAND = [sys.executable, "-m", "amqp_consumer.main"]
RUNNERS = ("twistd", "command")
CALLBACKS = ROOT / "tests" / "callbacks"


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def env_for(extra_paths: list[Path] | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    paths = [str(ROOT), str(CALLBACKS)] + [str(p) for p in extra_paths or []]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class DaemonProcess:
    """One daemon: write its config, start it, read its output, stop it, get its exit status."""

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        runner: str = "twistd",
    ) -> None:
        assert runner in RUNNERS, runner
        self.runner = runner
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "daemon.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "daemon.out"
        self.args = args or []
        self.env = env or env_for()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self.runner == "command":
            return [*COMMAND, f"--config={self.config_path}", *self.args]
        return [TWISTD, "--nodaemon", "--pidfile=", "amqp-consumer", f"--config={self.config_path}", *self.args]

    def start(self) -> DaemonProcess:
        out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                match = regex.search(self.output)
                if match:
                    return match
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging {pattern!r}:\n{self.output}")
            return regex.search(self.output)

        try:
            return wait_until(found, timeout, what=f"log line {pattern!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- daemon output ---\n{self.output}") from None

    def send_signal(self, sig: int = sig_module.SIGTERM) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout:g} s:\n{self.output}") from None

    def stop(self, sig: int = sig_module.SIGTERM, timeout: float = 30.0) -> int:
        self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def http_get(self, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def http_json(self, port: int, path: str) -> tuple[int, Any]:
        status, body = self.http_get(port, path)
        return status, json.loads(body)


def run_check(
    config_text: str, workdir: Path, args: list[str] | None = None, timeout: float = 60.0, runner: str = "twistd"
) -> subprocess.CompletedProcess[str]:
    """Run the daemon on a config that must fail (or pass) before connecting: exit code and output."""
    d = DaemonProcess(workdir, config_text, args, runner=runner)
    return subprocess.run(d.command(), cwd=workdir, env=d.env, capture_output=True, text=True, timeout=timeout)


def daemon_config(
    queue: str,
    callback: str = "testcb:record",
    *,
    url: str | Sequence[str],
    heartbeat: int = 10,
    reconnect: tuple[float, float] = (0.2, 1.0),
    workers: int = 1,
    prefetch: int = 100,
    drain: float = 30.0,
    queue_args: str = "{}",
    health: str = "",
    amqp_extra: str = "",
    extra: str = "",
) -> str:
    """A config with one queue, fast reconnects and health off unless asked; `extra` is appended.

    `url` is the broker fixture's (or a node's or a proxy's) URL: never the shared broker's by default, so a test
    parametrised over brokers talks to the one its id names. A list gives several (a cluster's nodes).
    """
    urls = ", ".join(f'"{u}"' for u in ([url] if isinstance(url, str) else url))
    return f"""
[amqp]
urls = [{urls}]
heartbeat = {heartbeat}
reconnect_min_delay = {reconnect[0]!r}
reconnect_max_delay = {reconnect[1]!r}
{amqp_extra}

[[queues]]
name = "{queue}"
arguments = {queue_args}

[consumer]
callback = "{callback}"
prefetch = {prefetch}
workers = {workers}
drain_timeout = {drain!r}

[health]
listen = "{health}"
{extra}
"""
