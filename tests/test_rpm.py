"""packaging/rpm/build.sh: spec check, sdist + SRPM, layout RPM build, rpmlint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.rpm

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "packaging" / "rpm" / "build.sh"

EXPECTED = [
    "/usr/lib/python3.{minor}/site-packages/twisted/plugins/amqp_consumer_plugin.py",
    "/usr/lib/python3.{minor}/site-packages/amqp_consumer/__init__.py",
    "/usr/lib/systemd/system/amqp-consumer@.service",
    "/usr/lib/sysusers.d/amqp-consumer.conf",
    "/etc/amqp-consumer/amqp-consumer.toml",
    "/usr/share/man/man1/amqp-consumer.1.gz",
    "/usr/share/man/man5/amqp-consumer.toml.5.gz",
]


def test_build_sh_builds_and_lints_the_rpm() -> None:
    missing = [t for t in ("rpmbuild", "rpmspec", "rpm", "rpmlint") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    # The interpreter running the tests has the project's dependencies; build.sh
    # installs the "build" module into it when missing.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    result = subprocess.run(
        ["bash", str(BUILD_SH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"build.sh exited {result.returncode}:\n{output[-6000:]}"
    assert "layout build with stub macros" in output

    version = subprocess.run(
        ["rpmspec", "-q", "--srpm", "--qf", "%{version}", str(ROOT / "packaging/rpm/amqp-consumer.spec")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    rpms = sorted((ROOT / "dist").glob(f"amqp-consumer-{version}-*.noarch.rpm"))
    assert rpms, "build.sh left no binary RPM in dist/"
    assert sorted((ROOT / "dist").glob(f"amqp-consumer-{version}-*.src.rpm")), "no SRPM in dist/"
    files = set(subprocess.run(["rpm", "-qlp", str(rpms[-1])], capture_output=True, text=True, check=True).stdout.split())
    minor = sys.version_info.minor  # the layout build installs for the interpreter it ran with
    absent = [f.format(minor=minor) for f in EXPECTED if f.format(minor=minor) not in files]
    assert not absent, "missing from the RPM:\n" + "\n".join(absent)
    assert not any(f.endswith("/dropin.cache") for f in files), "python3-twisted owns dropin.cache"
