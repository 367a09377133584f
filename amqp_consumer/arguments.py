"""Checks on the arguments tables of exchanges, queues and bindings, at config load.

AMQP 0-9-1 field tables as pika writes them carry strings, whole numbers,
booleans, date-times, arrays and tables, but no floats: a float makes pika
fail while encoding queue.declare, before anything reaches the broker, and the
declaration could never succeed. TOML's local dates and times have no AMQP
type either. The x-arguments RabbitMQ knows are also checked for the type it
insists on (it refuses, say, x-message-ttl = "1000" with 406
PRECONDITION_FAILED), and for the bounds it enforces whatever the queue type.
Values are otherwise left for the broker to judge: plugins and newer brokers
add arguments of their own.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Mapping

# name: (type, lowest value allowed or None); types are "int", "str" or "bool".
QUEUE_ARGUMENTS: dict[str, tuple[str, int | None]] = {
    "x-message-ttl": ("int", 0),
    "x-expires": ("int", 1),
    "x-max-length": ("int", 0),
    "x-max-length-bytes": ("int", 0),
    "x-max-priority": ("int", 0),
    "x-delivery-limit": ("int", None),  # -1 means no limit on quorum queues
    "x-consumer-timeout": ("int", None),
    "x-quorum-initial-group-size": ("int", 1),
    "x-initial-cluster-size": ("int", None),
    "x-queue-version": ("int", None),
    "x-stream-max-segment-size-bytes": ("int", None),
    "x-queue-type": ("str", None),
    "x-dead-letter-exchange": ("str", None),
    "x-dead-letter-routing-key": ("str", None),
    "x-dead-letter-strategy": ("str", None),
    "x-overflow": ("str", None),
    "x-queue-mode": ("str", None),
    "x-queue-leader-locator": ("str", None),
    "x-max-age": ("str", None),
    "x-single-active-consumer": ("bool", None),
}
EXCHANGE_ARGUMENTS: dict[str, tuple[str, int | None]] = {"alternate-exchange": ("str", None)}
BINDING_ARGUMENTS: dict[str, tuple[str, int | None]] = {"x-match": ("str", None)}

_HIGHEST = {"x-max-priority": 255}
_TYPE_NAMES = {"int": "a whole number", "str": "a string", "bool": "true or false"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ArgumentError(ValueError):
    """One bad value: `key` is the dotted path below the arguments table."""

    def __init__(self, key: str, problem: str, value: Any) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem
        self.value = value


def check_arguments(arguments: Mapping[str, Any], known: Mapping[str, tuple[str, int | None]]) -> None:
    """Raise ArgumentError for the first value that cannot be declared."""
    for name, value in arguments.items():
        key = subkey("", name)
        if name in known:
            _check_known(key, name, value, *known[name])
        _check_encodable(key, value)


def subkey(where: str, name: str) -> str:
    """where.name, quoting name the way TOML needs it."""
    part = name if _BARE_KEY.fullmatch(name) else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{where}.{part}" if where else part


def _check_known(key: str, name: str, value: Any, kind: str, lowest: int | None) -> None:
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            raise ArgumentError(key, f"expected a whole number (write {int(value)}, without the '.0')", value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ArgumentError(key, f"{name} must be {_TYPE_NAMES[kind]}", value)
    if kind == "int":
        highest = _HIGHEST.get(name)
        if lowest is not None and value < lowest or highest is not None and value > highest:
            bound = f"from {lowest} to {highest}" if highest is not None else f"of at least {lowest}"
            raise ArgumentError(key, f"{name} must be a whole number {bound}", value)


def _check_encodable(key: str, value: Any) -> None:
    if isinstance(value, float):
        raise ArgumentError(key, "AMQP arguments cannot carry a fractional number; use a whole number or a string", value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ArgumentError(key, "a date-time argument needs a UTC offset (for example 2024-05-01T12:00:00Z)", value)
    elif isinstance(value, (datetime.date, datetime.time)):
        raise ArgumentError(key, "AMQP arguments cannot carry a date or a time alone; write a full date-time with an offset", value)
    elif isinstance(value, Mapping):
        for name, inner in value.items():
            _check_encodable(subkey(key, name), inner)
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            _check_encodable(f"{key}[{i}]", inner)
