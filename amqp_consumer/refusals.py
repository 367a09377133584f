"""What to do about a declaration or consume the broker refused, in a few words for the log and /ready.

None of these refusals stops the daemon: each is retried with a growing delay,
so the operator can fix the broker side (or another client can let go of a
queue) without a restart. Only a refused login or virtual host is permanent,
and that is decided at the AMQP handshake, not here.
"""

from __future__ import annotations

_GENERIC = "check [[exchanges]], [[queues]] and [[bindings]] against what the broker has"


def hint(code: int, text: str) -> str:
    """The likely fix for a refusal with this reply code and text."""
    lowered = text.lower()
    # RabbitMQ 3.x refuses an unknown type with 503 COMMAND_INVALID (closing the
    # connection), 4.x with 406 PRECONDITION_FAILED (closing the channel); both
    # say "unknown exchange type", which must not read as "exists with other settings".
    if "unknown exchange type" in lowered or (code == 503 and "exchange type" in lowered):
        return "the broker has no such exchange type; enable the plugin that provides it or change the type in [[exchanges]]"
    if code == 403:
        if "exclusive" in lowered:
            return "another client consumes it exclusively or owns it as an exclusive queue; this clears when that client lets go"
        return "the broker user lacks a permission on this queue or exchange; grant it (rabbitmqctl set_permissions)"
    if code == 404:
        return "a queue or exchange named in the config does not exist on the broker; declare it in [[queues]] or [[exchanges]]"
    if code == 405:
        return "the queue is exclusive to another connection; this clears when that connection closes"
    if code == 406:
        return "an exchange or queue exists with other settings; make [[exchanges]]/[[queues]] match or delete it"
    return _GENERIC
