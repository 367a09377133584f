"""A booted systemd in a container, for tests that run the unit as an installed package does.

The image is a Debian bookworm tree (systemd 252, Python 3.11) that debootstrap
builds once into ``.cache/systemd-bookworm/root``; newer systemd may refuse a
host with a cgroup v1 hierarchy, bookworm's does not. Every :class:`Container`
boots a private copy of it (``cp -a``, a few seconds), so a run starts from a
clean tree and runs from several checkouts never share one.

``systemd-nspawn --register=no --keep-unit -b`` boots it without machined
(without ``--keep-unit`` nspawn fails with "Failed to open system bus" where
the host runs no systemd). The container shares the host's network, so the
broker and the daemon's ports are on the host's 127.0.0.1. Commands run inside
through ``nsenter --all`` into the namespaces of the container's PID 1, which
is the child of the nspawn process.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.daemonproc import wait_until

REPO = Path(__file__).resolve().parents[2]
IMAGE_CACHE = REPO / ".cache" / "systemd-bookworm"
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")

# What commands inside see: no host variables (PYTHONPATH, VIRTUAL_ENV, ...).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}


class ContainerError(RuntimeError):
    """The image could not be built, or the container could not boot or stop."""


def _image_complete(root: Path) -> bool:
    return all(os.path.lexists(root / p) for p in ("usr/lib/systemd/systemd", "usr/bin/python3", "usr/bin/dbus-daemon"))


def ensure_image(cache: Path = IMAGE_CACHE, log: Path | None = None) -> Path:
    """The cached bookworm root, debootstrapped first when absent (about 75 s).

    It is built in a temporary folder beside it and renamed into place, under a
    lock, so a concurrent run waits for it and an interrupted one leaves nothing
    half-built behind. Set DEBIAN_MIRROR to use another mirror.
    """
    root = cache / "root"
    if _image_complete(root):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _image_complete(root):
            return root
        if shutil.which("debootstrap") is None:
            raise ContainerError("debootstrap is not installed (apt-get install debootstrap)")
        building = Path(tempfile.mkdtemp(prefix="root.building.", dir=cache))
        building.chmod(0o755)
        log = log or cache / "debootstrap.log"
        try:
            with open(log, "wb") as out:
                result = subprocess.run(
                    ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(building), MIRROR],
                    stdout=out, stderr=subprocess.STDOUT, timeout=1800,
                )
            if result.returncode != 0 or not _image_complete(building):
                raise ContainerError(f"debootstrap {SUITE} from {MIRROR} failed (status {result.returncode}); see {log}")
            if os.path.lexists(root):
                shutil.rmtree(root)  # an incomplete tree from an older layout
            building.rename(root)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return root


def _die_with_parent() -> None:
    """In the child: SIGTERM (a clean poweroff of the container) when the test process dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


class Container:
    """One booted copy of the image: run commands in it, read its journal, power it off."""

    def __init__(self, image: Path, workdir: Path, name: str) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
            raise ValueError(f"not a machine name: {name!r}")
        self.image = image
        self.workdir = workdir
        self.name = name
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (write there, the container sees it)."""
        return self.root / inside.lstrip("/")

    def boot(self, timeout: float = 120.0) -> Container:
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.image), str(self.root)], check=True, timeout=600)
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", f"--machine={self.name}", "-D", str(self.root), "-b"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        proc = self.proc

        def leader() -> int | None:
            if proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {proc.returncode}:\n{self.console.read_text(errors='replace')}")
            # Before it execs systemd, nspawn's child is still setting the container up.
            for kid in _children(proc.pid):
                try:
                    if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                        return kid
                except OSError:
                    pass
            return None

        self.leader = wait_until(leader, 30, interval=0.1, what="the container's PID 1")
        # is-system-running needs the manager's bus socket, which appears during boot.
        state = wait_until(self._state, timeout, interval=0.1, what="the container's systemd to answer")
        if state not in ("running", "degraded"):
            raise ContainerError(f"the container booted into state {state!r}:\n{self.run('systemctl', '--failed', check=False).stdout}")
        return self

    def _state(self) -> str | None:
        result = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
        state = result.stdout.strip()
        return state if state in ("running", "degraded", "maintenance", "stopping") else None

    def command(self, *argv: str) -> list[str]:
        """The host argv that runs argv inside the container."""
        return ["nsenter", f"--target={self.leader}", "--all", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        if not self.leader:
            raise ContainerError("the container is not running")
        result = subprocess.run(
            self.command(*argv), env=INSIDE_ENV, input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited {result.returncode} in the container:\n{result.stdout}{result.stderr}")
        return result

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*argv), env=INSIDE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # --- systemd, as an operator reads it --------------------------------------------

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...``: property -> value."""
        argv = ["systemctl", "show", unit]
        for p in properties:
            argv += ["-p", p]
        out = self.run(*argv).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *selectors: str, output: str = "short") -> str:
        """``journalctl --no-pager -o OUTPUT SELECTORS`` (e.g. "-u", unit)."""
        return self.run("journalctl", "--no-pager", "-o", output, *selectors).stdout

    # --- end ----------------------------------------------------------------------------

    def poweroff(self, timeout: float = 60.0) -> None:
        """SIGTERM to nspawn halts the container cleanly; SIGKILL to its PID 1 if that hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.leader:
                try:
                    os.kill(self.leader, signal.SIGKILL)  # ends every process in its PID namespace
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(30)
        self.leader = 0

    def close(self) -> None:
        """Power off and delete the copy of the image."""
        try:
            self.poweroff()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
