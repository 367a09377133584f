"""Prometheus metrics on a private registry.

The per-message counts and the callback-duration histogram are plain numbers
bumped on the reactor thread (no lock) and turned into samples only when scraped.
prometheus_client itself (about 1 MB resident with what it imports) is loaded at
the first scrape of /metrics, not at start-up: a daemon nobody scrapes never holds it.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable

from amqp_consumer.state import BrokerNode

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


def _no_created_series() -> None:
    # No "<name>_created" series next to every counter and histogram: they double
    # the exposition and say nothing the process start time does not.
    import prometheus_client

    if hasattr(prometheus_client, "disable_created_metrics"):
        prometheus_client.disable_created_metrics()

OUTCOMES = ("received", "acked", "requeued", "rejected", "quarantined")
CONNECTION_STATES = ("connecting", "connected", "reconnecting", "closed")


class _Live:
    """Gauges computed at scrape time from the state, registry and dispatcher."""

    def __init__(self, read: Callable[[], dict[str, float]], connection_state: Callable[[], str]) -> None:
        self._read = read
        self._connection_state = connection_state

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        helps = {
            "amqp_consumer_inflight": "Deliveries received and not yet settled",
            "amqp_consumer_oldest_inflight_seconds": "Age of the oldest unsettled delivery",
            "amqp_consumer_connected": "1 while an AMQP connection is open",
            "amqp_consumer_ready": "1 while consuming on every configured queue",
            "amqp_consumer_standby": "1 while a single-active-consumer queue has sent this consumer nothing yet",
            "amqp_consumer_blocked": "1 while the broker blocks publishing (memory or disk alarm)",
            "amqp_consumer_reconnects_total": "Reconnections after a lost connection",
            "amqp_consumer_last_delivery_timestamp_seconds": "Unix time of the last delivery",
            "amqp_consumer_workers_busy": "Worker threads (or async callbacks) running",
            "amqp_consumer_workers_total": "Worker threads configured",
        }
        for name, value in self._read().items():
            kind = "counter" if name.endswith("_total") else "gauge"
            if kind == "counter":
                yield CounterMetricFamily(name[: -len("_total")], helps[name], value=value)
            else:
                yield GaugeMetricFamily(name, helps[name], value=value)
        current = self._connection_state()
        family = GaugeMetricFamily("amqp_consumer_connection_state", "1 for the current connection state", labels=["state"])
        for state in CONNECTION_STATES:
            family.add_metric([state], 1.0 if state == current else 0.0)
        yield family


class _Node:
    """Which node we are connected to, and what it runs: one series while connected, none otherwise."""

    def __init__(self, read: Callable[[], BrokerNode | None]) -> None:
        self._read = read

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "amqp_consumer_connected_node",
            "1 for the broker node (host:port of its URL) of the open AMQP connection",
            labels=["node", "cluster", "version"],
        )
        node = self._read()
        if node is not None:
            family.add_metric([node.node, node.cluster_name, node.version], 1.0)
        yield family


class _Counts:
    def __init__(self, counts: dict[str, dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "amqp_consumer_messages", "Deliveries by queue and outcome", labels=["queue", "outcome"]
        )
        for outcome, by_queue in self._counts.items():
            for queue, n in by_queue.items():
                family.add_metric([queue, outcome], n)
        yield family


class _PerQueue:
    """A counter by queue."""

    def __init__(self, name: str, documentation: str, counts: dict[str, int]) -> None:
        self._name = name
        self._documentation = documentation
        self._counts = counts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self._name, self._documentation, labels=["queue"])
        for queue, n in self._counts.items():
            family.add_metric([queue], n)
        yield family


class Durations:
    """A histogram for one writer thread: observe() is a bisect and two adds.

    prometheus_client's Histogram takes a lock and walks its buckets on every
    observation; this runs once per message on the reactor thread, so the
    counting is done here and prometheus_client only formats it at scrape time.
    Buckets follow Prometheus' convention: a value equal to a bound counts in it.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        # /metrics is rendered on the reactor thread too, so nothing moves meanwhile.
        labels = (*map(floatToGoString, self.bounds), "+Inf")
        cumulative, running = [], 0
        for bound, n in zip(labels, self.counts):
            running += n
            cumulative.append((bound, running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class _Process:
    """Where prometheus_client's process metrics go in the exposition (made with the registry)."""


class Metrics:
    def __init__(self, queues: Iterable[str]) -> None:
        # In the order of the exposition; the registry is made from them at the first scrape.
        self._collectors: list[Any] = []
        self._registry: CollectorRegistry | None = None
        # Only ever changed on the reactor thread.
        self.counters: dict[str, dict[str, int]] = {o: {} for o in OUTCOMES}
        self._collectors.append(_Counts(self.counters))
        self.quarantine_failures: dict[str, int] = {}
        self._collectors.append(
            _PerQueue(
                "amqp_consumer_quarantine_failures",
                "Messages whose quarantine copy could not be published (each then rejected or requeued)",
                self.quarantine_failures,
            )
        )
        self.ack_timeouts: dict[str, int] = {}
        self._collectors.append(
            _PerQueue(
                "amqp_consumer_ack_timeouts",
                "Times the broker took deliveries back because they stayed unacknowledged past its consumer timeout",
                self.ack_timeouts,
            )
        )
        self.duration = Durations(
            "amqp_consumer_callback_duration_seconds",
            "Time the callback took per message",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self._collectors.append(self.duration)
        self._collectors.append(_Process())  # process_cpu_seconds_total, memory, open fds, start time
        for q in queues:
            self.bind_queue(q)
        if "prometheus_client" in sys.modules:  # already loaded (by the callback): as when it was loaded here
            _no_created_series()

    @property
    def registry(self) -> CollectorRegistry:
        """The registry, made (and prometheus_client imported) on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            _no_created_series()
            registry = CollectorRegistry(auto_describe=False)
            for collector in self._collectors:
                if isinstance(collector, _Process):
                    ProcessCollector(registry=registry)
                else:
                    registry.register(collector)
            self._registry = registry
        return self._registry

    def _register(self, collector: Any) -> None:
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    def bind_queue(self, label: str) -> None:
        for outcome in OUTCOMES:
            self.counters[outcome].setdefault(label, 0)
        self.quarantine_failures.setdefault(label, 0)
        self.ack_timeouts.setdefault(label, 0)

    def quarantine_failed(self, label: str) -> None:
        self.quarantine_failures[label] = self.quarantine_failures.get(label, 0) + 1

    def watch(self, read: Callable[[], dict[str, float]], connection_state: Callable[[], str]) -> None:
        """Figures read at scrape time, so they can never disagree with the state they come from."""
        self._register(_Live(read, connection_state))

    def watch_node(self, read: Callable[[], BrokerNode | None]) -> None:
        """read() gives the node of the open connection, or None."""
        self._register(_Node(read))

    def value(self, outcome: str, queue: str) -> float:
        return self.counters[outcome][queue]

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
