"""Which brokers a test run covers: RabbitMQ 3.10 (the machine's, on 5672) and 4.3 (nodes in the .cache root).

``AMQP_CONSUMER_BROKERS=3.10,4.3`` asks for both explicitly: a broker that
cannot be provided is then an error, not a skip (CI sets it).  Unset, the run
covers 4.3 where it can (root, chroot, and the root built or buildable) and
otherwise says why it narrowed to 3.10.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import rabbit43
from tests.support.rabbitnode import RabbitNode

ENV = "AMQP_CONSUMER_BROKERS"
SHARED = "3.10"  # the broker on 127.0.0.1:5672
KNOWN = (SHARED, "4.3")


def broker_id(version: str) -> str:
    """How a parametrised test names its broker: ``test_x[rabbitmq-4.3]``."""
    return f"rabbitmq-{version}"


@dataclass
class BrokerPlan:
    versions: tuple[str, ...]
    required: bool  # named in AMQP_CONSUMER_BROKERS: failing to provide one is an error
    notes: list[str] = field(default_factory=list)  # why a broker was left out; said at the start and at the end

    def header(self) -> str:
        line = "brokers: " + ", ".join(f"RabbitMQ {v}" for v in self.versions)
        if self.required:
            line += f" (required by {ENV})"
        return "; ".join([line, *self.notes])


def plan(environ: Any = os.environ) -> BrokerPlan:
    raw = environ.get(ENV, "").strip()
    if raw:
        versions = tuple(dict.fromkeys(v.strip() for v in raw.split(",") if v.strip()))
        unknown = [v for v in versions if v not in KNOWN]
        if unknown or not versions:
            raise ValueError(f"{ENV}={raw!r}: expected a comma-separated list of {', '.join(KNOWN)}")
        return BrokerPlan(versions, required=True)
    why = rabbit43.why_unavailable()
    if why:
        return BrokerPlan((SHARED,), required=False, notes=[f"RabbitMQ 4.3 left out: {why} (3.10 only)"])
    return BrokerPlan(KNOWN, required=False)


def make_node(version: str, name: str, base_dir: Path, **options: Any) -> RabbitNode:
    """A private node of *version* (not started); *options* as for :class:`RabbitNode` (tls, extra_config, cookie...).

    3.10 nodes live in *base_dir*; 4.3 nodes live in the root (their folder is theirs alone all the same).
    """
    if version == SHARED:
        return RabbitNode(name, base_dir, **options)
    if version == "4.3":
        return rabbit43.Rabbit43Node(name, **options)
    raise ValueError(f"unknown broker version {version!r}")
