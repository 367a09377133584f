"""The cluster test's callback: one line per message, "n time redelivered", written before the ack.

Each line goes to the kernel in one write before the callback returns, so a
SIGKILLed daemon leaves every line of a message it may have acked.
"""

from __future__ import annotations

import os
import time
from typing import Any


class Sequence:
    def __init__(self, config: Any) -> None:
        self.sleep = float(config.get("sleep", 0))
        self.out = open(os.environ["TEST_OUT"], "a", buffering=1)  # noqa: SIM115 - for the daemon's life

    def __call__(self, message: Any) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        self.out.write(f"{message.body['n']} {time.time():.6f} {int(message.redelivered)}\n")
