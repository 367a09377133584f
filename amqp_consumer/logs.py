"""One log line per event, as text or JSON, on stdout (systemd's journal adds time and unit).

When stdout is the journal's stream, each line starts with the syslog priority
(``<3>`` for an error), which journald strips and records as the entry's
PRIORITY, so ``journalctl -p err`` finds the daemon's errors.

twistd asks for a log observer factory by dotted name (``--logger``); twist
takes a factory of file observers and a level from its own options. The
plugin's option parser hands either runner this module's observer after
loading the config (see use_for_runner), so the whole daemon, Twisted and
pika included, writes through this one observer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import IO, Any, Mapping, MutableMapping

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from amqp_consumer.redact import redact

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_STD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
# syslog priorities, as sd-daemon(3) prefixes and journald's stream reads them.
_PRIORITIES = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}
_NAMES = {LogLevel.debug: "DEBUG", LogLevel.info: "INFO", LogLevel.warn: "WARNING", LogLevel.error: "ERROR", LogLevel.critical: "CRITICAL"}


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    pika_level: str = "warn"
    logfile: str = ""
    timestamps: bool = True  # on text lines, unless they go to the journal (which stamps them itself)


_settings = LogSettings()


def configure(settings: LogSettings) -> None:
    global _settings
    _settings = settings


@implementer(ILogObserver)
class LineObserver:
    def __init__(self, stream: IO[str], fmt: str, timestamps: bool, priorities: bool = False) -> None:
        self._stream = stream
        self._json = fmt == "json"
        self._timestamps = timestamps
        self._priorities = priorities

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        namespace = event.get("log_namespace", "-")
        text = formatEvent(event)
        failure = event.get("log_failure")
        # twisted.python.log.err() events carry "failure" instead, and their text
        # already holds the traceback.
        any_failure = failure if failure is not None else (event.get("failure") if event.get("isError") else None)
        if any_failure is not None and _is_handshake_noise(any_failure):
            level, text, failure = LogLevel.warn, "connection dropped during the AMQP handshake; retrying", None
        if failure is not None:
            text = f"{text}\n{failure.getTraceback().rstrip()}" if text else failure.getTraceback().rstrip()
        message_id = event.get("message_id")
        if message_id is not None and not self._json and "{message_id" not in (event.get("log_format") or ""):
            text = f"{text} (message id {message_id})"
        text = redact(text)
        if self._json:
            record: dict[str, Any] = {
                "time": datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).isoformat(timespec="milliseconds"),
                "level": _NAMES.get(level, str(level)),
                "logger": namespace,
                "message": text,
            }
            if event.get("message_id") is not None:
                record["message_id"] = event["message_id"]
            line = json.dumps(record, default=str)
        else:
            line = f"{_NAMES.get(level, level)} {namespace}: {text}"
            if self._timestamps:
                stamp = datetime.fromtimestamp(event.get("log_time", 0)).isoformat(sep=" ", timespec="milliseconds")
                line = f"{stamp} {line}"
        if self._priorities:
            # JSON lines get the prefix too: journald strips it, so the journal's
            # MESSAGE is still one JSON object. A traceback's lines each become an
            # entry of their own, so each carries the priority.
            line = journal_prefix(level) + line.replace("\n", "\n" + journal_prefix(level))
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


def journal_prefix(level: LogLevel) -> str:
    """The syslog priority prefix journald's stream understands (SyslogLevelPrefix=, on by default)."""
    return f"<{_PRIORITIES.get(level, 6)}>"


def is_journal(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """True when stream is systemd's journal stream: $JOURNAL_STREAM names its device and inode.

    systemd sets the variable for a service's stdout (or stderr), and it is
    inherited; comparing the stream's own fstat() with it tells a journal from
    a file or pipe the output was redirected to.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return st.st_dev == int(device) and st.st_ino == int(inode)
    except (AttributeError, OSError, ValueError):
        return False


def _is_handshake_noise(failure: Failure) -> bool:
    # Twisted's ClientService logs automat's NoTransition when the TCP connection
    # drops while the AMQP handshake is still running; the retry happens anyway.
    return type(failure.value).__name__ == "NoTransition"


def _explained_by_the_daemon(record: logging.LogRecord) -> bool:
    """pika's warning for a channel the broker closed: the daemon says the same in its own line.

    The subscription explains every close of its channel (with the fix for a
    refused declaration and the retry delay), and so does the publisher for its
    own, so pika's line would only say it a second time at each attempt.
    """
    return record.name == "pika.channel" and str(record.msg).startswith("Received remote Channel.Close")


class _ToTwisted(logging.Handler):
    """stdlib logging (pika) into the same observer."""

    _levels = {logging.DEBUG: LogLevel.debug, logging.INFO: LogLevel.info, logging.WARNING: LogLevel.warn, logging.ERROR: LogLevel.error, logging.CRITICAL: LogLevel.critical}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        level = LogLevel.debug if _explained_by_the_daemon(record) else self._levels.get(record.levelno, LogLevel.info)
        Logger(namespace=record.name).emit(level, "{text}", text=text)


def bridge_stdlib(pika_level: str) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _ToTwisted) for h in root.handlers):
        root.addHandler(_ToTwisted())
    root.setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(_STD_LEVELS[pika_level])


# Twisted's ports announce themselves through the legacy log at info level; the
# listeners already log one line of their own, so these are shown at debug only.
_PORT_CHATTER = re.compile(r"^(\S+ starting on \d+|\(\S+ Port \d+ Closed\))$")
# constantly's named constants carry no static type.
_NO: PredicateResult = PredicateResult.no
_MAYBE: PredicateResult = PredicateResult.maybe


@implementer(ILogFilterPredicate)
class _TwistedChatter:
    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if event.get("log_namespace") == "log_legacy" and _PORT_CHATTER.match(formatEvent(event)):
            return _NO
        # ClientService's "Scheduling retry N ..." counts from 1 again after every
        # handshake, which misleads; the connector's own failure line gives the delay.
        if str(event.get("log_namespace", "")).startswith("twisted.application") and str(
            event.get("log_format", "")
        ).startswith("Scheduling retry"):
            return _NO
        return _MAYBE


_twisted_chatter = _TwistedChatter()


def make_observer(settings: LogSettings | None = None, stream: IO[str] | None = None) -> ILogObserver:
    s = settings or _settings
    if stream is None:
        stream = open(s.logfile, "a", buffering=1) if s.logfile and s.logfile != "-" else sys.stdout
    bridge_stdlib(s.pika_level)
    predicates: list[ILogFilterPredicate] = [LogLevelFilterPredicate(defaultLogLevel=_LEVELS[s.level])]
    if s.level != "debug":
        predicates.insert(0, _twisted_chatter)
    journal = is_journal(stream)
    return FilteringLogObserver(LineObserver(stream, s.format, s.timestamps and not journal, journal), predicates)


def use_for_runner(runner_options: MutableMapping[str, Any] | None, settings: LogSettings) -> None:
    """Make the runner whose options are runner_options (twistd's or twist's) log through make_observer.

    Under twist, [logging] overrides its --log-format and --log-level; its
    --log-file is kept. Under twistd, its --logfile is kept.
    """
    if runner_options is not None and "fileLogObserverFactory" in runner_options:  # twist
        configure(settings)
        runner_options["fileLogObserverFactory"] = lambda stream: make_observer(settings, stream)
        runner_options["logLevel"] = _LEVELS[settings.level]  # twist filters before our observer does
        return
    logfile = (runner_options or {}).get("logfile") or ""
    configure(replace(settings, logfile=logfile))
    if runner_options is not None and runner_options.get("logger") is None:
        runner_options["logger"] = "amqp_consumer.logs.twistd_observer"


def twistd_observer() -> ILogObserver:
    """The factory twistd calls (named by --logger)."""
    return make_observer()
