"""Where amqp-consumer spends its CPU per message: cProfile of the reactor thread, or py-spy of the whole process.

    .venv/bin/python bench/profile_hotpath.py [--variant ac-sync-w1|ac-sync-w4|ac-async] [--messages N]
                                      [--py-spy] [--top N]

cProfile (the default) runs the daemon under ``twistd --profile --profiler=cprofile``:
it sees the reactor thread only (pika's frame parsing, Message construction,
dispatch, ack batching), which is where everything but the callback runs, and
its per-call overhead inflates small functions, so read it for proportions.
``--py-spy`` samples every thread of an unmodified daemon instead (needs
py-spy, installed into bench/.venv-bench on first use, and ptrace permission).
Output goes to bench/results/logs/profile-*.
"""

from __future__ import annotations

import argparse
import io
import pstats
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import amqp_tools  # noqa: E402
import run  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="ac-sync-w1", choices=[v.name for v in run.VARIANTS if v.kind == "ac"])
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--py-spy", action="store_true", help="sample with py-spy (all threads) instead of cProfile")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args(argv)
    v = run.BY_NAME[a.variant]
    run.LOGS.mkdir(parents=True, exist_ok=True)
    ctl = amqp_tools.Control(run.URL, run.QUEUE)
    run.quiet_queue(ctl)
    amqp_tools.fill(run.URL, run.QUEUE, a.messages)
    stats = run.LOGS / f"profile-{v.name}.pstats"
    if a.py_spy:
        spy = run.BENCH_VENV / "bin" / "py-spy"
        if not spy.exists():
            subprocess.run([str(run.BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "py-spy"], check=True)
        r = run.launch(v, f"profile-{v.name}", a.messages)
        out = run.LOGS / f"profile-{v.name}.pyspy.txt"
        out.unlink(missing_ok=True)
        # Attach once a tenth of the queue is consumed: start-up (imports, connecting) stays out of the samples.
        while r.alive() and ctl.status()[0] > a.messages * 0.9:
            time.sleep(0.02)
        spy_proc = subprocess.Popen(
            [str(spy), "record", "--pid", str(r.proc.pid), "--rate", "1000", "--format", "raw", "--threads",
             "--gil", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
    else:
        r = run.launch(
            v, f"profile-{v.name}", a.messages,
            twistd_args=(f"--profile={stats}", "--profiler=cprofile", "--savestats"),
        )
    try:
        res = run.wait_result(r, timeout=600)
    finally:
        if a.py_spy:
            spy_proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                _, spy_err = spy_proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
                _, spy_err = spy_proc.communicate()
        run.stop(r)
    ctl.close()
    n = res["count"]
    print(f"{v.name}: {n:,} messages, {(n - 1) / res['seconds']:,.0f} msg/s, "
          f"{res['cpu_seconds'] / (n - 1) * 1e6:.0f} CPU µs/msg (profiler overhead included)")
    if a.py_spy:
        if not out.exists():
            print(f"py-spy wrote nothing: {spy_err.strip()}", file=sys.stderr)
            return 1
        print(summarize_pyspy(out, a.top))
        return 0
    for _ in range(50):  # twistd writes the stats at exit
        if stats.exists():
            break
        time.sleep(0.1)
    buf = io.StringIO()
    ps = pstats.Stats(str(stats), stream=buf)
    ps.sort_stats("tottime").print_stats(a.top)
    ps.sort_stats("cumulative").print_stats(a.top)
    print(buf.getvalue().replace(str(run.ROOT) + "/", "").replace(str(run.PROJECT_VENV) + "/lib/python3.11/site-packages/", ""))
    print(f"full stats: {stats}")
    return 0


def summarize_pyspy(path: Path, top: int) -> str:
    """Self time and inclusive time per function from py-spy's raw (collapsed stack) output."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + c
    lines = [f"{total} samples of the thread holding the GIL", "", "self %   function"]
    for f, c in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * c / total:6.1f}   {f}")
    lines += ["", "incl %   function"]
    for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * c / total:6.1f}   {f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
