"""`make bench`: throughput, CPU per message, latency, RSS, readiness and memory growth of amqp-consumer
against a raw pika consumer and fedora-messaging, on the local broker.

Run with the project venv's python (it needs pika, nothing else):

    .venv/bin/python bench/run.py [--rounds N] [--messages N] [--quick] [--skip-long] [--only a,b]

Prints a markdown report to stdout, progress to stderr, and writes
bench/results/latest.json plus a timestamped copy. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import amqp_tools  # noqa: E402  (needs BENCH on sys.path)

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
QUEUE = "amqp-consumer.bench"
PREFETCH = 100
PROJECT_VENV = ROOT / ".venv"
PYCACHE = tempfile.TemporaryDirectory(prefix="bench-pycache-")
BENCH_VENV = BENCH / ".venv-bench"
REQUIREMENTS = BENCH / "requirements.txt"
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    kind: str  # "ac" | "pika" | "fm"
    workers: int = 1
    is_async: bool = False


VARIANTS = [
    Variant("ac-sync-w1", "amqp-consumer, sync callback, workers=1", "ac", workers=1),
    Variant("ac-sync-w4", "amqp-consumer, sync callback, workers=4", "ac", workers=4),
    Variant("ac-async", "amqp-consumer, async callback", "ac", is_async=True),
    Variant("pika-raw", "raw pika SelectConnection (baseline)", "pika"),
    Variant("pika-raw-batched", "raw pika SelectConnection, acks batched per loop turn", "pika"),
    Variant("fedora-messaging", "fedora-messaging consume", "fm"),
]
BY_NAME = {v.name: v for v in VARIANTS}
BASELINE = "pika-raw"
SLOW_BASELINE = "fedora-messaging"


_T0 = time.monotonic()


def say(*parts: Any) -> None:
    print(f"bench [{time.monotonic() - _T0:6.1f} s]:", *parts, file=sys.stderr, flush=True)


# --- /proc -------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime of the whole process (all threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def broker_pid(port: int = 5672) -> int | None:
    """The process that listens on 127.0.0.1:<port> (the broker), found through /proc (read only)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{parts[9]}]")
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- environments ---------------------------------------------------------------------------


def project_python() -> Path:
    """The project's ./.venv python, else the one running this script (a checkout without ./.venv)."""
    p = PROJECT_VENV / "bin" / "python"
    return p if p.exists() else Path(sys.executable)


def project_twistd() -> Path:
    return project_python().with_name("twistd")


def ensure_bench_venv() -> str | None:
    """Create bench/.venv-bench (fedora-messaging lives only there); returns why not, or None."""
    stamp = BENCH_VENV / ".requirements.sha256"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    exe = BENCH_VENV / "bin" / "fedora-messaging"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return None
    say(f"creating {BENCH_VENV.relative_to(ROOT)} (fedora-messaging; never a project dependency)")
    try:
        if BENCH_VENV.exists():
            shutil.rmtree(BENCH_VENV)
        subprocess.run([str(project_python()), "-m", "venv", str(BENCH_VENV)], check=True)
        pip = [str(BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"could not build {BENCH_VENV.name}: {e}"
    stamp.write_text(want + "\n")
    return None


def versions() -> dict[str, Any]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    v: dict[str, Any] = {
        "python": platform.python_version(),
        "project": run([str(project_python()), "-c", "import pika, twisted; print(pika.__version__, twisted.__version__)"]),
        "git_commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }
    proj = v.pop("project").split()
    if len(proj) == 2:
        v["pika"], v["twisted"] = proj
    fm_py = BENCH_VENV / "bin" / "python"
    if fm_py.exists():
        v["fedora_messaging"] = run(
            [str(fm_py), "-c", "import importlib.metadata as m; print(m.version('fedora-messaging'))"]
        )
    return v


# --- launching a consumer -----------------------------------------------------------------------


def ac_config(v: Variant, port: int) -> str:
    callback = "bench_callbacks:async_callback" if v.is_async else "bench_callbacks:sync_callback"
    return f"""# written by bench/run.py
[amqp]
urls = ["{URL}"]
connection_name = "bench-{v.name}"

[[queues]]
name = "{QUEUE}"
durable = true
auto_delete = false
exclusive = false

[consumer]
callback = "{callback}"
prefetch = {PREFETCH}
workers = {v.workers}
drain_timeout = 10.0

[health]
listen = "tcp:{port}:interface=127.0.0.1"

[logging]
level = "info"
"""


def fm_config() -> str:
    # Per-message INFO lines are turned off so that logging is not what is measured.
    return f"""# written by bench/run.py
amqp_url = "{URL}"
callback = "bench_callbacks:fm_callback"

[client_properties]
app = "bench-fedora-messaging"

[qos]
prefetch_size = 0
prefetch_count = {PREFETCH}

[queues."{QUEUE}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
queue = "{QUEUE}"
exchange = "amq.topic"
routing_keys = ["{QUEUE}.unused"]

[log_config]
version = 1
disable_existing_loggers = false

[log_config.formatters.simple]
format = "[%(name)s %(levelname)s] %(message)s"

[log_config.handlers.console]
class = "logging.StreamHandler"
formatter = "simple"
stream = "ext://sys.stdout"

[log_config.loggers.fedora_messaging]
level = "WARNING"
propagate = false
handlers = ["console"]

[log_config.root]
level = "WARNING"
handlers = ["console"]
"""


@dataclass
class Running:
    variant: Variant
    proc: subprocess.Popen
    started_wall: float
    started: float
    out: Path
    log: Path
    health_port: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def launch(
    v: Variant, tag: str, expect: int, mode: str = "throughput", checkpoints: str = "", twistd_args: tuple[str, ...] = ()
) -> Running:
    LOGS.mkdir(parents=True, exist_ok=True)
    out = LOGS / f"{tag}.result.json"
    log = LOGS / f"{tag}.log"
    for p in (out, Path(f"{out}.part")):
        p.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(BENCH_OUT=str(out), BENCH_EXPECT=str(expect), BENCH_MODE=mode, BENCH_CHECKPOINTS=checkpoints)
    env.pop("PYTHONPATH", None)
    # Bytecode, as an installed package loads it: compiling the sources at every start (a checkout
    # without __pycache__ under PYTHONDONTWRITEBYTECODE=1) leaves over 1 MB of the compiler's garbage
    # in RSS. A private cache keeps the checkout unwritten; the first start of each variant fills it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE.name
    port = None
    if v.kind == "ac":
        port = free_port()
        cfg = LOGS / f"{tag}.toml"
        cfg.write_text(ac_config(v, port))
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{BENCH}"
        if twistd_args:
            cmd = [str(project_twistd()), "-n", "--pidfile=", *twistd_args, "amqp-consumer", f"--config={cfg}"]
        else:  # what the systemd unit runs: the amqp-consumer command (the console script's module)
            cmd = [str(project_python()), "-m", "amqp_consumer.main", f"--config={cfg}"]
    elif v.kind == "pika":
        env["PYTHONPATH"] = str(BENCH)
        cmd = [str(project_python()), str(BENCH / "pika_consumer.py"), URL, QUEUE, str(PREFETCH)]
        if v.name.endswith("-batched"):
            cmd.append("--batch-acks")
    elif v.kind == "fm":
        cfg = LOGS / f"{tag}.toml"
        cfg.write_text(fm_config())
        env["PYTHONPATH"] = str(BENCH)
        cmd = [str(BENCH_VENV / "bin" / "fedora-messaging"), "--conf", str(cfg), "consume"]
    else:
        raise ValueError(v.kind)
    with open(log, "w") as logf:
        started_wall, started = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=str(LOGS), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    return Running(v, proc, started_wall, started, out, log, port)


def stop(r: Running, timeout: float = 30.0) -> int | None:
    if r.alive():
        r.proc.send_signal(signal.SIGTERM)
        try:
            r.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{r.variant.name}: no exit {timeout:g} s after SIGTERM; killing it")
            r.proc.kill()
            r.proc.wait(10)
    return r.proc.returncode


def wait_result(r: Running, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.out.exists():
            return json.loads(r.out.read_text())
        if not r.alive():
            raise RuntimeError(f"{r.variant.name} exited with {r.proc.returncode} before finishing:\n{r.log_tail()}")
        time.sleep(0.01)
    raise RuntimeError(f"{r.variant.name}: no result after {timeout:g} s:\n{r.log_tail()}")


# --- the measurements ---------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    messages: int
    latency_rate: float
    latency_seconds: float
    idle_seconds: float
    ready_runs: int
    latency_rounds: int
    long_total: int
    long_step: int
    skip_long: bool
    variants: list[Variant] = field(default_factory=list)


def quiet_queue(ctl: amqp_tools.Control) -> None:
    ctl.declare()
    if not ctl.wait_consumers(0, 30):
        raise RuntimeError(f"queue {QUEUE!r} still has a consumer; is another consumer running?")
    ctl.purge()


def throughput_run(ctl: amqp_tools.Control, v: Variant, s: Settings, rnd: int) -> dict:
    quiet_queue(ctl)
    fill_rate = amqp_tools.fill(URL, QUEUE, s.messages)
    load_before = loadavg()
    bpid = broker_pid()
    b0 = proc_cpu_seconds(bpid) if bpid else None
    r = launch(v, f"{v.name}-r{rnd}", s.messages)
    try:
        res = wait_result(r, timeout=max(120.0, s.messages / 100))
        b1 = proc_cpu_seconds(bpid) if bpid else None
        st = proc_status(r.proc.pid)
        cpu_total = proc_cpu_seconds(r.proc.pid)
        time.sleep(s.idle_seconds)
        idle = proc_status(r.proc.pid).get("VmRSS")
    finally:
        code = stop(r)
    left, _ = ctl.status()
    n = res["count"]
    out = {
        "round": rnd,
        "messages": n,
        "seconds": res["seconds"],
        "msg_per_s": (n - 1) / res["seconds"],
        "cpu_us_per_msg": res["cpu_seconds"] / (n - 1) * 1e6,
        "cpu_share": res["cpu_seconds"] / res["seconds"],
        "broker_cpu_us_per_msg": (b1 - b0) / n * 1e6 if b0 is not None and b1 is not None else None,
        "start_to_first_ms": (res["first_wall"] - r.started_wall) * 1e3,
        "peak_rss_mb": st.get("VmHWM", 0) / 1024,
        "idle_rss_after_load_mb": (idle or 0) / 1024,
        "process_cpu_seconds_total": cpu_total,
        "fill_msg_per_s": fill_rate,
        "exit_code": code,
        "left_in_queue": left,
        "loadavg_before": load_before,
    }
    if left:
        say(f"WARNING {v.name}: {left} messages back in the queue after stop (not all acked)")
    return out


def latency_run(ctl: amqp_tools.Control, v: Variant, s: Settings) -> dict:
    quiet_queue(ctl)
    total = int(s.latency_rate * s.latency_seconds)
    r = launch(v, f"{v.name}-latency", total, mode="latency")
    try:
        if not ctl.wait_consumers(1, 60):
            raise RuntimeError(f"{v.name} did not start consuming:\n{r.log_tail()}")
        time.sleep(0.5)
        pub = amqp_tools.publish_at_rate(URL, QUEUE, s.latency_rate, s.latency_seconds)
        res = wait_result(r, timeout=60 + total / 50)
    finally:
        stop(r)
    lat = sorted(x * 1e3 for x in res["latency"])
    inside = sorted(x * 1e3 for x in res.get("inside") or [])
    return {
        "messages": len(lat),
        "inside_p50_ms": pct(inside, 50) if inside else None,
        "inside_p99_ms": pct(inside, 99) if inside else None,
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "p999_ms": pct(lat, 99.9),
        "max_ms": lat[-1],
        "publisher": pub,
        "gc": res.get("gc"),
    }


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def http_ready(port: int) -> int | None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/ready")
        status = c.getresponse().status
        c.close()
        return status
    except (OSError, http.client.HTTPException):
        return None


def ready_run(ctl: amqp_tools.Control, s: Settings, i: int) -> dict:
    """amqp-consumer (sync, workers=1) on an empty queue: process start to /ready = 200, and idle RSS."""
    v = BY_NAME["ac-sync-w1"]
    quiet_queue(ctl)
    r = launch(v, f"ready-{i}", 1)
    ready_ms = consumer_ms = None
    answered = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and r.alive():
            now = time.perf_counter()
            status = http_ready(r.health_port) if ready_ms is None else 200
            if status is not None:
                answered = True
            if status == 200 and ready_ms is None:
                ready_ms = (now - r.started) * 1e3
            if consumer_ms is None and ctl.status()[1] >= 1:
                consumer_ms = (time.perf_counter() - r.started) * 1e3
            if ready_ms is not None and consumer_ms is not None:
                break
            if consumer_ms is not None and not answered and (now - r.started) * 1e3 > consumer_ms + 3000:
                break  # consuming for 3 s and nothing listens on the health port
            time.sleep(0.005)
        time.sleep(s.idle_seconds)
        idle = proc_status(r.proc.pid).get("VmRSS")
    finally:
        stop(r)
    return {
        "start_to_ready_ms": ready_ms,
        "health_answered": answered,
        "start_to_consumer_registered_ms": consumer_ms,
        "idle_rss_mb": (idle or 0) / 1024,
    }


def long_run(ctl: amqp_tools.Control, s: Settings) -> dict:
    """amqp-consumer (sync, workers=1) through long_total messages, topped up as it goes; RSS at each step."""
    v = BY_NAME["ac-sync-w1"]
    quiet_queue(ctl)
    step, total = s.long_step, s.long_total
    checkpoints = ",".join(str(k) for k in range(step, total + 1, step))
    published = 0
    first = min(total, 2 * step)
    amqp_tools.fill(URL, QUEUE, first, start=published)
    published += first
    r = launch(v, "long", total, checkpoints=checkpoints)
    try:
        while published < total:
            if not r.alive():
                raise RuntimeError(f"{v.name} exited during the long run:\n{r.log_tail()}")
            if ctl.status()[0] < step:
                chunk = min(step, total - published)
                amqp_tools.fill(URL, QUEUE, chunk, start=published)
                published += chunk
            else:
                time.sleep(0.2)
        res = wait_result(r, timeout=max(300.0, total / 100))
        peak = proc_status(r.proc.pid).get("VmHWM", 0)
        time.sleep(s.idle_seconds)
        idle = proc_status(r.proc.pid).get("VmRSS", 0)
    finally:
        stop(r)
    rss = {int(k): kib / 1024 for k, kib in res["rss_kib"].items()}
    at_step, at_total = rss.get(step), rss.get(total)
    return {
        "messages": total,
        "rss_mb_at": {str(k): round(val, 2) for k, val in sorted(rss.items())},
        "rss_mb_at_step": at_step,
        "rss_mb_at_total": at_total,
        "growth_mb": (at_total - at_step) if at_step and at_total else None,
        "msg_per_s": (res["count"] - 1) / res["seconds"],
        "cpu_us_per_msg": res["cpu_seconds"] / (res["count"] - 1) * 1e6,
        "peak_rss_mb": peak / 1024,
        "idle_rss_after_mb": idle / 1024,
    }


# --- summary ------------------------------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    by_round: dict[int, dict[str, dict]] = {}
    for name, rs in runs.items():
        for r in rs:
            by_round.setdefault(r["round"], {})[name] = r
    out = {}
    for name, rs in runs.items():
        ratios: dict[str, list[float]] = {BASELINE: [], SLOW_BASELINE: []}
        cpu_ratio: list[float] = []
        for rnd in by_round.values():
            if name in rnd:
                for base in ratios:
                    if base in rnd:
                        ratios[base].append(rnd[name]["msg_per_s"] / rnd[base]["msg_per_s"])
                if BASELINE in rnd:
                    cpu_ratio.append(rnd[name]["cpu_us_per_msg"] / rnd[BASELINE]["cpu_us_per_msg"])
        out[name] = {
            "msg_per_s": median([r["msg_per_s"] for r in rs]),
            "msg_per_s_all": [round(r["msg_per_s"]) for r in rs],
            "vs_pika_raw": median(ratios[BASELINE]),
            "vs_pika_raw_all": [round(x, 3) for x in ratios[BASELINE]],
            "vs_fedora_messaging": median(ratios[SLOW_BASELINE]),
            "vs_fedora_messaging_all": [round(x, 2) for x in ratios[SLOW_BASELINE]],
            "cpu_us_per_msg": median([r["cpu_us_per_msg"] for r in rs]),
            "cpu_us_per_msg_all": [round(r["cpu_us_per_msg"], 1) for r in rs],
            "cpu_vs_pika_raw": median(cpu_ratio),
            "broker_cpu_us_per_msg": median([r["broker_cpu_us_per_msg"] for r in rs]),
            "consumer_cpu_share": median([r["cpu_share"] for r in rs]),
            "start_to_first_ms": median([r["start_to_first_ms"] for r in rs]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in rs]),
            "idle_rss_after_load_mb": median([r["idle_rss_after_load_mb"] for r in rs]),
        }
    return out


def fmt(x: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def report(data: dict) -> str:
    s = data["settings"]
    lines = []
    lines.append(
        f"### Throughput: {s['messages']:,} persistent ~{amqp_tools.BODY_SIZE}-byte JSON messages, prefetch {PREFETCH}, "
        f"{s['rounds']} interleaved round(s), medians"
    )
    lines.append("")
    lines.append(
        "| variant | msg/s | × raw pika | × fedora-messaging | CPU µs/msg | CPU × raw pika | broker CPU µs/msg "
        "| start → 1st msg | peak RSS | RSS idle after load |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in data["throughput"].items():
        lines.append(
            f"| {name} | {fmt(t['msg_per_s'], ',.0f')} | {fmt(t['vs_pika_raw'], '.2f')} | "
            f"{fmt(t['vs_fedora_messaging'], '.1f')} | {fmt(t['cpu_us_per_msg'], '.0f')} | "
            f"{fmt(t['cpu_vs_pika_raw'], '.2f')} | "
            f"{fmt(t['broker_cpu_us_per_msg'], '.0f')} | "
            f"{fmt(t['start_to_first_ms'], '.0f', ' ms')} | {fmt(t['peak_rss_mb'], '.1f', ' MB')} | "
            f"{fmt(t['idle_rss_after_load_mb'], '.1f', ' MB')} |"
        )
    for name, why in data.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | |")
    lines.append("")
    lines.append("; ".join(f"`{v.name}`: {v.title}" for v in VARIANTS if v.name in data["settings"]["variants"]) + ".")
    if data.get("latency"):
        lines.append("")
        lines.append(
            f"### End-to-end latency (publish → callback) at {s['latency_rate']:,.0f} msg/s for {s['latency_seconds']:g} s, "
            f"{s['latency_rounds']} interleaved round(s), medians"
        )
        lines.append("")
        lines.append("| variant | p50 | p90 | p99 | p99.9 | max | p99 per round (ms) | in the daemon p50 / p99 |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, l in data["latency"].items():
            if "error" in l:
                lines.append(f"| {name} | error: {l['error']} | | | | | | |")
                continue
            inside = (
                f"{l['inside_p50_ms']:.2f} / {l['inside_p99_ms']:.2f} ms" if l.get("inside_p99_ms") is not None else "—"
            )
            lines.append(
                f"| {name} | {l['p50_ms']:.2f} ms | {l['p90_ms']:.2f} ms | {l['p99_ms']:.2f} ms | "
                f"{l['p999_ms']:.2f} ms | {l['max_ms']:.1f} ms | {', '.join(f'{x:.2f}' for x in l['p99_ms_all'])} | {inside} |"
            )
        lines.append("")
        lines.append(
            "\"In the daemon\": from the delivery reaching amqp-consumer's dispatcher to the callback "
            "(the thread hand-off for sync callbacks); the rest of the latency is the publisher, the broker "
            "and the kernel, which every variant shares."
        )
    rd = data.get("ready")
    if rd:
        lines.append("")
        lines.append("### amqp-consumer start-up and memory")
        lines.append("")
        if rd["start_to_ready_ms"] is not None:
            lines.append(f"- process start → `/ready` = 200: {rd['start_to_ready_ms']:.0f} ms (median of {rd['runs']})")
        else:
            lines.append(f"- process start → `/ready` = 200: n/a ({rd['note']})")
        lines.append(
            f"- process start → consumer registered on the broker: {fmt(rd['start_to_consumer_registered_ms'], '.0f', ' ms')}"
        )
        lines.append(f"- idle RSS ({s['idle_seconds']:g} s after start, no load): {fmt(rd['idle_rss_mb'], '.1f', ' MB')}")
    lg = data.get("long")
    if lg:
        if "error" in lg:
            lines.append(f"- long run: error: {lg['error']}")
        else:
            lines.append(
                f"- RSS after {s['long_step']:,} messages: {fmt(lg['rss_mb_at_step'], '.1f', ' MB')}; after "
                f"{lg['messages']:,}: {fmt(lg['rss_mb_at_total'], '.1f', ' MB')} (growth {fmt(lg['growth_mb'], '+.1f', ' MB')}; "
                f"{lg['msg_per_s']:,.0f} msg/s, {lg['cpu_us_per_msg']:.0f} CPU µs/msg over the run)"
            )
    if data.get("targets"):
        lines.append("")
        lines.append("### Targets")
        lines.append("")
        lines.append("| target | measured | |")
        lines.append("|---|---:|---|")
        for t in data["targets"]:
            verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {t['measured']} | {verdict} |")
    lines.append("")
    v = data["versions"]
    lines.append(
        f"Python {v.get('python')}, pika {v.get('pika')}, Twisted {v.get('twisted')}, "
        f"fedora-messaging {v.get('fedora_messaging', 'n/a')}, RabbitMQ {v.get('rabbitmq', '?')}, "
        f"{v.get('cpus')} CPUs, commit {v.get('git_commit')}{' (dirty)' if v.get('git_dirty') else ''}; "
        f"command: `{data['command']}`"
    )
    return "\n".join(lines)


def targets(data: dict) -> list[dict]:
    t = data["throughput"]
    out = []

    def add(target: str, value: float | None, ok: bool | None, shown: str) -> None:
        out.append({"target": target, "value": value, "measured": shown if value is not None else "n/a",
                    "met": None if value is None else ok})

    def ratio(name: str, key: str) -> float | None:
        return t.get(name, {}).get(key)

    x = ratio("ac-sync-w1", "vs_pika_raw")
    add("sync workers=1 ≥ 0.8 × raw pika", x, x is not None and x >= 0.8, f"{x:.2f} ×" if x else "")
    x = ratio("ac-sync-w1", "vs_fedora_messaging")
    add("sync workers=1 ≥ 10 × fedora-messaging", x, x is not None and x >= 10, f"{x:.1f} ×" if x else "")
    x = ratio("ac-async", "vs_pika_raw")
    add("async ≥ 1.0 × raw pika", x, x is not None and x >= 1.0, f"{x:.2f} ×" if x else "")
    base_p99 = data.get("latency", {}).get(BASELINE, {}).get("p99_ms")
    context = f" (raw pika {base_p99:.2f} ms)" if base_p99 is not None else ""
    for name, label in (("ac-sync-w1", "sync, workers=1"), ("ac-async", "async")):
        x = data.get("latency", {}).get(name, {}).get("p99_ms")
        add(f"p99 ≤ 2 ms at {data['settings']['latency_rate']:,.0f} msg/s ({label})", x, x is not None and x <= 2.0,
            f"{x:.2f} ms{context}" if x is not None else "")
    x = (data.get("ready") or {}).get("idle_rss_mb")
    add("idle RSS ≤ 60 MB", x, x is not None and x <= 60, f"{x:.1f} MB" if x is not None else "")
    lg = data.get("long") or {}
    x = lg.get("growth_mb")
    # "No growth": allow 2 MB (allocator and interpreter noise) or 5 %, whichever is larger.
    base = lg.get("rss_mb_at_step") or 0
    add(f"no RSS growth {data['settings']['long_step']:,} → {data['settings']['long_total']:,} messages", x,
        x is not None and x <= max(2.0, 0.05 * base), f"{x:+.1f} MB" if x is not None else "")
    return out


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--messages", type=int, help="messages per throughput run (default 50000; quick 3000)")
    p.add_argument("--quick", action="store_true", help="small numbers: a smoke run well under a minute")
    p.add_argument("--skip-long", action="store_true", help="skip the long (500,000-message) memory run")
    p.add_argument("--skip-latency", action="store_true", help="skip the fixed-rate latency runs")
    p.add_argument("--only", help=f"comma-separated variants: {', '.join(BY_NAME)}")
    p.add_argument("--latency-seconds", type=float, help="length of each latency run (default 10; quick 1)")
    p.add_argument("--latency-rounds", type=int, help="interleaved latency rounds (default 5; quick 1)")
    p.add_argument("--latency-rate", type=float, default=1000.0, help="publish rate of the latency runs (msg/s)")
    p.add_argument("--long-messages", type=int, help="messages in the memory run (default 500000; quick 10000)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--results", type=Path, help="folder for the JSON results and per-run logs (default bench/results)")
    p.add_argument("--queue", default=QUEUE, help=f"the queue to fill and consume, emptied first (default {QUEUE})")
    p.add_argument("--prefetch", type=int, default=PREFETCH, help=f"prefetch of every variant (default {PREFETCH})")
    p.add_argument("--switch-interval", type=float,
                   help="experiment: sys.setswitchinterval() in every consumer process (default: Python's 0.005)")
    a = p.parse_args(argv)
    q = a.quick
    names = [n.strip() for n in a.only.split(",")] if a.only else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    long_total = a.long_messages or (10_000 if q else 500_000)
    s = Settings(
        rounds=a.rounds or (1 if q else 3),
        messages=a.messages or (3_000 if q else 50_000),
        latency_rate=a.latency_rate,
        latency_seconds=a.latency_seconds or (1.0 if q else 10.0),
        idle_seconds=0.5 if q else 5.0,
        ready_runs=1 if q else 3,
        latency_rounds=a.latency_rounds or (1 if q else 5),
        long_total=long_total,
        long_step=max(1, long_total // 10),
        skip_long=a.skip_long,
        variants=[BY_NAME[n] for n in names],
    )
    return a, s


def main(argv: list[str]) -> int:
    global PREFETCH, QUEUE, RESULTS, LOGS
    args, s = parse_args(argv)
    PREFETCH = args.prefetch
    QUEUE = args.queue
    if args.results:
        RESULTS = args.results.resolve()
        LOGS = RESULTS / "logs"
    if args.switch_interval:
        os.environ["BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
    t_start = time.monotonic()
    data: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/run.py", *argv]).strip(),
        "settings": {k: v for k, v in s.__dict__.items() if k != "variants"} | {"variants": [v.name for v in s.variants]},
        "skipped": {},
    }
    variants = list(s.variants)
    if any(v.kind == "fm" for v in variants):
        why = ensure_bench_venv()
        if why:
            say(f"skipping fedora-messaging: {why}")
            data["skipped"]["fedora-messaging"] = why
            variants = [v for v in variants if v.kind != "fm"]
    data["versions"] = versions()
    ctl = amqp_tools.Control(URL, QUEUE)
    try:
        ctl.declare()
    except Exception as e:  # noqa: BLE001
        say(f"cannot reach the broker at {URL.split('@')[-1]}: {e} (make broker)")
        return 2
    conn = ctl._conn
    data["versions"]["rabbitmq"] = conn._impl.server_properties.get("version", b"?") if conn else "?"
    if isinstance(data["versions"]["rabbitmq"], bytes):
        data["versions"]["rabbitmq"] = data["versions"]["rabbitmq"].decode()

    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    for rnd in range(1, s.rounds + 1):
        for v in variants:
            say(f"round {rnd}/{s.rounds}: {v.name} ({s.messages:,} messages)")
            try:
                r = throughput_run(ctl, v, s, rnd)
            except Exception as e:  # noqa: BLE001
                say(f"{v.name} failed: {e}")
                data["skipped"].setdefault(v.name, f"failed in round {rnd}: {str(e).splitlines()[0]}")
                continue
            runs[v.name].append(r)
            b = r["broker_cpu_us_per_msg"]
            say(f"  {r['msg_per_s']:,.0f} msg/s, {r['cpu_us_per_msg']:.0f} CPU µs/msg (broker {fmt(b, '.0f')}), "
                f"peak RSS {r['peak_rss_mb']:.1f} MB")
    data["runs"] = runs
    data["throughput"] = summarize({k: rs for k, rs in runs.items() if rs})

    if not args.skip_latency:
        lat_runs: dict[str, list[dict]] = {v.name: [] for v in variants}
        errors: dict[str, str] = {}
        for rnd in range(1, s.latency_rounds + 1):
            for v in variants:
                say(f"latency round {rnd}/{s.latency_rounds}: {v.name} ({s.latency_rate:,.0f} msg/s for {s.latency_seconds:g} s)")
                try:
                    l = latency_run(ctl, v, s)
                except Exception as e:  # noqa: BLE001
                    say(f"latency {v.name} failed: {e}")
                    errors.setdefault(v.name, str(e).splitlines()[0])
                    continue
                l["round"] = rnd
                lat_runs[v.name].append(l)
                say(f"  p50 {l['p50_ms']:.2f} ms, p99 {l['p99_ms']:.2f} ms, max {l['max_ms']:.1f} ms")
        data["latency_runs"] = lat_runs
        data["latency"] = {}
        for name, ls in lat_runs.items():
            if not ls:
                data["latency"][name] = {"error": errors.get(name, "no run")}
                continue
            data["latency"][name] = {
                key: median([l[key] for l in ls]) for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
            } | {
                key: median([l[key] for l in ls if l.get(key) is not None])
                for key in ("inside_p50_ms", "inside_p99_ms")
            } | {
                "p99_ms_all": [round(l["p99_ms"], 2) for l in ls],
                "publisher_rate": median([l["publisher"]["rate"] for l in ls]),
                "rounds": len(ls),
            }

    if BY_NAME["ac-sync-w1"] in variants:
        ready = []
        for i in range(s.ready_runs):
            say(f"start-up: amqp-consumer run {i + 1}/{s.ready_runs}")
            ready.append(ready_run(ctl, s, i))
        ms = [r["start_to_ready_ms"] for r in ready]
        data["ready"] = {
            "runs": len(ready),
            "all": ready,
            "start_to_ready_ms": median(ms),
            "start_to_consumer_registered_ms": median([r["start_to_consumer_registered_ms"] for r in ready]),
            "idle_rss_mb": median([r["idle_rss_mb"] for r in ready]),
            "note": "" if any(r["health_answered"] for r in ready) else "nothing answered on the [health] endpoint",
        }
        if not s.skip_long:
            say(f"long run: amqp-consumer through {s.long_total:,} messages (RSS every {s.long_step:,})")
            try:
                data["long"] = long_run(ctl, s)
            except Exception as e:  # noqa: BLE001
                say(f"long run failed: {e}")
                data["long"] = {"error": str(e).splitlines()[0]}
    ctl.close()
    data["targets"] = targets(data)
    data["elapsed_seconds"] = round(time.monotonic() - t_start, 1)
    text = report(data)
    print(text)
    data["markdown"] = text
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        body = json.dumps(data, indent=2, default=str) + "\n"
        (RESULTS / f"{stamp}.json").write_text(body)
        tmp = RESULTS / "latest.json.tmp"
        tmp.write_text(body)
        os.replace(tmp, RESULTS / "latest.json")
        say(f"wrote {RESULTS / 'latest.json'} and {stamp}.json ({data['elapsed_seconds']:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
