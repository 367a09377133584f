"""Measurement inside a consumer process, the same for every variant.

Every variant's callback decodes the body once (or gets it decoded by its
framework) and calls ``PROBE.hit(body)``. The probe counts messages and, when
the expected count is reached, writes one small JSON file that the harness
waits for. It uses the standard library only: it is imported by amqp-consumer
(project venv), the raw pika consumer (project venv) and fedora-messaging
(bench venv).

Environment (set by bench/run.py):
  BENCH_OUT          where to write the result JSON (required to record anything)
  BENCH_EXPECT       messages to count before writing it
  BENCH_MODE         "throughput" (default) or "latency"
  BENCH_CHECKPOINTS  comma-separated counts at which to read this process's RSS
  BENCH_SWITCH_INTERVAL  if set, sys.setswitchinterval() of the consumer process
                     (an experiment knob: the GIL hand-off delay between threads)

What is recorded:
  first/last         perf_counter at the first and at the expected-th message
  cpu first/last     CLOCK_PROCESS_CPUTIME_ID (user+sys of every thread of the
                     process, the figure /proc/<pid>/stat gives, at ns resolution)
  latency            time.time() at the callback minus body["sent"] (latency mode)
  inside             (latency mode, amqp-consumer only) perf_counter at the callback
                     minus when the delivery reached the daemon's dispatcher: the
                     daemon's own share of the latency (see bench_callbacks.py)
  rss                VmRSS at each checkpoint
  gc                 (latency mode) every garbage-collector pass: generation and pause
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import threading
import time

_clock = time.perf_counter
_cpu = time.process_time
_now = time.time


def _rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Probe:
    def __init__(self) -> None:
        self.out = os.environ.get("BENCH_OUT", "")
        self.expect = int(os.environ.get("BENCH_EXPECT", "0") or 0)
        self.mode = os.environ.get("BENCH_MODE", "throughput")
        cps = os.environ.get("BENCH_CHECKPOINTS", "")
        self.checkpoints = frozenset(int(c) for c in cps.split(",") if c.strip())
        self._count = itertools.count(1)  # next() on it is atomic under the GIL
        self.first = self.last = 0.0
        self.first_wall = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.rss: dict[int, int] = {}
        self.latency: list[float] | None = [] if self.mode == "latency" else None
        self.inside: list[float] = []
        self.threads: set[str] = set()
        self.gc_pauses: list[tuple[int, float]] = []
        self._gc_start = 0.0
        if self.latency is not None:
            gc.callbacks.append(self._on_gc)
        self._written = False
        self._lock = threading.Lock()

    def hit(self, body, arrived: float | None = None) -> None:
        n = next(self._count)
        if self.latency is not None:
            self.latency.append(_now() - body["sent"])
            if arrived is not None:
                self.inside.append(_clock() - arrived)
        if n == 1:
            self.first = _clock()
            self.first_wall = _now()
            self.cpu_first = _cpu()
        if n in self.checkpoints:
            self.rss[n] = _rss_kib()
        if n == self.expect:
            self.last = _clock()
            self.cpu_last = _cpu()
            self.threads.add(threading.current_thread().name)
            self._write(n)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = _clock()
        elif self.first:
            self.gc_pauses.append((info["generation"], _clock() - self._gc_start))

    def _write(self, n: int) -> None:
        with self._lock:
            if self._written or not self.out:
                return
            self._written = True
        data = {
            "count": n,
            "first": self.first,
            "last": self.last,
            "first_wall": self.first_wall,
            "seconds": self.last - self.first,
            "cpu_seconds": self.cpu_last - self.cpu_first,
            "rss_kib": {str(k): v for k, v in sorted(self.rss.items())},
            "pid": os.getpid(),
            "thread_of_last": sorted(self.threads),
        }
        if self.latency is not None:
            data["latency"] = self.latency
            if self.inside:
                data["inside"] = self.inside
            data["gc"] = {
                f"gen{g}": {
                    "count": len(p := [d for gen, d in self.gc_pauses if gen == g]),
                    "max_ms": round(max(p) * 1e3, 3) if p else 0.0,
                    "total_ms": round(sum(p) * 1e3, 3),
                }
                for g in (0, 1, 2)
            }
        tmp = f"{self.out}.part"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.out)


if os.environ.get("BENCH_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))

PROBE = Probe()
