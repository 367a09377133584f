"""The soak test's reckoning (bench/soak_report.py) judges records correctly.

The soak itself runs for half an hour against a private node (`make soak`) and
is not part of the suite; what is checked here, on hand-made records, is that
its verdicts can be trusted: a message that vanished is counted lost, a second
run is pinned on the disruption that caused it, a second run nothing explains
is a problem, RSS growth and a /ready that lies while the node is down fail.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if not (BENCH / "soak_report.py").is_file():
    pytest.skip("bench/ is not part of this tree (the source distribution leaves it out)", allow_module_level=True)
sys.path.insert(0, str(BENCH))

import soak_report  # noqa: E402
from soak_report import Found, Inputs  # noqa: E402

T0 = 1_800_000_000.0


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def published(*items: tuple[str, str], confirmed: bool = True) -> list[dict]:
    rows = []
    for i, (sid, kind) in enumerate(items):
        rows.append({"sid": sid, "kind": kind, "t": T0 + i, "ev": "publish"})
        rows.append({"sid": sid, "ev": "confirmed" if confirmed else "unconfirmed", "t": T0 + i})
    return rows


def run(sid: str, start: float, end: float | None, result: str = "ok", redelivered: bool = False, thread: str = "w1") -> list[dict]:
    base = {"sid": sid, "redelivered": redelivered, "thread": thread, "do": "-"}
    rows = [{**base, "ev": "start", "t": T0 + start}]
    if end is not None:
        rows.append({**base, "ev": "end", "t": T0 + end, "start": T0 + start, "result": result})
    return rows


def log_line(t: float, message: str, level: str = "WARNING") -> dict:
    return {"time": datetime.fromtimestamp(T0 + t, tz=timezone.utc).isoformat(), "level": level, "logger": "x", "message": message}


def reckon(tmp_path: Path, pub: list[dict], runs: list[dict], found: list[Found], log: list[dict] = (), kills: list[dict] = ()) -> dict:
    inputs = Inputs(
        write_jsonl(tmp_path / "published.jsonl", pub),
        write_jsonl(tmp_path / "runs.jsonl", runs),
        write_jsonl(tmp_path / "daemon.out", list(log)),
        list(kills),
        found,
    )
    return soak_report.reconcile(inputs, consumer_timeout=20.0)


def quarantined(sid: str, exception: str, kind: str) -> Found:
    return Found(sid, "quarantine", {"soak-kind": kind, "amqp-consumer-exception": exception, "amqp-consumer-error": "x"})


def test_every_expected_outcome_passes_and_a_vanished_message_is_lost(tmp_path):
    pub = published(("s1", "ok"), ("s2", "raise"), ("s3", "drop"), ("s4", "bad-json"), ("s5", "ok"))
    runs = run("s1", 10, 10.1) + run("s2", 11, 11.1, "raise") + run("s3", 12, 12.1, "drop")
    found = [quarantined("s2", "ValueError", "raise"), Found("s3", "dead", {}), quarantined("s4", "BodyDecodeError", "bad-json")]
    r = reckon(tmp_path, pub, runs, found)
    assert r["outcomes"] == {"acked": 1, "quarantined": 2, "dead-lettered": 1, "lost": 1}
    assert r["lost"] == 1
    assert [p["sid"] for p in r["problems"]] == ["s5"]


def test_an_unconfirmed_publish_that_never_arrived_is_not_lost(tmp_path):
    r = reckon(tmp_path, published(("s1", "ok"), confirmed=False), [], [])
    assert r["outcomes"] == {"unconfirmed, never arrived": 1}
    assert r["lost"] == 0 and r["problem_count"] == 0


def test_wrong_outcome_and_wrong_exception_are_problems(tmp_path):
    pub = published(("s1", "raise"), ("s2", "raise"), ("s3", "bad-json"))
    runs = run("s1", 1, 1.1, "raise") + run("s2", 2, 2.1, "raise") + run("s3", 3, 3.1)
    found = [Found("s1", "main", {}), quarantined("s2", "TypeError", "raise"), quarantined("s3", "BodyDecodeError", "bad-json")]
    r = reckon(tmp_path, pub, runs, found)
    problems = {(p["sid"], p["problem"].split(",")[0]) for p in r["problems"]}
    assert ("s1", "expected quarantined") in problems
    assert ("s2", "quarantined with the wrong exception") in problems
    assert ("s3", "the callback ran on a message it should never see") in problems
    assert r["left_in_queue"] == 1


def test_reruns_are_pinned_on_their_cause(tmp_path):
    pub = published(("s1", "nack-once"), ("s2", "ok"), ("s3", "ok"), ("s4", "ok"), ("s5", "ok"), ("s6", "ok"))
    runs = (
        run("s1", 1, 1.1, "nack") + run("s1", 2, 2.1, redelivered=True)
        # ran, then the node was killed before its ack was stored
        + run("s2", 10, 10.1) + run("s2", 30, 30.1, redelivered=True)
        # the same, but the restarted node no longer knew it had delivered the message
        + run("s6", 11, 11.1, thread="w5") + run("s6", 31, 31.1, thread="w5")
        # still running when the broker closed the channel for a consumer timeout
        + run("s3", 40, 70, "ok-slow", thread="w2") + run("s3", 72, 72.1, redelivered=True)
        # finished long before a channel loss: its ack had gone out; nothing explains a rerun
        + run("s4", 50, 50.1, thread="w3") + run("s4", 80, 80.1, redelivered=True, thread="w3")
        # its first delivery (not flagged redelivered) ran after a later one
        + run("s5", 100, 100.1, thread="w4", redelivered=True) + run("s5", 101, 101.1, thread="w4")
    )
    log = [log_line(61, "the broker closed our channel: 406 PRECONDITION_FAILED - delivery acknowledgement timed out")]
    kills = [{"killed": T0 + 15, "killed_done": T0 + 15.2, "restart_begin": T0 + 20, "restart_done": T0 + 28}]
    r = reckon(tmp_path, pub, runs, [], log, kills)
    assert r["rerun_causes"] == {
        "nack (intended)": 1,
        "node kill": 1,
        "node kill (not flagged redelivered: the node lost its record of the delivery)": 1,
        "consumer timeout": 1,
        "unexplained": 1,
        "first delivery ran after a later one (unexplained before it)": 1,
    }
    assert sorted(p["sid"] for p in r["problems"]) == ["s4", "s5"]
    assert r["lost"] == 0


def test_an_ack_waits_for_the_rest_of_its_batch(tmp_path):
    """A fast run behind a slow one in the same worker batch is acked only when the batch ends."""
    pub = published(("s1", "slow"), ("s2", "ok"))
    runs = (
        run("s1", 10, 45, "ok-slow") + run("s2", 45.001, 45.002)  # same thread, back to back: one batch
        + run("s1", 50, 50.1, redelivered=True) + run("s2", 50.2, 50.3, redelivered=True)
    )
    log = [log_line(35, "the broker closed our channel: 406 PRECONDITION_FAILED - delivery acknowledgement timed out")]
    r = reckon(tmp_path, pub, runs, [], log)
    assert r["rerun_causes"] == {"consumer timeout": 2}
    assert r["problem_count"] == 0
    assert r["runs_started_after_their_channel_died"] == 1  # s2's first run, 10 s after the close


def test_a_second_quarantined_copy_needs_a_disruption_between_the_copies(tmp_path):
    def copy(sid: str, at: float) -> Found:
        found = quarantined(sid, "ValueError", "raise")
        found.headers["amqp-consumer-quarantined-at"] = datetime.fromtimestamp(T0 + at, tz=timezone.utc).isoformat(timespec="seconds")
        return found

    pub = published(("s1", "raise"), ("s2", "raise"))
    runs = run("s1", 10, 10.1, "raise") + run("s1", 40, 40.1, "raise", redelivered=True)
    runs += run("s2", 60, 60.1, "raise", thread="w2") + run("s2", 90, 90.1, "raise", redelivered=True, thread="w2")
    # s1: the node was killed just after its copy was confirmed, before the ack was stored
    kills = [{"killed": T0 + 10.2, "killed_done": T0 + 10.4, "restart_begin": T0 + 15, "restart_done": T0 + 30}]
    found = [copy("s1", 10), copy("s1", 40), copy("s2", 60), copy("s2", 90)]
    r = reckon(tmp_path, pub, runs, found, kills=kills)
    assert r["quarantine_copies_extra"] == 2
    assert r["quarantine_copies_extra_causes"] == {"node kill": 1, "unexplained": 1}
    assert [(p["sid"], p["problem"]) for p in r["problems"]] == [
        ("s2", "quarantined more than once"),
        ("s2", "ran again: unexplained after the callback raised (a quarantine retry?)"),
    ]


def test_a_quarantined_message_is_found_by_the_id_in_its_body():
    assert soak_report.sid_of(None, {}, b'{"sid": "s0000042", "do": "ok", broken') == "s0000042"
    assert soak_report.sid_of(b"s7", {}, b"") == "s7"


@pytest.mark.parametrize(("rss", "flat"), [([50, 51, 50, 52, 51, 53], True), ([50, 50, 60, 70, 80, 90], False)])
def test_rss_is_flat_within_the_bound(rss, flat):
    summary = soak_report.rss_summary([{"rss_mb": v} for v in rss], bound_mb=20)
    assert summary["flat"] is flat
    assert summary["max_mb"] == max(rss) and summary["first_mb"] == rss[0] and summary["last_mb"] == rss[-1]


def test_a_200_from_ready_while_the_node_is_down_is_a_violation():
    kills = [{"killed": 100.0, "killed_done": 100.5, "restart_begin": 110.0, "restart_done": 118.0}]
    polls = [
        {"t0": 100.6, "t1": 100.7, "status": 200},  # within the grace after the kill: the daemon may not know yet
        {"t0": 105.0, "t1": 105.1, "status": 503},
        {"t0": 106.0, "t1": 106.1, "status": 200},  # a lie
        {"t0": 120.0, "t1": 120.1, "status": 503},  # reconnecting after the restart
        {"t0": 130.0, "t1": 130.1, "status": 200},
    ]
    summary = soak_report.ready_summary(polls, kills, grace=1.0, settle=10.0)
    assert summary["violations"] == 1
    assert summary["ready_200_share_node_up"] == 1.0  # only the poll at 130 s is after the outage
