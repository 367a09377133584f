"""What the idle daemon holds in memory beyond the interpreter and its libraries.

    .venv/bin/python bench/idle_rss.py [--url URL] [--idle-seconds S] [--breakdown] [--importtime N]

Starts the daemon with the example-like configuration (health on, manhole off,
sync callback, workers = 1) against the broker at URL, once as the
`amqp-consumer` command (what the systemd unit runs) and once as `twistd -n
amqp-consumer`, waits for
/ready = 200 and a few idle seconds, and reads VmRSS from /proc/PID/status. It
reports that figure next to the floor, a bare
`python -c 'import twisted.internet.epollreactor'` (which already pulls in
pyOpenSSL through Twisted's TCP module), and next to the RSS of importing what the
daemon imports without running it, so that "held beyond the floor" splits into
"imported" and "kept at run time". Every figure is the median of --runs processes.

Every python here loads bytecode, as an installed package does: sources compiled
at each start (PYTHONDONTWRITEBYTECODE=1 and no __pycache__, as in a fresh
checkout) leave the compiler's garbage behind and add more than 1 MB. The
bytecode goes to a private cache (PYTHONPYCACHEPREFIX in a temporary folder),
filled by one unmeasured daemon run, so the checkout is not written to.

--breakdown adds what each part of the daemon's imports holds (cumulative
imports, one fresh python each), and what stays out of an idle daemon.
--importtime N lists the N heaviest imports of a daemon run (`python -X
importtime`, cumulative).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def twistd() -> list[str]:
    """twistd from the running Python's environment (no ./.venv needed)."""
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def vm(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and Threads from /proc/PID/status (KiB, or a count), and Pss
    from /proc/PID/smaps_rollup (the process's share of pages it shares with others)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


_PYCACHE = tempfile.TemporaryDirectory(prefix="idle-rss-pycache-")


def python_env() -> dict[str, str]:
    """The environment of every measured python: this checkout first on the path, bytecode from
    (and written to) a private cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env["PYTHONPYCACHEPREFIX"] = _PYCACHE.name
    return env


def median_of(runs: int, measure: Callable[[], dict[str, int]]) -> dict[str, int]:
    """The run with the median VmRSS."""
    results = sorted((measure() for _ in range(runs)), key=lambda r: r["VmRSS"])
    return results[len(results) // 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_rss(code: str) -> dict[str, int]:
    """The status figures of a python that ran code and then waits to be read."""
    script = code + "\nimport sys; sys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=python_env(), text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ok\n", "the probe did not start"
        return vm(p.pid)
    finally:
        p.kill()
        p.wait()


def config(folder: Path, url: str, port: int) -> Path:
    queue = f"amqp-consumer.idle-rss.{uuid.uuid4().hex[:8]}"
    p = folder / "idle.toml"
    p.write_text(
        f"""
[amqp]
urls = ["{url}"]
heartbeat = 15
[[queues]]
name = "{queue}"
exclusive = true
[consumer]
callback = "amqp_consumer.example:print_message"
prefetch = 100
workers = 1
[consumer.config]
greeting = "hello"
[health]
listen = "tcp:{port}:interface=127.0.0.1"
"""
    )
    return p


def ready(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/ready")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


RUNNERS = {
    "command": ["-m", "amqp_consumer.main"],  # what the amqp-consumer console script runs
    "twistd": [*twistd()[1:], "-n", "--pidfile=", "amqp-consumer"],
}


def daemon_rss(url: str, idle_seconds: float, flags: tuple[str, ...] = (), runner: str = "command") -> tuple[dict[str, int], float, str]:
    """Start the daemon (python flags) with runner, wait for /ready, idle, read its figures; returns
    them, the start-to-ready time and its output."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = config(Path(tmp), url, port)
        env = python_env()
        log = open(Path(tmp) / "daemon.log", "w")
        began = time.monotonic()
        p = subprocess.Popen([sys.executable, *flags, *RUNNERS[runner], f"--config={cfg}"],
                             cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = began + 60
            while not ready(port):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the daemon never became ready:\n" + (Path(tmp) / "daemon.log").read_text()[-3000:])
                time.sleep(0.05)
            took = time.monotonic() - began
            time.sleep(idle_seconds)
            return vm(p.pid), took, (Path(tmp) / "daemon.log").read_text()
        finally:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()


# What `twistd amqp-consumer` imports before it runs (the plugin, the service maker and what it builds).
DAEMON_IMPORTS = """
from twisted.internet import epollreactor
epollreactor.install()
import twisted.scripts.twistd
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
list(getPlugins(IServiceMaker))  # twistd's plugin scan
from amqp_consumer import tap
tap.makeService  # noqa
# what tap.build and tap.assemble import when makeService runs
import amqp_consumer.consumer, amqp_consumer.daemon, amqp_consumer.health, amqp_consumer.systemd, amqp_consumer.lifecycle
"""

FLOOR = "import twisted.internet.epollreactor"

# The daemon's imports in the order twistd reaches them, each step on top of the ones before.
BREAKDOWN: list[tuple[str, str]] = [
    ("twistd and its plugin scan", """
from twisted.internet import epollreactor
epollreactor.install()
import twisted.scripts.twistd
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
list(getPlugins(IServiceMaker))
"""),
    ("Twisted's ClientService and endpoints", "import twisted.application.internet, twisted.internet.endpoints"),
    ("amqp_consumer.connection: pika's core and Twisted adapter (not its other adapters, their plumbing or decimal), the config",
     "import amqp_consumer.connection"),
    ("amqp_consumer.tap: config, callback loading, the consumer", "import amqp_consumer.tap"),
    (
        "tap.assemble's imports: the consumer, the daemon, health on twisted.web.http, systemd",
        "import amqp_consumer.consumer, amqp_consumer.daemon, amqp_consumer.health, amqp_consumer.systemd",
    ),
]

# What an idle daemon (example-like config) does not hold, each measured on top of all of BREAKDOWN.
LEFT_OUT: list[tuple[str, str]] = [
    ("prometheus-client (loaded at the first /metrics scrape)", "import amqp_consumer.metrics as m; m.Metrics(['q']).exposition()"),
    ("twisted.web.server's Site (not used)", "import twisted.web.server"),
    ("pika's blocking, select and asyncio adapters (what its package __init__ would import), with their plumbing",
     "import pika; pika.BlockingConnection"),
    ("the rest of pika's io_services_utils (the other adapters' plumbing; the Twisted adapter uses one check)",
     "import pika.adapters.utils.io_services_utils as m; m.SocketConnectionMixin"),
    ("decimal (pika.data's, loaded when a message carries a decimal header)", "import decimal"),
    ("the SSH manhole's Conch (only when [manhole] listen is set)", "import amqp_consumer.manhole"),
]

# The floor without pyOpenSSL: what Twisted's TCP module costs when it cannot import it.
FLOOR_WITHOUT_OPENSSL = "import sys; sys.modules['OpenSSL'] = None\n" + FLOOR


def heaviest_imports(output: str, top: int) -> list[tuple[int, str]]:
    """The heaviest imports in `-X importtime` output (cumulative µs), two levels deep."""
    rows = []
    for line in output.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        if depth <= 1:
            rows.append((int(cumulative), "  " * depth + name.strip()))
    return sorted(rows, reverse=True)[:top]


def mb(kib: int) -> str:
    return f"{kib / 1024:.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    ap.add_argument("--idle-seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3, help="daemon runs; the median is reported")
    ap.add_argument("--breakdown", action="store_true", help="what each part of the daemon's imports holds")
    ap.add_argument("--importtime", type=int, default=0, metavar="N", help="list the N heaviest imports of a daemon run")
    a = ap.parse_args()

    for runner in RUNNERS:
        daemon_rss(a.url, 0, runner=runner)  # fills the bytecode cache; not measured
    floor = median_of(a.runs, lambda: python_rss(FLOOR))
    imported = median_of(a.runs, lambda: python_rss(DAEMON_IMPORTS))

    print(f"floor (import twisted.internet.epollreactor): {mb(floor['VmRSS'])}")
    print(f"twistd daemon's imports, not run:              {mb(imported['VmRSS'])} "
          f"(+{mb(imported['VmRSS'] - floor['VmRSS'])} over the floor)")
    idle: dict[str, dict[str, int]] = {}
    for runner, label in (("command", "amqp-consumer"), ("twistd", "twistd -n amqp-consumer")):
        runs = sorted((daemon_rss(a.url, a.idle_seconds, runner=runner) for _ in range(a.runs)), key=lambda r: r[0]["VmRSS"])
        daemon, took, _ = runs[len(runs) // 2]
        idle[runner] = daemon
        print(f"{label} idle, {a.idle_seconds:g} s after /ready (median of {a.runs}): {mb(daemon['VmRSS'])} "
              f"(+{mb(daemon['VmRSS'] - floor['VmRSS'])} over the floor; anon {mb(daemon['RssAnon'])}, "
              f"file {mb(daemon['RssFile'])}, PSS {mb(daemon.get('Pss', 0))}, {daemon['Threads']} threads; "
              f"ready after {took:.2f} s)")
    # The breakdown follows twistd's path, the longer one: the command leaves out its first part's
    # runner and plugin scan.
    daemon = idle["twistd"]
    print(f"  twistd's, kept at run time (beyond the imports): {mb(daemon['VmRSS'] - imported['VmRSS'])}")
    if a.breakdown:
        print(f"\nwhere the {mb(daemon['VmRSS'] - floor['VmRSS'])} beyond the floor go (cumulative imports, "
              f"median of {a.runs} each):")
        code, previous = "", floor["VmRSS"]
        for what, step in BREAKDOWN:
            code += "\n" + step
            now = median_of(a.runs, lambda: python_rss(code))["VmRSS"]
            print(f"  +{mb(now - previous):>8}  {what}")
            previous = now
        print(f"  +{mb(daemon['VmRSS'] - previous):>8}  kept at run time: connection, buffers")
        print("not in an idle daemon (each on top of all the above):")
        for what, step in LEFT_OUT:
            now = median_of(a.runs, lambda: python_rss(code + "\n" + step))["VmRSS"]
            print(f"  +{mb(now - previous):>8}  {what}")
        without = median_of(a.runs, lambda: python_rss(FLOOR_WITHOUT_OPENSSL))["VmRSS"]
        print(f"of the floor: {mb(floor['VmRSS'] - without)} is pyOpenSSL and cryptography, which Twisted's TCP "
              f"module imports whenever they are installed (floor without them: {mb(without)})")
    if a.importtime:
        print("\nheaviest imports of a daemon run, to idle (cumulative µs, two levels deep):")
        _, _, output = daemon_rss(a.url, a.idle_seconds, ("-X", "importtime"), runner="twistd")
        for us, name in heaviest_imports(output, a.importtime):
            print(f"  {us:>9,}  {name}")


if __name__ == "__main__":
    main()
