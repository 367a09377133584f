"""HTTP health and metrics: GET /live, /ready, /metrics and /status.

Everything is answered on the reactor thread from one status snapshot
(status.py), taken per request, so a probe costs nothing on the message path
and /live doubles as "the reactor turns". /ready, /status and the live gauges
of /metrics read the same snapshot, so they never disagree. The site writes no
access log: probes every few seconds would flood the journal. Nothing here
reads the configuration or any part of the daemon but its snapshot (and the
metrics text built from it), so no URL or password can leak out.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol, cast

from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.web.http import Request
from twisted.web.resource import IResource, Resource

from amqp_consumer import __version__
from amqp_consumer.httpserver import NotFound, ResourceFactory
from amqp_consumer.listen import Listener
from amqp_consumer.status import Snapshot

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"


class Reported(Protocol):
    """What health reads: the daemon's snapshot and its metrics text; fatal() if it cannot listen."""

    def snapshot(self) -> Snapshot: ...
    def exposition(self) -> bytes: ...
    def fatal(self, code: int, why: str) -> None: ...


def status_document(source: Reported) -> dict[str, Any]:
    """The daemon's state as one JSON-ready dict: GET /status (the manhole's status() is the same document)."""
    return source.snapshot().document()


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2, sort_keys=False).encode() + b"\n"


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, source: Reported) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self.source = source

    def render_GET(self, request: Request) -> bytes:
        raise NotImplementedError

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class Live(_Leaf):
    """200 whenever the reactor answers at all."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"cache-control", b"no-store")
        return b"alive\n"


class Ready(_Leaf):
    """200 while consuming on every configured queue; 503 with the reason otherwise."""

    def render_GET(self, request: Request) -> bytes:
        snap = self.source.snapshot()
        return _json(request, 200 if snap.ready else 503, {"ready": snap.ready, "reason": snap.reason})


class MetricsPage(_Leaf):
    """Prometheus text exposition, rendered here on the reactor thread."""

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST  # loaded at the first scrape (see metrics.py)

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.source.exposition()


class Status(_Leaf):
    """Everything /ready and /metrics know, as one JSON document."""

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, status_document(self.source))


class Index(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        return (
            b"amqp-consumer " + __version__.encode() + b"\n"
            b"/live     200 while the process answers\n"
            b"/ready    200 while consuming on every queue, else 503 and why\n"
            b"/metrics  Prometheus metrics\n"
            b"/status   the state as JSON\n"
        )


class Root(Resource):
    def __init__(self, source: Reported) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._index = Index(source)
        self._not_found = NotFound("No such resource", "Try /live, /ready, /metrics or /status.")
        self.putChild(b"live", Live(source))
        self.putChild(b"ready", Ready(source))
        self.putChild(b"metrics", MetricsPage(source))
        self.putChild(b"status", Status(source))

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self._index
        return self._not_found


def service(
    reactor: IReactorTCP, source: Reported, description: str, on_error: Callable[[int, str], None] | None = None
) -> Listener:
    """The HTTP listener as a service (for ``[health] listen``); a failure to listen goes to
    on_error, by default source.fatal."""
    return Listener(
        reactor,
        "health",
        description,
        # The daemon's reactor provides both; the clock only dates the answers.
        ResourceFactory(Root(source), cast(IReactorTime, reactor)),
        on_error=on_error or source.fatal,
        announce=lambda address: f"serving /live /ready /metrics /status on http://{address}/",
    )
