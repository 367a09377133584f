"""Prometheus metrics on a private registry, exposed from the metric definitions alone.

Every ``amqp_consumer_*`` family comes from a definition (metricdefs.py, written
by the module that owns the figure): at scrape time one status snapshot is
taken and each definition reads its value from it, so /metrics says what
/status says. The per-message counts and the callback-duration histogram are
plain numbers bumped on the reactor thread (no lock), kept here, and turned
into samples only when scraped. prometheus_client itself (about 1 MB resident
with what it imports) is loaded at the first scrape of /metrics, not at
start-up: a daemon nobody scrapes never holds it.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from amqp_consumer.metricdefs import METRICS, Catalogue, Metric

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric as Family

    from amqp_consumer.status import Snapshot


def _no_created_series() -> None:
    # No "<name>_created" series next to every counter and histogram: they double
    # the exposition and say nothing the process start time does not.
    import prometheus_client

    if hasattr(prometheus_client, "disable_created_metrics"):
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


OUTCOMES = ("received", "acked", "requeued", "rejected", "quarantined")

# --- the figures kept here -----------------------------------------------------------------

MESSAGES = METRICS.counter(
    "amqp_consumer_messages_total",
    "Deliveries by queue and outcome",
    labels=("queue", "outcome"),
    series=lambda s: [
        ((queue, outcome), float(n)) for outcome, by_queue in s.counters.messages.items() for queue, n in by_queue.items()
    ],
)
# Counted on the quarantine's behalf (Metrics.quarantine_failed): it owns the event, this module the number.
QUARANTINE_FAILURES = METRICS.counter(
    "amqp_consumer_quarantine_failures_total",
    "Messages whose quarantine copy could not be published (each then rejected or requeued)",
    labels=("queue",),
    series=lambda s: [((queue,), float(n)) for queue, n in s.counters.quarantine_failures.items()],
)
CALLBACK_DURATION = METRICS.histogram(
    "amqp_consumer_callback_duration_seconds",
    "Time the callback took per message",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def family(metric: Metric, snapshot: Snapshot) -> Family:
    """The samples of one gauge or counter definition, read from the snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    make = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
    if metric.value is not None:
        return make(metric.family, metric.doc, value=metric.value(snapshot))
    assert metric.series is not None  # metricdefs checks one reader or the other
    fam = make(metric.family, metric.doc, labels=list(metric.labels))
    for labels, value in metric.series(snapshot):
        fam.add_metric(list(labels), value)
    return fam


class _FromSnapshot:
    """Every defined gauge and counter, read from one snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot], catalogue: Catalogue) -> None:
        self._snapshot = snapshot
        self._catalogue = catalogue

    def collect(self) -> Iterator[Family]:
        snap = self._snapshot()
        for metric in self._catalogue:
            if metric.kind != "histogram":
                yield family(metric, snap)


class Durations:
    """A histogram for one writer thread: observe() is a bisect and two adds.

    prometheus_client's Histogram takes a lock and walks its buckets on every
    observation; this runs once per message on the reactor thread, so the
    counting is done here and prometheus_client only formats it at scrape time.
    Buckets follow Prometheus' convention: a value equal to a bound counts in it.
    """

    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        self.bounds = tuple(float(b) for b in metric.buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def collect(self) -> Iterable[Family]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        # /metrics is rendered on the reactor thread too, so nothing moves meanwhile.
        labels = (*map(floatToGoString, self.bounds), "+Inf")
        cumulative, running = [], 0
        for bound, n in zip(labels, self.counts):
            running += n
            cumulative.append((bound, running))
        yield HistogramMetricFamily(self.metric.name, self.metric.doc, buckets=cumulative, sum_value=self.sum)


class _Process:
    """Where prometheus_client's process metrics go in the exposition (made with the registry)."""


class Metrics:
    """The counts bumped per message, and the registry /metrics is rendered from."""

    def __init__(self, queues: Iterable[str], catalogue: Catalogue = METRICS) -> None:
        self._catalogue = catalogue
        # In the order of the exposition; the registry is made from them at the first scrape.
        self._collectors: list[Any] = []
        self._registry: CollectorRegistry | None = None
        # Only ever changed on the reactor thread.
        self.counters: dict[str, dict[str, int]] = {o: {} for o in OUTCOMES}
        self.quarantine_failures: dict[str, int] = {}
        self.ack_timeouts: dict[str, int] = {}
        self.duration = Durations(CALLBACK_DURATION)
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

    def bind_queue(self, label: str) -> None:
        for outcome in OUTCOMES:
            self.counters[outcome].setdefault(label, 0)
        self.quarantine_failures.setdefault(label, 0)
        self.ack_timeouts.setdefault(label, 0)

    def quarantine_failed(self, label: str) -> None:
        self.quarantine_failures[label] = self.quarantine_failures.get(label, 0) + 1

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Expose every defined gauge and counter, read from snapshot() when scraped."""
        collector = _FromSnapshot(snapshot, self._catalogue)
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    def value(self, outcome: str, queue: str) -> float:
        return self.counters[outcome][queue]

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
