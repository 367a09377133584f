"""The quarantined copy's properties and the descriptions of errors, without a broker."""

from __future__ import annotations

from datetime import datetime, timezone

from amqp_consumer.connection import properties_size
from amqp_consumer.message import Message
from amqp_consumer.quarantine import copy_properties, describe

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def message(**kwargs) -> Message:
    return Message(body=b"{}", queue="orders", exchange="shop", routing_key="order.new", **kwargs)


def test_user_id_is_kept_only_when_it_is_ours():
    other = copy_properties(message(user_id="alice"), "E", "e", limit=131052, own_user="daemon", now=NOW)
    assert "user_id" not in other and other["headers"]["amqp-consumer-user-id"] == "alice"
    ours = copy_properties(message(user_id="daemon"), "E", "e", limit=131052, own_user="daemon", now=NOW)
    assert ours["user_id"] == "daemon" and "amqp-consumer-user-id" not in ours["headers"]
    external = copy_properties(message(user_id="daemon"), "E", "e", limit=131052, own_user=None, now=NOW)
    assert "user_id" not in external  # logged in by certificate: the name is not known, so not claimed


def test_a_timestamp_out_of_datetime_range_is_kept_as_sent():
    m = message(timestamp=1_700_000_000_000)  # milliseconds in a seconds field
    assert m.timestamp is None
    assert copy_properties(m, "E", "e", limit=131052, own_user=None)["timestamp"] == 1_700_000_000_000


def test_the_copy_is_cut_to_the_frame_size_biggest_headers_first():
    m = message(headers={"a": "x" * 3000, "b": "y" * 2000, "c": 1})
    copy = copy_properties(m, "ValueError", "boom " * 1000, limit=4076, own_user=None, now=NOW)
    assert properties_size(copy) <= 4076
    h = copy["headers"]
    assert "a" not in h and h["c"] == 1
    assert "'a' (" in h["amqp-consumer-dropped-headers"]
    assert h["amqp-consumer-queue"] == "orders"


def test_describing_an_error_never_fails():
    class NoStr(Exception):
        def __str__(self):
            raise RuntimeError("no")

    class Nothing(NoStr):
        def __repr__(self):
            raise RuntimeError("no")

    assert describe(ValueError("plain")) == "plain"
    assert describe(NoStr("x")) == "(NoStr.__str__ failed) NoStr('x')"
    assert describe(Nothing()) == "(Nothing.__str__ and __repr__ failed)"
