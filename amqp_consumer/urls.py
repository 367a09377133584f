"""Broker URLs, checked completely when the config is loaded.

A URL this check accepts is one pika's URLParameters accepts too (the tests
hold both to that), so nothing about a URL can fail once the daemon runs.
Only the query options that take effect under this daemon are accepted; the
others pika knows are refused with the key that does their job here, since
silently ignoring them would mislead.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

# The URL query options the daemon passes on to the AMQP handshake.
SUPPORTED_OPTIONS = ("channel_max", "frame_max", "locale")

# pika's other URL options, and what to set instead.
_INSTEAD = {
    "heartbeat": "set amqp.heartbeat instead",
    "connection_attempts": "the daemon retries forever; set amqp.reconnect_min_delay and amqp.reconnect_max_delay instead",
    "retry_delay": "set amqp.reconnect_min_delay and amqp.reconnect_max_delay instead",
    "socket_timeout": "set amqp.connect_timeout instead",
    "stack_timeout": "set amqp.connect_timeout instead",
    "ssl_options": "use an amqps:// URL and [amqp.tls] instead",
    "client_properties": "set amqp.connection_name instead",
    "tcp_options": "the daemon sets its socket options itself",
    "blocked_connection_timeout": "a blocked connection stays open until the broker unblocks it (see amqp_consumer_blocked in /metrics)",
}

_WHOLE = re.compile(r"[0-9]+")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_RANGES = {"channel_max": (1, 65535), "frame_max": (4096, 131072)}


def check_amqp_url(url: str) -> str | None:
    """What is wrong with one broker URL, in a few words, or None."""
    if _SPACE_OR_CONTROL.search(url):
        return "a URL cannot contain spaces or control characters; percent-encode them (a space is %20)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL ({e}); percent-encode '@', ':', '/', '?', '#', '[' and ']' in the user and password"
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        return "expected an amqp:// or amqps:// URL with a host, such as amqp://host:5672/%2F"
    if port == 0:
        return "bad port 0: expected 1 to 65535"
    if parts.username is not None and parts.password is None:
        return "a user needs a password: write user:password before the '@' (percent-encode an '@' inside either)"
    if parts.path.count("/") > 1:
        return "the virtual host is one path segment; write '/' inside it as %2F (amqp://host/%2F is the default vhost)"
    if parts.fragment or url.endswith("#"):
        return "unexpected '#' in the URL; percent-encode it as %23 in a password"
    return _check_query(parts.query)


def _check_query(query: str) -> str | None:
    try:
        options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=100)
    except ValueError:
        return "expected URL options as ?name=value&name=value"
    for name, values in options.items():
        if name in _INSTEAD:
            return f"URL option {name!r} is not supported: {_INSTEAD[name]}"
        if name not in SUPPORTED_OPTIONS:
            return f"unknown URL option {name!r} (supported: {', '.join(SUPPORTED_OPTIONS)})"
        if len(values) > 1:
            return f"URL option {name!r} is given {len(values)} times"
        value = values[0]
        if not value:
            return f"URL option {name!r} has no value"
        if name in _RANGES:
            lo, hi = _RANGES[name]
            if not _WHOLE.fullmatch(value) or not lo <= int(value) <= hi:
                return f"URL option {name!r}: expected a whole number from {lo} to {hi}"
    return None
