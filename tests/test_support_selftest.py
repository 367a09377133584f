"""Self-test of the test helpers: private RabbitMQ nodes (3.10 on the host, 4.3 in its root) and the TCP proxy."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.credentials
import pika.exceptions
import pytest

from tests.support import rabbit43
from tests.support.brokers import SHARED, make_node
from tests.support.broker import Broker
from tests.support.rabbitnode import RabbitNode, TLSFiles, rabbitmq_available
from tests.support.tcpproxy import TCPProxy

pytestmark = [pytest.mark.broker_node]

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def _params(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    return params


def _connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(_params(url))


def _queue_name() -> str:
    return f"selftest-{uuid.uuid4().hex[:8]}"


def _round_trip(connection: pika.BlockingConnection, body: bytes) -> None:
    """Publish *body* to a fresh queue and get it back."""
    channel = connection.channel()
    channel.confirm_delivery()
    queue = channel.queue_declare(_queue_name(), auto_delete=True).method.queue
    channel.basic_publish("", queue, body)
    method, _props, got = channel.basic_get(queue, auto_ack=True)
    assert method is not None
    assert got == body
    channel.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, broker_version: str, request: pytest.FixtureRequest) -> Iterator[RabbitNode]:
    """A fresh node of its own (not the session's private node, which restarts slower with what
    other tests left on it)."""
    if broker_version == SHARED and not rabbitmq_available():
        pytest.skip("RabbitMQ is not installed")
    if broker_version != SHARED:
        request.getfixturevalue("rabbitmq43_root")
    rabbit = make_node(broker_version, "selftest", tmp_path_factory.mktemp("rabbitnode"),
                       extra_config={"consumer_timeout": "3600000"})
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.cleanup()


@pytest.fixture
def proxy(node: RabbitNode) -> Iterator[TCPProxy]:
    with TCPProxy(node.port) as tcp_proxy:
        yield tcp_proxy


def _server_version(url: str) -> str:
    connection = _connect(url)
    try:
        version: bytes | str = connection._impl.server_properties["version"]
    finally:
        connection.close()
    return version.decode() if isinstance(version, bytes) else version


def test_node_identity(node: RabbitNode, broker_version: str) -> None:
    assert node.nodename == f"{node.name}@localhost"
    assert node.name.startswith("selftest-")
    assert node.url == f"amqp://guest:guest@127.0.0.1:{node.port}/%2F"
    assert node.tls_port is None
    assert node.is_running()
    assert node.port != 5672
    assert node.name in node.ctl("status").stdout
    assert _server_version(node.url).startswith(broker_version + ".")
    # extra_config lines reach rabbitmq.conf
    assert node.ctl("eval", "application:get_env(rabbit, consumer_timeout).").stdout.strip() == "{ok,3600000}"


def test_broker_fixture_is_the_broker_its_id_names(broker: Broker, broker_version: str) -> None:
    assert broker.version == broker_version
    assert _server_version(broker.url).startswith(broker_version + ".")


@pytest.mark.broker_only("4.3")
def test_4_3_node_runs_in_its_root_and_mounts_nothing_the_host_sees(node: RabbitNode) -> None:
    assert isinstance(node, rabbit43.Rabbit43Node)
    assert node.dir.parent == node.root / rabbit43.NODES
    [pid] = node._beam_pids()
    assert Path(f"/proc/{pid}/root").resolve() == node.root
    # /proc is mounted in the node's own mount namespace, never in ours.
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert rabbit43._mount_points_under(node.dir) == []


def test_publish_and_consume(node: RabbitNode) -> None:
    connection = _connect(node.url)
    try:
        _round_trip(connection, b"direct")
        channel = connection.channel()
        queue = channel.queue_declare(_queue_name(), exclusive=True).method.queue
        tag = channel.basic_consume(queue, lambda *args: None)
        [consumer] = node.consumers(queue)
        assert consumer["consumer_tag"] == tag
        assert node.consumers(_queue_name()) == []
    finally:
        connection.close()


@pytest.mark.broker_only("4.3")  # what the cluster tests build on; 3.10 private nodes have always done this
def test_nodes_with_the_same_cookie_reach_each_other(node: RabbitNode, rabbit_nodes) -> None:
    """What a cluster needs: a peer started with the node's cookie answers its ping (each node has its own by default).
    4.3 nodes find each other through the root's own epmd."""
    peer = rabbit_nodes("selftest-peer", cookie=node.cookie)
    assert node.ctl("eval", f"net_adm:ping('{peer.nodename}').").stdout.strip() == "pong"


def test_queue_depth_counts_unacked(node: RabbitNode) -> None:
    connection = _connect(node.url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = _queue_name()
        channel.queue_declare(queue)
        channel.basic_publish("", queue, b"one")
        channel.basic_publish("", queue, b"two")
        assert node.queue_depth(queue) == 2
        method, _props, _body = channel.basic_get(queue, auto_ack=False)
        assert method is not None
        assert node.queue_depth(queue) == 2  # one ready, one unacked
        channel.basic_ack(method.delivery_tag)
        channel.basic_get(queue, auto_ack=True)
        assert node.queue_depth(queue) == 0
        node.delete_queue(queue)
        with pytest.raises(KeyError):
            node.queue_depth(queue)
    finally:
        connection.close()


def test_close_all_connections(node: RabbitNode) -> None:
    connection = _connect(node.url)
    node.close_all_connections("selftest")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        connection.process_data_events(time_limit=5)
        connection.process_data_events(time_limit=5)
    assert info.value.reply_code == 320


@pytest.mark.single_broker  # the proxy's behaviour
def test_proxy_forwards_and_cuts(node: RabbitNode, proxy: TCPProxy) -> None:
    connection = _connect(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    _round_trip(connection, b"through the proxy")
    assert proxy.connection_count == 1
    proxy.cut()
    assert proxy.connection_count == 0
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connection.channel()
    assert not connection.is_open


@pytest.mark.single_broker
def test_proxy_stall_resume_refuse(node: RabbitNode, proxy: TCPProxy) -> None:
    proxy.stall()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(AMQP_HEADER)
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(1)
        assert proxy.connection_count == 1
        proxy.resume()
        sock.settimeout(5)
        assert sock.recv(1) == b"\x01"  # a method frame: connection.start

    proxy.refuse(True)
    # Closed at once: the client sees a reset (possibly while still connecting) or an EOF.
    with contextlib.suppress(ConnectionResetError):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            assert sock.recv(1) == b""
    proxy.refuse(False)
    connection = _connect(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    connection.close()


def test_durable_message_survives_kill(node: RabbitNode) -> None:
    queue = _queue_name()
    connection = _connect(node.url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True)
    channel.basic_publish("", queue, b"persistent", pika.BasicProperties(delivery_mode=2))
    # RabbitMQ 3.x keeps queue definitions in Mnesia, whose log writer caches for up to
    # about 2 s: a kill -9 right after the declare-ok can lose the queue itself (seen in
    # CI). Flush that log first; on 4.x (Khepri) the call fails harmlessly, hence catch.
    node.ctl("eval", "catch mnesia:sync_log().")

    node.kill()
    assert not node.is_running()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
    with pytest.raises(pika.exceptions.AMQPError):
        connection.process_data_events(time_limit=1)

    node.restart()
    assert node.is_running()

    def depth() -> int:
        try:
            return node.queue_depth(queue)
        except KeyError:  # durable queues are recovered just after boot
            return -1

    deadline = time.monotonic() + 20
    while depth() != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert depth() == 1
    connection = _connect(node.url)
    try:
        channel = connection.channel()
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None
        assert body == b"persistent"
        channel.queue_delete(queue)
    finally:
        connection.close()


def test_graceful_stop_and_restart(node: RabbitNode) -> None:
    node.stop()
    assert not node.is_running()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
    node.restart()
    connection = _connect(node.url)
    try:
        _round_trip(connection, b"after restart")
    finally:
        connection.close()


# -- TLS -----------------------------------------------------------------------


# conftest's tls_node, shared with tests/test_tls.py: its certificate names broker.test and 127.0.0.1.


@pytest.fixture
def tls_files(tls_node: RabbitNode) -> TLSFiles:
    assert tls_node.tls is not None
    return tls_node.tls


def _tls_params(
    node: RabbitNode,
    cafile: Path,
    server_hostname: str = "broker.test",
    host: str = "127.0.0.1",
    client: TLSFiles | None = None,
) -> pika.URLParameters:
    context = ssl.create_default_context(cafile=str(cafile))
    if client is not None:
        context.load_cert_chain(str(client.client_cert), str(client.client_key))
    params = _params(node.tls_url(host))
    params.ssl_options = pika.SSLOptions(context, server_hostname=server_hostname)
    return params


def test_tls_verified_connection(tls_node: RabbitNode, tls_files: TLSFiles) -> None:
    assert tls_node.tls_port is not None
    assert tls_node.tls_url() == f"amqps://guest:guest@localhost:{tls_node.tls_port}/%2F"
    connection = pika.BlockingConnection(_tls_params(tls_node, tls_files.ca_cert))
    try:
        _round_trip(connection, b"over TLS")
    finally:
        connection.close()


def test_tls_ip_address_is_in_the_certificate(tls_node: RabbitNode, tls_files: TLSFiles) -> None:
    params = _tls_params(tls_node, tls_files.ca_cert, server_hostname="127.0.0.1", host="127.0.0.1")
    pika.BlockingConnection(params).close()


def test_tls_external_auth_with_client_cert(tls_node: RabbitNode, tls_files: TLSFiles) -> None:
    params = _tls_params(tls_node, tls_files.ca_cert, client=tls_files)
    params.credentials = pika.credentials.ExternalCredentials()
    connection = pika.BlockingConnection(params)
    try:
        _round_trip(connection, b"EXTERNAL")
    finally:
        connection.close()


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-hostname"])
def test_tls_rejects_bad_server_identity(tls_node: RabbitNode, tls_files: TLSFiles, case: str) -> None:
    if case == "wrong-ca":
        params = _tls_params(tls_node, tls_files.other_ca_cert)
    else:
        params = _tls_params(tls_node, tls_files.ca_cert, server_hostname="not-broker.example")
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):
        pika.BlockingConnection(params)
