"""Fail every test during which this process logged an unhandled error (a pytest plugin: tests/conftest.py).

Twisted reports what nobody handled by logging it, not by raising: an errback-less
Deferred that is garbage-collected with a failure ("Unhandled error in Deferred"),
an exception in a reactor callback, `log.failure(...)`, `twisted.python.log.err()`.
A test that only looks at what the daemon did would pass through all of these.

The rule: a test fails at teardown when, between its set-up and its teardown, the
global log received an event that carries a Failure (`log_failure`, as from
`Logger.failure()` and "Unhandled error in Deferred", or a legacy `log.err()`
event, `isError` with its `failure`) at level error or above. Plain error-level lines
without a Failure ("... goes to quarantine", "cannot reach ...") are the daemon
telling its operator about the world, by design: they do not fail a test (assert
them where they matter). A Failure logged deliberately below error level (a
warning with a traceback) does not fail it either.

A test that provokes such an error on purpose declares it with the
``expect_errors`` fixture: ``expect_errors("NoTransition")`` lets any logged
Failure whose description (the event's text, then ``module.Type: value`` of the
exception) matches that regular expression pass, however many times it happens
(none is fine too: races decide whether some errors happen at all). To assert that
one did happen, ``logged_errors.flush(pattern)`` returns and forgets the ones seen
so far.

Only this process's log is seen: daemons run as subprocesses log to their own output.
"""

from __future__ import annotations

import gc
import re
from typing import Any, Callable, Iterator

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.reflect import qual


def failure_of(event: dict[str, Any]) -> Failure | None:
    """The Failure an event reports as an error, or None for anything else."""
    failure = event.get("log_failure")
    if failure is None and event.get("isError"):
        failure = event.get("failure")
        level = LogLevel.critical
    else:
        level = event.get("log_level", LogLevel.info)
    if not isinstance(failure, Failure) or level < LogLevel.error:
        return None
    return failure


def describe(event: dict[str, Any], failure: Failure) -> str:
    """What a pattern is matched against: the event's text, then the exception's type and value."""
    try:
        value = str(failure.value)
    except Exception:
        value = "(unprintable)"
    return f"{formatEvent(event)}\n{qual(failure.type)}: {value}"


class LoggedErrors:
    """A global log observer that keeps the events carrying unhandled Failures."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Failure]] = []
        self.expected: list[re.Pattern[str]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        failure = failure_of(event)
        if failure is not None:
            self.seen.append((describe(event, failure), failure))

    def expect(self, pattern: str) -> None:
        self.expected.append(re.compile(pattern))

    def flush(self, pattern: str) -> list[str]:
        """The descriptions of the errors seen so far that match pattern, forgotten from now on."""
        rx = re.compile(pattern)
        matched = [text for text, _ in self.seen if rx.search(text)]
        self.seen = [(text, f) for text, f in self.seen if not rx.search(text)]
        return matched

    def unexpected(self) -> list[tuple[str, Failure]]:
        return [(text, f) for text, f in self.seen if not any(rx.search(text) for rx in self.expected)]


@pytest.fixture(autouse=True)
def logged_errors() -> Iterator[LoggedErrors]:
    """Every test: fail at teardown if an unhandled Failure was logged (see this module's docstring)."""
    errors = LoggedErrors()
    globalLogPublisher.addObserver(errors)
    try:
        yield errors
        gc.collect()  # a dropped Deferred with a failure logs it when it is collected
    finally:
        globalLogPublisher.removeObserver(errors)
    unexpected = errors.unexpected()
    if unexpected:
        report = "\n\n".join(f"{text}\n{f.getTraceback().rstrip()}" for text, f in unexpected)
        pytest.fail(
            f"{len(unexpected)} unhandled error(s) logged during the test (declare deliberate ones with "
            f"expect_errors(pattern)):\n\n{report}",
            pytrace=False,
        )


@pytest.fixture
def expect_errors(logged_errors: LoggedErrors) -> Callable[[str], None]:
    """expect_errors(pattern): logged Failures matching this regular expression do not fail the test."""
    return logged_errors.expect
