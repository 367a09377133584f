"""The SSH manhole: key-only logins, an ed25519 host key kept at 0600, and the operator helpers.

The end-to-end tests log in with the real OpenSSH client (``ssh -tt``), type
expressions and read the results back from the session.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.conch.ssh.userauth import SSHUserAuthServer
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from amqp_consumer import exitcodes, health, manhole, tap
from amqp_consumer.config import (
    AMQPConfig,
    Config,
    ConfigError,
    ConsumerConfig,
    HealthConfig,
    ManholeConfig,
    QueueConfig,
    load,
)
from amqp_consumer.daemon import Daemon
from amqp_consumer.lifecycle import Lifecycle
from tests.support.broker import Broker, unique
from tests.support.daemonproc import ROOT, DaemonProcess, env_for
from tests.support.inprocess import in_process
from tests.support.ops import (
    HEALTH_ANYWHERE,
    SSH_KEYGEN,
    ManholeSession,
    health_port,
    http_json,
    make_ssh_key,
    manhole_port,
    poll,
    ssh_refused,
)

SECRET = "pw-0815-never-shown"


# --- host key ------------------------------------------------------------------------------


def test_host_key_path_defaults() -> None:
    assert manhole.host_key_path("/etc/x/key", {"STATE_DIRECTORY": "/var/lib/a"}) == "/etc/x/key"
    assert manhole.host_key_path("", {"STATE_DIRECTORY": "/var/lib/a"}) == "/var/lib/a/manhole_host_key"
    assert manhole.host_key_path("", {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == "/var/lib/a/manhole_host_key"
    assert manhole.host_key_path("", {}) == "./manhole_host_key"


def test_missing_host_key_is_generated_ed25519_mode_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "host_key"
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        key = manhole.load_or_create_host_key(str(path))
    finally:
        os.umask(old_umask)
    assert key.type() == "Ed25519" and not key.isPublic()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    again = manhole.load_or_create_host_key(str(path))
    assert again.fingerprint() == key.fingerprint()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_two_instances_creating_the_host_key_at_once_end_up_with_the_same_key(tmp_path: Path, monkeypatch) -> None:
    """amqp-consumer@a and @b share the state directory: the loser of the race uses the winner's key."""
    path = tmp_path / "manhole_host_key"
    generate = manhole.Ed25519PrivateKey.generate
    other: list = []

    def other_instance_writes_its_key_meanwhile():
        monkeypatch.setattr(manhole.Ed25519PrivateKey, "generate", generate)
        other.append(manhole.load_or_create_host_key(str(path)))
        return generate()

    monkeypatch.setattr(manhole.Ed25519PrivateKey, "generate", other_instance_writes_its_key_meanwhile)
    ours = manhole.load_or_create_host_key(str(path))
    assert ours.fingerprint() == other[0].fingerprint()
    assert manhole.load_or_create_host_key(str(path)).fingerprint() == ours.fingerprint()
    assert list(tmp_path.iterdir()) == [path]


def test_unusable_host_key_files_are_config_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match="manhole.host_key"):
        manhole.load_or_create_host_key(str(garbage))
    public = tmp_path / "public"
    public.write_bytes(keys.Key(Ed25519PrivateKey.generate()).public().toString("openssh"))
    with pytest.raises(ConfigError, match="public key"):
        manhole.load_or_create_host_key(str(public))
    with pytest.raises(ConfigError, match="cannot create"):
        manhole.load_or_create_host_key(str(tmp_path / "no" / "such" / "dir" / "key"))


# --- authentication -------------------------------------------------------------------------


def _keypair() -> keys.Key:
    return keys.Key(Ed25519PrivateKey.generate())


def _signed(key: keys.Key, user: bytes = b"anyone") -> SSHPrivateKey:
    blob = key.public().blob()
    data = b"session-id-and-request"
    return SSHPrivateKey(user, key.sshType(), blob, data, key.sign(data))


def test_authorized_keys_file_is_read_skipping_comments(tmp_path: Path) -> None:
    a, b = _keypair(), _keypair()
    path = tmp_path / "authorized_keys"
    path.write_bytes(
        b"# operators\n\n" + a.public().toString("openssh") + b" alice\n" + b.public().toString("openssh") + b" bob\n"
    )
    found = manhole.read_authorized_keys(str(path))
    assert [k.fingerprint() for k in found] == [a.fingerprint(), b.fingerprint()]
    with pytest.raises(ConfigError, match="manhole.authorized_keys"):
        manhole.read_authorized_keys(str(tmp_path / "missing"))


@pytest_twisted.ensureDeferred
async def test_portal_accepts_only_authorized_public_keys() -> None:
    allowed, stranger = _keypair(), _keypair()

    class Realm:
        def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> Any:
            return interfaces[0], avatar_id, lambda: None

    portal = manhole.make_portal(Realm(), [allowed.public()])  # type: ignore[arg-type]
    assert portal.listCredentialsInterfaces() == [ISSHPrivateKey]
    _iface, avatar, _logout = await portal.login(_signed(allowed, b"whoever"), None, ISSHPrivateKey)
    assert avatar == b"whoever"  # any user name: the key is the credential
    with pytest.raises(UnauthorizedLogin):
        await portal.login(_signed(stranger), None, ISSHPrivateKey)
    with pytest.raises(UnhandledCredentials):
        await portal.login(UsernamePassword(b"root", b"guest"), None, ISSHPrivateKey)
    with pytest.raises(ValidPublicKey):  # a key offered without a signature only asks "would you take it?"
        await portal.login(SSHPrivateKey(b"x", allowed.sshType(), allowed.public().blob(), None, None), None, ISSHPrivateKey)


def test_factory_has_its_own_host_key_dicts_and_offers_only_publickey() -> None:
    daemon = in_process(MemoryReactorClock(), make_config(), lambda m: None, on_exit=lambda c: None)
    key = _keypair()
    factory = manhole.make_factory(daemon, [], key)
    assert factory.privateKeys == {b"ssh-ed25519": key}
    assert factory.publicKeys[b"ssh-ed25519"].fingerprint() == key.fingerprint()
    assert manhole.manhole_ssh.ConchFactory.publicKeys == {}  # the shared class attribute is untouched
    # What the SSH server offers is derived from the portal's credential interfaces.
    offered = [SSHUserAuthServer.interfaceToMethod.get(i) for i in factory.portal.listCredentialsInterfaces()]
    assert offered == [b"publickey"]


# --- the namespace ------------------------------------------------------------------------------


def make_config(listen: str = "") -> Config:
    return Config(
        amqp=AMQPConfig(urls=(f"amqp://ops:{SECRET}@127.0.0.1:1/%2F",)),
        queues=(QueueConfig(name="q1"),),
        consumer=ConsumerConfig(callback="opscb:ack", config={"db_password": SECRET, "api": {"token": SECRET}, "n": 3, "dsn": f"postgresql://app:{SECRET}@db/app"}),
        health=HealthConfig(listen=""),
        manhole=ManholeConfig(listen=listen),
    )


@pytest.fixture
def ns(reactor) -> Iterator[tuple[Daemon, dict[str, Any]]]:
    daemon = in_process(reactor, make_config(), lambda m: None, on_exit=lambda c: None)
    yield daemon, manhole.namespace(daemon)


def test_namespace_helpers_have_docstrings_and_help_lists_them(ns) -> None:
    _daemon, space = ns
    for name in ("status", "inflight", "pause", "resume", "config"):
        doc = space[name].__doc__
        assert doc and doc.strip() and doc is not dict.__doc__, name
    listing = repr(space["help"]())
    for label in ("status()", "inflight()", "pause()", "resume()", "config", "daemon", "reactor"):
        assert f"\n  {label} " in listing
    assert "GET /status" in repr(space["help"]) and "Stop consuming" in repr(space["help"](space["pause"]))


def test_config_is_redacted(ns) -> None:
    _daemon, space = ns
    config = space["config"]
    assert SECRET not in repr(config) and SECRET not in str(dict(config))
    assert config["amqp"]["urls"] == ["amqp://ops:***@127.0.0.1:1/%2F"]
    assert config["consumer"]["config"] == {
        "db_password": "***", "api": {"token": "***"}, "n": 3, "dsn": "postgresql://app:***@db/app"
    }


@pytest_twisted.ensureDeferred
async def test_status_inflight_pause_resume(ns) -> None:
    daemon, space = ns
    assert space["daemon"] is daemon
    status = space["status"]()
    assert status.keys() == health.status_document(daemon).keys() and status["ready"] is False
    assert space["inflight"]() == daemon.consumer.inflight.snapshot() == []
    d = space["pause"]()
    assert isinstance(d, defer.Deferred)
    await d
    assert daemon.state.readiness() == (False, "paused")
    await space["resume"]()
    assert daemon.state.paused is False


def test_manhole_is_off_unless_configured_and_the_example_binds_to_loopback() -> None:
    assert ManholeConfig().listen == ""
    daemon = tap.build(MemoryReactorClock(), make_config(listen=""), lambda m: None)
    with pytest.raises(KeyError):
        daemon.getServiceNamed("manhole")
    example = ROOT / "conf" / "amqp-consumer.toml"
    assert load(example).manhole.listen == ""
    text = example.read_text()
    section = text[text.index("[manhole]") :]
    assert 'listen = ""' in section and "interface=127.0.0.1" in section.split("\n[")[0]


def test_an_unusable_host_key_stops_the_daemon_with_78(tmp_path: Path) -> None:
    class Recorded(Lifecycle):
        def stop(self, code: int) -> None:
            codes.append(code)

    codes: list[int] = []
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(_keypair().public().toString("openssh") + b"\n")
    garbage = tmp_path / "host_key"
    garbage.write_text("not a key\n")
    fake = MemoryReactorClock()
    config = replace(
        make_config(),
        manhole=ManholeConfig(listen="tcp:0:interface=127.0.0.1", authorized_keys=str(authorized), host_key=str(garbage)),
    )
    daemon = tap.build(fake, config, lambda m: None, lifecycle=Recorded(fake))
    assert codes == [exitcodes.CONFIG]
    with pytest.raises(KeyError):
        daemon.getServiceNamed("manhole")


# --- the real thing: twistd + OpenSSH ------------------------------------------------------------


class Live:
    def __init__(self, daemon: DaemonProcess, port: int, http_port: int, key: Path, stranger: Path, gate: Path, state_dir: Path, queue: str, broker: Broker) -> None:
        self.daemon, self.port, self.http_port = daemon, port, http_port
        self.key, self.stranger, self.gate, self.state_dir = key, stranger, gate, state_dir
        self.queue, self.broker = queue, broker

    def session(self) -> ManholeSession:
        return ManholeSession(self.port, self.key)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One daemon with a manhole for the module; its host key is generated in $STATE_DIRECTORY."""
    tmp = tmp_path_factory.mktemp("manhole")
    key = make_ssh_key(tmp, "operator")
    stranger = make_ssh_key(tmp, "stranger")
    authorized = tmp / "authorized_keys"
    authorized.write_text("# who may log in\n" + (tmp / "operator.pub").read_text())
    state_dir = tmp / "state"
    state_dir.mkdir()
    gate = tmp / "gate"
    gate.touch()
    broker = Broker()
    queue = unique("manhole")
    broker.declare(queue)
    text = f"""
[amqp]
urls = ["amqp://guest:guest@127.0.0.1:5672/%2F"]

[[queues]]
name = "{queue}"

[consumer]
callback = "opscb:gate"
drain_timeout = 5

[health]
listen = "{HEALTH_ANYWHERE}"

[manhole]
listen = "tcp:0:interface=127.0.0.1"
authorized_keys = "{authorized}"
"""
    d = DaemonProcess(tmp / "d", text, env=env_for(TEST_GATE=str(gate), STATE_DIRECTORY=str(state_dir)))
    d.start()
    try:
        port = manhole_port(d)
        http_port = health_port(d)
        d.wait_for_log("consuming from")
        yield Live(d, port, http_port, key, stranger, gate, state_dir, queue, broker)
        gate.touch()
        status = d.stop(timeout=15)
    finally:
        gate.touch()
        d.kill()
        broker.close()
    # Logins, refusals, pause and resume leave no traceback behind, and the daemon still stops cleanly.
    assert status == 0
    assert "Traceback" not in d.output, d.output


def test_login_by_key_and_evaluate(live: Live) -> None:
    with live.session() as s:
        assert s.evaluate("40+2") == "42"
        assert s.evaluate("status()['ready']") == "True"
        assert s.evaluate("status()['connection']['state']") == "'connected'"
        assert s.evaluate("x = 5") == ""
        assert s.evaluate("x * 2") == "10"
    live.daemon.wait_for_log(r"manhole: operator logged in")


def test_help_and_config_in_the_shell(live: Live) -> None:
    with live.session() as s:
        listing = s.evaluate("help()")
        for label in ("status()", "inflight()", "pause()", "resume()", "config"):
            assert label in listing
        assert s.evaluate("config['amqp']['urls']") == "['amqp://guest:***@127.0.0.1:5672/%2F']"


def test_pause_and_resume_from_the_shell(live: Live) -> None:
    with live.session() as s:
        s.evaluate("pause()")
        s.wait_for_text(r"Deferred #\d+ called back")
        status, doc = http_json(live.http_port, "/ready")
        assert (status, doc["reason"]) == (503, "paused")
        assert s.evaluate("status()['paused']") == "True"
        s.evaluate("resume()")
        poll(lambda: http_json(live.http_port, "/ready")[0] == 200, 10, "/ready 200 after resume()")


def test_inflight_shows_deliveries_being_processed(live: Live) -> None:
    live.gate.unlink()
    try:
        live.broker.publish_raw(live.queue, b"held", message_id="held-1")
        poll(lambda: http_json(live.http_port, "/status")[1]["inflight"]["count"] == 1, 10, "one delivery in flight")
        with live.session() as s:
            assert s.evaluate("len(inflight())") == "1"
            assert s.evaluate("inflight()[0]['message_id']") == "'held-1'"
            assert s.evaluate("inflight()[0]['age_seconds'] >= 0") == "True"
    finally:
        live.gate.touch()
    poll(lambda: http_json(live.http_port, "/status")[1]["inflight"]["count"] == 0, 10, "the delivery settled")


def test_unknown_key_and_passwords_are_refused(live: Live) -> None:
    wrong = ssh_refused(live.port, live.stranger)
    assert wrong.returncode == 255
    assert "Permission denied (publickey)" in wrong.stderr
    fingerprint = manhole.fingerprint_of(keys.Key.fromFile(str(live.stranger) + ".pub"))
    listed = subprocess.run([SSH_KEYGEN, "-l", "-f", str(live.stranger)], capture_output=True, text=True).stdout
    assert fingerprint in listed  # the log names keys the way ssh-keygen -l does
    live.daemon.wait_for_log(rf"manhole: refused operator: key {re.escape(fingerprint)} is not in the authorized keys")
    own = manhole.fingerprint_of(keys.Key.fromFile(str(live.key) + ".pub"))
    assert own not in live.daemon.output  # asking "would you take this key?" is not a refusal
    password = ssh_refused(
        live.port, None, "PubkeyAuthentication=no", "PreferredAuthentications=password,keyboard-interactive"
    )
    assert password.returncode == 255
    assert "Permission denied (publickey)" in password.stderr  # the only method the server offers


def test_host_key_was_generated_in_the_state_directory(live: Live) -> None:
    path = live.state_dir / "manhole_host_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.Key.fromFile(str(path)).type() == "Ed25519"
    live.daemon.wait_for_log(r"generated a new ed25519 host key in " + str(path))
