"""A clean stop loses nothing: the AMQP connection is closed with its handshake, and the process exits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.broker import Broker, read_rows, unique
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for, wait_until


def broker_log(node) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((node.dir / "log").glob("*.log")))


def abrupt_closes(log: str, connection_name: str) -> list[str]:
    """The broker's "unexpectedly closed" lines for the connection with this client-provided name."""
    # The Erlang pid that prefixes the line: 3.10 repeats it after "connection", 4.3 gives the addresses there.
    pids = set(re.findall(rf"(<[0-9.]+>) connection .*has a client-provided name: {re.escape(connection_name)}\s*$", log, re.M))
    assert pids, f"the broker never saw connection {connection_name!r}"
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "client unexpectedly closed TCP connection" in line:
            context = " ".join(lines[max(0, i - 2) : i + 1])
            if any(pid in context for pid in pids):
                out.append(context)
    return out


@pytest.mark.broker_node
def test_sigterm_mid_stream_closes_with_the_handshake_and_no_finished_message_runs_again(
    tmp_path: Path, running_node, daemons
):
    node = running_node
    pub = Broker(node.url)
    names = []
    for trial in range(4):
        queue = unique("stop")
        pub.declare(queue)
        ids = pub.publish_json(queue, [{"n": i, "sleep": 0.001} for i in range(2500)])
        name = unique("amqpc-stop")
        names.append(name)
        out = tmp_path / f"seen{trial}.jsonl"
        text = daemon_config(queue, "testcb:slow", url=node.url, amqp_extra=f'connection_name = "{name}"')
        d = DaemonProcess(tmp_path / f"d{trial}", text, env=env_for(TEST_OUT=str(out)))
        d.start()
        daemons.append(d)
        wait_until(lambda: sum(r.get("event") == "end" for r in read_rows(out)) > 300 + 100 * trial, 30, what="consuming")
        assert d.stop() == 0, d.output
        finished = {r["id"] for r in read_rows(out) if r.get("event") == "end"}
        assert len(finished) < len(ids), "the stop came too late to be mid-stream"
        back = {props.message_id for props, _body in pub.get_all(queue)}
        assert not finished & back, f"trial {trial}: {len(finished & back)} finished messages went back to the queue"
        assert finished | back == set(ids)  # and none was lost
        pub.delete(queue)
        pub.delete(queue + ".quarantine")
    pub.close()
    wait_until(lambda: all(f"has a client-provided name: {n}" in broker_log(node) for n in names), 10, what="broker log")
    log = broker_log(node)
    for name in names:
        assert abrupt_closes(log, name) == []


def test_a_leaked_non_daemon_thread_does_not_keep_the_stopped_daemon_alive(tmp_path: Path, broker: Broker, queue, out_file, daemons):
    broker.declare(queue)
    d = DaemonProcess(tmp_path / "d", daemon_config(queue, "testcb:leak_thread", url=broker.url), env=env_for(TEST_OUT=str(out_file)))
    d.start()
    daemons.append(d)
    d.wait_for_log("consuming from")
    broker.publish_json(queue, [{"n": 7}])
    wait_until(lambda: read_rows(out_file), 20, what="the callback ran")
    assert d.stop(timeout=30) == 0
    assert re.search(r"exiting with 1 non-daemon thread\(s\) still running.*leaky-7", d.output)
