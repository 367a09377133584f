"""pika's private names that amqp_consumer/connection.py relies on are still there, in the same shape.

connection.py lists them in PIKA_PRIVATE with the pika version they were checked
against; a pika upgrade that renames or reshapes one fails here, not in production.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pika
import pika.channel
import pika.connection
import pytest
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from twisted.internet.task import Clock

from amqp_consumer.connection import PIKA_CHECKED, PIKA_PRIVATE

_ENTRY = re.compile(r"^(\w+)(?:\((.*)\))?$")


def _instances() -> dict[str, Any]:
    """One unconnected instance of each pika class named in PIKA_PRIVATE (instance attributes are set in __init__)."""
    proto = TwistedProtocolConnection(pika.ConnectionParameters(), custom_reactor=Clock())
    channel = pika.channel.Channel(proto._impl, 1, lambda _ch: None)
    return {
        "TwistedProtocolConnection": proto,
        "Connection": proto._impl,
        "Channel": channel,
        "TwistedChannel": TwistedChannel(channel),
    }


def test_the_checked_version_is_the_installed_one_or_the_list_was_rechecked() -> None:
    # Bump PIKA_CHECKED only after going through PIKA_PRIVATE against the new pika's source.
    assert pika.__version__ == PIKA_CHECKED, (
        f"pika {pika.__version__} is installed; connection.PIKA_PRIVATE was checked against {PIKA_CHECKED}"
    )


@pytest.mark.parametrize(("owner", "entry", "why"), PIKA_PRIVATE, ids=[f"{o}.{e}" for o, e, _ in PIKA_PRIVATE])
def test_private_name_exists_with_its_shape(owner: str, entry: str, why: str) -> None:
    match = _ENTRY.match(entry)
    assert match, f"malformed PIKA_PRIVATE entry {entry!r}"
    name, params = match.group(1), match.group(2)
    instance = _instances()[owner]
    assert hasattr(instance, name), f"pika {pika.__version__}: {owner}.{name} is gone ({why})"
    value = getattr(instance, name)
    if params is None:
        assert not inspect.ismethod(value), f"{owner}.{name} is now a method ({why})"
        return
    assert inspect.ismethod(value), f"{owner}.{name} is no longer a method ({why})"
    expected = [p.strip() for p in params.split(",") if p.strip()]
    assert list(inspect.signature(value).parameters) == expected, f"{owner}.{name} changed its parameters ({why})"


def test_instance_attributes_hold_what_connection_py_expects() -> None:
    objects = _instances()
    impl, channel, tc = objects["Connection"], objects["Channel"], objects["TwistedChannel"]
    assert impl._frame_buffer == b""
    assert impl._channels == {} and impl._error is None
    assert channel._consumers == {} and channel._closing_reason is None
    assert tc._channel is channel and tc._consumers == {}
    # The protocol's ready Deferred exists before connecting: the handshake waits on it.
    assert objects["TwistedProtocolConnection"].ready is not None


def test_every_private_name_connection_py_uses_is_listed() -> None:
    # Attributes with a leading underscore read or set on pika objects in connection.py.
    import amqp_consumer.connection as module

    source = inspect.getsource(module)
    listed = {entry.split("(")[0] for _, entry, _ in PIKA_PRIVATE}
    pika_objects = r"(?:impl|self\._impl|proto\._impl|self\._proto\._impl|channel|self\._ch|self\._tc|tc)"
    used = set(re.findall(pika_objects + r"\.(_[a-z]\w*)", source))
    ours = {"_impl", "_ch", "_tc", "_proto", "_numbers", "_watch", "_cancel_handlers", "_on_message", "_close_listeners"}
    assert used - ours <= listed, f"not in PIKA_PRIVATE: {sorted(used - ours - listed)}"
