"""Install what an RPM contains into a booted Debian container, doing what rpm and Fedora would.

The container has no rpm database, so the steps of an RPM transaction are done
one by one, each standing in for a Fedora part:

1. the payload is unpacked with ``rpm2cpio | cpio -idm`` (rpm's unpacking);
2. the %pre scriptlet runs, then ``systemd-sysusers`` on the package's
   sysusers.d files (what Fedora's %sysusers_create_compat in %pre does; the
   layout build's %pre is a stub);
3. every file gets the owner, group and mode the RPM header lists (cpio leaves
   them root's);
4. the Python requirements of the package's metadata (Requires-Dist, which
   Fedora's dependency generator turns into Requires) are installed from PyPI
   into the system Python with the pip wheel Debian ships, and /usr/bin/twistd
   links to the twistd pip wrote to /usr/local/bin (python3-twisted's file on
   Fedora); a .pth file puts Fedora's site-packages folder, where the RPM
   installs, on the path of Debian's python3, which does not look there;
5. ``systemctl daemon-reload`` (systemd's file trigger on Fedora), then the
   %post scriptlet.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.nspawn import Container

PTH_NAME = "fedora-site-packages.pth"


@dataclass(frozen=True)
class PayloadFile:
    path: str
    user: str
    group: str
    mode: int

    @property
    def is_link(self) -> bool:
        return (self.mode & 0o170000) == 0o120000


def _query(rpm: Path, fmt: str) -> str:
    return subprocess.run(["rpm", "-qp", "--qf", fmt, str(rpm)], capture_output=True, text=True, check=True).stdout


def payload_files(rpm: Path) -> list[PayloadFile]:
    out = _query(rpm, "[%{FILENAMES}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t%{FILEMODES}\n]")
    files = []
    for line in out.splitlines():
        path, user, group, mode = line.split("\t")
        files.append(PayloadFile(path, user, group, int(mode)))
    return files


def scriptlet(rpm: Path, tag: str) -> str:
    """The body of %pre (PREIN) or %post (POSTIN); '' when there is none."""
    body = _query(rpm, f"%{{{tag}}}")
    return "" if body == "(none)" else body


def _requirements(container: Container, files: list[PayloadFile]) -> list[str]:
    (metadata,) = [f.path for f in files if re.search(r"\.dist-info/METADATA$", f.path)]
    text = container.path(metadata).read_text(encoding="utf-8")
    # Requirements for extras ("; extra == 'test'") are skipped by pip itself.
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _ca_bundle() -> Path | None:
    """The host's CA bundle, for pip inside (a host behind a TLS-inspecting proxy trusts its CA there)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def install_requirements(container: Container, files: list[PayloadFile]) -> None:
    site_dirs = sorted({m.group(0) for f in files if (m := re.match(r"/usr/lib/python3\.\d+/site-packages", f.path))})
    pth = container.path(f"/usr/lib/python3/dist-packages/{PTH_NAME}")
    pth.write_text("".join(f"{d}\n" for d in site_dirs))
    wheels = sorted(container.path("/usr/share/python-wheels").glob("pip-*.whl"))
    if not wheels:
        raise RuntimeError("the image has no pip wheel in /usr/share/python-wheels (package python3-pip-whl)")
    pip = ["python3", f"/usr/share/python-wheels/{wheels[-1].name}/pip", "install", "--quiet",
           "--break-system-packages", "--no-warn-script-location", "--disable-pip-version-check", "--no-cache-dir"]
    bundle = _ca_bundle()
    if bundle is not None:
        shutil.copy(bundle, container.path("/var/tmp/host-ca-bundle.pem"))
        pip += ["--cert", "/var/tmp/host-ca-bundle.pem"]
    try:
        container.run(*pip, *_requirements(container, files), timeout=900)
    finally:
        container.path("/var/tmp/host-ca-bundle.pem").unlink(missing_ok=True)
    twistd = container.path("/usr/bin/twistd")
    if not os.path.lexists(twistd):
        twistd.symlink_to("/usr/local/bin/twistd")


def _apply_ownership(container: Container, files: list[PayloadFile]) -> None:
    by_owner: dict[str, list[str]] = {}
    by_mode: dict[str, list[str]] = {}
    for f in files:
        by_owner.setdefault(f"{f.user}:{f.group}", []).append(f.path)
        if not f.is_link:
            by_mode.setdefault(f"{f.mode & 0o7777:04o}", []).append(f.path)
    for owner, paths in by_owner.items():
        container.run("chown", "-h", owner, *paths)
    for mode, paths in by_mode.items():
        container.run("chmod", mode, *paths)


def install(container: Container, rpm: Path) -> list[PayloadFile]:
    """Install rpm's payload into the running container; returns its file list."""
    files = payload_files(rpm)
    with subprocess.Popen(["rpm2cpio", str(rpm)], stdout=subprocess.PIPE) as unpack:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=unpack.stdout, cwd=container.root, check=True)
    if unpack.returncode != 0:
        raise RuntimeError(f"rpm2cpio {rpm} exited {unpack.returncode}")
    pre = scriptlet(rpm, "PREIN")
    if pre:
        container.run("sh", "-c", pre, "pre", "1")
    sysusers = [f.path for f in files if f.path.startswith("/usr/lib/sysusers.d/")]
    if sysusers:
        container.run("systemd-sysusers", *sysusers)
    _apply_ownership(container, files)
    install_requirements(container, files)
    container.run("systemctl", "daemon-reload")
    post = scriptlet(rpm, "POSTIN")
    if post:
        container.run("sh", "-c", post, "post", "1")
    return files
