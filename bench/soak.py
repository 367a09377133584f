"""`make soak`: mixed traffic through the daemon for N minutes while the broker node is killed.

A private RabbitMQ node (never the broker on 5672) with a short consumer
timeout; the daemon runs as an operator runs it (the `amqp-consumer` command that
the systemd unit runs, or `twistd -n amqp-consumer` with --runner twistd), with
a callback that records every run; a publisher with confirms sends good,
failing, slow and poison messages; the node is killed with SIGKILL every 2-4 minutes and restarted.
At the end the queue is drained, the daemon stopped with SIGTERM, and every
published message is reconciled with where it ended up. See bench/README.md.

    .venv/bin/python bench/soak.py [--minutes 30] [--broker 3.10|4.3] [--runner command|twistd] [--rate 5] [--results DIR]

Prints progress to stderr, one summary line to stdout, writes report.json (and
every raw record) to the results folder, and exits 0 only if nothing was lost,
every outcome matched, RSS stayed flat, /ready never said 200 while the node
was down, and no queue ever had more than one consumer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

import pika  # noqa: E402

import soak_report  # noqa: E402
import soak_traffic  # noqa: E402
from tests.support.daemonproc import DaemonProcess, env_for  # noqa: E402
from tests.support import brokers, rabbit43  # noqa: E402

QUEUE = "soak"
RSS_EVERY = 10.0
CONSUMERS_EVERY = 5.0
READY_EVERY = 0.5
# A 200 from /ready counts as a lie only when asked this long after the node's ports closed.
READY_GRACE = 1.0
# The share of 200s with the node up leaves out each restart and this long after it:
# the daemon's reconnect backoff (reconnect_max_delay = 5 s) plus a margin.
READY_SETTLE = 10.0
START, END = '"ev": "start"', '"ev": "end"'

_T0 = time.monotonic()


def say(*parts: Any) -> None:
    print(f"soak [{(time.monotonic() - _T0) / 60:5.1f} min]:", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the broker node --------------------------------------------------------------------


def make_node(broker: str, base: Path, consumer_timeout_ms: int) -> tuple[Any, dict[str, Any]]:
    """A private node and the main queue's extra arguments for that broker version."""
    if broker == "3.10":
        node = brokers.make_node(broker, "soak", base, extra_config={"consumer_timeout": str(consumer_timeout_ms)})
        # 3.x checks the consumer timeout on the channel's tick (once a minute by
        # default); a 5 s tick makes a slow callback's timeout land soon after it.
        (node.dir / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 5000}]}].\n")
        return node, {}
    why = rabbit43.why_unavailable()
    if why:
        raise SystemExit(f"soak: RabbitMQ 4.3 cannot run here: {why}")
    rabbit43.build_root()
    # 4.3 times out only quorum queues, by their own x-consumer-timeout; it cancels the consumer.
    # A quorum queue dead-letters at most once by default: messages dropped in the last
    # seconds before a kill were lost (9 of 50 in a 4-minute trial). At-least-once
    # dead-lettering keeps each until the dead-letter queue has it; it needs reject-publish.
    node = brokers.make_node(broker, "soak", base)
    return node, {
        "x-queue-type": "quorum",
        "x-consumer-timeout": consumer_timeout_ms,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


# --- the daemon -------------------------------------------------------------------------


def daemon_toml(url: str, queue_args: dict[str, Any], args: argparse.Namespace, runs_file: Path, health_port: int) -> str:
    arguments = {"x-dead-letter-exchange": f"{QUEUE}.dlx", **queue_args}
    inline = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in arguments.items())
    return f"""
[amqp]
urls = ["{url}"]
heartbeat = 10
connection_name = "soak"
reconnect_min_delay = 1.0
reconnect_max_delay = 5.0

[[exchanges]]
name = "{QUEUE}.dlx"
type = "fanout"
durable = true

[[queues]]
name = "{QUEUE}.dead"
durable = true

[[queues]]
name = "{QUEUE}"
durable = true
arguments = {{{inline}}}

[[bindings]]
queue = "{QUEUE}.dead"
exchange = "{QUEUE}.dlx"

[consumer]
callback = "soak_callback:SoakCallback"
queues = ["{QUEUE}"]
ack_timeout = {float(args.consumer_timeout)!r}
prefetch = {args.prefetch}
workers = {args.workers}
drain_timeout = {float(args.drain_timeout)!r}

[consumer.config]
runs_file = "{runs_file}"
slow_seconds = {float(args.slow_seconds)!r}

[health]
listen = "tcp:{health_port}:interface=127.0.0.1"

[logging]
format = "json"
"""


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --- watchers ---------------------------------------------------------------------------


class ReadyPoller(threading.Thread):
    """GET /ready every half second: (asked at, answered at, status or None)."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(name="soak-ready", daemon=True)
        self._url = f"http://127.0.0.1:{port}/ready"
        self._halt = stop
        self.polls: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self._halt.wait(READY_EVERY):
            t0 = time.time()
            try:
                with urllib.request.urlopen(self._url, timeout=2) as r:
                    status: int | None = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = None
            self.polls.append({"t0": t0, "t1": time.time(), "status": status})


class Sampler(threading.Thread):
    """The daemon's RSS every 10 s and the queue's consumer count every 5 s (None while the node is down)."""

    def __init__(self, pid: int, url: str, stop: threading.Event) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self._pid = pid
        self._url = url
        self._halt = stop
        self._conn: pika.BlockingConnection | None = None
        self.samples: list[dict[str, Any]] = []
        self.consumers: list[dict[str, Any]] = []

    def _consumer_count(self) -> int | None:
        try:
            if self._conn is None or not self._conn.is_open:
                params = pika.URLParameters(self._url)
                params.heartbeat = 0
                params.connection_attempts = 1
                params.socket_timeout = 3
                params.client_properties = {"connection_name": "soak-sampler"}
                self._conn = pika.BlockingConnection(params)
            ch = self._conn.channel()
            try:
                return int(ch.queue_declare(QUEUE, passive=True).method.consumer_count)
            finally:
                if ch.is_open:
                    ch.close()
        except Exception:  # noqa: BLE001 - node down or restarting
            self._conn = None
            return None

    def run(self) -> None:
        next_rss = 0.0
        while True:
            now = time.monotonic()
            if now >= next_rss:
                self.samples.append({"t": time.time(), "rss_mb": rss_mb(self._pid)})
                next_rss = now + RSS_EVERY
            self.consumers.append({"t": time.time(), "consumers": self._consumer_count()})
            if self._halt.wait(CONSUMERS_EVERY):
                break
        if self._conn is not None and self._conn.is_open:
            self._conn.close()


# --- the end: drain, stop, read what is left -----------------------------------------------


def count_lines(path: Path, needle: str) -> int:
    with path.open(encoding="utf-8", errors="replace") as f:
        return sum(needle in line for line in f)


def open_runs(runs_file: Path) -> int:
    """Callback runs started and not yet ended."""
    return count_lines(runs_file, START) - count_lines(runs_file, END)


def drain(node: Any, runs_file: Path, limit: float) -> dict[str, Any]:
    """Wait until the queue holds nothing (ready or unacked) and no callback runs, twice in a row."""
    deadline = time.monotonic() + limit
    started = time.monotonic()
    calm = 0
    depth = running = -1
    while time.monotonic() < deadline:
        try:
            depth = node.queue_depth(QUEUE)
        except Exception as e:  # noqa: BLE001 - rabbitmqctl hiccup: try again
            say(f"queue depth unknown: {e}")
            depth = -1
        running = open_runs(runs_file)
        calm = calm + 1 if depth == 0 and running == 0 else 0
        if calm >= 2:
            break
        time.sleep(5)
    return {"seconds": round(time.monotonic() - started, 1), "drained": calm >= 2, "depth": depth, "running": running}


def take_all(url: str) -> list[soak_report.Found]:
    """Empty the main, quarantine and dead-letter queues, noting each message's soak id and headers."""
    params = pika.URLParameters(url)
    params.heartbeat = 0
    conn = pika.BlockingConnection(params)
    found = []
    try:
        ch = conn.channel()
        for where, name in (("main", QUEUE), ("quarantine", f"{QUEUE}.quarantine"), ("dead", f"{QUEUE}.dead")):
            while True:
                method, props, body = ch.basic_get(name, auto_ack=True)
                if method is None:
                    break
                headers = dict(props.headers or {})
                found.append(
                    soak_report.Found(
                        soak_report.sid_of(props.message_id, headers, body), where, headers, method.redelivered, len(body)
                    )
                )
    finally:
        conn.close()
    return found


def broker_version(url: str) -> str:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        version = conn._impl.server_properties.get("version", b"?")  # noqa: SLF001 - pika keeps it there
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        conn.close()


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, out: Path) -> int:
    rng = random.Random(args.seed)
    skip = set(filter(None, args.skip_kinds.split(",")))
    unknown = skip - set(soak_traffic.BY_NAME)
    if unknown:
        raise SystemExit(f"soak: --skip-kinds: unknown kinds {sorted(unknown)}; known: {sorted(soak_traffic.BY_NAME)}")
    runs_file, published_file = out / "runs.jsonl", out / "published.jsonl"
    runs_file.touch()
    kills: list[dict[str, float]] = []
    base = Path(tempfile.mkdtemp(prefix="soak-node-"))
    node, queue_args = make_node(args.broker, base, int(args.consumer_timeout * 1000))
    daemon: DaemonProcess | None = None
    stop = threading.Event()
    watch_stop = threading.Event()
    facts: dict[str, Any] = {"broker": args.broker, "args": vars(args), "results": str(out)}
    try:
        say(f"starting node {node.nodename} (RabbitMQ {args.broker})")
        node.start()
        facts["broker_version"] = broker_version(node.url)
        health_port = free_port()
        config = daemon_toml(node.url, queue_args, args, runs_file, health_port)
        daemon = DaemonProcess(out / "daemon", config, env=env_for([BENCH]), runner=args.runner)
        daemon.start()
        assert daemon.proc is not None
        ready = ReadyPoller(health_port, watch_stop)
        ready.start()
        deadline = time.monotonic() + 60
        while not (ready.polls and ready.polls[-1]["status"] == 200):
            if time.monotonic() > deadline or daemon.proc.poll() is not None:
                raise SystemExit(f"soak: the daemon did not become ready:\n{daemon.output[-3000:]}")
            time.sleep(0.2)
        sampler = Sampler(daemon.proc.pid, node.url, watch_stop)
        sampler.start()
        publisher = soak_traffic.Publisher(
            node.url, QUEUE, args.rate, soak_traffic.Mix(rng, skip), rng, published_file, stop
        )
        say(f"daemon pid {daemon.proc.pid} ready; publishing {args.rate:g} msg/s for {args.minutes:g} min")
        t_start = time.monotonic()
        end = t_start + args.minutes * 60
        publisher.start()

        next_kill = t_start + rng.uniform(args.kill_min, args.kill_max)
        next_progress = t_start + 60
        while time.monotonic() < end:
            now = time.monotonic()
            if daemon.proc.poll() is not None:
                facts["daemon_died"] = daemon.proc.returncode
                say(f"the daemon exited during the run ({daemon.proc.returncode})")
                break
            if now >= next_kill and end - now > args.quiet_end:
                k: dict[str, float] = {"killed": time.time()}
                node.kill()
                k["killed_done"] = time.time()
                time.sleep(rng.uniform(2, 10))
                k["restart_begin"] = time.time()
                for attempt in range(3):
                    try:
                        node.restart()
                        break
                    except Exception as e:  # noqa: BLE001 - try again; give up after three
                        say(f"restart {attempt + 1} failed: {e}")
                        if attempt == 2:
                            raise
                k["restart_done"] = time.time()
                kills.append(k)
                say(f"kill {len(kills)}: node down {k['restart_begin'] - k['killed']:.1f} s, "
                    f"back after {k['restart_done'] - k['killed']:.1f} s")
                next_kill = time.monotonic() + rng.uniform(args.kill_min, args.kill_max)
            if now >= next_progress:
                next_progress += 60
                last_rss = sampler.samples[-1]["rss_mb"] if sampler.samples else None
                say(f"published {publisher.sent} (unconfirmed {publisher.unconfirmed}), "
                    f"callback runs started {count_lines(runs_file, START)}, kills {len(kills)}, rss {last_rss} MB")
            time.sleep(0.5)
        facts["traffic_minutes"] = round((time.monotonic() - t_start) / 60, 2)
        stop.set()
        publisher.join(60)
        say(f"publishing stopped after {publisher.sent} messages; draining (up to {args.drain_minutes:g} min)")
        facts["drain"] = drain(node, runs_file, args.drain_minutes * 60)
        say(f"drain: {facts['drain']}")
        watch_stop.set()
        ready.join(10)
        sampler.join(20)
        t_term = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        try:
            facts["daemon_exit"] = daemon.wait(args.drain_timeout + 30)
        except AssertionError:
            facts["daemon_exit"] = "still running after SIGTERM; killed"
            daemon.kill()
        facts["stop_seconds"] = round(time.monotonic() - t_term, 1)
        found = take_all(node.url)
        facts["kills"] = kills
        (out / "found.jsonl").write_text("".join(json.dumps(vars(f), default=str) + "\n" for f in found))
        (out / "watch.json").write_text(
            json.dumps({"samples": sampler.samples, "consumers": sampler.consumers, "ready": ready.polls, "kills": kills})
        )
        (out / "facts.json").write_text(json.dumps(facts, indent=1, default=str))
    finally:
        stop.set()
        watch_stop.set()
        if daemon is not None:
            daemon.kill()
        node.cleanup()
    return report(out, args)


def report(out: Path, args: argparse.Namespace) -> int:
    """Reconcile the records in `out`, write report.json, print the summary line; 0 if everything held."""
    facts = json.loads((out / "facts.json").read_text())
    watch = json.loads((out / "watch.json").read_text())
    found = [soak_report.Found(**row) for row in soak_report.read_jsonl(out / "found.jsonl")]
    kills = watch["kills"]
    inputs = soak_report.Inputs(out / "published.jsonl", out / "runs.jsonl", out / "daemon" / "daemon.out", kills, found)
    rec = soak_report.reconcile(inputs, args.consumer_timeout)
    rss = soak_report.rss_summary(watch["samples"], args.rss_bound_mb)
    ready = soak_report.ready_summary(watch["ready"], kills, READY_GRACE, READY_SETTLE)
    counts = [c["consumers"] for c in watch["consumers"] if c["consumers"] is not None]
    consumers = {"samples": len(counts), "max": max(counts, default=None),
                 "share_with_one": round(sum(c == 1 for c in counts) / len(counts), 4) if counts else None}
    failures = []
    if rec["lost"]:
        failures.append(f"{rec['lost']} lost")
    if rec["left_in_queue"]:
        failures.append(f"{rec['left_in_queue']} left in the queue")
    if rec["problem_count"]:
        failures.append(f"{rec['problem_count']} problems")
    if rss.get("flat") is False:
        failures.append(f"RSS grew {rss['growth_mb']} MB")
    if ready["violations"]:
        failures.append(f"{ready['violations']} /ready 200s while the node was down")
    if (ready["ready_200_share_node_up"] or 0) < args.min_ready_share:
        failures.append(f"/ready 200 only {ready['ready_200_share_node_up']} of the time with the node up")
    if (consumers["max"] or 0) > 1:
        failures.append(f"up to {consumers['max']} consumers on the queue")
    if facts.get("daemon_exit") != 0:
        failures.append(f"daemon exit {facts.get('daemon_exit')!r}")
    if facts.get("daemon_died") is not None:
        failures.append("the daemon died during the run")
    if not facts.get("drain", {}).get("drained"):
        failures.append("the queue did not drain")
    doc = {
        "verdict": "PASS" if not failures else "FAIL",
        "failures": failures,
        "broker_version": facts.get("broker_version"),
        "traffic_minutes": facts.get("traffic_minutes"),
        "kills": len(kills),
        "node_down_seconds": [round(k["restart_done"] - k["killed"], 1) for k in kills],
        "drain": facts.get("drain"),
        "daemon_exit": facts.get("daemon_exit"),
        "stop_seconds": facts.get("stop_seconds"),
        **rec,
        "rss": rss,
        "ready": ready,
        "consumers": consumers,
        "args": facts.get("args"),
    }
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=str))
    per_kind = ", ".join(f"{k} {n}" for k, n in sorted(rec["published_per_kind"].items()))
    outcomes = ", ".join(f"{k} {n}" for k, n in sorted(rec["outcomes"].items()))
    causes = ", ".join(f"{k} {n}" for k, n in sorted(rec["rerun_causes"].items())) or "none"
    copies = ", ".join(f"{k} {n}" for k, n in sorted(rec["quarantine_copies_extra_causes"].items()))
    print(
        f"soak {doc['verdict']}: {doc['traffic_minutes']} min on RabbitMQ {doc['broker_version']}, {len(kills)} node kills; "
        f"published {rec['published']} ({per_kind}); outcomes: {outcomes}; lost {rec['lost']}; "
        f"reruns {rec['reruns']} ({causes}); extra quarantine copies {rec['quarantine_copies_extra']}"
        f"{' (' + copies + ')' if copies else ''}; problems {rec['problem_count']}; "
        f"RSS first/last/max {rss.get('first_mb')}/{rss.get('last_mb')}/{rss.get('max_mb')} MB "
        f"(thirds {rss.get('first_third_median_mb')}->{rss.get('last_third_median_mb')}); "
        f"/ready violations {ready['violations']}, 200 share with node up {ready['ready_200_share_node_up']}; "
        f"consumers max {consumers['max']}; daemon exit {doc['daemon_exit']}"
        + (f"; FAILED: {'; '.join(failures)}" if failures else "")
        + f"; report {out / 'report.json'}",
        flush=True,
    )
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 30)), help="traffic time (default 30, or $SOAK_MINUTES)")
    p.add_argument("--broker", choices=["3.10", "4.3"], default=os.environ.get("SOAK_BROKER", "3.10"))
    p.add_argument("--runner", choices=["command", "twistd"], default=os.environ.get("SOAK_RUNNER", "command"),
                   help="how the daemon runs: the amqp-consumer command, as the systemd unit runs it (default), or twistd -n")
    p.add_argument("--rate", type=float, default=5.0, help="messages published per second (default 5)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=20)
    p.add_argument("--drain-timeout", type=float, default=60.0, help="the daemon's consumer.drain_timeout")
    p.add_argument("--consumer-timeout", type=float, default=20.0, help="the broker's consumer timeout, seconds")
    p.add_argument("--slow-seconds", type=float, default=35.0, help="first run of a 'slow' message (> timeout + check interval)")
    p.add_argument("--kill-min", type=float, default=120.0, help="seconds between node kills, at least")
    p.add_argument("--kill-max", type=float, default=240.0, help="seconds between node kills, at most")
    p.add_argument("--quiet-end", type=float, default=45.0, help="no kill in the last this many seconds of traffic")
    p.add_argument("--drain-minutes", type=float, default=5.0, help="how long the end waits for the queue to empty")
    p.add_argument("--rss-bound-mb", type=float, default=20.0, help="allowed growth of RSS, last third's median over the first's")
    p.add_argument("--min-ready-share", type=float, default=0.8, help="share of /ready polls that must be 200 while the node is up")
    p.add_argument("--skip-kinds", default="", help=f"comma-separated kinds not to send: {','.join(soak_traffic.BY_NAME)}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--results", type=Path, default=None, help="folder for the records and report.json (default bench/results/soak/<UTC time>)")
    p.add_argument("--reconcile", type=Path, default=None, help="only re-run the reckoning on an earlier soak's folder")
    args = p.parse_args(argv)
    if args.reconcile is not None:
        return report(args.reconcile, args)
    soak_traffic.read_any_timestamp()
    if args.seed is None:
        args.seed = random.randrange(2**32)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.results or BENCH / "results" / "soak" / stamp
    out.mkdir(parents=True, exist_ok=True)
    return run(args, out)


if __name__ == "__main__":
    sys.exit(main())
