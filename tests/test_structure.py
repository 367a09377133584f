"""The shape of the house: flat surfaces, one assembly point, and the start/stop order of the root service.

These read the source (the imports and constructor calls of each module) or
record what an assembled daemon does; none needs a broker.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from amqp_consumer import tap
from amqp_consumer.config import AMQPConfig, Config, ConsumerConfig, HealthConfig, ManholeConfig, QueueConfig
from amqp_consumer.daemon import Daemon
from tests.support.daemonproc import ROOT
from tests.support.ops import NotifySocket, make_ssh_key

PACKAGE = ROOT / "amqp_consumer"
SURFACES = ("health", "manhole", "systemd")
# What the surfaces must not reach into: each other, and the parts whose figures they
# read through the status snapshot instead.
BEHIND_THE_SNAPSHOT = ("daemon", "consumer", "tap", "subscription", "inflight", "dispatch", "pipeline", "quarantine", "connection")


def imported_modules(path: Path) -> set[str]:
    """Every amqp_consumer module a file imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = "amqp_consumer" + (f".{base}" if base else "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m.removeprefix("amqp_consumer.") for m in found if m.startswith("amqp_consumer.")}


def test_the_import_walk_sees_every_form_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import amqp_consumer.daemon\n"
        "from amqp_consumer import health as h\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from amqp_consumer.consumer import Consumer\n"
        "def f():\n    from . import manhole\n"
    )
    assert {"daemon", "health", "consumer", "manhole"} <= imported_modules(sample)


@pytest.mark.parametrize("surface", SURFACES)
def test_the_surfaces_are_peers_that_read_the_snapshot(surface: str) -> None:
    imported = imported_modules(PACKAGE / f"{surface}.py")
    forbidden = {s for s in SURFACES if s != surface} | set(BEHIND_THE_SNAPSHOT)
    assert not imported & forbidden, f"{surface}.py imports {sorted(imported & forbidden)}"
    assert "status" in imported  # what they read instead


# The long-lived parts, by the module that defines each: only the assembly (tap.py) constructs them.
ASSEMBLED = {
    "State": "state", "Metrics": "metrics", "Status": "status", "FatalStop": "daemon", "Daemon": "daemon",
    "Consumer": "consumer", "InFlight": "inflight", "Settler": "inflight", "Dispatcher": "dispatch",
    "Publisher": "publisher", "Quarantine": "quarantine", "Pipeline": "pipeline",
    "AckTimeoutWatch": "brokerlimits", "Subscription": "subscription", "Connector": "connection",
    "Lifecycle": "lifecycle",
}


def constructed(path: Path) -> set[str]:
    """The long-lived parts a module constructs: calls of the class imported from its defining module."""
    tree = ast.parse(path.read_text(), str(path))
    here = path.stem
    source = {name: home for name, home in ASSEMBLED.items() if home == here}  # its own classes
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amqp_consumer."):
            for alias in node.names:
                source[alias.asname or alias.name] = node.module.removeprefix("amqp_consumer.")  # type: ignore[union-attr]
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if name in ASSEMBLED and source.get(name) == ASSEMBLED[name]:
                calls.add(name)
    return calls


def test_only_the_assembly_builds_the_long_lived_parts() -> None:
    builders = {p.stem: constructed(p) for p in sorted(PACKAGE.glob("*.py")) if constructed(p)}
    assert set(builders) == {"tap"}, builders
    assert builders["tap"] == set(ASSEMBLED)


# --- start and stop order -----------------------------------------------------------------


@pytest.fixture
def assembled(tmp_path: Path) -> Any:
    """A daemon with every child: consumer, health, manhole and systemd, on a fake reactor."""
    make_ssh_key(tmp_path, "operator")
    config = Config(
        amqp=AMQPConfig(urls=("amqp://guest:guest@127.0.0.1:1/%2F",)),
        queues=(QueueConfig(name="q"),),
        consumer=ConsumerConfig(callback="opscb:ack", drain_timeout=5),
        health=HealthConfig(listen="tcp:0:interface=127.0.0.1"),
        manhole=ManholeConfig(
            listen="tcp:0:interface=127.0.0.1",
            authorized_keys=str(tmp_path / "operator.pub"),
            host_key=str(tmp_path / "host_key"),
        ),
    )
    notify = NotifySocket()
    daemon = tap.assemble(MemoryReactorClock(), config, lambda m: None, on_exit=lambda code: None,
                          environ={"NOTIFY_SOCKET": notify.address})
    yield daemon, notify
    notify.close()


def record(daemon: Daemon) -> list[str]:
    """Each child's start and stop, and when its stop finished; around the consumer's stop, what health answers."""
    events: list[str] = []
    health = daemon.getServiceNamed("health")

    def health_says() -> None:
        events.append(f"  health running: {bool(health.running)}, ready says: {daemon.snapshot().reason}")

    def stopped(result: Any, name: str) -> Any:
        events.append(f"stopped {name}")
        if name == "consumer":
            health_says()
        return result

    for child in list(daemon):
        name = child.name

        def start(orig: Any = child.startService, name: str = name) -> None:
            events.append(f"start {name}")
            orig()

        def stop(orig: Any = child.stopService, name: str = name) -> Any:
            events.append(f"stop {name}")
            d = maybeDeferred(orig)
            if name == "consumer":
                health_says()  # the drain has begun
            return d.addCallback(stopped, name)

        child.startService = start  # type: ignore[method-assign]
        child.stopService = stop  # type: ignore[method-assign]
    return events


def test_children_start_in_order_and_the_consumer_drains_before_the_rest_stop(assembled) -> None:
    daemon, notify = assembled
    assert [s.name for s in daemon] == ["consumer", "health", "manhole", "systemd"]
    events = record(daemon)
    daemon.startService()
    assert events == ["start consumer", "start health", "start manhole", "start systemd"]
    assert notify.wait_for(lambda d: d.startswith("READY=1"), 5, "READY=1")
    del events[:]
    stopping = daemon.stopService()
    assert stopping.called  # nothing in flight, and the fake reactor answers at once
    draining = "  health running: True, ready says: draining"  # health still answers, and says why
    assert events[:4] == ["stop consumer", draining, "stopped consumer", draining]
    assert [e for e in events[4:] if e.startswith("stop ")] == ["stop systemd", "stop manhole", "stop health"]
    assert sorted(e for e in events if e.startswith("stopped")) == [
        "stopped consumer", "stopped health", "stopped manhole", "stopped systemd"
    ]
    assert not daemon.running and not any(s.running for s in daemon)
