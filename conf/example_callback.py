"""The example callback of conf/amqp-consumer.toml: print each message."""


def print_message(message):
    print(str(message), flush=True)
