"""What a callback can say about a message besides "done" (a plain return)."""

from __future__ import annotations


class Nack(Exception):
    """Put the message back in its queue for another try."""


class Drop(Exception):
    """Reject the message without requeueing it (dead-lettered when the queue has a DLX)."""


class HaltConsumer(Exception):
    """Stop consuming, finish in-flight work, then exit with ``exit_code``.

    With ``requeue=True`` the message that raised it goes back to the queue;
    otherwise it is acknowledged.
    """

    def __init__(self, exit_code: int = 0, requeue: bool = False, reason: str = "") -> None:
        super().__init__(reason or f"halt requested (exit code {exit_code})")
        self.exit_code = exit_code
        self.requeue = requeue
