"""Every kind of bad config: exit status 78 and one line naming the file, the key and what is expected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from amqp_consumer.config import ConfigError, load, redact_url
from tests.support.daemonproc import DaemonProcess, env_for, run_check

GOOD = """
[[queues]]
name = "q1"

[consumer]
callback = "testcb:record"
"""

CASES = [
    # (id, config text (None: no file), expected fragments of the one line)
    ("bad-toml", "[consumer\ncallback = 1", ["invalid TOML"]),
    ("unknown-key", GOOD + "prefech = 10\n", ["consumer.prefech", "unknown key", "prefetch"]),
    ("unknown-table", GOOD + "[helth]\nlisten = ''\n", ["helth", "unknown key"]),
    ("wrong-type", GOOD.replace('callback = "testcb:record"', 'callback = "testcb:record"\nprefetch = "lots"'),
     ["consumer.prefetch", "expected a whole number", "'lots'"]),
    ("out-of-range", GOOD + "workers = 0\n", ["consumer.workers", "from 1 to 256", "got 0"]),
    ("bool-for-int", GOOD + "prefetch = true\n", ["consumer.prefetch", "expected a whole number"]),
    ("missing-required", "[[queues]]\nname='q'\n[[bindings]]\nqueue = 'q'\n", ["bindings[0].exchange", "missing required key"]),
    ("missing-callback", "[[queues]]\nname='q'\n", ["consumer.callback", "missing required key"]),
    ("callback-syntax", GOOD.replace("testcb:record", "testcb.record"), ["consumer.callback", "module:object"]),
    ("callback-module-missing", GOOD.replace("testcb:record", "no_such_module:fn"),
     ["consumer.callback", "cannot import module 'no_such_module'", "PYTHONPATH"]),
    ("callback-import-raises", GOOD.replace("testcb:record", "badimport:fn"), ["consumer.callback", "ImportError", "always fails"]),
    ("callback-attr-missing", GOOD.replace("testcb:record", "testcb:nope"), ["consumer.callback", "no attribute 'nope'"]),
    ("binding-undeclared-queue", GOOD + "[[bindings]]\nqueue = 'other'\nexchange = 'amq.topic'\n",
     ["bindings[0].queue", "queue 'other' is not declared", "[[queues]]"]),
    ("bad-url-hides-password", GOOD + "[amqp]\nurls = ['http://bob:s3cret@127.0.0.1/']\n",
     ["amqp.urls", "amqp://", "bob:***@"]),
    ("nothing-to-consume", "[consumer]\ncallback = 'testcb:record'\n", ["consumer.queues", "nothing to consume"]),
    ("bad-endpoint", GOOD + "[health]\nlisten = 'tcp:notaport'\n", ["health.listen", "endpoint"]),
    ("tls-key-without-cert", GOOD + "[amqp.tls]\nkey = '/etc/hostname'\n", ["amqp.tls.cert", "required"]),
    # URLs: every one is parsed at load, whatever is wrong with it, and its password never shows.
    ("urls-a-string-hides-password", GOOD + "[amqp]\nurls = 'amqp://admin:s3cret@127.0.0.1'\n",
     ["amqp.urls", "expected an array", "'amqp://admin:***@127.0.0.1'"]),
    ("url-bad-ipv6", GOOD + "[amqp]\nurls = ['amqp://u:s3cret@[::1']\n", ["amqp.urls[0]", "not a valid URL", "u:***@[::1"]),
    ("url-option-bad-value", GOOD + "[amqp]\nurls = ['amqp://u:s3cret@127.0.0.1/?frame_max=abc']\n",
     ["amqp.urls[0]", "'frame_max'", "from 4096 to 131072"]),
    ("url-option-unknown", GOOD + "[amqp]\nurls = ['amqp://u:s3cret@127.0.0.1/?foo=bar']\n",
     ["amqp.urls[0]", "unknown URL option 'foo'", "channel_max, frame_max, locale"]),
    ("url-option-set-elsewhere", GOOD + "[amqp]\nurls = ['amqp://u:s3cret@127.0.0.1/?ssl_options=x']\n",
     ["amqp.urls[0]", "'ssl_options' is not supported", "[amqp.tls]"]),
    ("url-user-without-password", GOOD + "[amqp]\nurls = ['amqp://bob@127.0.0.1/']\n", ["amqp.urls[0]", "needs a password"]),
    ("url-vhost-with-slash", GOOD + "[amqp]\nurls = ['amqp://127.0.0.1/a/b']\n", ["amqp.urls[0]", "%2F"]),
    ("url-with-spaces", GOOD + "[amqp]\nurls = ['amqp://u:s3 cret@127.0.0.1/']\n", ["amqp.urls[0]", "spaces", "'amqp://u:***@127.0.0.1/'"]),
    ("url-scheme-less-hides-password", GOOD + "[amqp]\nurls = ['bob:s3cret@127.0.0.1']\n", ["amqp.urls[0]", "amqp://", "'bob:***@127.0.0.1'"]),
    # Topology the broker could never accept.
    ("exchange-type-unknown", GOOD + "[[exchanges]]\nname = 'x'\ntype = 'bogus'\n",
     ["exchanges[0].type", "direct, fanout, topic, headers", "x-...", "got 'bogus'"]),
    ("argument-float", GOOD.replace('name = "q1"', 'name = "q1"\narguments = { "x-message-ttl" = 60000.0 }'),
     ["queues[0].arguments.x-message-ttl", "write 60000, without the '.0'", "got 60000.0"]),
    ("argument-fraction", GOOD.replace('name = "q1"', 'name = "q1"\narguments = { "x-my-weight" = [1, 0.5] }'),
     ["queues[0].arguments.x-my-weight[1]", "fractional", "got 0.5"]),
    ("argument-wrong-type", GOOD.replace('name = "q1"', 'name = "q1"\narguments = { "x-max-length" = "10" }'),
     ["queues[0].arguments.x-max-length", "must be a whole number", "got '10'"]),
    ("argument-out-of-range", GOOD.replace('name = "q1"', 'name = "q1"\narguments = { "x-max-priority" = 300 }'),
     ["queues[0].arguments.x-max-priority", "from 0 to 255", "got 300"]),
    ("argument-date-alone", GOOD + "[[bindings]]\nqueue = 'q1'\nexchange = 'amq.headers'\narguments = { since = 2024-05-01 }\n",
     ["bindings[0].arguments.since", "date or a time alone", "datetime.date(2024, 5, 1)"]),
]


@pytest.mark.parametrize("case_id,text,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_78_with_one_line(tmp_path: Path, case_id: str, text: str, fragments: list[str]) -> None:
    result = run_check(text, tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 78, result.stderr + result.stdout
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("amqp-consumer: config error: ")
    assert str(tmp_path / "daemon.toml") in line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert line.count(" got ") <= 1, line
    assert "Traceback" not in result.stderr + result.stdout
    assert "s3cret" not in result.stderr + result.stdout and "s3 cret" not in result.stderr + result.stdout


def test_missing_file_exits_78(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, GOOD)
    d.config_path.unlink()
    import subprocess

    result = subprocess.run(d.command(), cwd=tmp_path, env=env_for(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"amqp-consumer: config error: {d.config_path}: no such file; pass --config=FILE with an existing TOML file"
    ]


def test_check_passes_a_good_config_and_the_example(tmp_path: Path) -> None:
    result = run_check(GOOD, tmp_path, ["--check"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK (callback testcb:record; queues: q1)")
    root = Path(__file__).resolve().parents[1]
    import subprocess

    example = subprocess.run(
        DaemonProcess(tmp_path / "x", "").command()[:-1] + [f"--config={root / 'conf/amqp-consumer.toml'}", "--check"],
        env=env_for([root / "conf"]), capture_output=True, text=True, timeout=60,
    )
    assert example.returncode == 0, example.stderr
    assert "OK" in example.stdout


def test_check_refuses_a_url_the_daemon_could_not_use(tmp_path: Path) -> None:
    """--check parses URLs as completely as a start does (it used to pass ?heartbeat=abc)."""
    result = run_check(GOOD + "[amqp]\nurls = ['amqp://u:s3cret@127.0.0.1/?heartbeat=abc']\n", tmp_path, ["--check"])
    assert result.returncode == 78, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"amqp-consumer: config error: {tmp_path / 'daemon.toml'}: amqp.urls[0]: URL option 'heartbeat' is not supported: "
        "set amqp.heartbeat instead, got 'amqp://u:***@127.0.0.1/?heartbeat=abc'"
    ]


URLS_PIKA_REFUSES = [
    "amqp://u:p@[::1",
    "amqp://u:p@h/?heartbeat=abc",
    "amqp://u:p@h/?foo=bar",
    "amqp://u:p@h/?ssl_options=x",
    "amqp://bob@h/",
    "amqp://h:99999/",
    "amqp://h:port/",
    "amqpx://h/",
    "amqp://h/?channel_max=0",
    "amqp://h/?channel_max=65536",
    "amqp://h/?frame_max=4095",
    "amqp://h/?frame_max=131073",
    "amqp://h/?channel_max=1&channel_max=2",
    "amqp://h/?heartbeat=-1",
    "amqp://h/?client_properties=x",
]
URLS_PIKA_TAKES = [
    "amqp://guest:guest@127.0.0.1:5672/%2F",
    "amqps://u:p%40ss@broker.example:5671/orders",
    "amqp://[::1]:5672/",
    "AMQP://h",
    "amqp://u:p@h/?channel_max=64&frame_max=131072&locale=en_US",
]


@pytest.mark.parametrize("url", URLS_PIKA_REFUSES + URLS_PIKA_TAKES)
def test_a_url_the_check_accepts_is_one_pika_accepts(url: str) -> None:
    """Nothing about a URL can fail after load: the check is at least as strict as pika's parser."""
    import pika

    from amqp_consumer.urls import check_amqp_url

    problem = check_amqp_url(url)
    try:
        pika.URLParameters(url)
        pika_error = None
    except Exception as e:  # pika raises ValueError, or TypeError for a user without a password
        pika_error = e
    if problem is None:
        assert pika_error is None, f"{url!r} passes the check but pika refuses it: {pika_error!r}"
    assert (problem is None) == (url in URLS_PIKA_TAKES), (url, problem)


def test_callback_option_overrides_the_file(tmp_path: Path) -> None:
    result = run_check(GOOD, tmp_path, ["--check", "--callback=testcb:slow"])
    assert result.returncode == 0
    assert "callback testcb:slow" in result.stdout
    bad = run_check(GOOD, tmp_path, ["--check", "--callback=testcb:missing"])
    assert bad.returncode == 78
    assert "no attribute 'missing'" in bad.stderr


def test_load_gives_frozen_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    c = load(p)
    assert (c.consumer.prefetch, c.consumer.workers, c.consumer.drain_timeout) == (100, 1, 30.0)
    assert c.amqp.heartbeat == 15 and c.health.listen == "tcp:9100:interface=127.0.0.1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.consumer.prefetch = 5  # type: ignore[misc]


def test_server_named_queue_rules(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[[queues]]\nname=''\n[[queues]]\nname=''\n[consumer]\ncallback='m:f'\n")
    with pytest.raises(ConfigError, match="at most one server-named queue"):
        load(p)


def test_redact_url() -> None:
    assert redact_url("amqps://u:p%40ss@host:5671/vh") == "amqps://u:***@host:5671/vh"
    assert redact_url("amqp://host/") == "amqp://host/"


@pytest.mark.parametrize(
    "text, shown",
    [
        ("postgresql://app:SECRET@db/app", "postgresql://app:***@db/app"),
        ("amqp://u:SECRET@[::1", "amqp://u:***@[::1"),
        ("amqp://u:SEC/RET@h/%2F", "amqp://u:***@h/%2F"),
        ("app:SECRET@db", "app:***@db"),
        ("to amqp://a:SECRET@h and redis://:SECRET@r:6379/0", "to amqp://a:***@h and redis://:***@r:6379/0"),
        ("failed: 'amqp://u:SECRET@h', 'amqp://v:SECRET@i'", "failed: 'amqp://u:***@h', 'amqp://v:***@i'"),
        ("such as amqp://h:5672/%2F, got 'app:***@db'", "such as amqp://h:5672/%2F, got 'app:***@db'"),
    ],
)
def test_redaction_hides_the_password_of_any_url_even_a_broken_one(text: str, shown: str) -> None:
    from amqp_consumer.redact import redact

    assert redact(text) == shown


def test_redaction_of_one_value_hides_a_password_with_a_space() -> None:
    from amqp_consumer.redact import redact

    assert redact("amqp://u:SEC RET@h", whole=True) == "amqp://u:***@h"


def test_example_config_shows_every_key() -> None:
    """conf/amqp-consumer.toml is the operator's starting point: every schema key appears in it."""
    import tomllib

    from amqp_consumer.config import schema_keys

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "conf" / "amqp-consumer.toml").read_text())
    present: set[str] = set()

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict) and prefix.rsplit(".", 1)[-1] in ("arguments", "config"):
            present.add(prefix)  # a free table: its own keys are not the schema's
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                walk(v, prefix)
        else:
            present.add(prefix)

    walk(data, "")
    assert schema_keys() - present == set()
    assert present - schema_keys() == set()
