"""amqp-consumer@.service under a real systemd: the RPM installed into a booted container and run.

``make test-systemd`` runs this folder (``make test`` does not: pyproject's
norecursedirs leaves it out, since it needs root, systemd-nspawn and a few
minutes). The RPM from ``make rpm`` is installed into a booted Debian bookworm
container (systemd 252) the way rpm would (tests/support/rpmpayload.py), each
instance's configuration is a ``cp -p`` of the RPM's example pointed at the
test broker, and the unit runs exactly as shipped, with no drop-ins: every
check below passes with all of its hardening in force. Checks read what an
operator reads: systemctl, journalctl, the HTTP probes, file modes, the queue.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pika
import pytest

from tests.support import nspawn, rpmpayload
from tests.support.broker import Broker, unique
from tests.support.daemonproc import CALLBACKS, wait_until
from tests.support.ops import ManholeSession, http, make_ssh_key

REPO = Path(__file__).resolve().parents[2]
UNIT_SOURCE = REPO / "conf" / "amqp-consumer@.service"
EXAMPLE = "/etc/amqp-consumer/amqp-consumer.toml"
LINE_FORMAT = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# The unit's own settings, which the tests' deadlines are derived from.
WATCHDOG_SEC = 30
RESTART_SEC = 5
TIMEOUT_STOP_SEC = 60


def _built_rpm() -> Path:
    """dist/'s noarch RPM, refusing one older than the files it is built from."""
    rpms = sorted((REPO / "dist").glob("amqp-consumer-*.noarch.rpm"), key=lambda p: p.stat().st_mtime)
    if not rpms:
        pytest.fail("no dist/amqp-consumer-*.noarch.rpm: run `make rpm` (make test-systemd does)")
    rpm = rpms[-1]
    sources = [REPO / "pyproject.toml", *REPO.glob("amqp_consumer/*.py"), *REPO.glob("twisted/plugins/*.py"),
               *REPO.glob("conf/*"), *REPO.glob("man/*"), *REPO.glob("packaging/rpm/*")]
    newer = [str(p.relative_to(REPO)) for p in sources if p.stat().st_mtime > rpm.stat().st_mtime]
    if newer:
        pytest.fail(f"{rpm.name} is older than {', '.join(sorted(newer)[:5])}: run `make rpm` (make test-systemd does)")
    return rpm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set(text: str, section: str, key: str, value: str) -> str:
    """Replace the value of `key` in `[section]` of the example (its comment goes); fail if absent."""
    pattern = re.compile(rf"(^\[{re.escape(section)}\]\n(?:(?!\[).*\n)*?){re.escape(key)} = [^\n]*", re.M)
    new, count = pattern.subn(lambda m: f"{m.group(1)}{key} = {value}", text, count=1)
    assert count == 1, f"the RPM's example configuration has no {key} in [{section}]"
    return new


@dataclass
class Instance:
    """amqp-consumer@NAME.service with /etc/amqp-consumer/NAME.toml."""

    box: nspawn.Container
    name: str
    queue: str  # also its exchange's name, as in the example
    health: int
    started: dict[str, object] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return f"amqp-consumer@{self.name}.service"

    @property
    def config(self) -> str:
        return f"/etc/amqp-consumer/{self.name}.toml"

    def show(self, *properties: str) -> dict[str, str]:
        return self.box.show(self.unit, *properties)

    def journal(self, output: str = "short") -> str:
        return self.box.journal("-u", self.unit, output=output)

    def daemon_lines(self) -> list[str]:
        """What the daemon itself wrote (not systemd's lines about it), as journalctl -o cat shows it."""
        rows = [json.loads(line) for line in self.journal("json").splitlines() if line.strip()]
        return [r["MESSAGE"] for r in rows if r.get("SYSLOG_IDENTIFIER") == f"amqp-consumer@{self.name}" and isinstance(r.get("MESSAGE"), str)]

    def wait_journal(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        try:
            return wait_until(lambda: regex.search(self.journal()), timeout, interval=0.3, what=f"journal line {pattern!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- journalctl -u {self.unit} ---\n{self.journal()}") from None

    def start(self) -> subprocess.CompletedProcess[str]:
        """systemctl start, noting what an operator would see the moment it returns."""
        result = self.box.run("systemctl", "start", self.unit, check=False, timeout=120)
        self.started = {
            "result": result,
            "props": self.show("ActiveState", "SubState", "MainPID"),
            "live": _status(self.health, "/live"),
        }
        # The unit as shipped: nothing overrides it.
        assert self.show("DropInPaths")["DropInPaths"] == "", "the tests must run the unit without drop-ins"
        return result

    def stop(self) -> None:
        self.box.run("systemctl", "stop", self.unit, check=False, timeout=TIMEOUT_STOP_SEC + 30)

    def ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: _status(self.health, "/ready") == 200, timeout, interval=0.2, what=f"{self.unit}: /ready = 200")


def _status(port: int, path: str) -> int:
    try:
        return http(port, path, timeout=2)[0]
    except OSError:
        return 0


@pytest.fixture(scope="module")
def amqp() -> Iterator[Broker]:
    """The test broker; what the instances declared is deleted after the container is gone."""
    b = Broker()
    try:
        b.channel()
    except Exception as e:
        pytest.fail(f"no RabbitMQ at {b.url} ({e}); run `make test-systemd`, which starts one")
    yield b
    for name in sorted(b.created):
        b.channel().exchange_delete(name)  # RabbitMQ: no error when it is gone already
    b.close()


@pytest.fixture(scope="module")
def box(amqp: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Container]:
    """A booted container with the RPM installed and the test callbacks in its system Python."""
    if os.geteuid() != 0:
        pytest.fail("make test-systemd runs as root (it boots a container with systemd-nspawn)")
    missing = [t for t in ("systemd-nspawn", "nsenter", "rpm", "rpm2cpio", "cpio") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (Debian: apt-get install systemd-container rpm cpio util-linux)")
    rpm = _built_rpm()
    image = nspawn.ensure_image()
    container = nspawn.Container(image, tmp_path_factory.mktemp("container"), unique("amqpc-unit"))
    try:
        container.boot()
        rpmpayload.install(container, rpm)
        # "Install your callback's module into the system Python" (README).
        (site,) = container.path("/usr/local/lib").glob("python3.*/dist-packages")
        shutil.copy(CALLBACKS / "unitcb.py", site / "unitcb.py")
        yield container
    finally:
        container.close()


def make_instance(box: nspawn.Container, amqp: Broker, name: str, *, callback: str = "", url: str = "",
                  prefetch: str = "", manhole: tuple[int, str] | None = None) -> Instance:
    """Copy the RPM's example the way the README says, then point it at the test broker and unique names."""
    box.run("cp", "-p", EXAMPLE, f"/etc/amqp-consumer/{name}.toml")
    path = box.path(f"/etc/amqp-consumer/{name}.toml")
    queue = unique(f"amqpc-unit-{name}")
    amqp.created.add(queue)
    text = path.read_text()
    assert "amqp-consumer.example" in text
    text = text.replace("amqp-consumer.example", queue)
    text = _set(text, "amqp", "urls", json.dumps([url or amqp.url]))
    health = _free_port()
    text = _set(text, "health", "listen", f'"tcp:{health}:interface=127.0.0.1"')
    if callback:
        text = _set(text, "consumer", "callback", json.dumps(callback))
    if prefetch:
        text = _set(text, "consumer", "prefetch", prefetch)
    if manhole:
        port, keys = manhole
        text = _set(text, "manhole", "listen", f'"tcp:{port}:interface=127.0.0.1"')
        text = _set(text, "manhole", "authorized_keys", json.dumps(keys))
    path.write_text(text)  # the file keeps cp -p's owner and mode
    return Instance(box, name, queue, health)


def publish(amqp: Broker, exchange: str, body: object, routing_key: str = "test") -> str:
    message_id = unique("m")
    amqp.channel().basic_publish(
        exchange, routing_key, json.dumps(body).encode(),
        pika.BasicProperties(content_type="application/json", message_id=message_id, delivery_mode=2),
    )
    return message_id


# --- the example, started the way the README says ------------------------------------------


@pytest.fixture(scope="module")
def example(box: nspawn.Container, amqp: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, Path, int]]:
    """amqp-consumer@example from the RPM's example, with the manhole on; (instance, ssh key, manhole port)."""
    key = make_ssh_key(tmp_path_factory.mktemp("ssh"), "operator")
    keys = "/etc/amqp-consumer/example.keys"
    box.path(keys).write_text(key.with_suffix(".pub").read_text())
    box.run("chmod", "0640", keys)
    box.run("chgrp", "amqp-consumer", keys)
    port = _free_port()
    instance = make_instance(box, amqp, "example", manhole=(port, keys))
    instance.start()
    yield instance, key, port
    instance.stop()


def test_start_returns_after_ready_and_messages_reach_the_journal(example, amqp: Broker) -> None:
    instance, _key, _port = example
    result = instance.started["result"]
    assert result.returncode == 0, f"systemctl start failed:\n{result.stdout}{result.stderr}\n{instance.journal()}"
    # Type=notify: start returned only after READY=1, which follows the listeners.
    assert instance.started["props"]["ActiveState"] == "active"
    assert instance.started["props"]["SubState"] == "running"
    assert instance.started["live"] == 200, "/live did not answer the moment systemctl start returned"
    journal = instance.journal()
    serving = journal.index("health: serving")
    assert serving < journal.index(f"Started {instance.unit}"), journal
    instance.ready()
    expected = f"consuming 1 queue(s) from {amqp.url.replace(':guest@', ':***@')}"
    wait_until(lambda: instance.show("StatusText")["StatusText"] == expected, 20, interval=0.2,
               what=f"StatusText={expected}")

    message_id = publish(amqp, instance.queue, {"hello": "journal"}, routing_key="orders.new")
    instance.wait_journal(
        rf"amqp-consumer@example\[\d+\]: INFO stdout: Message id={message_id} exchange='{instance.queue}' "
        rf"routing_key='orders.new' queue='{instance.queue}' body=\{{\"hello\": \"journal\"\}}"
    )
    wait_until(lambda: amqp.counts(instance.queue) == (0, 1), 20, what="the message acked, one consumer")

    # The journal adds the time: the daemon writes "LEVEL logger: message", no timestamp.
    lines = instance.daemon_lines()
    assert lines and all(LINE_FORMAT.match(line) for line in lines), "\n".join(lines)
    assert not [line for line in lines if re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line)], "\n".join(lines)
    # %post refreshed twistd's plugin cache; the sandboxed daemon could not have.
    assert not [line for line in lines if "plugin cache" in line or "dropin" in line], "\n".join(lines)


def test_runs_as_the_sysusers_user_with_its_host_key_in_the_state_directory(example) -> None:
    instance, key, port = example
    box = instance.box
    name, _x, uid, gid, gecos, home, shell = box.run("getent", "passwd", "amqp-consumer").stdout.strip().split(":")
    assert (gecos, home, shell) == ("amqp-consumer daemon", "/var/lib/amqp-consumer", "/usr/sbin/nologin")
    assert int(uid) < 1000, "a system user"
    pid = instance.show("MainPID")["MainPID"]
    status = box.run("cat", f"/proc/{pid}/status").stdout
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
    assert re.search(rf"^Gid:\s+{gid}\s+{gid}\s+{gid}\s+{gid}$", status, re.M), status

    assert box.run("stat", "-c", "%a %U %G", "/var/lib/amqp-consumer").stdout.split() == ["700", name, name]
    host_key = "/var/lib/amqp-consumer/manhole_host_key"
    assert box.run("stat", "-c", "%a %U %G", host_key).stdout.split() == ["600", name, name]
    instance.wait_journal(rf"manhole: generated a new ed25519 host key in {host_key} \(SHA256:")

    # The manhole answers under the sandbox, as that user.
    with ManholeSession(port, key) as shell_session:
        assert shell_session.evaluate("__import__('os').geteuid()") == uid
        assert shell_session.evaluate("status()['ready']") == "True"


def test_security_exposure_of_the_running_unit(example) -> None:
    instance, _key, _port = example
    shipped = instance.box.path(instance.show("FragmentPath")["FragmentPath"]).read_text()
    assert shipped == UNIT_SOURCE.read_text(), "the RPM's unit differs from conf/amqp-consumer@.service"
    assert instance.show("ActiveState")["ActiveState"] == "active"
    out = instance.box.run("systemd-analyze", "security", "--no-pager", instance.unit).stdout
    match = re.search(rf"Overall exposure level for {re.escape(instance.unit)}: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= 1.5, out


# --- the sandbox ------------------------------------------------------------------------------


def test_protect_system_strict_leaves_only_the_state_directory_writable(box, amqp: Broker) -> None:
    # Folders the service user owns, so only the sandbox can stop the writes.
    outside = ["/usr/local/share/amqp-probe", "/etc/amqp-probe", "/var/lib/amqp-probe", "/opt/amqp-probe"]
    for folder in outside:
        box.run("install", "-d", "-o", "amqp-consumer", "-g", "amqp-consumer", folder)
    # Outside the sandbox the user can write there.
    box.run("runuser", "-u", "amqp-consumer", "--", "touch", "/etc/amqp-probe/unsandboxed")

    instance = make_instance(box, amqp, "sandbox", callback="unitcb:write_probe")
    try:
        assert instance.start().returncode == 0, instance.journal()
        instance.ready()
        message_id = publish(amqp, instance.queue, {"dirs": ["$STATE_DIRECTORY", "/tmp", "/var/tmp", *outside]})
        match = instance.wait_journal(r"write probe: (\{.*\})")
        results = json.loads(match.group(1))
        assert results == {
            "/var/lib/amqp-consumer": "ok",
            "/tmp": "ok",       # PrivateTmp: writable, but the service's own
            "/var/tmp": "ok",
            **{folder: errno.errorcode[errno.EROFS] for folder in outside},
        }, results
        assert box.path(f"/var/lib/amqp-consumer/probe-{message_id}").is_file()
        assert box.run("test", "-e", f"/tmp/probe-{message_id}", check=False).returncode == 1, "PrivateTmp leaked"
        wait_until(lambda: amqp.depth(instance.queue) == 0, 10, what="the probe message acked")
    finally:
        instance.stop()


# --- the watchdog -------------------------------------------------------------------------------


def _realtime(instance: Instance, pattern: str) -> float:
    """Seconds since the epoch of the first journal entry of the unit whose MESSAGE matches."""
    regex = re.compile(pattern)
    for line in instance.journal("json").splitlines():
        row = json.loads(line)
        if isinstance(row.get("MESSAGE"), str) and regex.search(row["MESSAGE"]):
            return int(row["__REALTIME_TIMESTAMP"]) / 1e6
    raise AssertionError(f"no journal entry matching {pattern!r}:\n{instance.journal()}")


def test_watchdog_kills_a_blocked_reactor_and_systemd_restarts_it(box, amqp: Broker) -> None:
    instance = make_instance(box, amqp, "watchdog", callback="unitcb:block_reactor")
    try:
        assert instance.start().returncode == 0, instance.journal()
        instance.ready()
        first_pid = instance.show("MainPID")["MainPID"]
        message_id = publish(amqp, instance.queue, {"block": True})
        instance.wait_journal(rf"blocking the reactor on {message_id}")

        # Killed within WatchdogSec of the last ping, restarted RestartSec later.
        deadline = WATCHDOG_SEC + RESTART_SEC + 30
        wait_until(lambda: instance.show("NRestarts")["NRestarts"] == "1", deadline, interval=0.5,
                   what="NRestarts=1")
        instance.wait_journal(rf"{re.escape(instance.unit)}: Watchdog timeout \(limit {WATCHDOG_SEC}s\)!")
        instance.wait_journal(rf"Killing process {first_pid} \(amqp-consumer\) with signal SIGABRT")
        instance.wait_journal(r"Main process exited, code=(dumped|killed), status=6/ABRT")
        instance.wait_journal(r"Failed with result 'watchdog'")
        instance.wait_journal(r"Scheduled restart job, restart counter is at 1")
        blocked = _realtime(instance, rf"^INFO stdout: blocking the reactor on {message_id} ")
        timeout = _realtime(instance, r"Watchdog timeout")
        assert timeout - blocked <= WATCHDOG_SEC + 2, f"the watchdog fired {timeout - blocked:.1f} s after the block"

        # The new process consumes again; the blocked message comes back and is acked.
        instance.ready(60)
        props = instance.show("ActiveState", "MainPID")
        assert props["ActiveState"] == "active" and props["MainPID"] != first_pid
        instance.wait_journal(rf"redelivered {message_id}: acked")
        wait_until(lambda: amqp.counts(instance.queue) == (0, 1), 20, what="the redelivery acked, one consumer")
    finally:
        instance.stop()


# --- stop ---------------------------------------------------------------------------------------


def test_stop_drains_the_message_in_flight_and_exits_0(box, amqp: Broker) -> None:
    sleep = 8.0
    instance = make_instance(box, amqp, "slow", callback="unitcb:slow")
    try:
        assert instance.start().returncode == 0, instance.journal()
        instance.ready()
        message_id = publish(amqp, instance.queue, {"sleep": sleep})
        instance.wait_journal(rf"started {message_id}")
        began = time.monotonic()
        stopping = box.popen("systemctl", "stop", instance.unit)
        # STOPPING=1 and the drain's status line while the callback runs.
        wait_until(lambda: instance.show("ActiveState")["ActiveState"] == "deactivating", 10, interval=0.2,
                   what="ActiveState=deactivating")
        # systemd shows deactivating as soon as it sends SIGTERM; the daemon's STATUS= follows.
        wait_until(lambda: "draining" in instance.show("StatusText")["StatusText"], 10, interval=0.2,
                   what="StatusText draining")
        output, _ = stopping.communicate(timeout=TIMEOUT_STOP_SEC + 30)
        took = time.monotonic() - began
        assert stopping.returncode == 0, output
        assert took < TIMEOUT_STOP_SEC, f"systemctl stop took {took:.1f} s"
        props = instance.show("ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
        journal = instance.journal()
        # Exit status 0 (anything else is logged as "Main process exited, code=...").
        assert journal.index(f"finished {message_id}") < journal.index(f"{instance.unit}: Deactivated successfully"), journal
        assert "Main process exited" not in journal, journal
        assert "SIGKILL" not in journal and "timed out" not in journal, journal
        # Acked after it finished: not back in the queue, and nobody consumes.
        assert amqp.counts(instance.queue) == (0, 0)
    finally:
        instance.stop()


# --- failures an operator must fix --------------------------------------------------------------


def test_bad_config_and_refused_credentials_fail_once_without_restarts(box, amqp: Broker) -> None:
    broken = make_instance(box, amqp, "broken", prefetch='"lots"')
    assert ":guest@" in amqp.url
    refused = make_instance(box, amqp, "refused", url=amqp.url.replace(":guest@", ":not-the-password@"))
    try:
        result = broken.start()
        assert result.returncode != 0, "systemctl start succeeded on a broken config"
        assert f"Job for {broken.unit} failed" in result.stderr
        # READY=1 does not wait for the broker: this one starts, then exits 77.
        assert refused.start().returncode == 0, refused.journal()
        wait_until(lambda: refused.show("ActiveState")["ActiveState"] == "failed", 30, interval=0.3,
                   what=f"{refused.unit} failed")
        time.sleep(RESTART_SEC + 3)  # a restart would have happened by now
        for instance, code, name in ((broken, 78, "CONFIG"), (refused, 77, "NOPERM")):
            props = instance.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
            assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(code),
                             "NRestarts": "0"}, (instance.unit, props, instance.journal())
            assert instance.journal().count("Main process exited") == 1, instance.journal()
            status = box.run("systemctl", "status", "--no-pager", instance.unit, check=False)
            assert status.returncode == 3  # "not running"
            assert f"status={code}/{name}" in status.stdout, status.stdout
        # The reason, one line, among the journal lines systemctl status shows.
        status = box.run("systemctl", "status", "--no-pager", broken.unit, check=False).stdout
        assert (f"amqp-consumer@broken[{broken.show('ExecMainPID')['ExecMainPID']}]: amqp-consumer: config error: "
                f"{broken.config}: consumer.prefetch: expected a whole number, got 'lots'\n") in status, status
        status = box.run("systemctl", "status", "--no-pager", refused.unit, check=False).stdout
        assert re.search(r"CRITICAL amqp_consumer.daemon: stopping: the broker refused .+ \(exit status 77\)\n", status), status
        assert "not-the-password" not in status and "not-the-password" not in refused.journal()
        # The daemon's lines carry their priority: journalctl -p err shows why each one stopped,
        # and not its info lines; the failed unit's status text says why too.
        errors = box.journal("-p", "err", "-u", refused.unit)
        assert re.search(r"CRITICAL amqp_consumer.daemon: stopping: the broker refused .+ \(exit status 77\)\n", errors), errors
        assert "connecting to" not in errors, errors
        assert refused.show("StatusText")["StatusText"].startswith("stopped: the broker refused "), refused.show("StatusText")
        errors = box.journal("-p", "err", "-u", broken.unit)
        assert f"amqp-consumer: config error: {broken.config}: consumer.prefetch: expected a whole number" in errors, errors
    finally:
        broken.stop()
        refused.stop()
        box.run("systemctl", "reset-failed", check=False)
