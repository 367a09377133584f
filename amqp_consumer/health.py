"""HTTP health and metrics: GET /live, /ready, /metrics and /status.

Everything is answered on the reactor thread from in-memory state, so a probe
costs nothing on the message path and /live doubles as "the reactor turns".
The site writes no access log: probes every few seconds would flood the journal.
Nothing here reads the configuration, so no URL or password can leak out.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from twisted.web.http import Request
from twisted.web.resource import IResource, Resource

from amqp_consumer import __version__
from amqp_consumer.httpserver import NotFound, ResourceFactory
from amqp_consumer.listen import Listener
from amqp_consumer.metrics import OUTCOMES

if TYPE_CHECKING:
    from amqp_consumer.daemon import Daemon

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"


def status_document(daemon: Daemon) -> dict[str, Any]:
    """The daemon's state as one JSON-ready dict: GET /status and the manhole's status()."""
    consumer = daemon.consumer
    metrics = daemon.metrics
    dispatcher = consumer.dispatcher
    doc = daemon.state.as_dict()
    doc["inflight"] = {
        "count": len(consumer.inflight),
        "oldest_seconds": round(consumer.inflight.oldest_age(), 3),
        # the delivery nearest its queue's consumer ack timeout: queue, message_id, age, limit, percent
        "ack_timeout": consumer.ack_timeouts.nearest(),
    }
    doc["messages"] = {
        label: {outcome: int(metrics.value(outcome, label)) for outcome in OUTCOMES}
        for label in metrics.counters["received"]
    }
    doc["ack_timeouts"] = dict(metrics.ack_timeouts)
    doc["workers"] = {
        "kind": "async" if dispatcher.is_async else "threads",
        "busy": dispatcher.busy,
        "total": 0 if dispatcher.is_async else dispatcher.workers,
        "waiting": dispatcher.pending,
    }
    doc["version"] = __version__
    doc["pid"] = os.getpid()
    doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return doc


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2, sort_keys=False).encode() + b"\n"


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)  # type: ignore[attr-defined,no-any-return]


class Live(_Leaf):
    """200 whenever the reactor answers at all."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"cache-control", b"no-store")
        return b"alive\n"


class Ready(_Leaf):
    """200 while consuming on every configured queue; 503 with the reason otherwise."""

    def render_GET(self, request: Request) -> bytes:
        ready, reason = self.daemon.state.readiness()
        return _json(request, 200 if ready else 503, {"ready": ready, "reason": reason})


class MetricsPage(_Leaf):
    """Prometheus text exposition, rendered here on the reactor thread."""

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST  # loaded at the first scrape (see metrics.py)

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.daemon.metrics.exposition()


class Status(_Leaf):
    """Everything /ready and /metrics know, as one JSON document."""

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, status_document(self.daemon))


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
    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self._index = Index(daemon)
        self._not_found = NotFound("No such resource", "Try /live, /ready, /metrics or /status.")
        self.putChild(b"live", Live(daemon))
        self.putChild(b"ready", Ready(daemon))
        self.putChild(b"metrics", MetricsPage(daemon))
        self.putChild(b"status", Status(daemon))

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self._index
        return self._not_found


def service(reactor: Any, daemon: Daemon, description: str) -> Listener:
    """The HTTP listener as a service (for ``[health] listen``)."""
    return Listener(
        reactor,
        "health",
        description,
        ResourceFactory(Root(daemon), reactor),
        on_error=daemon.fatal,
        announce=lambda address: f"serving /live /ready /metrics /status on http://{address}/",
    )
