"""An SSH manhole: a live Python shell inside the running daemon, for operators.

Logins are by public key only, checked against an OpenSSH ``authorized_keys``
file read at startup; there is no password checker at all. The server's host
key is an ed25519 key kept in a file (mode 0600), generated on first start.

The shell runs on the reactor thread: anything slow typed there stalls the
daemon (heartbeats included) until it returns. Its status() is the status
snapshot's document (status.py), the same one GET /status serves; the shell
reaches the daemon through the operator controls in ``Operated``.
"""

from __future__ import annotations

import os
import pprint
import pydoc
import secrets
import stat
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION, SSHServerTransport
from twisted.cred import portal
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from zope.interface import implementer

from amqp_consumer.config import Config, ConfigError, ManholeConfig, redacted
from amqp_consumer.listen import Listener
from amqp_consumer.status import Snapshot

log = Logger(namespace="amqp_consumer.manhole")

HOST_KEY_NAME = "manhole_host_key"


class Operated(Protocol):
    """What the shell is given: the daemon's snapshot and its operator controls (daemon.Daemon)."""

    config: Config

    @property
    def reactor(self) -> Any: ...
    def snapshot(self) -> Snapshot: ...
    def inflight(self) -> list[dict[str, Any]]: ...
    def pause(self) -> Deferred[None]: ...
    def resume(self) -> Deferred[None]: ...
    def fatal(self, code: int, why: str) -> None: ...


# --- host key and authorized keys ------------------------------------------------


def host_key_path(configured: str, environ: Mapping[str, str] | None = None) -> str:
    """manhole.host_key, else $STATE_DIRECTORY/manhole_host_key, else ./manhole_host_key."""
    if configured:
        return configured
    env = os.environ if environ is None else environ
    state_dirs = env.get("STATE_DIRECTORY", "")
    if state_dirs:
        # systemd joins several StateDirectory= entries with ':'; the first is ours.
        return os.path.join(state_dirs.split(":")[0], HOST_KEY_NAME)
    return os.path.join(".", HOST_KEY_NAME)


def load_or_create_host_key(path: str) -> keys.Key:
    """Read the private host key at path, or generate an ed25519 key there (mode 0600)."""
    try:
        key: keys.Key = keys.Key.fromFile(path)
    except FileNotFoundError:
        return _create_host_key(path)
    except (OSError, keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
        raise ConfigError("manhole.host_key", f"cannot use {path!r} as an SSH host key: {_why(e)}") from None
    if not key.isPublic():
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warn("the manhole host key {path} is readable by others; chmod 600 it", path=path)
        return key
    raise ConfigError("manhole.host_key", f"{path!r} holds a public key; it must be the private host key")


def _create_host_key(path: str) -> keys.Key:
    key = keys.Key(Ed25519PrivateKey.generate())
    data = key.toString("openssh")
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link, not rename: two instances starting together on one state
        # directory must end up with the same key, not each with its own.
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_host_key(path)  # the other one was first
    except OSError as e:
        raise ConfigError("manhole.host_key", f"cannot create {path!r}: {_why(e)}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    log.info(
        "manhole: generated a new ed25519 host key in {path} ({fingerprint})",
        path=path,
        fingerprint=fingerprint_of(key),
    )
    return key


def fingerprint_of(key: keys.Key) -> str:
    """SHA256:... as `ssh-keygen -l` prints it."""
    return "SHA256:" + str(key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)).rstrip("=")


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def read_authorized_keys(path: str) -> list[keys.Key]:
    """The public keys of an OpenSSH authorized_keys file (lines with options are skipped)."""
    try:
        with open(path, "rb") as f:
            found = list(readAuthorizedKeyFile(f))
    except OSError as e:
        raise ConfigError("manhole.authorized_keys", f"cannot read {path!r}: {_why(e)}") from None
    return found


class AnyUserName(Mapping[bytes, tuple[keys.Key, ...]]):
    """The key database seen by InMemorySSHKeyDB: every user name gets the same keys.

    The key is the credential; the name an operator types is only logged.
    """

    def __init__(self, authorized: list[keys.Key]) -> None:
        self._keys = tuple(authorized)

    def __getitem__(self, username: bytes) -> tuple[keys.Key, ...]:
        return self._keys

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def __len__(self) -> int:
        return 0


class KeyChecker(SSHPublicKeyChecker):
    """Conch's public-key checker, logging the keys it refuses."""

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        d: Deferred[Any] = super().requestAvatarId(credentials)  # type: ignore[no-untyped-call]

        def refused(failure: Any) -> Any:
            # ValidPublicKey (an UnauthorizedLogin) only answers a client asking
            # "would you take this key?" before it signs: not a refusal.
            if failure.check(UnauthorizedLogin) and not failure.check(ValidPublicKey):
                try:
                    fingerprint = fingerprint_of(keys.Key.fromString(credentials.blob))
                except Exception:
                    fingerprint = "(unreadable key)"
                log.warn(
                    "manhole: refused {user}: key {fingerprint} is not in the authorized keys",
                    user=credentials.username.decode("utf-8", "replace"),
                    fingerprint=fingerprint,
                )
            return failure

        return d.addErrback(refused)


def make_portal(realm: portal.IRealm, authorized: list[keys.Key]) -> portal.Portal:
    """A portal whose only checker is public-key: no password can ever log in."""
    return portal.Portal(realm, [KeyChecker(InMemorySSHKeyDB(AnyUserName(authorized)))])


# --- the shell's namespace ---------------------------------------------------------


class _Text(str):
    """Shown as-is by the shell (its repr is the text itself)."""

    def __repr__(self) -> str:
        return str(self)


class _Shown(dict):  # type: ignore[type-arg]
    """A dict the shell prints one key per line."""

    def __repr__(self) -> str:
        return pprint.pformat(dict(self), sort_dicts=False, width=110)


class _ShownList(list):  # type: ignore[type-arg]
    def __repr__(self) -> str:
        return pprint.pformat(list(self), sort_dicts=False, width=110)


class RedactedConfig(_Shown):
    """The daemon's configuration as plain data, with secrets redacted.

    Any URL-shaped value shows '***' for its password (broker URLs, a dsn
    under consumer.config), and values under consumer.config whose key names a
    password, secret, token or credential show '***'.
    Changing it changes nothing: the daemon reads its config once, at start.
    """


def redacted_config(config: Config) -> RedactedConfig:
    return RedactedConfig(redacted(config))


class Help:
    """help() lists the operator helpers; help(obj) shows obj's documentation."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._entries = entries  # (what to type, what it does)

    def listing(self) -> str:
        width = max(len(label) for label, _ in self._entries)
        lines = ["Operator helpers (help(name) for more):"]
        for label, doc in self._entries:
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            lines.append(f"  {label.ljust(width)}  {first}")
        lines.append("The shell runs on the reactor thread: anything slow typed here stalls the daemon.")
        return "\n".join(lines)

    def __call__(self, obj: Any = None) -> _Text:
        if obj is None:
            return _Text(self.listing())
        plain = pydoc.plaintext  # type: ignore[attr-defined]  # typeshed leaves it out
        return _Text(pydoc.render_doc(obj, title="%s", renderer=plain).rstrip())

    def __repr__(self) -> str:
        return self.listing()


def namespace(daemon: Operated) -> dict[str, Any]:
    """What the shell sees: the running service and the operator helpers."""

    def status() -> _Shown:
        """The daemon's state as a dict: the same document as GET /status."""
        return _Shown(daemon.snapshot().document())

    def inflight() -> _ShownList:
        """Deliveries received and not yet settled, oldest first, with their age in seconds."""
        return _ShownList(daemon.inflight())

    def pause() -> Deferred[None]:
        """Stop consuming on every queue (in-flight deliveries still finish); /ready says "paused"."""
        log.info("manhole: pausing consumption")
        return daemon.pause()

    def resume() -> Deferred[None]:
        """Consume again after pause()."""
        log.info("manhole: resuming consumption")
        return daemon.resume()

    config = redacted_config(daemon.config)
    ns: dict[str, Any] = {
        "status": status,
        "inflight": inflight,
        "pause": pause,
        "resume": resume,
        "config": config,
        "daemon": daemon,
        "reactor": daemon.reactor,
    }
    ns["help"] = Help(
        [
            ("status()", status.__doc__ or ""),
            ("inflight()", inflight.__doc__ or ""),
            ("pause()", pause.__doc__ or ""),
            ("resume()", resume.__doc__ or ""),
            ("config", config.__doc__ or ""),
            ("daemon", "The running service: daemon.consumer, daemon.state, daemon.metrics."),
            ("reactor", "The Twisted reactor the daemon runs on."),
        ]
    )
    return ns


# --- SSH plumbing --------------------------------------------------------------------


class _Session(manhole_ssh.TerminalSession):
    """Conch's terminal session, tolerant of window-size changes and EOF from the client."""

    width = 80
    height = 24
    _terminal: Any = None

    def openShell(self, proto: Any) -> None:
        self._terminal = self.chainedProtocolFactory()  # type: ignore[no-untyped-call]
        self.transportFactory(  # type: ignore[no-untyped-call]
            proto, self._terminal, IConchUser(self.original), self.width, self.height
        )

    def windowChanged(self, newWindowSize: Any) -> None:
        self.height, self.width = newWindowSize[:2]
        terminal_protocol = getattr(self._terminal, "terminalProtocol", None)
        if terminal_protocol is not None:
            terminal_protocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        pass


class _Transport(SSHServerTransport):
    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if reasonCode == DISCONNECT_BY_APPLICATION:  # the client logged out: not an error
            return
        super().receiveError(reasonCode, description)  # type: ignore[no-untyped-call]


@implementer(portal.IRealm)
class _Realm(manhole_ssh.TerminalRealm):
    """Conch's terminal realm, logging logins; each session gets a copy of the shell's namespace."""

    sessionFactory = _Session

    def __init__(self, ns: dict[str, Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._ns = ns

    def chainedProtocolFactory(self) -> insults.ServerProtocol:  # type: ignore[override]  # a class there
        # A copy per session: one operator's variables do not leak into another's.
        return insults.ServerProtocol(manhole.ColoredManhole, dict(self._ns))

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else str(avatarId)
        log.info("manhole: {user} logged in", user=name)
        return super().requestAvatar(avatarId, mind, *interfaces)  # type: ignore[no-untyped-call]


def make_factory(daemon: Operated, authorized: list[keys.Key], host_key: keys.Key) -> manhole_ssh.ConchFactory:
    realm = _Realm(namespace(daemon))
    factory = manhole_ssh.ConchFactory(make_portal(realm, authorized))
    # New dicts on the instance: the class attributes are shared by every ConchFactory.
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}  # type: ignore[dict-item]  # conch says bytes, means Key
    factory.protocol = _Transport
    factory.noisy = False
    return factory


def service(
    reactor: IReactorTCP, daemon: Operated, config: ManholeConfig, on_error: Callable[[int, str], None] | None = None
) -> Listener:
    """The manhole listener for ``[manhole]``; raises ConfigError for unusable key files. A failure
    to listen goes to on_error, by default daemon.fatal."""
    authorized = read_authorized_keys(config.authorized_keys)
    if not authorized:
        log.warn("manhole: {path} holds no usable key; nobody can log in", path=config.authorized_keys)
    key_path = host_key_path(config.host_key)
    host_key = load_or_create_host_key(key_path)
    fingerprint = fingerprint_of(host_key)
    return Listener(
        reactor,
        "manhole",
        config.listen,
        make_factory(daemon, authorized, host_key),
        on_error=on_error or daemon.fatal,
        announce=lambda address: (
            f"SSH manhole on {address}, {len(authorized)} key(s) from {config.authorized_keys}, "
            f"host key {fingerprint}"
        ),
    )
