"""twistd plugin: ``twistd -n amqp-consumer --config=FILE``.

Lazy on purpose: amqp_consumer.tap is imported only when this plugin runs, so
``twistd --help`` stays fast and no reactor is installed before ``-r`` picks one.
"""

from twisted.application.service import ServiceMaker

amqpConsumer = ServiceMaker(
    "amqp-consumer",
    "amqp_consumer.tap",
    "Consume RabbitMQ messages and run a Python callback on each one",
    "amqp-consumer",
)
