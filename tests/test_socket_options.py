"""In-process: the AMQP socket sends small frames at once (TCP_NODELAY), as pika's own adapters do."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from tests.conftest import until
from tests.support.inprocess import in_process, inprocess_config


@pytest.mark.single_broker  # a socket option of ours, not broker behaviour
@pytest_twisted.ensureDeferred
async def test_connection_socket_has_tcp_nodelay(reactor, tmp_path, broker, queue):
    # Without it, a lone ack (or the close frame at shutdown) can sit in the kernel
    # until the broker's delayed TCP ACK arrives, up to 40 ms on Linux.
    daemon = in_process(reactor, inprocess_config(tmp_path, queue, broker.url), lambda m: None, on_exit=lambda code: None)
    daemon.startService()
    try:
        await until(reactor, lambda: daemon.state.readiness()[0], what="ready")
        handle = daemon.consumer.subscription._session._proto.transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await daemon.stopService()
