"""Callbacks for the tests of the unit under systemd (tests/systemd_container).

They are installed into the container's system Python and report by printing,
so what they saw ends up in the unit's journal, where an operator would look.
"""

from __future__ import annotations

import errno
import json
import os
import time


def write_probe(message) -> None:
    """Try to create a file in each folder of body['dirs']; print {dir: "ok" or the errno name}."""
    results = {}
    for folder in message.body["dirs"]:
        folder = folder.replace("$STATE_DIRECTORY", os.environ.get("STATE_DIRECTORY", "$STATE_DIRECTORY"))
        try:
            with open(os.path.join(folder, f"probe-{message.id}"), "w") as f:
                f.write("written by the amqp-consumer service\n")
            results[folder] = "ok"
        except OSError as e:
            results[folder] = errno.errorcode.get(e.errno or 0, str(e))
    print("write probe: " + json.dumps(results, sort_keys=True), flush=True)


async def block_reactor(message) -> None:
    """Block the reactor for good on a first delivery (async, never awaiting); ack a redelivery."""
    if message.redelivered:
        print(f"redelivered {message.id}: acked", flush=True)
        return
    print(f"blocking the reactor on {message.id} at {time.time():.3f}", flush=True)
    time.sleep(3600)


def slow(message) -> None:
    """Take body['sleep'] seconds on a worker thread."""
    print(f"started {message.id}", flush=True)
    time.sleep(float(message.body["sleep"]))
    print(f"finished {message.id}", flush=True)
