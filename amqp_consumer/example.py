"""The callback of the example configuration: print each message.

It ships inside the package, so the example configuration works wherever the
package is installed (a checkout, a virtualenv, the RPM's system Python)
without putting anything on PYTHONPATH.
"""

from __future__ import annotations

from amqp_consumer.message import Message


def print_message(message: Message) -> None:
    print(str(message), flush=True)
