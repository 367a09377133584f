"""The suite's own guard (tests/support/logged_errors.py): a test that logs an unhandled error fails.

Each case is a small test file run by a pytest of its own with only that plugin,
so what is checked is the verdict a developer would see.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = '''
import gc
import pytest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

log = Logger()


def test_log_failure():
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("the sum went wrong")


def test_unhandled_error_in_a_dropped_deferred():
    defer.fail(KeyError("nobody listens"))


def test_legacy_log_err():
    legacy_log.err(Failure(ValueError("old style")), "Unhandled Error")


def test_plain_error_line_is_by_design():
    log.error("message {message_id} goes to quarantine", message_id="m-1")


def test_failure_below_error_level_is_deliberate():
    log.failure("retrying", Failure(OSError("flaky")), level=__import__("twisted.logger").logger.LogLevel.warn)


def test_declared_error_passes(expect_errors):
    expect_errors("NoTransition|ValueError: old style")
    legacy_log.err(Failure(ValueError("old style")), "Unhandled Error")


def test_declared_error_may_not_happen(expect_errors):
    expect_errors("NoTransition")


def test_undeclared_error_beside_a_declared_one_fails(expect_errors):
    expect_errors("old style")
    legacy_log.err(Failure(ValueError("old style")), "Unhandled Error")
    defer.fail(KeyError("this one is not declared"))


def test_flush_returns_what_happened(logged_errors):
    legacy_log.err(Failure(ValueError("old style")), "Unhandled Error")
    assert len(logged_errors.flush("ValueError")) == 1
'''


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("guard")
    (folder / "test_cases.py").write_text(textwrap.dedent(CASES))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.support.logged_errors", "-p", "no:randomly", "-p", "no:cacheprovider",
         "-rA", "-q", "--rootdir", str(folder), "-c", "/dev/null", str(folder / "test_cases.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    verdicts = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("PASSED", "ERROR", "FAILED") and "::" in parts[1]:
            name = parts[1].split("::")[1]
            if verdicts.get(name) != "ERROR":  # a teardown error follows the call's PASSED
                verdicts[name] = parts[0]
    assert verdicts, r.stdout + r.stderr
    verdicts["output"] = r.stdout
    return verdicts


@pytest.mark.parametrize("case", ["test_log_failure", "test_unhandled_error_in_a_dropped_deferred", "test_legacy_log_err",
                                  "test_undeclared_error_beside_a_declared_one_fails"])
def test_an_unhandled_error_fails_the_test(outcomes: dict[str, str], case: str) -> None:
    assert outcomes[case] == "ERROR", outcomes["output"]


@pytest.mark.parametrize("case", ["test_plain_error_line_is_by_design", "test_failure_below_error_level_is_deliberate",
                                  "test_declared_error_passes", "test_declared_error_may_not_happen",
                                  "test_flush_returns_what_happened"])
def test_by_design_and_declared_errors_pass(outcomes: dict[str, str], case: str) -> None:
    assert outcomes[case] == "PASSED", outcomes["output"]


def test_the_report_names_the_error_and_how_to_declare_it(outcomes: dict[str, str]) -> None:
    out = outcomes["output"]
    assert "KeyError: 'this one is not declared'" in out and "expect_errors(pattern)" in out
    assert "ZeroDivisionError" in out and "the sum went wrong" in out
