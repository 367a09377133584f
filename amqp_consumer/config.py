"""Load the TOML file into frozen dataclasses, or fail with one line that says why.

The dataclasses below are the schema: every key, its type, default and check is
declared once, here, and ``schema_keys()`` exposes them so the section-5 man page
can be checked against the code.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from amqp_consumer.arguments import BINDING_ARGUMENTS, EXCHANGE_ARGUMENTS, QUEUE_ARGUMENTS, ArgumentError, check_arguments
from amqp_consumer.redact import redact
from amqp_consumer.urls import check_amqp_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Section = TypeVar("_Section", bound="DataclassInstance")


class ConfigError(Exception):
    """A configuration problem, worded for the operator as a single line (passwords hidden)."""

    def __init__(self, where: str, problem: str) -> None:
        where, problem = redact(where), redact(problem)
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


Check = Callable[[Any], "str | None"]


def _key(doc: str, *, check: Check | None = None, each: Check | None = None, **kwargs: Any) -> Any:
    """A schema key; `check` judges the whole value, `each` every item of an array."""
    return field(metadata={"doc": doc, "check": check, "each": each}, **kwargs)


def _range(lo: float, hi: float, what: str = "a number") -> Check:
    def check(value: Any) -> str | None:
        if not lo <= value <= hi:
            return f"expected {what} from {lo:g} to {hi:g}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        if value not in choices:
            return "expected one of " + ", ".join(repr(c) for c in choices)
        return None

    return check


def _callback_ref(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        return "expected 'module:object', for example 'mypkg.handlers:on_message'"
    return None


def _amqp_urls(value: tuple[str, ...]) -> str | None:
    return None if value else "expected at least one URL"


# Built into every RabbitMQ; plugins add types named x-...
BUILTIN_EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")


def _exchange_type(value: str) -> str | None:
    if value in BUILTIN_EXCHANGE_TYPES or (value.startswith("x-") and len(value) > 2):
        return None
    return "expected direct, fanout, topic, headers, or a plugin's type named x-... (such as x-consistent-hash)"


def _arguments(known: Mapping[str, tuple[str, int | None]]) -> Check:
    def check(value: Mapping[str, Any]) -> str | None:
        try:
            check_arguments(value, known)
        except ArgumentError as e:
            raise ConfigError(e.key, f"{e.problem}, got {_describe(e.value)}") from None
        return None

    return check


def _endpoint(value: str) -> str | None:
    if not value:
        return None
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(object(), value)
    except (ValueError, TypeError, KeyError) as e:
        return f"expected a Twisted endpoint string like 'tcp:9100:interface=127.0.0.1' ({e})"
    return None


_LEVELS = ("debug", "info", "warn", "error", "critical")


@dataclass(frozen=True)
class TLSConfig:
    ca_cert: str = _key("PEM file of the CA that signed the broker's certificate; empty = system trust store", default="")
    cert: str = _key("PEM client certificate presented to the broker; empty = none", default="")
    key: str = _key("PEM private key of cert; required with cert", default="")


@dataclass(frozen=True)
class AMQPConfig:
    urls: tuple[str, ...] = _key(
        "broker URLs, tried in order, the next one on failure",
        default=("amqp://guest:guest@127.0.0.1:5672/%2F",),
        check=_amqp_urls,
        each=check_amqp_url,
    )
    shuffle: bool = _key(
        "try the urls in a random order, drawn once at start, so that daemons sharing a config spread over a cluster's nodes",
        default=False,
    )
    heartbeat: int = _key("AMQP heartbeat in seconds; 0 turns it off", default=15, check=_range(0, 3600, "whole seconds"))
    connection_name: str = _key("connection name shown by the broker; empty = amqp-consumer@HOST", default="")
    connect_timeout: float = _key("seconds allowed for TCP, TLS and AMQP handshakes", default=10.0, check=_range(0.1, 600, "seconds"))
    reconnect_min_delay: float = _key("first reconnect delay in seconds", default=1.0, check=_range(0.01, 3600, "seconds"))
    reconnect_max_delay: float = _key("longest reconnect delay in seconds", default=60.0, check=_range(0.01, 3600, "seconds"))
    auth_mechanism: str = _key(
        "PLAIN (user and password from the URL) or EXTERNAL (the TLS client certificate)",
        default="PLAIN",
        check=_one_of("PLAIN", "EXTERNAL"),
    )
    tls: TLSConfig = _key("TLS settings for amqps:// URLs", default_factory=TLSConfig)


@dataclass(frozen=True)
class ExchangeConfig:
    name: str = _key("exchange name", check=lambda v: None if v else "expected a non-empty name")
    type: str = _key("direct, fanout, topic, headers, or a plugin type (x-...)", default="direct", check=_exchange_type)
    durable: bool = _key("survives a broker restart", default=True)
    auto_delete: bool = _key("deleted when its last binding goes", default=False)
    arguments: Mapping[str, Any] = _key(
        "x-arguments passed to exchange.declare", default_factory=dict, check=_arguments(EXCHANGE_ARGUMENTS)
    )


@dataclass(frozen=True)
class QueueConfig:
    name: str = _key("queue name; empty = a server-named queue (at most one)", default="")
    durable: bool = _key("survives a broker restart", default=True)
    auto_delete: bool = _key("deleted when its last consumer goes", default=False)
    exclusive: bool = _key("private to this connection, deleted with it", default=False)
    arguments: Mapping[str, Any] = _key(
        "x-arguments such as x-queue-type or x-dead-letter-exchange",
        default_factory=dict,
        check=_arguments(QUEUE_ARGUMENTS),
    )


@dataclass(frozen=True)
class BindingConfig:
    queue: str = _key("a queue from [[queues]]; empty = the server-named queue")
    exchange: str = _key("exchange to bind to", check=lambda v: None if v else "expected a non-empty exchange name")
    routing_keys: tuple[str, ...] = _key("one binding per routing key", default=("",))
    arguments: Mapping[str, Any] = _key(
        "binding arguments (headers exchanges)", default_factory=dict, check=_arguments(BINDING_ARGUMENTS)
    )


@dataclass(frozen=True)
class ConsumerConfig:
    callback: str = _key("the callback as 'module:object'", default="", check=_callback_ref)
    queues: tuple[str, ...] = _key("queues to consume; empty = every declared queue", default=())
    prefetch: int = _key("unacknowledged deliveries the broker may send ahead", default=100, check=_range(1, 65535, "a whole number"))
    workers: int = _key("sync callbacks running at once; 1 keeps delivery order", default=1, check=_range(1, 256, "a whole number"))
    drain_timeout: float = _key("seconds in-flight callbacks get to finish on shutdown", default=30.0, check=_range(0, 86400, "seconds"))
    ack_timeout: float = _key(
        "the broker's consumer ack timeout in seconds; 0 = the queue's x-consumer-timeout argument if declared, else 1800",
        default=0.0,
        check=_range(0, 604800, "seconds"),
    )
    config: Mapping[str, Any] = _key("free table handed to the callback", default_factory=dict)


@dataclass(frozen=True)
class HealthConfig:
    listen: str = _key("Twisted endpoint for /live /ready /metrics /status; empty = off", default="tcp:9100:interface=127.0.0.1", check=_endpoint)


@dataclass(frozen=True)
class ManholeConfig:
    listen: str = _key("Twisted endpoint for the SSH manhole; empty = off", default="", check=_endpoint)
    authorized_keys: str = _key("OpenSSH authorized_keys file of the keys allowed in", default="")
    host_key: str = _key("SSH host key file, generated (ed25519, 0600) when missing; empty = $STATE_DIRECTORY/manhole_host_key or ./manhole_host_key", default="")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _key("lowest level logged", default="info", check=_one_of(*_LEVELS))
    format: str = _key("text or json (one object per line)", default="text", check=_one_of("text", "json"))
    pika_level: str = _key("lowest level of pika's own log lines", default="warn", check=_one_of(*_LEVELS))


@dataclass(frozen=True)
class Config:
    amqp: AMQPConfig = _key("connection", default_factory=AMQPConfig)
    exchanges: tuple[ExchangeConfig, ...] = _key("exchanges declared on every connection", default=())
    queues: tuple[QueueConfig, ...] = _key("queues declared on every connection", default=())
    bindings: tuple[BindingConfig, ...] = _key("bindings declared on every connection", default=())
    consumer: ConsumerConfig = _key("what to consume and how", default_factory=ConsumerConfig)
    health: HealthConfig = _key("HTTP health and metrics", default_factory=HealthConfig)
    manhole: ManholeConfig = _key("SSH manhole", default_factory=ManholeConfig)
    logging: LoggingConfig = _key("log output", default_factory=LoggingConfig)
    path: str = field(default="", metadata={"internal": True})

    @property
    def consumed_queues(self) -> tuple[str, ...]:
        """Configured names; "" stands for the server-named queue."""
        return self.consumer.queues or tuple(q.name for q in self.queues)


# --- generic loading -------------------------------------------------------

_FREE = object()


def _describe(value: Any) -> str:
    """A value echoed in an error: short, and never with a password in it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(redact(value, whole=True)) if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a table, got {_describe(value)}")
        return _build(tp, value, where)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, list):
            kind = "an array of tables ([[...]])" if dataclasses.is_dataclass(inner) else "an array"
            raise ConfigError(where, f"expected {kind}, got {_describe(value)}")
        return tuple(_convert(inner, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is collections.abc.Mapping or tp is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a table, got {_describe(value)}")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected a whole number, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"schema type {tp!r} not handled")  # pragma: no cover


def _build(cls: type[_Section], table: dict[str, Any], where: str) -> _Section:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for name in table:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(_join(where, name), f"unknown key (known keys here: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "missing required key")
            continue
        value = _convert(hints[name], table[name], key)
        each = f.metadata.get("each")
        for i, item in enumerate(value if each else ()):
            _apply(each, item, f"{key}[{i}]")
        _apply(f.metadata.get("check"), value, key, table[name])
        values[name] = value
    return cls(**values)


def _apply(check: Check | None, value: Any, key: str, raw: Any = None) -> None:
    """Run one check; its problem becomes a ConfigError that echoes the value it judged."""
    if check is None:
        return
    try:
        problem = check(value)
    except ConfigError as e:  # a check that names a key below this one
        raise ConfigError(_join(key, e.where), e.problem) from None
    if problem:
        raise ConfigError(key, f"{problem}, got {_describe(value if raw is None else raw)}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# --- public API --------------------------------------------------------------


def load(path: str | os.PathLike[str], callback_override: str | None = None) -> Config:
    """Read, parse and validate; every failure is a ConfigError naming the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), "no such file; pass --config=FILE with an existing TOML file") from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(p), "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"invalid TOML: {e}") from None
    if callback_override is not None:
        problem = _callback_ref(callback_override)
        if problem or not callback_override:
            raise ConfigError("--callback", problem or "expected 'module:object'")
        table.setdefault("consumer", {})
        if isinstance(table["consumer"], dict):
            table["consumer"]["callback"] = callback_override
    try:
        config = _build(Config, table, "")
        _check_whole(config, p)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e.where}", e.problem) from None
    return dataclasses.replace(config, path=str(p))


def _check_whole(config: Config, base: Path) -> None:
    """Rules that span keys; each names the key to fix."""
    if not config.consumer.callback:
        raise ConfigError("consumer.callback", "missing required key (or pass --callback=module:object)")
    names = [q.name for q in config.queues]
    if names.count("") > 1:
        raise ConfigError("queues", "at most one server-named queue (name = \"\") is supported")
    dupes = {n for n in names if n and names.count(n) > 1}
    if dupes:
        raise ConfigError("queues", f"queue {sorted(dupes)[0]!r} is declared twice")
    for i, b in enumerate(config.bindings):
        if b.queue not in names:
            what = "the server-named queue" if b.queue == "" else f"queue {b.queue!r}"
            raise ConfigError(f"bindings[{i}].queue", f"{what} is not declared; add it to [[queues]]")
        if not b.routing_keys:
            raise ConfigError(f"bindings[{i}].routing_keys", "expected at least one routing key (use [\"\"] for none)")
    if not config.consumed_queues:
        raise ConfigError("consumer.queues", "nothing to consume; declare a [[queues]] entry or list queues here")
    for i, q in enumerate(config.consumer.queues):
        if q == "" and "" not in names:
            raise ConfigError(f"consumer.queues[{i}]", "\"\" means the server-named queue, and none is declared")
    if config.amqp.reconnect_max_delay < config.amqp.reconnect_min_delay:
        raise ConfigError("amqp.reconnect_max_delay", "must not be below amqp.reconnect_min_delay")
    tls = config.amqp.tls
    if tls.cert and not tls.key:
        raise ConfigError("amqp.tls.key", "required when amqp.tls.cert is set")
    if tls.key and not tls.cert:
        raise ConfigError("amqp.tls.cert", "required when amqp.tls.key is set")
    for name in ("ca_cert", "cert", "key"):
        value = getattr(tls, name)
        if value and not os.access(value, os.R_OK):
            raise ConfigError(f"amqp.tls.{name}", f"cannot read {value!r}")
    if config.amqp.auth_mechanism == "EXTERNAL" and not tls.cert:
        raise ConfigError("amqp.auth_mechanism", "EXTERNAL needs a client certificate in amqp.tls.cert")
    m = config.manhole
    if m.listen and not m.authorized_keys:
        raise ConfigError("manhole.authorized_keys", "required when manhole.listen is set (logins are by key only)")
    if m.listen and not os.access(m.authorized_keys, os.R_OK):
        raise ConfigError("manhole.authorized_keys", f"cannot read {m.authorized_keys!r}")


def schema_keys() -> set[str]:
    """Every documented key as a dotted path; arrays of tables appear without an index."""
    keys: set[str] = set()

    def walk(cls: type[DataclassInstance], prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            key = _join(prefix, f.name)
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, key)
            elif isinstance(inner, type) and dataclasses.is_dataclass(inner):
                walk(inner, key)
            else:
                keys.add(key)

    walk(Config, "")
    return keys


# The names other modules use for redact(): one rule for URLs, free text and values.
redact_url = redact
redact_text = redact

# Keys under [consumer.config] whose values are hidden whatever they hold.
SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "apikey", "api_key", "private")


def redacted(config: Config) -> dict[str, Any]:
    """The config as plain data with secrets hidden (the manhole's `config`).

    Every string goes through redact() (the password of any URL in it), and
    under consumer.config a key naming a password, secret, token or credential
    shows '***' whatever its value.
    """
    data: dict[str, Any] = _plain(config)
    data["consumer"]["config"] = _hide_secret_keys(data["consumer"]["config"])
    return data


def _hide_secret_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) else _hide_secret_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_hide_secret_keys(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return redact(value, whole=True)
    return value
