"""Shared fixtures. The broker is real: the one on 127.0.0.1:5672, or a private node for tests that stop one."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.broker import Broker, unique


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    try:
        b.channel()
    except Exception as e:  # pragma: no cover - environment problem, say it plainly
        pytest.fail(f"no RabbitMQ on 127.0.0.1:5672 ({e}); run `make test`, which starts one")
    yield b
    b.close()


@pytest.fixture
def queue(broker: Broker) -> str:
    name = unique("q")
    broker.created.add(name)
    return name


@pytest.fixture
def out_file(tmp_path: Path) -> Path:
    return tmp_path / "seen.jsonl"
