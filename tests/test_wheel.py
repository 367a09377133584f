"""The wheel works on its own: installed into a fresh virtualenv (dependencies
from PyPI or pip's cache), twistd finds the plugin, and twistd and the amqp-consumer command
both pass --check on the example configuration, importing nothing from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result


def test_wheel_installs_and_both_runners_run_the_check(tmp_path: Path) -> None:
    # Nothing from the checkout or the test run may leak into the fresh venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], env=env, timeout=300)
    (wheel,) = wheels.glob("amqp_consumer-*.whl")

    # The venv gets no pip of its own (ensurepip costs 7 s here): this pip installs into it.
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], env=env, timeout=120)
    _run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "-q", str(wheel)], env=env, timeout=600)

    run = tmp_path / "run"
    run.mkdir()
    # The example's callback ships in the package: nothing goes on PYTHONPATH.
    shutil.copy(ROOT / "conf" / "amqp-consumer.toml", run / "amqp-consumer.toml")
    env_run = env

    where = _run(
        [str(fresh / "bin" / "python"), "-c",
         "import amqp_consumer, twisted.plugins.amqp_consumer_plugin as p; print(amqp_consumer.__file__); print(p.__file__)"],
        cwd=run, env=env_run, timeout=60,
    ).stdout.split()
    assert all(path.startswith(str(fresh)) for path in where), f"imported from outside the fresh venv: {where}"

    help_text = _run([str(fresh / "bin" / "twistd"), "--help"], cwd=run, env=env_run, timeout=60).stdout
    assert "amqp-consumer" in help_text, "twistd --help does not list the amqp-consumer plugin"

    check = _run(
        [str(fresh / "bin" / "twistd"), "-n", "amqp-consumer", "--check", "--config=amqp-consumer.toml"],
        cwd=run, env=env_run, timeout=60,
    )
    lines = check.stdout.strip().splitlines()
    assert len(lines) == 1 and "OK" in lines[0], f"expected a one-line verdict, got:\n{check.stdout}{check.stderr}"

    # The amqp-consumer command (what the systemd unit runs) comes with the wheel.
    command = _run([str(fresh / "bin" / "amqp-consumer"), "--check", "--config=amqp-consumer.toml"], cwd=run, env=env_run, timeout=60)
    assert command.stdout == check.stdout, f"the command's verdict differs:\n{command.stdout}{command.stderr}"
