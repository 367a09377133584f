"""The fix named for each refusal, from the reply code and text each broker version sends."""

from __future__ import annotations

import pytest

from amqp_consumer.refusals import hint

MISSING_PLUGIN = "the broker has no such exchange type; enable the plugin that provides it or change the type in [[exchanges]]"
OTHER_SETTINGS = "an exchange or queue exists with other settings; make [[exchanges]]/[[queues]] match or delete it"


@pytest.mark.parametrize(
    "code, text",
    [
        (503, "COMMAND_INVALID - unknown exchange type 'x-bogus'"),  # RabbitMQ 3.10, closing the connection
        (406, "PRECONDITION_FAILED - unknown exchange type 'x-bogus'"),  # RabbitMQ 4.3, closing the channel
    ],
)
def test_an_unknown_exchange_type_asks_for_its_plugin_on_either_broker(code: int, text: str) -> None:
    assert hint(code, text) == MISSING_PLUGIN


def test_an_exchange_redeclared_with_another_type_is_not_mistaken_for_a_missing_plugin() -> None:
    text = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'direct'"
    assert hint(406, text) == OTHER_SETTINGS
