"""Serve a ``twisted.web.resource`` tree on ``twisted.web.http`` alone, without ``twisted.web.server``.

``twisted.web.server.Site`` imports Perspective Broker (for its sessions), the
template system with an XML parser, and hyperlink: about 2 MB that an idle
daemon would hold only to answer /live, /ready, /metrics and /status. The
health listener needs a small part of it, which is here: walk the request
path through the resource tree (``twisted.web.resource`` is light), render the
leaf, and answer the way Site answers - the same status codes, ``Server`` and
``Date`` headers, ``Allow`` on 405, 501 for unknown methods, the same error
pages, no body for HEAD, an empty 200 for ``OPTIONS *`` - but with no access
log line per request, and no log line for a HEAD request either.
"""

from __future__ import annotations

from html import escape
from urllib.parse import unquote_to_bytes

from twisted import copyright
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource, Resource, getChildForRequest

log = Logger(namespace="amqp_consumer.httpserver")

# The Server header twisted.web.server sends.
SERVER = f"TwistedWeb/{copyright.version}".encode()
# Methods that get 405 (with Allow) rather than 501 when a resource lacks them.
_KNOWN_METHODS = (b"GET", b"HEAD", b"POST")


def error_body(code: int, brief: str, detail: str) -> bytes:
    """The HTML of Twisted's error pages for 405 and 501 (text already escaped by the caller)."""
    return (
        f"\n<html>\n  <head><title>{code} - {brief}</title></head>\n"
        f"  <body>\n    <h1>{brief}</h1>\n    <p>{detail}</p>\n  </body>\n</html>\n"
    ).encode()


class NotFound(Resource):
    """404 for any method and any path below it, the page ``twisted.web.pages.notFound`` renders."""

    isLeaf = True

    def __init__(self, brief: str, detail: str) -> None:
        Resource.__init__(self)
        self._body = (
            f"<!DOCTYPE html>\n<html><head><title>404 - {escape(brief, quote=False)}</title></head>"
            f"<body><h1>{escape(brief, quote=False)}</h1><p>{escape(detail, quote=False)}</p></body></html>"
        ).encode()

    def render(self, request: http.Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self._body


class ResourceRequest(http.Request):
    """A request answered from its factory's resource tree (see the module docstring)."""

    def process(self) -> None:
        _answer(self, self.channel.factory.resource)


def _answer(request: http.Request, root: IResource) -> None:
    request.setHeader(b"server", SERVER)
    request.setHeader(b"date", http.datetimeToString())
    if request.path == b"*":
        _star(request)
        return
    # Where twisted.web.resource's traversal reads and moves the path segments.
    request.prepath = []  # type: ignore[attr-defined]
    request.postpath = [unquote_to_bytes(segment) for segment in request.path[1:].split(b"/")]  # type: ignore[attr-defined]
    try:
        _render(request, getChildForRequest(root, request))
    except BaseException:
        _failed(request)


def _star(request: http.Request) -> None:
    # "OPTIONS *" asks whether the server is there at all.
    if request.method == b"OPTIONS":
        request.setResponseCode(http.OK)
    else:
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader(b"allow", b"OPTIONS")
    request.setHeader(b"content-length", b"0")
    request.finish()


def _render(request: http.Request, resource: IResource) -> None:
    try:
        body = resource.render(request)
    except UnsupportedMethod as e:
        allowed: list[bytes] = list(e.allowedMethods)
        if request.method == b"HEAD" and b"GET" in allowed:  # HEAD is GET without the body
            request.method = b"GET"
            try:
                body = resource.render(request)
            finally:
                request.method = b"HEAD"
        else:
            body = _unsupported(request, allowed)
    if not isinstance(body, bytes):
        raise TypeError(f"{resource!r} rendered {type(body).__name__}, not bytes")
    request.setHeader(b"content-length", b"%d" % len(body))
    if body and request.code not in (http.NO_CONTENT, http.NOT_MODIFIED) and not request.responseHeaders.hasHeader(b"content-type"):
        request.setHeader(b"content-type", b"text/html")
    request.write(body)  # http.Request sends no body for HEAD
    request.finish()


def _unsupported(request: http.Request, allowed: list[bytes]) -> bytes:
    method = request.method.decode("charmap")
    if request.method in _KNOWN_METHODS:
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader(b"allow", b", ".join(allowed))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        names = [m.decode("ascii") for m in allowed]
        detail = (
            f"Your browser approached me (at {escape(request.uri.decode('charmap'))}) with the method"
            f' "{method}".  I only allow the method{"s" if len(names) > 1 else ""} {", ".join(names)} here.'
        )
        return error_body(http.NOT_ALLOWED, "Method Not Allowed", detail)
    request.setResponseCode(http.NOT_IMPLEMENTED)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return error_body(http.NOT_IMPLEMENTED, "Huh?", f"I don't know how to treat a {escape(method)} request.")


def _failed(request: http.Request) -> None:
    """Answer 500 for the exception being handled, and log it."""
    log.failure("answering {method} {path}", method=request.method, path=request.path)
    body = b"<html><head><title>Processing Failed</title></head><body><b>Processing Failed</b></body></html>"
    request.setResponseCode(http.INTERNAL_SERVER_ERROR)
    request.setHeader(b"content-type", b"text/html")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class ResourceFactory(http.HTTPFactory):
    """HTTP/1.x connections whose requests are answered from ``resource``; no access log."""

    noisy = False  # no "Starting factory" lines

    def __init__(self, resource: IResource, reactor: IReactorTime) -> None:
        super().__init__(reactor=reactor)
        self.resource = resource

    def buildProtocol(self, addr: IAddress | None) -> http._GenericHTTPChannelProtocol | None:
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.requestFactory = ResourceRequest
        return channel

    def log(self, request: http.Request) -> None:
        pass
