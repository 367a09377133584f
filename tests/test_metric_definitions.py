"""Metric definitions: each metric defined once, by its owner; /metrics built from the definitions alone.

A scrape of an assembled daemon shows every defined metric and nothing
undefined; a second definition of a name, or a wrong one, fails when the
defining module is imported, not when Prometheus scrapes.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from amqp_consumer.config import AMQPConfig, Config, ConsumerConfig, HealthConfig, QueueConfig
from amqp_consumer.metricdefs import METRICS, Catalogue, MetricDefinitionError
from amqp_consumer.state import BrokerNode
from tests.support.daemonproc import ROOT
from tests.support.inprocess import in_process


def scrape() -> str:
    config = Config(
        amqp=AMQPConfig(urls=("amqp://guest:guest@127.0.0.1:1/%2F",)),
        queues=(QueueConfig(name="q1"), QueueConfig(name="q2", arguments={"x-single-active-consumer": True})),
        consumer=ConsumerConfig(callback="opscb:ack"),
        health=HealthConfig(listen=""),
    )
    daemon = in_process(MemoryReactorClock(), config, lambda m: None, on_exit=lambda code: None)
    # Connected, so that the node's series is there too (it has none while disconnected).
    daemon.state.set_connection("connected", node=BrokerNode("127.0.0.1:1", "RabbitMQ", "4.3.6", "c"))
    return daemon.exposition().decode()


def families(text: str) -> dict[str, str]:
    """{family name: type} from the exposition's # TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def exposed_name(family: str, kind: str) -> str:
    """The name a user greps for: prometheus_client versions differ on a counter's # TYPE line."""
    return f"{family}_total" if kind == "counter" and not family.endswith("_total") else family


def test_every_defined_metric_is_in_a_scrape_and_nothing_else_is() -> None:
    text = scrape()
    ours = {exposed_name(f, k): k for f, k in families(text).items() if f.startswith("amqp_consumer_")}
    defined = {m.name: m.kind for m in METRICS}
    assert ours == defined
    assert len(defined) == 16  # the figures the README lists under /metrics
    for m in METRICS:
        series = re.findall(rf"^{m.family}(?:_total|_bucket|_count|_sum)?(?:{{[^}}]*}})? \S+$", text, re.M)
        assert series, f"{m.name} has a family but no sample"
    assert "process_cpu_seconds_total" in text  # prometheus_client's own, besides ours


def test_each_metric_is_defined_in_the_module_that_owns_its_figure() -> None:
    owners = {m.name: m.owner for m in METRICS}
    assert owners["amqp_consumer_inflight"] == "amqp_consumer.inflight"
    assert owners["amqp_consumer_workers_busy"] == "amqp_consumer.dispatch"
    assert owners["amqp_consumer_ack_timeouts_total"] == "amqp_consumer.brokerlimits"
    assert owners["amqp_consumer_connected"] == "amqp_consumer.state"
    assert owners["amqp_consumer_ready"] == "amqp_consumer.status"
    assert owners["amqp_consumer_messages_total"] == "amqp_consumer.metrics"
    assert not any(owner in ("amqp_consumer.consumer", "amqp_consumer.health") for owner in owners.values())


def test_the_readme_and_the_man_page_name_only_defined_metrics() -> None:
    defined = set(METRICS.names())
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("- `GET /metrics`") : readme.index("- `GET /status`")]
    listed = set(re.findall(r"amqp_consumer_[a-z_]+", section))
    assert listed == defined
    for path in (ROOT / "man").iterdir():
        assert set(re.findall(r"amqp_consumer_[a-z_]+", path.read_text().replace("\\", ""))) <= defined, path


def test_a_second_definition_of_a_name_fails_at_definition() -> None:
    before = METRICS.names()
    with pytest.raises(MetricDefinitionError, match=r"amqp_consumer_inflight is already defined \(in amqp_consumer.inflight\)"):
        METRICS.gauge("amqp_consumer_inflight", "again", value=lambda s: 0.0)
    assert METRICS.names() == before


def test_a_module_redefining_a_metric_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stray_owner.py").write_text(
        "from amqp_consumer.metricdefs import METRICS\n"
        "TWICE = METRICS.gauge('amqp_consumer_ready', 'a copy kept by hand', value=lambda s: 1.0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MetricDefinitionError, match="amqp_consumer_ready is already defined"):
        importlib.import_module("stray_owner")
    sys.modules.pop("stray_owner", None)


@pytest.mark.parametrize(
    "define, why",
    [
        (lambda c: c.gauge("inflight", "no namespace", value=lambda s: 0.0), "names start with amqp_consumer_"),
        (lambda c: c.gauge("amqp_consumer_Inflight", "capital", value=lambda s: 0.0), "names start with"),
        (lambda c: c.gauge("amqp_consumer_xy", " ", value=lambda s: 0.0), "no help text"),
        (lambda c: c.counter("amqp_consumer_things", "a count", value=lambda s: 0.0), "ends in _total"),
        (lambda c: c.gauge("amqp_consumer_xy_count", "reserved", value=lambda s: 0.0), "Prometheus adds those"),
        (lambda c: c.gauge("amqp_consumer_xy", "labelled", labels=("queue",), value=lambda s: 0.0), "series="),
        (lambda c: c.gauge("amqp_consumer_xy", "unlabelled", series=lambda s: []), "value="),
        (lambda c: c.gauge("amqp_consumer_xy", "two", labels=("q", "q"), series=lambda s: []), "named twice"),
        (lambda c: c.gauge("amqp_consumer_xy", "le", labels=("le",), series=lambda s: []), "bad label name"),
        (lambda c: c.histogram("amqp_consumer_xy_seconds", "no buckets", buckets=()), "has buckets"),
    ],
)
def test_a_wrong_definition_fails_at_definition(define, why: str) -> None:
    catalogue = Catalogue()
    with pytest.raises(MetricDefinitionError, match=re.escape(why)):
        define(catalogue)
    assert catalogue.names() == ()


def test_the_exposition_reads_the_catalogue_only() -> None:
    """A metric exists for /metrics by being defined, and in no other way."""
    from amqp_consumer.metrics import Metrics
    from amqp_consumer.state import State
    from amqp_consumer.status import Status

    catalogue = Catalogue()
    only = catalogue.gauge("amqp_consumer_only", "the one defined here", value=lambda s: 7.0)
    metrics = Metrics(["q"], catalogue=catalogue)
    metrics.watch(Status(State(lambda: 0.0, ("q",))).snapshot)
    ours = {f for f in families(metrics.exposition().decode()) if f.startswith("amqp_consumer_")}
    assert ours == {only.name, "amqp_consumer_callback_duration_seconds"}  # the histogram counts itself
    assert only in catalogue and only not in METRICS
