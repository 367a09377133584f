"""The shape of the house: the operations surfaces are flat peers.

These read the source (the imports of each module); none needs a broker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.daemonproc import ROOT

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
