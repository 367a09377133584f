"""The benchmark keeps working: a quick `bench/run.py` run against the shared broker (3.10; the bench measures
this daemon, not brokers), on a queue of its own so that concurrent test runs do not meet.

The figures themselves are not asserted (speed is judged from a full `make bench`,
never by timed assertions); what is checked is what a reader of the report relies
on: every variant ran, every message was acked, the tables and the JSON are there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.broker, pytest.mark.single_broker]


def test_quick_bench_reports_every_variant_and_writes_json(tmp_path, broker, queue):
    variants = ["ac-sync-w1", "ac-async", "pika-raw"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--skip-long", "--only", ",".join(variants),
         "--messages", "2000", "--latency-seconds", "0.5", "--results", str(tmp_path), "--queue", queue],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout
    for name in variants:
        assert f"| {name} |" in report
    assert "### Targets" in report and "idle RSS ≤ 60 MB" in report

    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["markdown"].strip() == report.strip()
    for name in variants:
        [run] = data["runs"][name]
        assert run["messages"] == 2000 and run["msg_per_s"] > 0 and run["cpu_us_per_msg"] > 0
        assert run["left_in_queue"] == 0, f"{name} left messages unacked"
        assert data["latency"][name]["p99_ms"] > 0
    assert data["throughput"]["ac-sync-w1"]["vs_pika_raw"] > 0
    # amqp-consumer's latency is split into the daemon's own share and the rest.
    assert data["latency"]["ac-sync-w1"]["inside_p99_ms"] > 0
    assert data["latency"]["pika-raw"]["inside_p99_ms"] is None
    assert data["ready"]["start_to_ready_ms"] > 0 and data["ready"]["idle_rss_mb"] > 0
