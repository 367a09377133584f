"""The baseline: a plain pika SelectConnection consumer, manual acks, prefetch 100.

One ack per message (basic_ack, multiple=False), callback on the I/O loop:
the usual way to write a pika consumer, and the ceiling for a pika-based
Python consumer on one core. With --batch-acks it instead acks once per I/O
loop turn with multiple=True (what amqp-consumer does), which costs the broker
less. SIGTERM/SIGINT close the connection (which returns any unacked message
to the queue) and exit 0.

  python pika_consumer.py URL QUEUE [PREFETCH] [--batch-acks]
"""

from __future__ import annotations

import json
import signal
import sys

import pika

from bench_probe import PROBE


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    batch_acks = "--batch-acks" in sys.argv[1:]
    url, queue = args[0], args[1]
    prefetch = int(args[2]) if len(args) > 2 else 100
    hit = PROBE.hit
    loads = json.loads
    last = {"tag": 0, "ch": None, "scheduled": False}

    def flush():
        last["scheduled"] = False
        ch = last["ch"]
        if ch is not None and ch.is_open:
            ch.basic_ack(last["tag"], multiple=True)

    def on_message(ch, method, _props, body):
        hit(loads(body))
        ch.basic_ack(method.delivery_tag)

    def on_message_batched(ch, method, _props, body):
        hit(loads(body))
        last["tag"] = method.delivery_tag
        last["ch"] = ch
        if not last["scheduled"]:
            last["scheduled"] = True
            conn.ioloop.call_later(0, flush)

    def on_qos(_frame, ch):
        callback = on_message_batched if batch_acks else on_message
        ch.basic_consume(queue=queue, on_message_callback=callback, auto_ack=False)

    def on_channel(ch):
        ch.basic_qos(prefetch_count=prefetch, callback=lambda f: on_qos(f, ch))

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_open_error(_conn, err):
        print(f"pika_consumer: cannot connect: {err}", file=sys.stderr, flush=True)
        _conn.ioloop.stop()

    def on_closed(conn, _reason):
        conn.ioloop.stop()

    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": "bench-pika-raw" + ("-batched" if batch_acks else "")}
    conn = pika.SelectConnection(
        params, on_open_callback=on_open, on_open_error_callback=on_open_error, on_close_callback=on_closed
    )

    def close():
        if conn.is_open:
            conn.close()
        elif not conn.is_closing:
            conn.ioloop.stop()

    def on_signal(_signum, _frame):
        conn.ioloop.add_callback_threadsafe(close)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    conn.ioloop.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
