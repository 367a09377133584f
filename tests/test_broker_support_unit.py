"""The test support's broker choice and its RabbitMQ 4.3 root build, without a network or a broker.

The real build (debootstrap from the Debian mirror, about a minute) runs in CI on a fresh clone; here a stand-in
debootstrap shows that only a complete build ever becomes the root, and that nothing is removed through a mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import brokers, rabbit43
from tests.support.rabbitnode import RabbitNodeError

FAKE_DEBOOTSTRAP = """#!/bin/sh
# debootstrap --variant=minbase --include=rabbitmq-server SUITE TARGET MIRROR SCRIPT
target="$4"
mkdir -p "$target/usr/lib/rabbitmq/bin" "$target/etc" "$target/var/cache/apt/archives"
touch "$target/var/cache/apt/archives/big.deb"
case "$FAKE_MODE" in
    fail) touch "$target/usr/lib/rabbitmq/bin/rabbitmq-server"; echo "E: mirror went away"; exit 1 ;;
    empty) exit 0 ;;
    *) touch "$target/usr/lib/rabbitmq/bin/rabbitmq-server"; echo "I: Base system installed successfully." ;;
esac
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the build runs in its own mount namespace (root only)")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = tmp_path / "debootstrap"
    script.write_text(FAKE_DEBOOTSTRAP)
    script.chmod(0o755)

    def build(mode: str) -> Path:
        monkeypatch.setenv("FAKE_MODE", mode)
        return rabbit43.build_root(tmp_path / "cache" / "root", debootstrap=str(script), say=lambda line: None)

    return build


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.glob(f"{root.name}.partial-*"))


@needs_root
@pytest.mark.parametrize("mode", ["fail", "empty"])
def test_a_failed_build_leaves_no_root(tmp_path: Path, fake, mode: str) -> None:
    root = tmp_path / "cache" / "root"
    with pytest.raises(RabbitNodeError, match="building the RabbitMQ 4.3 root failed"):
        fake(mode)
    assert not root.exists() and leftovers(root) == []
    if mode == "fail":
        assert "E: mirror went away" in (root.parent / "build.log").read_text()


@needs_root
def test_an_interrupted_build_is_removed_and_the_root_is_built_whole(tmp_path: Path, fake) -> None:
    root = tmp_path / "cache" / "root"
    interrupted = root.parent / "root.partial-4242"
    (interrupted / "usr/lib/rabbitmq/bin").mkdir(parents=True)
    (interrupted / "usr/lib/rabbitmq/bin/rabbitmq-server").touch()  # looks complete, but was never renamed
    assert fake("ok") == root
    assert rabbit43.root_ready(root) and leftovers(root) == []
    assert "localhost" in (root / "etc/hosts").read_text()
    assert list((root / "var/cache/apt/archives").glob("*.deb")) == []


@needs_root
def test_a_root_that_is_there_is_reused(tmp_path: Path, fake) -> None:
    fake("ok")
    (tmp_path / "cache/root/marker").touch()
    fake("fail")  # would fail if it ran
    assert (tmp_path / "cache/root/marker").exists()


@needs_root
def test_nothing_is_removed_through_a_mount_point(tmp_path: Path) -> None:
    """A folder with something mounted below it (as /dev or /proc could be) is left alone, and says why."""
    victim = tmp_path / "node"
    (victim / "dev").mkdir(parents=True)
    code = (
        "import sys; from pathlib import Path; from tests.support.rabbit43 import remove_tree; "
        "from tests.support.rabbitnode import RabbitNodeError\n"
        "Path(sys.argv[1], 'dev', 'null-ish').write_text('host device')\n"
        "try:\n    remove_tree(Path(sys.argv[1]))\nexcept RabbitNodeError as e:\n    print(e)\n"
        "print(Path(sys.argv[1], 'dev', 'null-ish').read_text())\n"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount -t tmpfs none "$1/dev" && exec "$0" -c "$2" "$1"', sys.executable, str(victim), code],
        capture_output=True, text=True, timeout=60, cwd=rabbit43.REPO, env={**os.environ, "PYTHONPATH": str(rabbit43.REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert f"not removing {victim}: {victim}/dev is mounted below it" in result.stdout
    assert result.stdout.rstrip().endswith("host device")


def test_explicit_brokers_are_required() -> None:
    plan = brokers.plan({brokers.ENV: "3.10, 4.3"})
    assert plan.versions == ("3.10", "4.3") and plan.required and plan.notes == []
    assert plan.header() == f"brokers: RabbitMQ 3.10, RabbitMQ 4.3 (required by {brokers.ENV})"
    with pytest.raises(ValueError, match="expected a comma-separated list of 3.10, 4.3"):
        brokers.plan({brokers.ENV: "3.10,5.0"})


def test_without_4_3_the_run_narrows_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rabbit43, "why_unavailable", lambda root=rabbit43.ROOT: "needs root (chroot)")
    plan = brokers.plan({})
    assert plan.versions == ("3.10",) and not plan.required
    assert plan.header() == "brokers: RabbitMQ 3.10; RabbitMQ 4.3 left out: needs root (chroot) (3.10 only)"


def test_node_folders_left_by_a_dead_test_run_are_swept(tmp_path: Path) -> None:
    nodes = tmp_path / rabbit43.NODES
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, owner in (("gone-1", dead.pid), ("mine-1", os.getpid())):
        (nodes / name / "mnesia").mkdir(parents=True)
        (nodes / name / "owner").write_text(f"{owner}\n")
    (nodes / "starting-1").mkdir()  # no owner yet: being created
    rabbit43.sweep_stale_nodes(tmp_path)
    assert sorted(p.name for p in nodes.iterdir()) == ["mine-1", "starting-1"]
