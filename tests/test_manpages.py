"""The man pages: the section-5 page documents exactly the keys of the schema,
its complete example uses every key, and both pages pass mandoc's and groff's
checks (when those tools are installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from amqp_consumer.config import schema_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAN = Path(__file__).resolve().parent.parent / "man"
PAGES = [MAN / "amqp-consumer.1", MAN / "amqp-consumer.toml.5"]
CONFIG_PAGE = MAN / "amqp-consumer.toml.5"

# ".SS [amqp.tls]" or ".SS [[queues]]", optionally quoted.
_TABLE_HEADING = re.compile(r'^\.SS\s+"?\[\[?([a-z_][a-z0-9_.]*)\]\]?"?\s*$')
# The tag line of a key paragraph: ".B prefetch" and nothing else.
_KEY_TAG = re.compile(r"^\.B\s+([a-z_][a-z0-9_]*)\s*$")


def documented_keys(text: str) -> dict[str, int]:
    """Dotted keys of the page, each with the line it is documented on.

    A key is a ``.TP`` paragraph whose tag line is ``.B name``, under a
    ``.SS [table]`` or ``.SS [[array]]`` heading; any other ``.SH``/``.SS``
    heading ends the table.
    """
    keys: dict[str, int] = {}
    table: str | None = None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if line.startswith((".SH", ".SS")):
            m = _TABLE_HEADING.match(line)
            table = m.group(1) if m else None
            continue
        if table is None or line.strip() != ".TP" or number >= len(lines):
            continue
        m = _KEY_TAG.match(lines[number])  # the line after .TP
        if m:
            key = f"{table}.{m.group(1)}"
            if key in keys:
                raise AssertionError(f"{CONFIG_PAGE.name}:{number + 1}: {key} is documented twice")
            keys[key] = number + 1
    return keys


def _diff_message(documented: set[str], schema: set[str]) -> str:
    lines = []
    missing = sorted(schema - documented)
    extra = sorted(documented - schema)
    if missing:
        lines.append("in amqp_consumer/config.py but not documented in man/amqp-consumer.toml.5:")
        lines += [f"  + {k}" for k in missing]
        lines.append('  (add a ".TP" paragraph with ".B <key>" under the ".SS [table]" heading)')
    if extra:
        lines.append("documented in man/amqp-consumer.toml.5 but not in the schema (renamed or removed?):")
        lines += [f"  - {k}" for k in extra]
    return "\n".join(lines)


def test_config_page_documents_every_schema_key() -> None:
    documented = set(documented_keys(CONFIG_PAGE.read_text(encoding="utf-8")))
    schema = schema_keys()
    assert documented == schema, "\n" + _diff_message(documented, schema)


def test_key_extraction_sees_tables_and_arrays_of_tables() -> None:
    sample = "\n".join([
        ".SH TABLES",
        ".SS [consumer]",
        ".TP",
        ".B prefetch",
        "text",
        ".SS [[queues]]",
        ".TP",
        ".B name",
        ".SH EXAMPLES",
        ".TP",
        ".B ignored",
    ])
    assert set(documented_keys(sample)) == {"consumer.prefetch", "queues.name"}


def _unroff(line: str) -> str:
    for escape, char in (("\\-", "-"), ("\\(dq", '"'), ("\\(aq", "'"), ("\\e", "\\"), ("\\&", "")):
        line = line.replace(escape, char)
    return line


def _example_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith(".EX"):
            current = []
        elif line.startswith(".EE"):
            blocks.append("\n".join(current or []))
            current = None
        elif current is not None:
            current.append(_unroff(line))
    return blocks


def _keys_used(value: Any, prefix: str, leaves: set[str], out: set[str]) -> None:
    """Dotted keys of a parsed TOML document; schema keys holding a table are leaves."""
    for name, item in value.items():
        key = f"{prefix}.{name}" if prefix else name
        if key in leaves:
            out.add(key)
        elif isinstance(item, dict):
            _keys_used(item, key, leaves, out)
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            for element in item:
                _keys_used(element, key, leaves, out)
        else:
            out.add(key)


def test_complete_example_is_valid_toml_and_uses_every_key() -> None:
    blocks = [b for b in _example_blocks(CONFIG_PAGE.read_text(encoding="utf-8")) if "[amqp]" in b]
    assert blocks, "no example containing [amqp] found in man/amqp-consumer.toml.5"
    example = blocks[-1]
    try:
        document = tomllib.loads(example)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"the complete example of amqp-consumer.toml(5) is not valid TOML: {e}\n{example}")
    schema = schema_keys()
    used: set[str] = set()
    _keys_used(document, "", schema, used)
    assert used == schema, "complete example vs schema:\n" + _diff_message(used, schema)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_mandoc_lint_is_clean(page: Path) -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    result = _run(["mandoc", "-Tlint", "-W", "warning", str(page)])
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"mandoc -Tlint -W warning {page.name}:\n{output}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_groff_is_clean(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = _run(["groff", "-ww", "-b", "-z", "-man", str(page)])
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"groff -ww -b -z -man {page.name}:\n{output}"
