"""Daemons on a three-node RabbitMQ 4.3 cluster survive losing a node, and each other (``make test-cluster``).

1. A quorum queue, three daemons with different node orders in ``urls``, 20,000
   persistent messages published with confirms; the node leading the queue is
   killed (-9) mid-stream and restarted later.
2. Single active consumer across three daemons; the active one is SIGKILLed
   mid-stream and another takes over, in order.

The figures go into the run's summary line (conftest.py), which README's
"Running at scale" quotes.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

from tests.cluster.nodes import Cluster
from tests.cluster.publish import ConfirmedPublisher
from tests.cluster.summary import FIGURES
from tests.support.broker import unique
from tests.support.daemonproc import DaemonProcess, daemon_config, env_for
from tests.support.ops import HEALTH_ANYWHERE, health_port, http_json, poll

PREFETCH = 100
MESSAGES = 20_000
SAC_MESSAGES = 3_000
SAC_SLEEP = 0.002  # seconds per message: the active daemon is mid-stream for a few seconds
RECOVERY_LIMIT = 15.0  # seconds from a kill to consuming again
QUORUM = '{"x-queue-type" = "quorum"}'
SINGLE_ACTIVE = '{"x-queue-type" = "quorum", "x-single-active-consumer" = true}'


class ClusterDaemon:
    """One daemon of the scenario: its own config, node order, health port and record of what it processed."""

    def __init__(self, workdir: Path, name: str, urls: list[str], queue: str, arguments: str, sleep: float = 0.0) -> None:
        self.name = name
        self.out = workdir / f"{name}.lines"
        text = daemon_config(
            queue,
            "clustercb:Sequence",
            url=urls,
            heartbeat=5,
            reconnect=(0.5, 4.0),
            prefetch=PREFETCH,
            queue_args=arguments,
            health=HEALTH_ANYWHERE,
            amqp_extra=f'connection_name = "{name}"',
            extra=f"[consumer.config]\nsleep = {sleep}",
        )
        self.proc = DaemonProcess(workdir / name, text, env=env_for(TEST_OUT=str(self.out)))
        self.port = 0

    def start(self) -> ClusterDaemon:
        self.proc.start()
        self.port = health_port(self.proc)
        return self

    def records(self) -> list[tuple[int, float]]:
        """(n, time) per message processed, in processing order."""
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        rows = [line.split() for line in lines]
        return [(int(r[0]), float(r[1])) for r in rows if len(r) == 3]

    def ready(self) -> tuple[int, dict]:
        return http_json(self.port, "/ready")

    def node(self) -> str | None:
        return http_json(self.port, "/status")[1]["connection"]["node"]


def _daemons(cluster: Cluster, tmp_path: Path, queue: str, arguments: str, sleep: float = 0.0) -> list[ClusterDaemon]:
    """Three daemons, each listing the nodes starting from a different one."""
    urls = [n.url for n in cluster.nodes]
    return [
        ClusterDaemon(tmp_path, f"{queue}-d{i + 1}", urls[i:] + urls[:i], queue, arguments, sleep)
        for i in range(len(urls))
    ]


def _all_ready(ds: list[ClusterDaemon]) -> bool:
    return all(d.ready()[0] == 200 for d in ds)


def _counts(ds: list[ClusterDaemon]) -> Counter[int]:
    """How many times each message was processed, by any daemon."""
    return Counter(n for d in ds for n, _ in d.records())


def _duplicates(counts: Counter[int]) -> int:
    return sum(counts.values()) - len(counts)


def test_quorum_queue_consumption_survives_killing_its_leader(cluster: Cluster, tmp_path: Path, daemons) -> None:
    queue = unique("cluster-qq")
    ds = _daemons(cluster, tmp_path, queue, QUORUM)
    for d in ds:
        daemons.append(d.start().proc)
    poll(lambda: _all_ready(ds), 60, "every daemon consuming")
    assert {d.node() for d in ds} == {f"127.0.0.1:{n.port}" for n in cluster.nodes}  # one daemon per node
    leader = cluster.leader(queue)
    publisher = ConfirmedPublisher(next(n for n in cluster.nodes if n is not leader).url, queue, MESSAGES)
    publisher.start()

    def processed() -> int:
        return sum(len(d.records()) for d in ds)

    poll(lambda: processed() >= MESSAGES // 4 or publisher.error, 60, "a quarter of the messages processed")
    killed_at = processed()
    on_leader = [d for d in ds if d.node() == f"127.0.0.1:{leader.port}"]
    killing = time.time()
    leader.kill()  # returns once the node is dead: it died between these two times
    dead = time.time()

    def resumed() -> float | None:
        # The daemons held at most prefetch messages each when the node died; past
        # that many, messages processed after its death were delivered after it.
        after = sorted(t for d in ds for _, t in d.records() if t > dead)
        return after[len(ds) * PREFETCH] if len(after) > len(ds) * PREFETCH else None

    resumed_at = poll(resumed, 60, "consumption resumed after the leader was killed")
    leader.restart(timeout=180)

    publisher.join(120)
    assert publisher.error is None and publisher.confirmed == MESSAGES, publisher.error
    poll(lambda: set(range(MESSAGES)) <= set(_counts(ds)), 120, "every message processed at least once")
    poll(lambda: cluster.depth(queue) == 0, 60, "the queue drained")
    poll(lambda: _all_ready(ds), 60, "every daemon ready again")
    assert len(on_leader) == 1 and on_leader[0].node() != f"127.0.0.1:{leader.port}"  # it moved to another node
    assert "lost" in on_leader[0].proc.output
    per_daemon = Counter(name for name, _ in cluster.consumers(queue))
    counts = _counts(ds)
    FIGURES["quorum"] = {
        "published": publisher.confirmed,
        "unique": len(counts),
        "duplicates": _duplicates(counts),
        "killed_at": killed_at,
        "resumed_after": resumed_at - killing,
        "ready": sum(d.ready()[0] == 200 for d in ds),
        "daemons": len(ds),
        "max_consumers": max(per_daemon.values()),
    }
    assert resumed_at - killing < RECOVERY_LIMIT, f"resumed {resumed_at - killing:.1f} s after the kill"
    assert per_daemon == {d.name: 1 for d in ds}, per_daemon
    for d in ds:
        assert d.proc.stop() == 0


def test_single_active_consumer_hands_over_in_order(cluster: Cluster, tmp_path: Path, daemons) -> None:
    queue = unique("cluster-sac")
    ds = _daemons(cluster, tmp_path, queue, SINGLE_ACTIVE, sleep=SAC_SLEEP)
    first, others = ds[0], ds[1:]
    daemons.append(first.start().proc)
    poll(lambda: first.ready() == (200, {"ready": True, "reason": "standby"}), 60, "the first daemon registered")
    for d in others:
        daemons.append(d.start().proc)
    poll(lambda: len(cluster.consumers(queue)) == len(ds) and _all_ready(ds), 60, "every daemon registered")
    activity = {name: row["activity_status"] for name, row in cluster.consumers(queue)}
    assert activity == {first.name: "single_active", **{d.name: "waiting" for d in others}}, activity
    publisher = ConfirmedPublisher(cluster.nodes[1].url, queue, SAC_MESSAGES)
    publisher.start()
    poll(lambda: len(first.records()) >= SAC_MESSAGES // 4 or publisher.error, 60, "the first daemon under way")
    assert [d.records() for d in others] == [[], []]
    assert [d.ready() for d in others] == [(200, {"ready": True, "reason": "standby"})] * 2
    assert first.ready() == (200, {"ready": True, "reason": "consuming"})

    killed_at = len(first.records())
    killed = time.time()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    took_over = poll(lambda: min((t for d in others for _, t in d.records()[:1]), default=None), 60, "another daemon took over")

    publisher.join(120)
    assert publisher.error is None and publisher.confirmed == SAC_MESSAGES, publisher.error
    poll(lambda: set(range(SAC_MESSAGES)) <= set(_counts(ds)), 120, "every message processed at least once")
    active = [d for d in others if d.records()]
    assert len(active) == 1, "only one daemon at a time gets messages"
    for d in ds:
        sequence = [n for n, _ in d.records()]
        assert sequence == sorted(set(sequence)), f"{d.name} processed out of order"
    standby = next(d for d in others if d is not active[0])
    assert active[0].ready() == (200, {"ready": True, "reason": "consuming"})
    assert standby.ready() == (200, {"ready": True, "reason": "standby"})
    FIGURES["single_active"] = {
        "published": publisher.confirmed,
        "killed_at": killed_at,
        "takeover_after": took_over - killed,
        "in_order": len(active[0].records()),
        "duplicates": _duplicates(_counts(ds)),
    }
    assert took_over - killed < RECOVERY_LIMIT, f"taken over {took_over - killed:.1f} s after the kill"
    for d in others:
        assert d.proc.stop() == 0
