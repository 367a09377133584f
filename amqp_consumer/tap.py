"""``twistd amqp-consumer``: Options and makeService.

Options does all the checking (config, callback import) while twistd is still
parsing the command line, so a bad config fails before anything starts or
daemonizes, with one line and exit status 78.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import LogLevel
from twisted.python import usage

from amqp_consumer import exitcodes, logs
from amqp_consumer.config import Config, ConfigError, load
from amqp_consumer.dispatch import CallbackInitError, instantiate, load_callback


def _die(line: str, code: int) -> None:
    # Critical, like the daemon's own "stopping: ..." line, for journalctl -p err.
    prefix = logs.journal_prefix(LogLevel.critical) if logs.is_journal(sys.stderr) else ""
    print(f"{prefix}amqp-consumer: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class Options(usage.Options):
    synopsis = "--config=FILE [--callback=module:object] [--check]"
    longdesc = (
        "Consume RabbitMQ messages and run a Python callback on each one. "
        "Exit status: 0 clean stop, 70 unrecoverable failure, 77 broker refused the login "
        "or virtual host, 78 bad configuration; see amqp-consumer(1)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (required); see amqp-consumer.toml(5)."],
        ["callback", None, None, "The callback as module:object; overrides consumer.callback."],
    ]
    optFlags = [
        ["check", None, "Validate the config and import the callback, print a verdict, exit 0 or 78."],
    ]

    config: Config
    callback_object: Any

    def postOptions(self) -> None:
        if not self["config"]:
            _die("--config=FILE is required", exitcodes.CONFIG)
        try:
            self.config = load(self["config"], self["callback"])
            self.callback_object = load_callback(self.config.consumer.callback)
        except ConfigError as e:
            where = e.where if e.where.startswith(str(self["config"])) else f"{self['config']}: {e.where}"
            _die(f"config error: {where}: {e.problem}", exitcodes.CONFIG)
        except CallbackInitError as e:
            _die(f"the callback could not start: {e}", exitcodes.SOFTWARE)
        if self["check"]:
            queues = ", ".join(q or "(server-named)" for q in self.config.consumed_queues)
            print(f"amqp-consumer: {self['config']}: OK (callback {self.config.consumer.callback}; queues: {queues})")
            raise SystemExit(exitcodes.OK)
        lc = self.config.logging
        settings = logs.LogSettings(level=lc.level, format=lc.format, pika_level=lc.pika_level)
        logs.use_for_runner(getattr(self, "parent", None), settings)


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from amqp_consumer.build import build

    try:
        callback = instantiate(options.callback_object, options.config.consumer.config)
    except CallbackInitError as e:
        _die(f"the callback could not start: {e}", exitcodes.SOFTWARE)
    return build(reactor, options.config, callback)
