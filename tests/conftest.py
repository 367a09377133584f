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


@pytest.fixture(scope="session")
def private_node(tmp_path_factory: pytest.TempPathFactory):
    """A private RabbitMQ node (own name, ports and data) that tests may stop, kill and restart.

    Shared by the session to pay its start-up once; a test that stops it must leave it running.
    """
    from tests.support.rabbitnode import RabbitNode, rabbitmq_available

    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not installed: cannot start a private node")
    node = RabbitNode("amqpc-test", tmp_path_factory.mktemp("nodes"))
    node.start()
    yield node
    node.cleanup()


@pytest.fixture
def running_node(private_node):
    if not private_node.is_running():
        private_node.restart()
    yield private_node
    if not private_node.is_running():
        private_node.restart()


@pytest.fixture
def reactor():
    """The running reactor (pytest-twisted has no fixture of its own)."""
    from twisted.internet import reactor as r

    return r


async def until(reactor, predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll predicate on the reactor, yielding to it between tries."""
    from twisted.internet import task

    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


def pytest_collection_modifyitems(config, items):
    """Tag tests that need a broker, so packagers can run the rest (-m 'not broker and not broker_node')."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"broker", "queue", "private_node", "running_node", "tls_node"}:
            item.add_marker("broker")
        elif item.module.__name__ in ("tests.test_consume", "tests.test_recovery", "tests.test_tls"):
            item.add_marker("broker")


@pytest.fixture
def daemons():
    """Daemon subprocesses a test started; killed at teardown whatever happened."""
    started: list = []
    yield started
    for d in started:
        d.kill()
