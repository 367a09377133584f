"""Logs (stdout, one line per event, text or JSON, pika included, quiet per message) and exit statuses.

Exit statuses (see amqp_consumer/exitcodes.py): 0 clean stop, HaltConsumer's
code, 70 the consumer failed unrecoverably, 77 the broker refused our
credentials or virtual host at login, 78 bad configuration.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.logger import Logger, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from amqp_consumer import exitcodes, logs
from tests.support.broker import Broker
from tests.support.daemonproc import RUNNERS, TWISTD, DaemonProcess, daemon_config, run_check
from tests.support.ops import HEALTH_ANYWHERE, health_port, http_json, poll

PASSWORD = "wrong-pw-31337"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


# --- the observer -----------------------------------------------------------------------------


def observer(**settings: Any) -> tuple[Any, io.StringIO]:
    stream = io.StringIO()
    settings.setdefault("timestamps", False)
    return logs.make_observer(logs.LogSettings(**settings), stream), stream


@pytest.fixture
def stdlib_logging() -> Iterator[None]:
    """make_observer() wires stdlib logging (pika) into Twisted's; undo it after the test."""
    root = logging.getLogger()
    pika = logging.getLogger("pika")
    saved = (list(root.handlers), root.level, pika.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    pika.setLevel(saved[2])


def test_text_lines_have_level_logger_and_message(stdlib_logging) -> None:
    obs, out = observer()
    log = Logger(namespace="amqp_consumer.consumer", observer=obs)
    log.info("consuming from {queue!r}", queue="q")
    log.warn("the broker closed our channel")
    log.debug("not shown at info")
    assert out.getvalue().splitlines() == [
        "INFO amqp_consumer.consumer: consuming from 'q'",
        "WARNING amqp_consumer.consumer: the broker closed our channel",
    ]


def test_text_lines_carry_the_message_id(stdlib_logging) -> None:
    obs, out = observer()
    log = Logger(namespace="amqp_consumer.consumer", observer=obs)
    log.error("message {message_id} goes to quarantine", message_id="m-1")
    log.error("something about a message", message_id="m-2")
    assert out.getvalue().splitlines() == [
        "ERROR amqp_consumer.consumer: message m-1 goes to quarantine",
        "ERROR amqp_consumer.consumer: something about a message (message id m-2)",
    ]


def test_json_is_one_object_per_line(stdlib_logging) -> None:
    obs, out = observer(format="json")
    log = Logger(namespace="amqp_consumer.consumer", observer=obs)
    log.error("message {message_id} goes to quarantine:\n{detail}", message_id="m-1", detail="Traceback ...")
    log.info("connected")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "ERROR" and first["logger"] == "amqp_consumer.consumer"
    assert first["message_id"] == "m-1" and first["message"].startswith("message m-1 goes to quarantine:\nTraceback")
    assert re.match(r"\d{4}-\d\d-\d\dT", first["time"])
    assert second == {**second, "level": "INFO", "message": "connected"} and "message_id" not in second


def test_level_setting_filters(stdlib_logging) -> None:
    obs, out = observer(level="warn")
    log = Logger(namespace="x", observer=obs)
    log.info("quiet")
    log.warn("loud")
    assert out.getvalue() == "WARNING x: loud\n"


def test_urls_are_redacted_in_any_line(stdlib_logging) -> None:
    obs, out = observer()
    Logger(namespace="x", observer=obs).warn("cannot reach {url}", url=f"amqp://user:{PASSWORD}@h:5672/%2F")
    assert PASSWORD not in out.getvalue() and "amqp://user:***@h:5672/%2F" in out.getvalue()


@pytest.mark.parametrize(
    "pika_level, shown",
    [("warn", ["WARNING pika.connection: careful"]), ("debug", ["INFO pika.connection: chatty", "WARNING pika.connection: careful"])],
)
def test_pika_logging_goes_to_the_same_stream(stdlib_logging, pika_level: str, shown: list[str]) -> None:
    obs, out = observer(level="debug", pika_level=pika_level)
    globalLogPublisher.addObserver(obs)
    try:
        logging.getLogger("pika.connection").info("chatty")
        logging.getLogger("pika.connection").warning("careful")
    finally:
        globalLogPublisher.removeObserver(obs)
    assert out.getvalue().splitlines() == shown


@pytest.mark.parametrize("level, shown", [("info", []), ("debug", ["DEBUG pika.channel: Received remote Channel.Close (406): 'x'"])])
def test_pikas_channel_close_warning_is_debug_only_as_the_daemon_says_it(stdlib_logging, level: str, shown: list[str]) -> None:
    """The subscription and the publisher explain a channel the broker closed; pika's line would repeat it."""
    obs, out = observer(level=level, pika_level="debug")
    globalLogPublisher.addObserver(obs)
    try:
        logging.getLogger("pika.channel").warning("Received remote Channel.Close (%s): %r", 406, "x")
        logging.getLogger("pika.channel").warning("Channel.Flow received from server")
    finally:
        globalLogPublisher.removeObserver(obs)
    assert out.getvalue().splitlines() == shown + ["WARNING pika.channel: Channel.Flow received from server"]


def test_handshake_noise_from_legacy_log_err_is_one_warning(stdlib_logging, expect_errors) -> None:
    from automat import NoTransition

    expect_errors("NoTransition")  # logged here on purpose, as Twisted's ClientService does

    obs, out = observer()
    globalLogPublisher.addObserver(obs)
    try:
        legacy_log.err(Failure(NoTransition("Waiting", "_clientDisconnected")), "Unhandled Error")
    finally:
        globalLogPublisher.removeObserver(obs)
    assert out.getvalue() == "WARNING log_legacy: connection dropped during the AMQP handshake; retrying\n"


def journal_env(path: Path) -> dict[str, str]:
    """$JOURNAL_STREAM as systemd sets it when path is the journal's stream: "device:inode"."""
    st = path.stat()
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


@pytest.mark.parametrize("where", ["stdout", "elsewhere", "unset"])
def test_lines_to_the_journal_carry_the_syslog_priority(stdlib_logging, tmp_path: Path, monkeypatch, where: str) -> None:
    """journald reads "<3>" as priority err: journalctl -p err shows the daemon's errors."""
    out, other = tmp_path / "stdout", tmp_path / "other"
    other.touch()
    with open(out, "w") as stream:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        if where != "unset":
            monkeypatch.setenv("JOURNAL_STREAM", journal_env(out if where == "stdout" else other)["JOURNAL_STREAM"])
        for fmt in ("text", "json"):
            log = Logger(namespace="x", observer=logs.make_observer(logs.LogSettings(level="debug", format=fmt), stream))
            log.debug("d")
            log.info("i")
            log.warn("w")
            try:
                1 / 0
            except ZeroDivisionError:
                log.failure("e")
            log.critical("c")
    lines = out.read_text().splitlines()
    text, json_lines = lines[: len(lines) - 5], lines[len(lines) - 5 :]
    if where == "stdout":
        # No timestamp: the journal records one.
        assert text[:3] == ["<7>DEBUG x: d", "<6>INFO x: i", "<4>WARNING x: w"]
        assert text[3] == "<2>CRITICAL x: e" and text[-1] == "<2>CRITICAL x: c"
        assert text[4] == "<2>Traceback (most recent call last):"
        assert all(line.startswith("<2>") for line in text[3:]), text  # every line of the traceback
        assert [line[:3] for line in json_lines] == ["<7>", "<6>", "<4>", "<2>", "<2>"]
        assert [json.loads(line[3:])["level"] for line in json_lines] == ["DEBUG", "INFO", "WARNING", "CRITICAL", "CRITICAL"]
    else:
        assert not any(line.startswith("<") for line in lines), lines
        assert LINE.match(text[0]) and text[0].endswith(" DEBUG x: d"), text
        assert [json.loads(line)["level"] for line in json_lines][-1] == "CRITICAL"


# --- the daemon ------------------------------------------------------------------------------------


NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"  # for daemons that stop before connecting


def config(queue: str, callback: str = "opscb:ack", *, url: str, extra: str = "") -> str:
    return daemon_config(queue, callback, url=url, health=HEALTH_ANYWHERE, extra=extra)



# Both ways to run the daemon: twistd, and the amqp-consumer command the systemd unit runs.
by_runner = pytest.mark.parametrize("runner", RUNNERS)


def start(tmp_path: Path, text: str, daemons: list[DaemonProcess], runner: str = "twistd") -> DaemonProcess:
    d = DaemonProcess(tmp_path / "d", text, runner=runner)
    d.start()
    daemons.append(d)
    return d


@pytest.mark.single_broker  # the log format
@by_runner
def test_text_logs_on_stdout_nothing_per_message_and_sigterm_exits_0(
    tmp_path: Path, broker: Broker, queue: str, daemons, runner: str
) -> None:
    broker.declare(queue)
    d = start(tmp_path, config(queue, url=broker.url), daemons, runner)
    port = health_port(d)
    d.wait_for_log("consuming from")
    before = len(d.output.splitlines())
    ids = broker.publish_json(queue, [{"n": i} for i in range(50)])
    poll(lambda: http_json(port, "/status")[1]["messages"][queue]["acked"] == 50, 15, "50 messages acked")
    assert len(d.output.splitlines()) == before, "lines logged per message:\n" + d.output
    assert d.stop() == 0
    out = d.output
    assert not any(i in out for i in ids)
    lines = [line for line in out.splitlines() if line]
    assert lines and all(LINE.match(line) for line in lines), out
    assert "guest:guest" not in out


def consume_then_sigterm(command: list[str], d: DaemonProcess, out: Path, err: Path | None = None) -> int:
    """Run command with stdout (and stderr, or stdout) in files until it consumes, then SIGTERM it: its status."""
    with open(out, "wb") as o, open(err or os.devnull, "wb") as e:
        proc = subprocess.Popen(command, cwd=d.workdir, env=d.env, stdout=o, stderr=e if err else subprocess.STDOUT)
    try:
        poll(lambda: "consuming from" in out.read_text(), 20, "the daemon consuming")
        proc.send_signal(signal.SIGTERM)
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.single_broker  # where logs go
@by_runner
def test_logs_go_to_stdout_and_nothing_to_stderr(tmp_path: Path, broker: Broker, queue: str, runner: str) -> None:
    broker.declare(queue)
    d = DaemonProcess(tmp_path / "d", config(queue, url=broker.url).replace(HEALTH_ANYWHERE, ""), runner=runner)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    assert consume_then_sigterm(d.command(), d, out, err) == 0
    assert err.read_text() == ""
    assert "INFO amqp_consumer.lifecycle: SIGTERM received" in out.read_text()


@pytest.mark.single_broker  # the JSON log format; quarantine itself runs on every broker in test_consume.py
def test_json_logs_with_the_message_id_of_a_quarantined_message(tmp_path: Path, broker: Broker, queue: str, daemons) -> None:
    broker.declare(queue)
    d = start(tmp_path, config(queue, "opscb:explode", url=broker.url, extra='[logging]\nformat = "json"\n'), daemons)
    d.wait_for_log("consuming from")
    broker.publish_raw(queue, b"bad", message_id="poison-1")
    d.wait_for_log("poison-1")
    assert d.stop() == 0
    records = [json.loads(line) for line in d.output.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    quarantined = [r for r in records if r.get("message_id") == "poison-1"]
    assert len(quarantined) == 1
    assert quarantined[0]["level"] == "ERROR" and quarantined[0]["logger"] == "amqp_consumer.consumer"
    assert "ValueError: cannot handle this message" in quarantined[0]["message"]
    broker.delete(queue + ".quarantine")


@by_runner
def test_halt_consumer_exits_with_its_code(tmp_path: Path, broker: Broker, queue: str, daemons, runner: str) -> None:
    broker.declare(queue)
    d = start(tmp_path, config(queue, "opscb:halt", url=broker.url), daemons, runner)
    d.wait_for_log("consuming from")
    broker.publish_raw(queue, b"5")
    assert d.wait(20) == 5


@by_runner
def test_bad_config_exits_78_with_one_line(tmp_path: Path, runner: str) -> None:
    result = run_check(config("q", url=NO_BROKER, extra='[logging]\nformat = "xml"\n'), tmp_path, runner=runner)
    assert result.returncode == exitcodes.CONFIG == 78
    assert result.stdout == ""
    assert re.fullmatch(r"amqp-consumer: config error: \S+daemon\.toml: logging\.format: expected one of 'text', 'json'.*\n", result.stderr)


@by_runner
def test_callback_constructor_failure_exits_70_with_one_line(tmp_path: Path, runner: str) -> None:
    result = run_check(config("q", "opscb:BrokenInit", url=NO_BROKER), tmp_path, runner=runner)
    assert result.returncode == exitcodes.SOFTWARE == 70
    assert result.stderr.strip().splitlines() == [
        "amqp-consumer: the callback could not start: opscb.BrokenInit() raised RuntimeError: the database is unreachable"
    ]


def test_callback_module_that_exits_on_import_exits_70_with_one_line(tmp_path: Path) -> None:
    """sys.exit(0) at a callback module's top level must not pass for a clean start and stop."""
    for args in ([], ["--check"]):
        result = run_check(config("q", "exitsonimport:fn", url=NO_BROKER), tmp_path, args)
        assert result.returncode == exitcodes.SOFTWARE == 70, result.stdout + result.stderr
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "amqp-consumer: the callback could not start: importing 'exitsonimport' called sys.exit(0)"
        ]


@pytest.mark.single_broker  # the runner and the log format
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_twist_runner_writes_the_documented_lines_to_a_file(tmp_path: Path, broker: Broker, queue: str, fmt: str) -> None:
    """`twist amqp-consumer` behaves like `twistd -n`: [logging] applies, also with output to a file."""
    broker.declare(queue)
    d = DaemonProcess(tmp_path / "d", config(queue, url=broker.url, extra=f'[logging]\nformat = "{fmt}"\nlevel = "debug"\npika_level = "debug"\n'))
    twist = str(Path(TWISTD).with_name("twist"))
    out = tmp_path / "stdout"
    assert consume_then_sigterm([twist, "amqp-consumer", f"--config={d.config_path}"], d, out) == 0
    lines = [line for line in out.read_text().splitlines() if line]
    if fmt == "text":
        assert lines and all(LINE.match(line) for line in lines), out.read_text()
        found = [line for line in lines if " DEBUG " in line]
    else:
        records = [json.loads(line) for line in lines]
        assert all(set(r) <= {"time", "level", "logger", "message", "message_id"} for r in records), records[0]
        found = [r for r in records if r["level"] == "DEBUG"]
        lines = [r["message"] for r in records]
    assert found, "level = debug was not applied:\n" + "\n".join(lines)
    assert any("consuming from" in line for line in lines)
    assert "guest:guest" not in out.read_text()


@by_runner
def test_wrong_password_exits_77_with_one_line_and_no_password(
    tmp_path: Path, broker: Broker, queue: str, daemons, runner: str
) -> None:
    d = start(tmp_path, config(queue, url=broker.url.replace("guest:guest@", f"guest:{PASSWORD}@")), daemons, runner)
    status = d.wait(8)  # it takes well under a second
    out = d.output
    assert status == exitcodes.NOPERM == 77, out
    assert PASSWORD not in out
    assert "Traceback" not in out
    reasons = [line for line in out.splitlines() if " CRITICAL " in line]
    assert len(reasons) == 1 and "refused" in reasons[0] and "(exit status 77)" in reasons[0], out


@by_runner
def test_the_exit_77_line_reaches_the_journal_as_critical(
    tmp_path: Path, broker: Broker, queue: str, daemons, runner: str
) -> None:
    d = DaemonProcess(tmp_path / "d", config(queue, url=broker.url.replace(":guest@", f":{PASSWORD}@")), runner=runner)
    d.log_path.touch()
    d.env.update(journal_env(d.log_path))
    d.start()
    daemons.append(d)
    assert d.wait(8) == exitcodes.NOPERM, d.output
    lines = d.output.splitlines()
    critical = [line for line in lines if "CRITICAL" in line]
    assert len(critical) == 1 and critical[0].startswith("<2>CRITICAL amqp_consumer.daemon: stopping: the broker refused"), lines
    assert all(re.match(r"<[2-7]>[A-Z]+ [\w.]+: ", line) for line in lines), lines


@by_runner
def test_the_exit_78_line_on_stderr_reaches_the_journal_as_critical(tmp_path: Path, runner: str) -> None:
    bad = DaemonProcess(tmp_path / "bad", config("q", url=NO_BROKER, extra='[logging]\nformat = "xml"\n'), runner=runner)
    err = tmp_path / "stderr"
    err.touch()
    with open(err, "r+b") as stream:
        result = subprocess.run(bad.command(), cwd=bad.workdir, env={**bad.env, **journal_env(err)}, stderr=stream, timeout=60)
    assert result.returncode == exitcodes.CONFIG
    assert err.read_text().startswith("<2>amqp-consumer: config error: "), err.read_text()


def test_port_announcements_are_left_to_debug_level() -> None:
    """Twisted's "Site starting on 9100" / "(TCP Port 9100 Closed)" lines add nothing to the listener's own line."""
    import io

    from twisted.logger import LogLevel

    from amqp_consumer import logs

    for level, expected in (("info", 0), ("debug", 2)):
        out = io.StringIO()
        observer = logs.make_observer(logs.LogSettings(level=level, timestamps=False), stream=out)
        for text in ("QuietSite starting on 9100", "(TCP Port 9100 Closed)"):
            observer({"log_namespace": "log_legacy", "log_level": LogLevel.info, "log_format": "{t}", "t": text, "log_time": 0})
        observer({"log_namespace": "log_legacy", "log_level": LogLevel.info, "log_format": "something else", "log_time": 0})
        assert len(out.getvalue().splitlines()) == expected + 1


def test_the_command_refuses_an_unknown_option_with_one_line_and_78(tmp_path: Path) -> None:
    result = run_check(config("q", url=NO_BROKER), tmp_path, ["--no-such-option"], runner="command")
    assert result.returncode == exitcodes.CONFIG, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "amqp-consumer: option --no-such-option not recognized; see amqp-consumer --help"
    ]


def test_the_command_checks_a_config_and_shows_its_help(tmp_path: Path) -> None:
    ok = run_check(config("some.queue", url=NO_BROKER), tmp_path, ["--check"], runner="command")
    assert ok.returncode == 0 and ok.stdout.startswith("amqp-consumer: "), ok.stdout + ok.stderr
    assert "OK (callback opscb:ack; queues: some.queue)" in ok.stdout
    shown = run_check(config("q", url=NO_BROKER), tmp_path, ["--help"], runner="command")
    assert shown.returncode == 0 and "--check" in shown.stdout, shown.stdout
    assert shown.stdout.startswith("Usage: amqp-consumer --config=FILE"), shown.stdout
