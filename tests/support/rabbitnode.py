"""Private RabbitMQ nodes for tests that stop, kill or partition a broker.

Each :class:`RabbitNode` is a separate Erlang node with its own node name,
ports, data directory, log directory, configuration and Erlang cookie.  It
never touches the system broker (``rabbit@localhost`` on port 5672) and only
listens on 127.0.0.1.

The node is started with the RabbitMQ scripts themselves
(``/usr/lib/rabbitmq/bin/rabbitmq-server``), not with Debian's
``/usr/sbin`` wrapper.  The wrapper switches to the ``rabbitmq`` user when
called by root, which would need world-writable folders (pytest's temp
folders are ``0700``) and the system broker's cookie.  The scripts run as the
calling user instead, so any user can run these tests, and ``HOME`` points at
the node's folder, where the node and ``rabbitmqctl`` find the same private
cookie.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RabbitNode",
    "RabbitNodeError",
    "TLSFiles",
    "find_rabbitmq_scripts",
    "make_tls_files",
    "rabbitmq_available",
]

LOOPBACK = "127.0.0.1"

# rabbitmqctl uses a distribution port from this range (RabbitMQ's default),
# so the ports of a node must stay out of it.
_CLI_DIST_PORTS = range(35672, 35683)

_SCRIPT_DIRS = (
    "/usr/lib/rabbitmq/bin",
    "/usr/lib/rabbitmq/sbin",
    "/usr/local/lib/rabbitmq/bin",
)

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,40}$")

# Runs beside each started node: if the test process dies without cleaning
# up (SIGKILL, crash), it kills the node's VM so no beam is left behind.
# argv: owner pid, beam pid, node folder.
_WATCHDOG = """
import os, signal, sys, time
owner, beam, home = int(sys.argv[1]), int(sys.argv[2]), os.fsencode(sys.argv[3])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
def ours(pid):
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        return alive(pid)
    return (b"-home", home) in set(zip(args, args[1:]))
while alive(beam) and ours(beam):
    if not alive(owner) or os.getppid() != owner:
        try:
            os.kill(beam, signal.SIGKILL)
        except OSError:
            pass
        break
    time.sleep(1)
"""


class RabbitNodeError(RuntimeError):
    """A private node failed to start, stop or answer a command."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS-enabled node and its clients."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a CA that did NOT sign the server certificate


def make_tls_files(directory: Path, hostname: str = "localhost") -> TLSFiles:
    """Write a test CA, a server certificate and a client certificate.

    The server certificate is valid for *hostname* and 127.0.0.1 only.  The
    client certificate's common name is ``guest`` so that the EXTERNAL
    mechanism (``ssl_cert_login_from = common_name``) logs in as ``guest``.
    ``other_ca_cert`` is an unrelated CA, for "wrong CA" tests.
    """
    import trustme  # test-only dependency, imported when needed

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    ca = trustme.CA()
    server = ca.issue_cert(hostname, LOOPBACK)
    client = ca.issue_cert("amqp-consumer-test-client", common_name="guest")
    other_ca = trustme.CA()

    files = TLSFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca_cert=directory / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    other_ca.cert_pem.write_to_path(str(files.other_ca_cert))
    for key in (files.server_key, files.client_key):
        key.chmod(0o600)
    return files


def find_rabbitmq_scripts() -> Path | None:
    """The folder holding RabbitMQ's own ``rabbitmq-server`` and ``rabbitmqctl``."""
    candidates = list(_SCRIPT_DIRS)
    candidates += sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"), reverse=True)
    for folder in candidates:
        path = Path(folder)
        if (path / "rabbitmq-server").is_file() and (path / "rabbitmqctl").is_file():
            return path
    return None


def rabbitmq_available() -> bool:
    """Whether RabbitMQ is installed so that private nodes can run."""
    return find_rabbitmq_scripts() is not None


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in _CLI_DIST_PORTS:
            return port


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the command name, which is in parentheses.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


class RabbitNode:
    """A private RabbitMQ node on loopback, with its own ports and files.

    ``name`` is the given name plus a random suffix, ``nodename`` is
    ``<name>@localhost``.  Ports are picked once, in the constructor, and kept
    across :meth:`stop`/:meth:`kill` and :meth:`restart`, so durable data and
    clients' addresses stay valid.

    ``extra_config`` adds lines to ``rabbitmq.conf`` (e.g.
    ``{"consumer_timeout": "10000"}``).  ``cookie`` sets the Erlang cookie
    (nodes meant to form a cluster need the same one); by default each node
    gets a random one, kept in ``cookie``.
    """

    def __init__(
        self,
        name: str,
        base_dir: Path,
        tls: TLSFiles | None = None,
        verify_peer: bool = False,
        *,
        extra_config: Mapping[str, str] | None = None,
        cookie: str | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid node name {name!r}: use letters, digits, '-' or '_'")
        scripts = self._find_scripts()
        self._server_script = scripts / "rabbitmq-server"
        self._ctl_script = scripts / "rabbitmqctl"

        self.name = f"{name}-{secrets.token_hex(4)}"
        self.nodename = f"{self.name}@localhost"
        self.tls = tls
        self.verify_peer = verify_peer
        self.port = _free_port()
        self.dist_port = _free_port()
        self.tls_port: int | None = _free_port() if tls is not None else None
        while len({self.port, self.dist_port, self.tls_port} - {None}) != (3 if tls else 2):
            self.dist_port = _free_port()
            self.tls_port = _free_port() if tls is not None else None

        self.dir = Path(base_dir).resolve() / self.name
        self._mnesia_dir = self.dir / "mnesia"
        self._log_dir = self.dir / "log"
        self._pid_file = self.dir / "rabbit.pid"
        self._crash_dump = self.dir / "erl_crash.dump"
        self._startup_log = self.dir / "startup.log"
        self._pid: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._cleaned = False

        self.dir.mkdir(parents=True)
        self._mnesia_dir.mkdir()
        self._log_dir.mkdir()
        self.cookie = cookie or "".join(secrets.choice(string.ascii_uppercase) for _ in range(20))
        cookie_file = self.dir / ".erlang.cookie"
        cookie_file.write_text(self.cookie)
        cookie_file.chmod(0o400)  # Erlang refuses cookies readable by others
        (self.dir / "rabbitmq-env.conf").write_text("# private test node: ignore /etc/rabbitmq\n")
        plugins = ["rabbitmq_auth_mechanism_ssl"] if (tls is not None and verify_peer) else []
        (self.dir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        self._write_config(extra_config or {})
        atexit.register(self.cleanup)

    # -- where the node runs (overridden by nodes that run inside another root) --

    def _find_scripts(self) -> Path:
        scripts = find_rabbitmq_scripts()
        if scripts is None:
            raise RabbitNodeError("RabbitMQ is not installed (no rabbitmq-server script found)")
        return scripts

    def _node_path(self, path: Path) -> str:
        """*path* (on this machine) as the node and rabbitmqctl see it."""
        return str(path)

    def _command(self, script: Path, *args: str) -> list[str]:
        """The command line that runs one of RabbitMQ's scripts for this node."""
        return [str(script), *args]

    def _server_tls_files(self, tls: TLSFiles) -> tuple[Path, Path, Path]:
        """The CA, certificate and key files the node reads (copies where it cannot see *tls*)."""
        return tls.ca_cert, tls.server_cert, tls.server_key

    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}

    # -- addresses ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/%2F"

    def tls_url(self, host: str = "localhost") -> str:
        if self.tls_port is None:
            raise RabbitNodeError(f"node {self.nodename} has no TLS listener")
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.nodename} amqp={self.port} tls={self.tls_port}>"

    # -- files and environment ---------------------------------------------

    def _write_config(self, extra: Mapping[str, str]) -> None:
        lines = [
            f"listeners.tcp.default = {LOOPBACK}:{self.port}",
            "log.file.level = info",
            "log.console = false",
        ]
        if self.tls is not None:
            ca_cert, server_cert, server_key = self._server_tls_files(self.tls)
            lines += [
                f"listeners.ssl.default = {LOOPBACK}:{self.tls_port}",
                f"ssl_options.cacertfile = {self._node_path(ca_cert)}",
                f"ssl_options.certfile = {self._node_path(server_cert)}",
                f"ssl_options.keyfile = {self._node_path(server_key)}",
            ]
            if self.verify_peer:
                lines += [
                    "ssl_options.verify = verify_peer",
                    "ssl_options.fail_if_no_peer_cert = false",
                    "auth_mechanisms.1 = PLAIN",
                    "auth_mechanisms.2 = AMQPLAIN",
                    "auth_mechanisms.3 = EXTERNAL",
                    "ssl_cert_login_from = common_name",
                ]
            else:
                lines += [
                    "ssl_options.verify = verify_none",
                    "ssl_options.fail_if_no_peer_cert = false",
                ]
        lines += [f"{key} = {value}" for key, value in extra.items()]
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def _env(self) -> dict[str, str]:
        env = self._base_env()
        at = self._node_path
        env.update(
            HOME=at(self.dir),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=LOOPBACK,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=at(self._mnesia_dir),
            RABBITMQ_LOG_BASE=at(self._log_dir),
            RABBITMQ_CONFIG_FILE=at(self.dir / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=at(self.dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=at(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=at(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=at(self._pid_file),
            # Erlang distribution on loopback only.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS=LOOPBACK,
            ERL_CRASH_DUMP=at(self._crash_dump),
            ERL_CRASH_DUMP_BYTES="1000000",
        )
        return env

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log files, for error messages."""
        parts: list[str] = []
        for path in [self._startup_log, *sorted(self._log_dir.glob("*.log"))]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                if text:
                    parts.append(f"--- {path.name} ---")
                    parts.extend(text[-lines:])
        with contextlib.suppress(OSError):
            with self._crash_dump.open(errors="replace") as dump:
                head = [dump.readline().rstrip() for _ in range(3)]
            parts.append("--- erl_crash.dump ---")
            parts.extend(head)
        return "\n".join(parts) or "(no log output)"

    # -- processes ---------------------------------------------------------

    def _read_pid_file(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_beam(self, pid: int) -> bool:
        """Whether *pid* is this node's Erlang VM (guards against reused pids)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return _pid_alive(pid)  # no /proc: trust the pid file
        if not os.path.basename(cmdline[0]).startswith(b"beam"):
            return False
        # rabbitmqctl runs in a VM too (with the same HOME): the server is
        # the one booting the "rabbit" module.
        pairs = set(zip(cmdline, cmdline[1:], strict=False))
        if (b"-s", b"rabbit") not in pairs:
            return False
        return (b"-home", os.fsencode(self._node_path(self.dir))) in pairs

    def _beam_pids(self) -> list[int]:
        """Pids of live Erlang VMs belonging to this node."""
        pids: set[int] = set()
        for pid in (self._pid, self._read_pid_file()):
            if pid is not None and _pid_alive(pid) and self._is_our_beam(pid):
                pids.add(pid)
        # Fallback: a VM that died before writing its pid file, or a stale one.
        with contextlib.suppress(OSError):
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in pids:
                    pid = int(entry)
                    if self._is_our_beam(pid) and _pid_alive(pid):
                        pids.add(pid)
        return sorted(pids)

    def is_running(self) -> bool:
        """Whether this node's Erlang VM is alive (it may still be booting)."""
        pid = self._pid if self._pid is not None else self._read_pid_file()
        return pid is not None and _pid_alive(pid) and self._is_our_beam(pid)

    def _ports(self) -> list[int]:
        return [p for p in (self.port, self.tls_port, self.dist_port) if p is not None]

    def _wait_down(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._beam_pids() and not any(_port_open(p, 0.2) for p in self._ports()):
                return True
            time.sleep(0.1)
        return False

    def start(self, timeout: float = 90) -> None:
        """Start the node and block until it accepts AMQP connections."""
        if self._cleaned:
            raise RabbitNodeError(f"node {self.nodename} was cleaned up")
        if self.is_running():
            raise RabbitNodeError(f"node {self.nodename} is already running")
        for port in self._ports():
            if _port_open(port, 0.2):
                raise RabbitNodeError(f"port {port} of node {self.nodename} is taken by another process")
        deadline = time.monotonic() + timeout
        with contextlib.suppress(FileNotFoundError):
            self._crash_dump.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()
        self._pid = None

        with self._startup_log.open("ab") as out:
            launcher = subprocess.run(
                self._command(self._server_script, "-detached"),
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                timeout=max(5.0, timeout),
                check=False,
            )
        if launcher.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmq-server -detached failed ({launcher.returncode}) for {self.nodename}\n{self.log_tail()}"
            )

        # The AMQP listener opens at the end of the boot.
        while True:
            if self._pid is None:
                pid = self._read_pid_file()
                if pid is not None and self._is_our_beam(pid):
                    self._pid = pid
            if self._crash_dump.exists() or (self._pid is not None and not _pid_alive(self._pid)):
                self._force_kill()
                raise RabbitNodeError(f"node {self.nodename} died while booting\n{self.log_tail()}")
            if _port_open(self.port, 0.5):
                break
            if time.monotonic() > deadline:
                self._force_kill()
                raise RabbitNodeError(
                    f"node {self.nodename} did not open port {self.port} within {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.2)

        remaining = max(5.0, deadline - time.monotonic())
        result = self.ctl("await_startup", "--timeout", str(int(remaining)), check=False, timeout=remaining + 10)
        if result.returncode != 0:
            self._force_kill()
            raise RabbitNodeError(
                f"node {self.nodename}: await_startup failed: {result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        if self._pid is None:
            self._pid = self._read_pid_file()
        self._start_watchdog()
        if self.tls_port is not None and not _port_open(self.tls_port, 2):
            self._force_kill()
            raise RabbitNodeError(f"node {self.nodename}: TLS port {self.tls_port} is closed\n{self.log_tail()}")

    def _start_watchdog(self) -> None:
        self._stop_watchdog()
        if self._pid is None:
            return
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self._pid), self._node_path(self.dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives a Ctrl-C of the test run
            close_fds=True,
        )

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        if watchdog.poll() is None:
            watchdog.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=5)

    def stop(self, timeout: float = 60) -> None:
        """Stop the node gracefully and wait until its ports are closed."""
        if not self._beam_pids():
            self._wait_down(5)
            return
        self.ctl("stop", check=False, timeout=timeout)
        if not self._wait_down(timeout):
            raise RabbitNodeError(f"node {self.nodename} did not stop within {timeout:.0f}s\n{self.log_tail()}")

    def kill(self, timeout: float = 30) -> None:
        """``kill -9`` the node's Erlang VM and wait until its ports are closed."""
        pids = self._beam_pids()
        if not pids:
            raise RabbitNodeError(f"node {self.nodename} is not running")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._wait_down(timeout):
            raise RabbitNodeError(f"node {self.nodename} still up {timeout:.0f}s after SIGKILL")

    def _force_kill(self) -> None:
        for pid in self._beam_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_down(10)

    def restart(self, timeout: float = 90) -> None:
        """Start the node again (after stop or kill) with the same ports and data."""
        if self._beam_pids():
            self.stop()
        self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Kill the node and delete its files.  Safe to call twice.

        No graceful stop: its data goes with it, and ``rabbitmqctl stop`` costs 2-4 s a node."""
        if self._cleaned:
            return
        self._cleaned = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)
        pids = set(self._beam_pids())
        try:
            self._force_kill()
        finally:
            self._stop_watchdog()
            # Dead, if not yet reaped: init takes its time with the zombie, which holds nothing.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
                time.sleep(0.1)
            self._remove_files()

    def _remove_files(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- rabbitmqctl ---------------------------------------------------------

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS...`` against this node."""
        env = self._env()
        cwd = self.dir if self.dir.is_dir() else Path("/")
        try:
            result = subprocess.run(
                self._command(self._ctl_script, "-n", self.nodename, *args),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitNodeError(f"rabbitmqctl {' '.join(args)} timed out after {timeout}s") from exc
        if check and result.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl -n {self.nodename} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def _list_queues(self) -> Iterator[dict[str, object]]:
        out = self.ctl("list_queues", "-q", "--formatter", "json", "name", "messages").stdout
        yield from json.loads(out or "[]")

    def queue_depth(self, queue: str) -> int:
        """Messages in *queue*, ready plus unacknowledged."""
        for row in self._list_queues():
            if row.get("name") == queue:
                value = row.get("messages")
                return int(value) if isinstance(value, (int, str)) and str(value).isdigit() else 0
        raise KeyError(f"no queue {queue!r} on {self.nodename}")

    def consumers(self, queue: str | None = None) -> list[dict[str, object]]:
        """``rabbitmqctl list_consumers`` as rows (queue_name, consumer_tag, ack_required, ...)."""
        out = self.ctl("list_consumers", "-q", "--formatter", "json").stdout
        rows: list[dict[str, object]] = json.loads(out or "[]")
        return [r for r in rows if queue is None or r.get("queue_name") == queue]

    def delete_queue(self, queue: str) -> None:
        self.ctl("delete_queue", queue)

    def close_all_connections(self, reason: str = "test") -> None:
        self.ctl("close_all_connections", reason)
