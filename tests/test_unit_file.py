"""conf/amqp-consumer@.service: the settings the daemon relies on, and a clean
``systemd-analyze verify`` (when systemd-analyze is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from amqp_consumer import exitcodes
from amqp_consumer.config import ConsumerConfig

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "conf" / "amqp-consumer@.service"
MAN = ROOT / "man"


def _directives(text: str) -> dict[str, list[str]]:
    """Key -> values of the [Service]/[Unit]/[Install] lines (no continuation lines in our unit)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def _seconds(value: str) -> float:
    """systemd time spans as used here: "60", "60s", "1min 30s"."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_settings_match_the_daemon() -> None:
    d = _directives(UNIT.read_text(encoding="utf-8"))
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == ["/usr/bin/amqp-consumer --config=/etc/amqp-consumer/%i.toml"]
    assert set(d["RestartPreventExitStatus"][0].split()) == {str(exitcodes.NOPERM), str(exitcodes.CONFIG)}
    assert d["Restart"] == ["on-failure"]
    assert d["User"] == ["amqp-consumer"] and d["Group"] == ["amqp-consumer"]
    assert d["StateDirectory"] == ["amqp-consumer"]
    assert d["StateDirectoryMode"] == ["0700"]
    # SIGKILL must not land in the middle of the drain.
    drain = ConsumerConfig().drain_timeout
    assert _seconds(d["TimeoutStopSec"][0]) > drain, (
        f"TimeoutStopSec={d['TimeoutStopSec'][0]} must exceed the default consumer.drain_timeout ({drain:g} s)"
    )
    assert _seconds(d["WatchdogSec"][0]) > 0
    families = set(d["RestrictAddressFamilies"][0].split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists; /usr/bin/amqp-consumer is
    # not installed here, so the copies run /bin/true with the same arguments.
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/usr/bin/amqp-consumer " in text
    text = text.replace("ExecStart=/usr/bin/amqp-consumer ", "ExecStart=/bin/true ")
    template = tmp_path / "amqp-consumer@.service"
    instance = tmp_path / "amqp-consumer@verify.service"
    template.write_text(text, encoding="utf-8")
    instance.write_text(text, encoding="utf-8")
    # Documentation=man:... is checked with man(1): point it at our pages.
    manpath = tmp_path / "man"
    for page in MAN.glob("*.[15]"):
        section = manpath / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    env = dict(os.environ, MANPATH=str(manpath), SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    argv = ["systemd-analyze", "verify"]
    if shutil.which("man") is None:
        argv.append("--man=no")
    result = subprocess.run(
        [*argv, str(template), str(instance)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    output = (result.stdout + result.stderr).splitlines()
    # Containers and build hosts print noise about other units (missing
    # targets, unreadable system units); only lines about our unit count.
    ours = [line for line in output if "amqp-consumer" in line]
    assert not ours, "systemd-analyze verify complained about the unit:\n" + "\n".join(ours)
    bad_words = re.compile(r"unknown (key|section|lvalue)|failed to parse|invalid|not executable", re.I)
    suspicious = [line for line in output if bad_words.search(line) and str(tmp_path) in line]
    assert not suspicious, "\n".join(suspicious)
