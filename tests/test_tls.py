"""TLS to a private node with certificates made by the test: verification on, failures explained."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import read_rows, unique
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for, wait_until

pytestmark = pytest.mark.broker_node


def tls_config(url: str, queue: str, ca: Path, extra_amqp: str = "", tls_extra: str = "") -> str:
    tls = f'{extra_amqp}\n\n[amqp.tls]\nca_cert = "{ca}"\n{tls_extra}'
    return daemon_config(queue, url=url, reconnect=(0.5, 2.0), amqp_extra=tls)


def run(tmp_path: Path, text: str, out_file: Path, daemons: list) -> DaemonProcess:
    d = DaemonProcess(tmp_path / "d", text, env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    return d


def test_tls_with_verification_consumes(tmp_path, tls_node, out_file, daemons):
    from tests.support.broker import Broker

    queue = unique("tls")
    url = tls_node.tls_url("127.0.0.1")
    d = run(tmp_path, tls_config(url, queue, tls_node.tls.ca_cert), out_file, daemons)
    d.wait_for_log("consuming from", 30)
    b = Broker(tls_node.url)
    ids = b.publish_json(queue, [{"n": 1}])
    wait_until(lambda: [r["id"] for r in read_rows(out_file)] == ids, 20, what="message over TLS")
    assert "amqps://guest:***@127.0.0.1" in d.output and "guest:guest" not in d.output
    assert d.stop() == 0
    b.delete(queue)
    b.delete(queue + ".quarantine")


def test_wrong_ca_is_refused_with_a_clear_error(tmp_path, tls_node, out_file, daemons):
    url = tls_node.tls_url("127.0.0.1")
    d = run(tmp_path, tls_config(url, unique("tls"), tls_node.tls.other_ca_cert), out_file, daemons)
    d.wait_for_log(r"TLS: the broker's certificate is not signed by a trusted CA \(check amqp.tls.ca_cert\)", 30)
    assert "consuming from" not in d.output
    assert d.proc.poll() is None  # keeps retrying: the operator may fix the broker side
    assert d.stop() == 0


def test_hostname_mismatch_is_refused_with_a_clear_error(tmp_path, tls_node, out_file, daemons):
    url = tls_node.tls_url("localhost")
    d = run(tmp_path, tls_config(url, unique("tls"), tls_node.tls.ca_cert), out_file, daemons)
    d.wait_for_log(r"TLS: the broker's certificate does not match its host name", 30)
    assert "consuming from" not in d.output
    assert d.stop() == 0


def test_client_certificate_with_external_auth(tmp_path, tls_node, out_file, daemons):
    queue = unique("tls")
    # No user or password in the URL: the broker logs us in from the certificate's CN.
    url = f"amqps://127.0.0.1:{tls_node.tls_port}/%2F"
    text = tls_config(
        url,
        queue,
        tls_node.tls.ca_cert,
        extra_amqp='auth_mechanism = "EXTERNAL"',
        tls_extra=f'cert = "{tls_node.tls.client_cert}"\nkey = "{tls_node.tls.client_key}"',
    )
    d = run(tmp_path, text, out_file, daemons)
    d.wait_for_log("consuming from", 30)
    assert d.stop() == 0
