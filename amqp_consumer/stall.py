"""Notice a silent broker link: two heartbeat intervals without a byte from the broker means it is dead.

A broker that is alive sends something at least once per heartbeat interval
(RabbitMQ checks every half interval and sends a heartbeat frame when it sent
nothing since the last check), so two intervals of silence is the AMQP rule
for a dead peer. pika's own check runs only every heartbeat + 5 s and needs a
whole such period without data, so it noticed a stalled link 10 to 20 s late
with heartbeat = 5; this watch fires exactly two intervals after the last byte
received, so /ready turns 503 within two heartbeats of a partition.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class StallWatch:
    """Calls on_stall(quiet_seconds) once, when nothing was received for `limit` seconds.

    ``received()`` is called for every chunk of bytes read from the socket; it only
    notes the time, so the reading path costs one clock read and no timer update.
    """

    def __init__(self, clock: IReactorTime, limit: float, on_stall: Callable[[float], None]) -> None:
        self._clock = clock
        self.limit = limit
        self._on_stall = on_stall
        self.last = clock.seconds()
        self._confirming = False
        self._call: IDelayedCall | None = clock.callLater(limit, self._check)

    def received(self) -> None:
        self.last = self._clock.seconds()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        quiet = self._clock.seconds() - self.last
        if quiet < self.limit:  # data came meanwhile: look again when the newest byte is `limit` old
            self._confirming = False
            self._call = self._clock.callLater(self.limit - quiet, self._check)
        elif not self._confirming:
            # The reactor runs due timers before it reads sockets: after it was busy
            # itself (a long manhole command, say) the broker's bytes may be waiting
            # unread. Let it read once before judging the link.
            self._confirming = True
            self._call = self._clock.callLater(0, self._check)
        else:
            self._call = None
            self._on_stall(quiet)
