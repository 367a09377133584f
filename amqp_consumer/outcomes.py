"""What a callback can say about a message (the exceptions it raises), and what then happens to the message (the outcome values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Union


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


# --- what happens to a message ---------------------------------------------------
# The callback runner (dispatch.py) turns each run into one of these values and the
# settler (inflight.py) matches on them; nothing else decides what the broker hears.
# The argument-less ones are module-level singletons, so the hot path allocates nothing.


@dataclass(frozen=True, slots=True)
class Ack:
    """The callback returned: acknowledge (batched per reactor turn)."""

    kind: ClassVar[str] = "ack"


@dataclass(frozen=True, slots=True)
class Requeue:
    """Nack: back to its queue for another try."""

    kind: ClassVar[str] = "requeue"


@dataclass(frozen=True, slots=True)
class Reject:
    """Reject without requeue (dead-lettered when its queue has a DLX)."""

    kind: ClassVar[str] = "reject"


@dataclass(frozen=True, slots=True)
class NotRun:
    """The callback never ran (stopping, halted, or its channel closed): back to its queue, not counted."""

    kind: ClassVar[str] = "not-run"


@dataclass(frozen=True, slots=True)
class Quarantine:
    """The daemon cannot handle it: the failure policy takes over (a confirmed copy in its quarantine queue)."""

    error: BaseException
    detail: str  # the traceback, or why
    kind: ClassVar[str] = "quarantine"


@dataclass(frozen=True, slots=True)
class Halt:
    """The callback raised HaltConsumer: settle this one as asked, then stop with exit_code."""

    exit_code: int
    requeue: bool
    kind: ClassVar[str] = "halt"


# Room for what comes next. RetryAfter is an Outcome already: Settler.settle hands
# it to the failure policy, which (until a retry policy exists) quarantines it; no
# callback can produce it yet. Reply (a publish awaiting its confirm before the
# ack) is reserved: adding it means a member in Outcome and a case in
# Settler.settle, and mypy (assert_never there) points at the missing case.


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Try the message again after ``delay`` seconds: the failure policy decides how (see FailurePolicy.retry).

    A retry policy publishes it to a delay queue and acknowledges once confirmed;
    without one (today) it is quarantined, which loses nothing and cannot loop.
    """

    delay: float
    reason: str
    kind: ClassVar[str] = "retry"


@dataclass(frozen=True, slots=True)
class Reply:
    """Reserved: publish the callback's answer to reply_to, acknowledge once confirmed."""

    body: bytes
    kind: ClassVar[str] = "reply"


Outcome = Union[Ack, Requeue, Reject, NotRun, Quarantine, Halt, RetryAfter]

ACK: Final = Ack()
REQUEUE: Final = Requeue()
REJECT: Final = Reject()
NOT_RUN: Final = NotRun()
