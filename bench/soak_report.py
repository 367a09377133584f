"""The soak test's reckoning: every published message against where it ended up, and why any ran twice.

Inputs are plain records (published.jsonl, runs.jsonl, the daemon's JSON log,
the node's kill times and what was left in each queue at the end); the output
is one JSON-ready dict. Nothing here talks to a broker, so it can be re-run on
the files of an old soak (``soak.py --reconcile DIR``).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from soak_traffic import BY_NAME

SID_IN_BODY = re.compile(rb'"sid": ?"(s\d+)"')

# A rerun is pinned on a channel or connection loss only if the earlier run
# ended no more than this long before the loss (its ack could not have been
# sent and processed earlier), or had not ended at all.
ACK_GRACE = 2.0
# Runs of one worker batch start this close to the end of the run before them.
BATCH_GAP = 0.05


@dataclass
class Found:
    """A message taken from a queue at the end of the soak."""

    sid: str | None
    queue: str  # "quarantine", "dead" or "main"
    headers: dict[str, Any]
    redelivered: bool = False
    size: int = 0


@dataclass
class Disruption:
    t: float
    what: str  # "node kill", "consumer timeout", "channel or connection loss"
    detail: str = ""


@dataclass
class Inputs:
    published: Path
    runs: Path
    daemon_log: Path
    kills: list[dict[str, float]]
    found: list[Found]
    samples: list[dict[str, Any]] = field(default_factory=list)
    ready: list[dict[str, Any]] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def sid_of(message_id: Any, headers: dict[str, Any], body: bytes) -> str | None:
    """The soak id: from message_id, else the soak-id header, else the body (it is in every body)."""
    for value in (message_id, headers.get("soak-id")):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value.startswith("s"):
            return value
    m = SID_IN_BODY.search(body)
    return m.group(1).decode() if m else None


def disruptions(daemon_log: Path, kills: list[dict[str, float]]) -> list[Disruption]:
    """Node kills (from the harness) and the channel and connection losses the daemon logged."""
    out = [Disruption(k["killed"], "node kill") for k in kills]
    for row in read_jsonl(daemon_log):
        text = str(row.get("message", ""))
        level = str(row.get("level", "")).lower()
        if level not in ("warn", "warning", "error", "critical"):
            continue
        low = text.lower()
        if "quarantine" in low.split("\n", 1)[0]:
            continue
        if not any(w in low for w in ("channel", "connection", "consumer", "connect")):
            continue
        try:
            t = datetime.fromisoformat(row["time"]).timestamp()
        except (KeyError, ValueError):
            continue
        what = "consumer timeout" if ("timed out" in low or "timeout" in low) else "channel or connection loss"
        out.append(Disruption(t, what, text.split("\n", 1)[0][:300]))
    out.sort(key=lambda d: d.t)
    return out


def log_summary(daemon_log: Path, top: int = 30) -> list[dict[str, Any]]:
    """The daemon's warnings and errors, counted by their first line with ids, numbers and ports taken out."""
    counts: Counter[tuple[str, str]] = Counter()
    first_seen: dict[tuple[str, str], str] = {}
    for row in read_jsonl(daemon_log):
        level = str(row.get("level", "")).lower()
        if level not in ("warn", "warning", "error", "critical"):
            continue
        line = str(row.get("message", "")).split("\n", 1)[0]
        shape = re.sub(r"\bs\d{7}\b", "<id>", line)
        shape = re.sub(r"\d+(\.\d+)?", "<n>", shape)[:240]
        key = (level, shape)
        counts[key] += 1
        first_seen.setdefault(key, f"{row.get('time')} {line[:400]}")
    return [{"level": k[0], "count": n, "line": k[1], "first": first_seen[k]} for k, n in counts.most_common(top)]


def _batch_times(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Set each run's ``batch_t`` and ``settle_t``: when its batch started, and when its outcome could leave.

    A worker takes a batch of deliveries and hands the outcomes back together,
    so a run's ack waits for the runs after it in the same batch, and a run
    late in a batch may start long after its delivery arrived (and after its
    channel died). Runs of one batch follow each other on one thread with no
    gap; such a chain bounds both times (two batches back to back look like one
    chain, which only makes the bounds looser).
    """
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for rs in runs.values():
        for r in rs:
            r["settle_t"] = r["end_t"]
            r["batch_t"] = r["t"]
            if r["end_t"] is not None:
                by_thread[r["thread"]].append(r)
    for rs in by_thread.values():
        rs.sort(key=lambda r: r["t"])
        for before, r in zip(rs, rs[1:]):
            if r["t"] - before["end_t"] < BATCH_GAP:
                r["batch_t"] = before["batch_t"]
        for r, after in zip(reversed(rs[:-1]), reversed(rs[1:])):
            if after["t"] - r["end_t"] < BATCH_GAP:
                r["settle_t"] = after["settle_t"]


def _cause(prev: dict[str, Any], this: dict[str, Any], events: list[Disruption]) -> tuple[str, bool]:
    """Why a message ran again after `prev` ('unexplained' when nothing could have requeued it),
    and whether `prev` itself started after the loss that requeued it (it ran on a dead channel)."""
    if prev.get("result") == "nack":
        return "nack (intended)", False
    since = min(prev["t"], prev["batch_t"]) - ACK_GRACE
    settled, again = prev.get("settle_t"), this["t"]
    window = [e for e in events if since <= e.t <= again]
    # A kill can also lose an ack the broker had received but not yet stored.
    for e in window:
        if e.what == "node kill" or settled is None or settled >= e.t - ACK_GRACE:
            return e.what, e.t < prev["t"] - ACK_GRACE
    if prev.get("result") == "raise":
        return "unexplained after the callback raised (a quarantine retry?)", False
    return "unexplained", False


def _copies_cause(copies: list[dict[str, Any]], events: list[Disruption]) -> str:
    """Why a message was quarantined more than once: a disruption between its first copy and its last.

    The original is acked only after the broker confirmed its copy, so a
    channel or connection lost in between (or a node killed before the ack
    was stored) quarantines it again when it comes back: a duplicate, never a loss.
    """
    times = []
    for headers in copies:
        with suppress(KeyError, TypeError, ValueError):
            times.append(datetime.fromisoformat(str(headers["amqp-consumer-quarantined-at"])).timestamp())
    if len(times) < 2:
        return "unexplained"
    # quarantined-at has whole seconds
    first, last = min(times) - 1, max(times) + 1
    for e in events:
        if first <= e.t <= last:
            return e.what
    return "unexplained"


def reconcile(inp: Inputs, consumer_timeout: float) -> dict[str, Any]:
    published: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(inp.published):
        sid = row["sid"]
        if row["ev"] == "publish":
            published[sid] = {"kind": row["kind"], "t": row["t"], "confirmed": None, "size": row.get("size", 0)}
        elif sid in published:
            published[sid]["confirmed"] = row["ev"] == "confirmed"

    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in read_jsonl(inp.runs):
        sid = row["sid"]
        if row["ev"] == "start":
            runs[sid].append(
                {"t": row["t"], "redelivered": row["redelivered"], "end_t": None, "result": None, "thread": row.get("thread")}
            )
        else:
            for run in runs[sid]:
                if run["t"] == row["start"]:
                    run["end_t"], run["result"] = row["t"], row["result"]
                    break

    _batch_times(runs)

    where: dict[str, Counter[str]] = defaultdict(Counter)
    found_by_sid: dict[str, list[Found]] = defaultdict(list)
    strangers = []
    for f in inp.found:
        if f.sid is None or f.sid not in published:
            strangers.append({"queue": f.queue, "sid": f.sid, "headers": sorted(f.headers)[:20]})
            continue
        where[f.sid][f.queue] += 1
        found_by_sid[f.sid].append(f)

    events = disruptions(inp.daemon_log, inp.kills)
    outcomes: Counter[str] = Counter()
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    problems: list[dict[str, Any]] = []
    dup_causes: Counter[str] = Counter()
    dup_examples: dict[str, list[str]] = defaultdict(list)
    quarantine_copies_extra = 0
    unfinished_runs = 0
    stale_runs = 0
    copy_causes: Counter[str] = Counter()

    def problem(sid: str, what: str, **detail: Any) -> None:
        problems.append({"sid": sid, "kind": published[sid]["kind"], "problem": what, **detail})

    for sid, pub in published.items():
        kind = BY_NAME[pub["kind"]]
        its_runs = sorted(runs.get(sid, []), key=lambda r: r["t"])
        unfinished_runs += sum(1 for r in its_runs if r["end_t"] is None)
        places = where.get(sid, Counter())
        in_main, in_q, in_dead = places["main"], places["quarantine"], places["dead"]
        ok_runs = [r for r in its_runs if r["result"] in ("ok", "ok-slow")]

        if in_main:
            outcome = "left in its queue"
        elif in_q and in_dead:
            outcome = "quarantined and dead-lettered"
        elif in_q:
            outcome = "quarantined"
        elif in_dead:
            outcome = "dead-lettered"
        elif ok_runs:
            outcome = "acked"
        elif pub["confirmed"] is not True and not its_runs:
            outcome = "unconfirmed, never arrived"  # the node died before it stored the message
        else:
            outcome = "lost"
        outcomes[outcome] += 1
        per_kind[kind.name][outcome] += 1

        expected_ok = (
            outcome == kind.expect
            or (kind.expect == "settled-poison" and outcome in ("quarantined", "dead-lettered"))
            or outcome == "unconfirmed, never arrived"
        )
        if not expected_ok:
            problem(sid, f"expected {kind.expect}, found {outcome}", runs=len(its_runs), published_confirmed=pub["confirmed"])
        if kind.runs == "no" and its_runs:
            problem(sid, "the callback ran on a message it should never see", runs=len(its_runs))
        if outcome == "quarantined":
            copy = found_by_sid[sid][0].headers
            if kind.exception and copy.get("amqp-consumer-exception") != kind.exception:
                problem(sid, "quarantined with the wrong exception", got=copy.get("amqp-consumer-exception"), want=kind.exception)
            if copy.get("soak-kind") not in (kind.name, None) or "amqp-consumer-error" not in copy:
                problem(sid, "quarantined copy lacks headers", headers=sorted(map(str, copy))[:30])
            if in_q > 1:
                quarantine_copies_extra += in_q - 1
                cause = _copies_cause([f.headers for f in found_by_sid[sid] if f.queue == "quarantine"], events)
                copy_causes[cause] += in_q - 1
                if cause == "unexplained":
                    problem(sid, "quarantined more than once", copies=in_q)

        for prev, this in zip(its_runs, its_runs[1:]):
            cause, stale = _cause(prev, this, events)
            stale_runs += stale
            if not this["redelivered"] and cause == "node kill":
                cause = "node kill (not flagged redelivered: the node lost its record of the delivery)"
            elif not this["redelivered"]:
                # The broker flags every delivery after the first, and nothing is published twice:
                # the first delivery ran after a later one had (a dead channel's leftover), or ran twice.
                cause = f"first delivery ran after a later one ({cause} before it)"
            dup_causes[cause] += 1
            if len(dup_examples[cause]) < 10:
                dup_examples[cause].append(sid)
            if cause.startswith(("unexplained", "first delivery ran")):
                problem(sid, f"ran again: {cause}", runs=[_run_text(r) for r in its_runs])

    slow_runs = [r for rs in runs.values() for r in rs if r["result"] == "ok-slow" and r["end_t"] is not None]
    slow_over = sum(1 for r in slow_runs if r["end_t"] - r["t"] > consumer_timeout)
    return {
        "published": len(published),
        "published_confirmed": sum(1 for p in published.values() if p["confirmed"] is True),
        "published_unconfirmed": sum(1 for p in published.values() if p["confirmed"] is not True),
        "published_per_kind": dict(Counter(p["kind"] for p in published.values())),
        "outcomes": dict(outcomes),
        "outcomes_per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "lost": outcomes.get("lost", 0),
        "left_in_queue": outcomes.get("left in its queue", 0),
        "callback_runs": sum(len(r) for r in runs.values()),
        "unfinished_runs": unfinished_runs,
        "slow_runs_past_timeout": slow_over,
        "reruns": sum(dup_causes.values()),
        "rerun_causes": dict(dup_causes),
        "rerun_examples": dict(dup_examples),
        "runs_started_after_their_channel_died": stale_runs,
        "quarantine_copies_extra": quarantine_copies_extra,
        "quarantine_copies_extra_causes": dict(copy_causes),
        "strangers": strangers[:50],
        "disruptions": dict(Counter(e.what for e in events)),
        "daemon_warnings": log_summary(inp.daemon_log),
        "problems": problems[:200],
        "problem_count": len(problems),
        "problem_summary": dict(Counter(p["problem"].split(":")[0] for p in problems)),
    }


def _run_text(r: dict[str, Any]) -> str:
    end = f"{r['end_t'] - r['t']:.1f}s {r['result']}" if r["end_t"] is not None else "unfinished"
    return f"{datetime.fromtimestamp(r['t']).isoformat(timespec='milliseconds')} {end}{' redelivered' if r['redelivered'] else ''}"


def rss_summary(samples: list[dict[str, Any]], bound_mb: float) -> dict[str, Any]:
    """First/last/max RSS and the medians of the first and last thirds; flat if their gap is within bound_mb."""
    rss = [s["rss_mb"] for s in samples if s.get("rss_mb") is not None]
    if len(rss) < 3:
        return {"samples": len(rss), "flat": None}
    third = len(rss) // 3
    first, last = statistics.median(rss[:third]), statistics.median(rss[-third:])
    return {
        "samples": len(rss),
        "first_mb": rss[0],
        "last_mb": rss[-1],
        "max_mb": max(rss),
        "first_third_median_mb": first,
        "last_third_median_mb": last,
        "growth_mb": round(last - first, 1),
        "bound_mb": bound_mb,
        "flat": last - first <= bound_mb,
    }


def ready_summary(
    polls: list[dict[str, Any]], kills: list[dict[str, float]], grace: float, settle: float
) -> dict[str, Any]:
    """How often /ready said 200, and every 200 given while the node was down (a lie).

    The share of 200s "with the node up" leaves out each outage from the kill
    until `settle` seconds after the node answered again (its boot, and the
    daemon's reconnect backoff): it is the daemon's own readiness that is judged.
    """
    down = [(k["killed_done"] + grace, k["restart_begin"]) for k in kills if "restart_begin" in k]
    outages = [(k["killed"], k.get("restart_done", k["killed"]) + settle) for k in kills]
    answered = [p for p in polls if p["status"] is not None]
    violations = [
        p for p in answered
        if p["status"] == 200 and any(a <= p["t0"] and p["t1"] <= b for a, b in down)
    ]
    up_polls = [p for p in answered if not any(a <= p["t0"] <= b for a, b in outages)]
    return {
        "polls": len(polls),
        "no_answer": len(polls) - len(answered),
        "ready_200_share": round(sum(p["status"] == 200 for p in answered) / len(answered), 4) if answered else None,
        "ready_200_share_node_up": round(sum(p["status"] == 200 for p in up_polls) / len(up_polls), 4) if up_polls else None,
        "violations": len(violations),
        "violation_times": [datetime.fromtimestamp(p["t0"]).isoformat(timespec="milliseconds") for p in violations[:20]],
        "grace_seconds": grace,
        "settle_seconds": settle,
    }
