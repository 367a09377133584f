"""RabbitMQ 4.3 next to the machine's 3.10: a Debian-testing root built once, and private nodes run in it.

The machine's own RabbitMQ is 3.10 (Debian 12).  Debian testing carries 4.3, so
the suite debootstraps a minimal testing root holding ``rabbitmq-server`` into
the repository's ignored ``.cache/rabbitmq-4.3/root`` and runs nodes in it
under ``chroot``.  :class:`Rabbit43Node` has :class:`RabbitNode`'s interface
(start, stop, kill, restart, ``url``, ``ctl``), so a test is written once for
both brokers.

Safety, since the cache folder is the kind of thing people ``rm -rf``:

- The build goes into a temporary sibling folder, renamed into place only once
  complete: an interrupted build is never taken for a root (the next one
  removes it).
- Nothing is mounted where the rest of the machine sees it.  debootstrap and
  every node run in a mount namespace of their own (``unshare --mount`` with
  private propagation); /proc is mounted there for the node's memory monitor
  and goes away with the namespace's last process.  /dev is never bound: the
  device nodes debootstrap created in the root are enough.
- Test runs from several worktrees share the root: every node has its own
  name (random suffix), ports and folder under ``ROOT/tmp/amqp-consumer-nodes``.
  They share the root's epmd on port 4410, which keeps them apart from the
  host's Erlang nodes (epmd stays running afterwards, as it does on the host).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.rabbitnode import RabbitNode, RabbitNodeError, TLSFiles, _pid_alive

__all__ = ["ROOT", "BackgroundBuild", "Rabbit43Node", "build_root", "root_ready", "why_unavailable"]

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / ".cache" / "rabbitmq-4.3" / "root"
SUITE = "forky"  # Debian testing: rabbitmq-server 4.3 with Erlang 29
# Bookworm's debootstrap has no script for forky; the sid one fits testing.
DEBOOTSTRAP_SCRIPT = Path("/usr/share/debootstrap/scripts/sid")
MIRROR_ENV = "AMQP_CONSUMER_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
EPMD_PORT = 4410  # the root's own epmd; not 4369 (the host's), nor 4400 (used by hand in the notes)
SCRIPTS = Path("/usr/lib/rabbitmq/bin")  # inside the root
NODES = Path("tmp/amqp-consumer-nodes")  # inside the root
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

# Runs as `sh -c IN_ROOT ROOT COMMAND...` in a fresh mount namespace.
_IN_ROOT = 'mountpoint -q "$0/proc" || mount -t proc proc "$0/proc" || exit 1; exec chroot "$0" "$@"'
_PRIVATE_MOUNTS = ["unshare", "--mount", "--propagation", "private", "--"]


def mirror() -> str:
    return os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR


def root_ready(root: Path = ROOT) -> bool:
    """Whether *root* is a complete root with RabbitMQ in it."""
    return (root / SCRIPTS.relative_to("/") / "rabbitmq-server").is_file()


def why_unavailable(root: Path = ROOT) -> str | None:
    """Why RabbitMQ 4.3 cannot run here (in a few words), or None when it can (building the root if needed)."""
    if os.geteuid() != 0:
        return "needs root (chroot)"
    for tool in ("chroot", "unshare", "mountpoint"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if root_ready(root):
        return None
    if shutil.which("debootstrap") is None or not DEBOOTSTRAP_SCRIPT.is_file():
        return f"no {root} and debootstrap is not installed (apt-get install debootstrap)"
    if not (os.environ.get("http_proxy") or os.environ.get("HTTP_PROXY")):
        url = urlsplit(mirror())
        try:
            socket.create_connection((url.hostname or "", url.port or 80), timeout=5).close()
        except OSError as e:
            return f"no {root} and the Debian mirror {url.hostname} is unreachable ({e.strerror or e})"
    return None


def _mount_points_under(path: Path) -> list[str]:
    """Mount points at or below *path* in this process's mount namespace."""
    prefix = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 for a space, etc.
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """``rm -rf`` *path*, but never through a mount point (it would empty the host's /dev or /proc)."""
    mounted = _mount_points_under(path)
    if mounted:
        raise RabbitNodeError(f"not removing {path}: {', '.join(mounted)} is mounted below it")
    shutil.rmtree(path, ignore_errors=True)


def prepare_root(root: Path) -> None:
    """What a node needs in the root besides packages: /etc/hosts (without it the node cannot resolve localhost)."""
    hosts = root / "etc" / "hosts"
    if not hosts.exists():
        tmp = hosts.with_name(f".hosts.{os.getpid()}")
        tmp.write_text(HOSTS)
        tmp.replace(hosts)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[int]:
    """One build at a time on this machine; yields the lock's fd, which debootstrap inherits."""
    fd = os.open(folder / ".build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def build_root(root: Path = ROOT, *, debootstrap: str = "debootstrap", say=print) -> Path:
    """Build the Debian-testing root with RabbitMQ 4.3 at *root*, unless a complete one is there (about a minute)."""
    root = Path(root)
    if not root_ready(root):
        folder = root.parent
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder) as lock:
            if not root_ready(root):  # another test run may have built it while we waited
                _build(root, debootstrap, lock, say)
    prepare_root(root)
    return root


class BackgroundBuild:
    """build_root() on a thread, so that the minute it takes overlaps the tests that need no 4.3."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self._result: Path | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rabbitmq-4.3-root", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = build_root(self.root, say=lambda line: None)
        except BaseException as e:  # handed to whoever waits for the root
            self._result = e

    def wait(self) -> Path:
        self._thread.join()
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


def _build(root: Path, debootstrap: str, lock: int, say) -> None:
    if root.exists() and any(root.iterdir()):
        raise RabbitNodeError(f"{root} exists but holds no RabbitMQ: remove it and run again to rebuild it")
    folder = root.parent
    # Under the lock, any partial folder is what an interrupted build left: never used, removed.
    for stale in folder.glob(f"{root.name}.partial-*"):
        remove_tree(stale)
    partial = folder / f"{root.name}.partial-{os.getpid()}"
    log = folder / "build.log"
    url = mirror()
    say(f"building the RabbitMQ 4.3 root in {root} from {url} (about a minute; log: {log})")
    command = [
        *_PRIVATE_MOUNTS,  # whatever debootstrap mounts in the root vanishes with it, even when killed
        debootstrap,
        "--variant=minbase",
        "--include=rabbitmq-server",
        SUITE,
        str(partial),
        url,
        str(DEBOOTSTRAP_SCRIPT),
    ]
    with open(log, "wb") as out:
        try:
            # The child holds the lock too, so a build that outlives its test run is never swept away.
            result = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=(lock,), timeout=1800
            )
        except subprocess.TimeoutExpired:
            result = None
    if result is None or result.returncode != 0 or not root_ready(partial):
        remove_tree(partial)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        status = "timed out" if result is None else f"exit status {result.returncode}"
        raise RabbitNodeError(f"building the RabbitMQ 4.3 root failed ({status}); see {log}:\n{tail}")
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()  # about 90 MB nobody needs again
    prepare_root(partial)
    partial.rename(root)


class Rabbit43Node(RabbitNode):
    """A private RabbitMQ 4.3 node in the root; the same interface as :class:`RabbitNode`.

    Its folder (data, logs, config, cookie) is ``ROOT/tmp/amqp-consumer-nodes/<name>``.
    Nodes meant to form a cluster take the same ``cookie``; they find each other
    through the root's epmd.
    """

    version = "4.3"

    def __init__(
        self,
        name: str,
        tls: TLSFiles | None = None,
        verify_peer: bool = False,
        *,
        extra_config: Mapping[str, str] | None = None,
        cookie: str | None = None,
        root: Path = ROOT,
    ) -> None:
        self.root = Path(root).resolve()
        if not root_ready(self.root):
            raise RabbitNodeError(f"no RabbitMQ 4.3 root at {self.root}: build it with build_root()")
        prepare_root(self.root)
        base = self.root / NODES
        base.mkdir(parents=True, exist_ok=True)
        sweep_stale_nodes(self.root)
        super().__init__(name, base, tls, verify_peer, extra_config=extra_config, cookie=cookie)
        (self.dir / "owner").write_text(f"{os.getpid()}\n")

    def _find_scripts(self) -> Path:
        return SCRIPTS

    def _node_path(self, path: Path) -> str:
        return "/" + str(Path(path).relative_to(self.root))

    def _command(self, script: Path, *args: str) -> list[str]:
        return [*_PRIVATE_MOUNTS, "/bin/sh", "-c", _IN_ROOT, str(self.root), str(script), *args]

    def _base_env(self) -> dict[str, str]:
        # Nothing from the host's environment: the root has its own paths and tools.
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_PORT": str(EPMD_PORT),
        }

    def _server_tls_files(self, tls: TLSFiles) -> tuple[Path, Path, Path]:
        inside = self.dir / "tls"
        inside.mkdir(exist_ok=True)
        copies = []
        for source in (tls.ca_cert, tls.server_cert, tls.server_key):
            copy = inside / source.name
            shutil.copyfile(source, copy)
            copy.chmod(0o600)
            copies.append(copy)
        return copies[0], copies[1], copies[2]

    def _remove_files(self) -> None:
        remove_tree(self.dir)


def sweep_stale_nodes(root: Path = ROOT) -> None:
    """Remove node folders whose test run died without cleaning up (its watchdog killed the node)."""
    base = root / NODES
    homes: set[bytes] = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if entry.isdigit() else []
                homes.update(b for a, b in zip(args, args[1:]) if a == b"-home")
    with contextlib.suppress(OSError):
        for folder in base.iterdir():
            try:
                owner = int((folder / "owner").read_text())
            except (OSError, ValueError):
                continue  # being created, or not ours
            if _pid_alive(owner) or f"/{NODES}/{folder.name}".encode() in homes:
                continue
            with contextlib.suppress(RabbitNodeError):
                remove_tree(folder)
