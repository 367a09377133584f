"""Large bodies' memory goes back to the system (amqp_consumer/memory.py).

Each check runs in a fresh process, where glibc's mmap threshold has not moved yet. The figures
(RSS under large bodies) are measured by `make soak`, not here: these tests check where glibc
puts a large block, which decides whether its memory can be given back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.broker import Broker, read_rows
from tests.support.daemonproc import ROOT, RUNNERS, DaemonProcess, daemon_config, env_for, wait_until
from tests.support.malloc import has_mallinfo2

pytestmark = pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc 2.33 or later (mallinfo2)")

PROBE = """
import sys
from tests.support.malloc import own_mapping_after_a_larger_one
if sys.argv[1] == "fix":
    from amqp_consumer.memory import return_large_blocks
    print(return_large_blocks().name)
print(own_mapping_after_a_larger_one(3 << 20), own_mapping_after_a_larger_one(140_000))
"""


def probe(fix: bool, **env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "fix" if fix else "leave"],
        cwd=ROOT, env=env_for(**env), capture_output=True, text=True, check=True,
    )
    return out.stdout.split()


def test_left_alone_glibc_serves_a_large_body_from_the_heap_after_a_larger_one() -> None:
    # What the setting is for: without it, 3 MiB comes from the heap once 8 MiB was freed.
    assert probe(fix=False) == ["False", "False"]


def test_fixed_a_large_body_gets_its_own_mapping_and_a_frame_stays_on_the_heap() -> None:
    assert probe(fix=True) == ["FIXED", "True", "False"]


def test_an_operators_malloc_setting_is_left_alone() -> None:
    assert probe(fix=True, MALLOC_MMAP_THRESHOLD_=str(16 << 20)) == ["OPERATOR", "False", "False"]


def test_no_mallopt_to_be_found_does_not_stop_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from amqp_consumer import memory

    def no_libc(name: object) -> object:
        raise OSError("no such library")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.return_large_blocks({}) is memory.LargeBlocks.NOT_GLIBC


@pytest.mark.single_broker  # the process's malloc, not broker behaviour
@pytest.mark.parametrize("runner", RUNNERS)  # twistd, and the command the systemd unit runs
def test_the_running_daemon_gives_large_blocks_their_own_mapping(
    tmp_path: Path, broker: Broker, queue: str, out_file: Path, daemons: list[DaemonProcess], runner: str
) -> None:
    broker.declare(queue)
    broker.publish_json(queue, [{"n": 1}])
    d = DaemonProcess(tmp_path / "d", daemon_config(queue, "testcb:large_block", url=broker.url),
                      env=env_for(TEST_OUT=str(out_file)), runner=runner)
    d.start()
    daemons.append(d)
    wait_until(lambda: read_rows(out_file), 30, what="the probe message")
    assert read_rows(out_file)[0]["own_mapping"] is True
    assert d.stop() == 0
