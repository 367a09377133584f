"""Shared fixtures. The broker is real: RabbitMQ 3.10 on 127.0.0.1:5672 and, where this machine can run it, a
RabbitMQ 4.3 node of this run (tests/support/rabbit43.py); private nodes for tests that stop one.

Every test that uses a broker (``broker``, ``queue``, ``private_node``, ``running_node``, ``rabbit_nodes``...) runs
once per broker of the run, named ``[rabbitmq-3.10]`` / ``[rabbitmq-4.3]``, unless marked ``single_broker`` (not about
the broker: 3.10 only, no id) or ``broker_only("4.3")`` (a behaviour of that broker alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support import brokers, rabbit43
from tests.support.broker import SHARED_URL, Broker, unique
from tests.support.logged_errors import expect_errors, logged_errors  # noqa: F401  (fixtures for every test)
from tests.support.rabbitnode import RabbitNode, RabbitNodeError

_PLAN = pytest.StashKey[brokers.BrokerPlan]()
_BUILD = pytest.StashKey[rabbit43.BackgroundBuild]()


def pytest_configure(config: pytest.Config) -> None:
    try:
        config.stash[_PLAN] = brokers.plan()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config: pytest.Config) -> str:
    return config.stash[_PLAN].header()


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if config.get_verbosity() < 0:  # -q hides the report header; the brokers line is still said
        config.pluginmanager.getplugin("terminalreporter").write_line(config.stash[_PLAN].header())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    terminalreporter.write_line(config.stash[_PLAN].header())


def _version(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("broker_version") if callspec else None


def pytest_collection_finish(session: pytest.Session) -> None:
    """A 4.3 root that has to be built is built in the background while the tests before the 4.3 ones run."""
    config = session.config
    if config.option.collectonly or not any(_version(item) == "4.3" for item in session.items):
        return
    if rabbit43.root_ready() or rabbit43.why_unavailable() is not None:
        return  # nothing to build, or the fixture says why not
    config.pluginmanager.getplugin("terminalreporter").write_line(
        f"building the RabbitMQ 4.3 root in {rabbit43.ROOT} in the background (about a minute; "
        f"log: {rabbit43.ROOT.parent / 'build.log'}); the 4.3 tests run last"
    )
    config.stash[_BUILD] = rabbit43.BackgroundBuild()


def _say(config: pytest.Config, line: str) -> None:
    """A line on the terminal even while output is captured (the one-minute root build)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        config.pluginmanager.getplugin("terminalreporter").write_line(line)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker_version" not in metafunc.fixturenames or metafunc.definition.get_closest_marker("single_broker"):
        return
    versions = metafunc.config.stash[_PLAN].versions
    only = metafunc.definition.get_closest_marker("broker_only")
    if only is not None:  # a behaviour of that broker alone; skipped (empty parameter set) when the run lacks it
        versions = tuple(v for v in versions if v in only.args)
    metafunc.parametrize("broker_version", versions, ids=[brokers.broker_id(v) for v in versions], scope="module")


@pytest.fixture(scope="session")
def broker_version() -> str:
    """The broker version a test runs against (parametrised per test; this default serves single_broker tests)."""
    return brokers.SHARED


@pytest.fixture(scope="session")
def rabbitmq43_root(pytestconfig: pytest.Config) -> Path:
    """The Debian-testing root with RabbitMQ 4.3, built on first use (about a minute) unless .cache/ has it."""
    plan = pytestconfig.stash[_PLAN]
    problem = rabbit43.why_unavailable()
    if problem is None:
        try:
            background = pytestconfig.stash.get(_BUILD, None)
            if background is not None:
                return background.wait()
            return rabbit43.build_root(say=lambda line: _say(pytestconfig, line))
        except RabbitNodeError as e:
            problem = str(e)
    if plan.required:
        pytest.fail(f"RabbitMQ 4.3 is required by {brokers.ENV} but cannot run here: {problem}", pytrace=False)
    plan.notes.append(f"RabbitMQ 4.3 skipped: {problem.splitlines()[0]}")
    pytest.skip(f"RabbitMQ 4.3 cannot run here: {problem}")


@pytest.fixture(scope="session")
def rabbitmq43(rabbitmq43_root: Path) -> Iterator[RabbitNode]:
    """This run's RabbitMQ 4.3 node: the counterpart of the shared 3.10 on 5672 (use unique names, never stop it)."""
    node = rabbit43.Rabbit43Node("amqpc-broker", root=rabbitmq43_root)
    node.start()
    yield node
    node.cleanup()


@pytest.fixture
def broker(broker_version: str, request: pytest.FixtureRequest) -> Iterator[Broker]:
    if broker_version == brokers.SHARED:
        url = SHARED_URL
    else:
        url = request.getfixturevalue("rabbitmq43").url
    b = Broker(url, version=broker_version)
    try:
        b.channel()
    except Exception as e:  # pragma: no cover - environment problem, say it plainly
        hint = "run `make test`, which starts one" if broker_version == brokers.SHARED else "see its node's log"
        pytest.fail(f"no RabbitMQ {broker_version} at {b.redacted_url} ({e}); {hint}")
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


def _require_rabbitmq() -> None:
    from tests.support.rabbitnode import rabbitmq_available

    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not installed: cannot start a private node")


def _started(node: RabbitNode) -> Iterator[RabbitNode]:
    node.start()
    yield node
    node.cleanup()


def _of_the_tests_version(kind: str, broker_version: str, request: pytest.FixtureRequest) -> RabbitNode:
    """The session's ``<kind>_3_10`` or ``<kind>_4_3`` node, as the test's broker version says."""
    node: RabbitNode = request.getfixturevalue(f"{kind}_{broker_version.replace('.', '_')}")
    return node


@pytest.fixture(scope="session")
def private_node_3_10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    _require_rabbitmq()
    yield from _started(brokers.make_node("3.10", "amqpc-test", tmp_path_factory.mktemp("nodes")))


@pytest.fixture(scope="session")
def private_node_4_3(rabbitmq43_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    yield from _started(brokers.make_node("4.3", "amqpc-test", tmp_path_factory.mktemp("nodes")))


@pytest.fixture(scope="session")
def timeout_node_3_10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private 3.10 node whose consumer timeout is 3 s (RabbitMQ 3.x has no per-queue one), checked
    twice a second instead of once a minute (channel_tick_interval, advanced.config only). Shared by
    the tests of the ack timeout; a test that raises a memory alarm on it clears it again."""
    _require_rabbitmq()
    node = brokers.make_node("3.10", "acktimeout", tmp_path_factory.mktemp("nodes"), extra_config={"consumer_timeout": "3000"})
    (node.dir / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 500}]}].\n")
    yield from _started(node)


def _tls_node(version: str, base_dir: Path) -> RabbitNode:
    from tests.support.rabbitnode import make_tls_files

    # The server certificate names broker.test and 127.0.0.1, not localhost: connecting
    # through "localhost" is the hostname-mismatch case.
    files = make_tls_files(base_dir / "pki", hostname="broker.test")
    return brokers.make_node(version, "amqpc-tls", base_dir, tls=files, verify_peer=True)


@pytest.fixture(scope="session")
def tls_node_3_10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    _require_rabbitmq()
    yield from _started(_tls_node("3.10", tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def tls_node_4_3(rabbitmq43_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    yield from _started(_tls_node("4.3", tmp_path_factory.mktemp("tls")))


@pytest.fixture
def tls_node(broker_version: str, request: pytest.FixtureRequest) -> RabbitNode:
    """A private node of the test's broker version with TLS (its certificates in ``node.tls``), verifying
    client certificates and taking EXTERNAL logins. Shared by the session: never stop it."""
    return _of_the_tests_version("tls_node", broker_version, request)


@pytest.fixture
def private_node(broker_version: str, request: pytest.FixtureRequest) -> RabbitNode:
    """A private node of the test's broker version (own name, ports and data) that tests may stop, kill and restart.

    Shared by the session to pay its start-up once; a test that stops it must leave it running.
    """
    return _of_the_tests_version("private_node", broker_version, request)


@pytest.fixture
def running_node(private_node):
    if not private_node.is_running():
        private_node.restart()
    yield private_node
    if not private_node.is_running():
        private_node.restart()


@pytest.fixture
def rabbit_nodes(broker_version: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., RabbitNode]]:
    """Make private nodes of the test's broker version, cleaned up after it.

    ``rabbit_nodes("name", extra_config={"consumer_timeout": "5000"}, cookie=shared, start=True)``: options as for
    RabbitNode (tls, verify_peer, extra_config, cookie). Nodes meant to form a cluster take the same cookie.
    """
    if broker_version != brokers.SHARED:
        request.getfixturevalue("rabbitmq43_root")
    made: list[RabbitNode] = []

    def make(name: str = "amqpc-node", *, start: bool = True, **options: Any) -> RabbitNode:
        node = brokers.make_node(broker_version, name, tmp_path / "nodes", **options)
        made.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in made:
        node.cleanup()


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
    """Tag tests that need a broker, so packagers can run the rest (-m 'not broker and not broker_node');
    turn ``xfail_broker(version, reason=...)`` into a strict xfail of that broker's parametrisation."""
    for item in items:
        version = _version(item)
        for mark in item.iter_markers("xfail_broker"):
            if mark.args[0] == version:
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"RabbitMQ {version}: {mark.kwargs['reason']}"))
        names = set(getattr(item, "fixturenames", ()))
        if names & {"broker", "queue", "private_node", "running_node", "tls_node", "broker_version"}:
            item.add_marker("broker")
        elif item.module.__name__ in ("tests.test_consume", "tests.test_recovery", "tests.test_tls"):
            item.add_marker("broker")
    # The 4.3 parametrisations last (in their order): a root being built meanwhile is ready by then.
    items[:] = sorted(items, key=lambda item: _version(item) == "4.3")


@pytest.fixture
def daemons():
    """Daemon subprocesses a test started; killed at teardown whatever happened."""
    started: list = []
    yield started
    for d in started:
        d.kill()
