"""Metric definitions: each metric is written down once, by the module that owns its figure.

A definition is the metric's name as Prometheus shows it, its help text, its
labels and how its value is read at scrape time (from the status snapshot, see
status.py). /metrics is built from the definitions alone (metrics.py), so a
figure cannot be exposed without its help text, and a definition cannot be
forgotten by the exposition. A name defined twice, a name outside the
``amqp_consumer_`` namespace or a counter not ending in ``_total`` fails when
the defining module is imported, not when Prometheus scrapes.

This module imports nothing heavy: an owner defines its metrics at import time
without pulling in prometheus_client.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal

if TYPE_CHECKING:
    from amqp_consumer.status import Snapshot

Kind = Literal["gauge", "counter", "histogram"]
# Labelled samples: (label values, in the order of the definition's labels, value).
Series = Iterable[tuple[tuple[str, ...], float]]

_NAME = re.compile(r"amqp_consumer_[a-z][a-z0-9_]*[a-z0-9]")
_LABEL = re.compile(r"[a-z][a-z0-9_]*")
# Series names a counter or histogram adds to its family's name (a gauge may end in _total:
# amqp_consumer_workers_total does, from before there was this check).
_RESERVED_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


@dataclass(frozen=True, eq=False)
class Metric:
    """One metric. Made by ``Catalogue.gauge/counter/histogram``, which check it and register it.

    ``value`` reads an unlabelled figure from a snapshot, ``series`` a labelled
    one; a histogram has neither (its counts live in metrics.Durations).
    """

    name: str
    doc: str
    kind: Kind
    labels: tuple[str, ...] = ()
    value: Callable[[Snapshot], float] | None = None
    series: Callable[[Snapshot], Series] | None = None
    buckets: tuple[float, ...] = ()
    owner: str = ""  # the defining module, named in the error for a second definition

    @property
    def family(self) -> str:
        """The family name prometheus_client takes: a counter's without its ``_total``."""
        return self.name[: -len("_total")] if self.kind == "counter" else self.name


class MetricDefinitionError(ValueError):
    """A metric defined twice or defined wrongly: raised while its module is imported."""


class Catalogue:
    """The defined metrics, in the order they were defined."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def gauge(
        self,
        name: str,
        doc: str,
        *,
        value: Callable[[Snapshot], float] | None = None,
        labels: tuple[str, ...] = (),
        series: Callable[[Snapshot], Series] | None = None,
    ) -> Metric:
        return self._define(Metric(name, doc, "gauge", labels, value, series, owner=_caller()))

    def counter(
        self,
        name: str,
        doc: str,
        *,
        value: Callable[[Snapshot], float] | None = None,
        labels: tuple[str, ...] = (),
        series: Callable[[Snapshot], Series] | None = None,
    ) -> Metric:
        return self._define(Metric(name, doc, "counter", labels, value, series, owner=_caller()))

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Metric:
        return self._define(Metric(name, doc, "histogram", buckets=tuple(sorted(buckets)), owner=_caller()))

    def _define(self, metric: Metric) -> Metric:
        _check(metric)
        known = self._by_name.get(metric.name)
        if known is not None:
            raise MetricDefinitionError(f"metric {metric.name} is already defined (in {known.owner})")
        self._by_name[metric.name] = metric
        return metric

    def __iter__(self) -> Iterator[Metric]:
        return iter(tuple(self._by_name.values()))

    def __contains__(self, metric: object) -> bool:
        return isinstance(metric, Metric) and self._by_name.get(metric.name) is metric

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)


def _check(m: Metric) -> None:
    def wrong(why: str) -> MetricDefinitionError:
        return MetricDefinitionError(f"metric {m.name!r}: {why}")

    if not _NAME.fullmatch(m.name):
        raise wrong("names start with amqp_consumer_ and hold only a-z, 0-9 and _")
    if not m.doc.strip():
        raise wrong("no help text")
    if m.kind == "counter" and not m.name.endswith("_total"):
        raise wrong("a counter's name ends in _total")
    if m.name.endswith(_RESERVED_SUFFIXES):
        raise wrong(f"no name ends in {', '.join(_RESERVED_SUFFIXES)}: Prometheus adds those")
    if m.kind == "histogram" and m.name.endswith("_total"):
        raise wrong("a histogram's name does not end in _total")
    for label in m.labels:
        if not _LABEL.fullmatch(label) or label == "le":
            raise wrong(f"bad label name {label!r}")
    if len(set(m.labels)) != len(m.labels):
        raise wrong("a label is named twice")
    if m.kind == "histogram":
        if not m.buckets or m.value is not None or m.series is not None:
            raise wrong("a histogram has buckets and no reader (metrics.Durations counts it)")
    elif m.labels and (m.series is None or m.value is not None):
        raise wrong("a labelled metric is read with series=")
    elif not m.labels and (m.value is None or m.series is not None):
        raise wrong("an unlabelled metric is read with value=")


def _caller() -> str:
    return str(sys._getframe(2).f_globals.get("__name__", "?"))


# The daemon's metrics. Owners define theirs here: connection figures in state.py,
# readiness in status.py, in-flight figures in inflight.py, workers in dispatch.py,
# ack timeouts in brokerlimits.py, per-message counts and durations in metrics.py.
METRICS = Catalogue()
