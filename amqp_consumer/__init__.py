"""amqp-consumer: run a Python callback on every message of a RabbitMQ queue.

The public surface is deliberately small: the outcomes a callback may raise and
the message type it receives. Everything else is private to the daemon.
"""

from amqp_consumer.message import Message
from amqp_consumer.outcomes import Drop, HaltConsumer, Nack

__all__ = ["Drop", "HaltConsumer", "Message", "Nack"]
__version__ = "0.1.0"
