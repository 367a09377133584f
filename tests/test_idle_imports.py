"""What an idle daemon has imported: features that are off, or not yet asked for, cost no memory.

The figure itself (idle RSS against the floor) is the benchmark's, bench/idle_rss.py; this
guards the causes. It runs ``twistd -n amqp-consumer`` and the ``amqp-consumer`` command as
an operator does, with health on
and the manhole off, waits until it consumes, and reads the daemon's ``sys.modules``: a
tiny preamble in the daemon's python writes them to a file on SIGUSR2.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.broker import Broker
from tests.support.daemonproc import daemon_config, env_for, wait_until
from tests.support.ops import HEALTH_ANYWHERE, http

# Loaded only by a feature that is off here (the manhole), or only when asked for (a /metrics scrape):
NOT_WHEN_IDLE = {
    "twisted.conch": "the SSH manhole's Conch, with the manhole off",
    "prometheus_client": "prometheus-client, before the first /metrics scrape",
    "twisted.web.server": "twisted.web's Site: health runs on twisted.web.http",
    "twisted.spread": "Perspective Broker, which twisted.web.server brings",
    "twisted.web.template": "twisted.web's templates and XML parser, which Site's error pages bring",
    "pika.adapters.blocking_connection": "pika's blocking adapter, which pika's package __init__ brings",
    "pika.adapters.select_connection": "pika's select adapter, which pika's package __init__ brings",
    "pika.adapters.asyncio_connection": "pika's asyncio adapter, which pika's package __init__ brings",
    "pika.diagnostic_utils": "what pika's io_services_utils brings, of which the Twisted adapter uses one check",
    "decimal": "pika.data's decimal module, before a message carries a decimal header",
    # The broker's URL here is an address: connecting to it resolves nothing.
    "encodings.idna": "the IDNA codec, which only a host name needs",
}

PREAMBLE = """
import json, os, signal, sys
def _dump(signum, frame):
    path = os.environ["MODULES_OUT"]
    with open(path + ".tmp", "w") as f:
        json.dump(sorted(sys.modules), f)
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR2, _dump)
"""
RUN = {
    "twistd": 'sys.argv[0] = "twistd"\nfrom twisted.scripts.twistd import run\nrun()\n',
    "command": "from amqp_consumer.main import main\nmain(sys.argv[1:])\n",
}
ARGS = {"twistd": ["--nodaemon", "--pidfile=", "amqp-consumer"], "command": []}
# What the command leaves out that twistd needs: its runner and the plugin scan.
NOT_UNDER_THE_COMMAND = {
    "twisted.scripts": "twistd's runner",
    "pdb": "twistd's --debug, imported by its runner",
    "unittest": "unpickling Twisted's plugin cache (trial's interfaces)",
    "twisted.words": "the plugin scan (twisted_words provides a service maker)",
}


class Daemon:
    def __init__(self, tmp_path: Path, config: str, runner: str) -> None:
        self.runner = runner
        self.modules_file = tmp_path / "modules.json"
        self.log = tmp_path / "daemon.out"
        cfg = tmp_path / "daemon.toml"
        cfg.write_text(config)
        env = env_for(MODULES_OUT=str(self.modules_file))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", PREAMBLE + RUN[runner], *ARGS[runner], f"--config={cfg}"],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def modules(self) -> set[str]:
        self.modules_file.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR2)
        wait_until(self.modules_file.exists, 10, what="the daemon's module list")
        return set(json.loads(self.modules_file.read_text()))

    def port(self) -> int:
        found = wait_until(lambda: re.search(r"health: serving .* on http://127\.0\.0\.1:(\d+)/", self.output), 20,
                           what="the health listener")
        return int(found.group(1))


def threads(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))  # type: ignore[union-attr]


def loaded(modules: set[str], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in modules)


@pytest.fixture(params=sorted(RUN))
def idle_daemon(request: pytest.FixtureRequest, tmp_path: Path, broker: Broker, queue: str) -> Iterator[Daemon]:
    broker.declare(queue)
    config = daemon_config(queue, "amqp_consumer.example:print_message", url=broker.url, health=HEALTH_ANYWHERE)
    d = Daemon(tmp_path, config, request.param)
    try:
        yield d
    finally:
        d.proc.send_signal(signal.SIGTERM)
        try:
            assert d.proc.wait(30) == 0, d.output
        finally:
            if d.proc.poll() is None:
                d.proc.kill()


@pytest.mark.single_broker
def test_an_idle_daemon_has_not_imported_what_is_off_or_not_yet_asked_for(idle_daemon: Daemon) -> None:
    port = idle_daemon.port()
    wait_until(lambda: http(port, "/ready")[0] == 200, 20, what="/ready 200")
    for path in ("/live", "/status", "/nope"):
        http(port, path)
    modules = idle_daemon.modules()
    assert "amqp_consumer.consumer" in modules and "twisted.web.http" in modules  # the list is the daemon's
    held = {package: why for package, why in NOT_WHEN_IDLE.items() if loaded(modules, package)}
    assert held == {}, f"an idle daemon imported: {held}"
    # Nor does it hold threads: connecting to an address starts no resolver thread, and the
    # callback pool starts its threads with the first message.
    assert threads(idle_daemon.proc.pid) == 1
    if idle_daemon.runner == "command":
        held = {package: why for package, why in NOT_UNDER_THE_COMMAND.items() if loaded(modules, package)}
        assert held == {}, f"the amqp-consumer command imported: {held}"

    # Scraping /metrics loads prometheus-client then, and the answer is the full exposition.
    status, headers, body = http(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    assert b"amqp_consumer_messages_total" in body and b"process_start_time_seconds" in body
    assert loaded(idle_daemon.modules(), "prometheus_client")

