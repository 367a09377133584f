"""Test helpers for the operations surface: health URLs, the SSH manhole, sd_notify.

They work with :class:`tests.support.daemonproc.DaemonProcess` (a daemon in a
subprocess). Listeners in tests use port 0; the daemon logs the address it
got, and the helpers here read it from its output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tests.support.daemonproc import DaemonProcess, wait_until

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

HEALTH_ANYWHERE = "tcp:0:interface=127.0.0.1"


# --- HTTP --------------------------------------------------------------------------


def health_port(daemon: DaemonProcess, timeout: float = 20.0) -> int:
    """The port of the daemon's HTTP listener, from its start-up line."""
    match = daemon.wait_for_log(r"health: serving .* on http://127\.0\.0\.1:(\d+)/", timeout)
    return int(match.group(1))


def manhole_port(daemon: DaemonProcess, timeout: float = 20.0) -> int:
    """The port of the daemon's SSH manhole, from its start-up line."""
    match = daemon.wait_for_log(r"manhole: SSH manhole on 127\.0\.0\.1:(\d+)", timeout)
    return int(match.group(1))


def http(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET http://127.0.0.1:port/path: (status, lower-cased headers, body); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def http_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    status, _headers, body = http(port, path, timeout)
    return status, json.loads(body)


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call predicate until it returns something truthy; AssertionError naming `what` after timeout."""
    return wait_until(predicate, timeout, interval, what)


def metric_value(exposition: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text format, or None if absent."""
    for line in exposition.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


# --- sd_notify ---------------------------------------------------------------------------


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.

    ``abstract=True`` binds an abstract socket and gives the '@name' form.
    """

    def __init__(self, abstract: bool = False) -> None:
        self._dir: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"amqp-consumer-test-{os.getpid()}-{id(self):x}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # Short path: AF_UNIX paths are limited to 107 bytes; pytest's tmp paths can be longer.
            self._dir = tempfile.mkdtemp(prefix="sdnotify-")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.datagrams: list[str] = []

    def receive(self, timeout: float) -> str | None:
        """One datagram, or None if none came within timeout."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return None
        text = data.decode("utf-8", "replace")
        self.datagrams.append(text)
        return text

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0, what: str = "a datagram") -> str:
        """Receive until a datagram satisfies predicate; returns it."""
        for old in self.datagrams:
            if predicate(old):
                return old
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout:g} s; got {self.datagrams!r}")
            got = self.receive(left)
            if got is not None and predicate(got):
                return got

    def lines(self) -> list[str]:
        return [line for d in self.datagrams for line in d.splitlines()]

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


# --- SSH ----------------------------------------------------------------------------------


def make_ssh_key(directory: Path, name: str) -> Path:
    """A new passphrase-less ed25519 key pair; returns the private key's path (.pub next to it)."""
    path = directory / name
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path


def ssh_command(port: int, key: Path | None, user: str = "operator", *options: str) -> list[str]:
    cmd = [
        SSH, "-F", "/dev/null", "-tt", "-p", str(port),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", "ConnectTimeout=10",
    ]
    if key is not None:
        cmd += ["-i", str(key)]
    for option in options:
        cmd += ["-o", option]
    return cmd + [f"{user}@127.0.0.1"]


def ssh_refused(port: int, key: Path | None, *options: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ssh expecting the login to fail; returns the finished process."""
    return subprocess.run(
        ssh_command(port, key, "operator", *options),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


_PROMPT = ">>> "


class ManholeSession:
    """A real ``ssh -tt`` session into the manhole, typing lines and reading results.

    ``evaluate("40+2")`` types the line and returns what the shell printed
    before its next prompt ("42"); colour codes of the echoed input are skipped.
    """

    def __init__(self, port: int, key: Path, user: str = "operator") -> None:
        self.proc = subprocess.Popen(
            ssh_command(port, key, user),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def _wait(self, find: Callable[[str], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = find(self._buf.decode("utf-8", "replace"))
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"manhole: no {what} within {timeout:g} s; session output:\n{self.output!r}")
                self._cond.wait(min(left, 0.2))

    def wait_for_prompt(self, timeout: float = 15.0) -> None:
        self._wait(lambda text: _PROMPT in text, timeout, "first prompt")

    def evaluate(self, line: str, timeout: float = 10.0) -> str:
        """Type line, return the shell's printed result (may be empty), without trailing newline."""
        mark = len(self.output)
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\r")
        self.proc.stdin.flush()
        # The echo of the typed line ends with CR LF; the result runs up to the next prompt.
        pattern = re.compile(r"\r\n(?P<result>(?:.*?\r\n)?)" + re.escape(_PROMPT), re.S)
        match = self._wait(lambda text: pattern.search(text, mark), timeout, f"result of {line!r}")
        return match.group("result").replace("\r\n", "\n").rstrip("\n")

    def wait_for_text(self, regex: str, timeout: float = 10.0) -> re.Match[str]:
        pattern = re.compile(regex)
        return self._wait(lambda text: pattern.search(text), timeout, f"text matching {regex!r}")  # type: ignore[no-any-return]

    def close(self) -> None:
        """Log out with ^D; kill ssh if it does not go."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"\x04")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ManholeSession:
        self.wait_for_prompt()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
