"""``amqp-consumer --config=FILE``: the daemon run without twistd.

It takes the same options and runs the same service as ``twistd -n
amqp-consumer``, in the foreground. What it leaves out is what twistd costs a
process that never daemonizes: the plugin scan (which unpickles Twisted's
plugin cache and with it unittest, trial's and words' interfaces) and
twistd's own runner (pdb, profile), about 1.6 MB of an idle daemon's memory
(bench/idle_rss.py).
The systemd unit runs this command; twistd stays supported for operators who
want its options (``--logfile``, ``--reactor``, daemonizing).

What twistd would have done, done here the same way: the default reactor, the
service built before logging begins, one global log observer (the daemon's)
with stdout and stderr redirected into it, ``startService`` before the reactor
runs and ``stopService`` before it shuts down. Signals and the exit status
belong to the daemon already (lifecycle.py).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

from twisted.python import usage

from amqp_consumer import exitcodes

if TYPE_CHECKING:
    from amqp_consumer.tap import Options


def _options() -> Options:
    # Imported once the reactor is installed: what tap imports would install the default one.
    from amqp_consumer import tap

    class CommandOptions(tap.Options):
        # twistd prefixes "Usage: twistd [options] amqp-consumer"; alone, the synopsis says it.
        synopsis = f"Usage: amqp-consumer {tap.Options.synopsis}"

    return CommandOptions()  # type: ignore[no-untyped-call]  # Twisted leaves usage.Options untyped


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import default

    default.install()
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorCore
    from twisted.logger import globalLogBeginner

    from amqp_consumer import logs, tap

    options = _options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        print(f"amqp-consumer: {e}; see amqp-consumer --help", file=sys.stderr)
        raise SystemExit(exitcodes.CONFIG) from None
    # As under twistd: the service is built before logging begins (a callback that cannot start
    # says so in one line on stderr), and what it logs meanwhile is buffered and replayed.
    service = tap.makeService(options)
    globalLogBeginner.beginLoggingTo([logs.make_observer()])
    running = cast(IReactorCore, reactor)
    service.privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    service.startService()  # type: ignore[no-untyped-call]
    running.addSystemEventTrigger("before", "shutdown", service.stopService)
    running.run()


if __name__ == "__main__":
    main()
