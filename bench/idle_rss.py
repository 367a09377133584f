"""What the idle daemon holds in memory beyond the interpreter and its libraries.

    .venv/bin/python bench/idle_rss.py [--url URL] [--idle-seconds S] [--importtime N]

Starts `twistd -n amqp-consumer` with the example-like configuration (health on,
manhole off, sync callback, workers = 1) against the broker at URL, waits for
/ready = 200 and a few idle seconds, and reads VmRSS from /proc/PID/status. It
reports that figure next to the floor, a bare
`python -c 'import twisted.internet.epollreactor'` (which already pulls in
pyOpenSSL through Twisted's TCP module), and next to the RSS of importing what the
daemon imports without running it, so that "held beyond the floor" splits into
"imported" and "kept at run time". With --importtime it lists the N heaviest
imports of a daemon run (`python -X importtime`, cumulative).
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

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def twistd() -> list[str]:
    """twistd from the running Python's environment (no ./.venv needed)."""
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def vm(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and Threads from /proc/PID/status (KiB, or a count)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_rss(code: str) -> dict[str, int]:
    """The status figures of a python that ran code and then waits to be read."""
    script = code + "\nimport sys; sys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
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


def daemon_rss(url: str, idle_seconds: float, flags: tuple[str, ...] = ()) -> tuple[dict[str, int], float, str]:
    """Start the daemon (python flags), wait for /ready, idle, read its figures; returns them, the
    start-to-ready time and its output."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = config(Path(tmp), url, port)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log = open(Path(tmp) / "daemon.log", "w")
        began = time.monotonic()
        p = subprocess.Popen([sys.executable, *flags, *twistd()[1:], "-n", "--pidfile=", "amqp-consumer", f"--config={cfg}"],
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
import amqp_consumer.build, amqp_consumer.daemon
"""


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
    ap.add_argument("--importtime", type=int, default=0, metavar="N", help="list the N heaviest imports of a daemon run")
    a = ap.parse_args()

    floor = python_rss("import twisted.internet.epollreactor")
    imported = python_rss(DAEMON_IMPORTS)
    runs = sorted((daemon_rss(a.url, a.idle_seconds) for _ in range(a.runs)), key=lambda r: r[0]["VmRSS"])
    daemon, took, _ = runs[len(runs) // 2]

    print(f"floor (import twisted.internet.epollreactor): {mb(floor['VmRSS'])}")
    print(f"daemon's imports, not run:                     {mb(imported['VmRSS'])} "
          f"(+{mb(imported['VmRSS'] - floor['VmRSS'])} over the floor)")
    print(f"daemon idle, {a.idle_seconds:g} s after /ready (median of {a.runs}): {mb(daemon['VmRSS'])} "
          f"(+{mb(daemon['VmRSS'] - floor['VmRSS'])} over the floor; anon {mb(daemon['RssAnon'])}, "
          f"file {mb(daemon['RssFile'])}, {daemon['Threads']} threads; ready after {took:.2f} s)")
    print(f"  of which kept at run time (beyond the imports): {mb(daemon['VmRSS'] - imported['VmRSS'])}")
    if a.importtime:
        print("\nheaviest imports of a daemon run, to idle (cumulative µs, two levels deep):")
        _, _, output = daemon_rss(a.url, a.idle_seconds, ("-X", "importtime"))
        for us, name in heaviest_imports(output, a.importtime):
            print(f"  {us:>9,}  {name}")


if __name__ == "__main__":
    main()
