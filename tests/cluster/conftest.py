"""Fixtures for ``make test-cluster``; the suite itself does not collect this folder (``norecursedirs``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cluster.nodes import Cluster
from tests.cluster.summary import FIGURES, summary_line

SIZE = 3


@pytest.fixture(scope="session")
def cluster(rabbitmq43_root: Path) -> Iterator[Cluster]:
    started = time.monotonic()
    nodes = Cluster(rabbitmq43_root, SIZE)
    try:
        nodes.start()
        FIGURES.update(nodes=SIZE, cluster_seconds=time.monotonic() - started, version=nodes.version())
        yield nodes
    finally:
        nodes.cleanup()
        FIGURES["total_seconds"] = time.monotonic() - started


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "version" in FIGURES:
        terminalreporter.write_line(summary_line())
