"""The health listener's HTTP server: answers as twisted.web.server's Site did, without importing it.

A real listener on a loopback port serves a small resource tree; the client is
raw sockets in a thread, so the reactor keeps turning and every header and
byte the server sends is seen.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.web.error import UnsupportedMethod
from twisted.web.http import Request
from twisted.web.resource import Resource

from amqp_consumer.httpserver import NotFound, ResourceFactory

NOT_FOUND_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>404 - No such resource</title></head>"
    b"<body><h1>No such resource</h1><p>Try /hello &amp; /boom.</p></body></html>"
)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello\n"

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class GetOnly(Resource):
    """No render_HEAD of its own: HEAD is answered as GET without the body."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        if request.method != b"GET":
            raise UnsupportedMethod([b"GET"])
        return b"<p>get only</p>"


class Boom(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        raise RuntimeError("the resource broke")


class Root(Resource):
    def __init__(self) -> None:
        super().__init__()
        self.putChild(b"hello", Hello())
        self.putChild(b"get-only", GetOnly())
        self.putChild(b"boom", Boom())

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound("No such resource", "Try /hello & /boom.")


@pytest.fixture
def port(reactor) -> Iterator[int]:
    listening = reactor.listenTCP(0, ResourceFactory(Root(), reactor), interface="127.0.0.1")
    yield listening.getHost().port
    pytest_twisted.blockon(listening.stopListening())


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def ask(port: int, method: str, path: str) -> Any:
    """One request on its own connection, in a thread: the reactor must keep turning to answer it."""
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    return threads.deferToThread(_exchange, port, request)


@pytest_twisted.ensureDeferred
async def test_get_has_the_body_its_length_and_sites_server_and_date_headers(port) -> None:
    status, headers, body = await ask(port, "GET", "/hello")
    assert (status, body) == (200, b"hello\n")
    assert headers["content-length"] == "6" and headers["content-type"] == "text/plain"
    assert headers["server"].startswith("TwistedWeb/") and headers["date"].endswith(" GMT")


@pytest_twisted.ensureDeferred
async def test_path_segments_are_unquoted_and_a_leaf_takes_what_is_below_it(port) -> None:
    for path in ("/%68ello", "/hello/below", "/hello?x=1"):
        status, _, body = await ask(port, "GET", path)
        assert (status, body) == (200, b"hello\n"), path


@pytest_twisted.ensureDeferred
async def test_head_sends_the_headers_of_get_and_no_body(port) -> None:
    for path, length in (("/hello", "6"), ("/get-only", "15")):
        status, headers, body = await ask(port, "HEAD", path)
        assert (status, headers["content-length"], body) == (200, length, b""), path
    _, headers, _ = await ask(port, "HEAD", "/get-only")
    assert headers["content-type"] == "text/html"  # the default, as Site sent it


@pytest_twisted.ensureDeferred
async def test_an_unknown_path_is_404_with_the_page_escaped(port) -> None:
    status, headers, body = await ask(port, "GET", "/nope/deeper")
    assert (status, body) == (404, NOT_FOUND_PAGE)
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert (await ask(port, "POST", "/nope"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_known_method_the_resource_lacks_is_405_with_allow_an_unknown_one_501(port) -> None:
    status, headers, body = await ask(port, "POST", "/get-only")
    assert status == 405 and headers["allow"] == "GET"
    assert b'with the method "POST".  I only allow the method GET here.' in body
    status, _, body = await ask(port, "PUT", "/hello")
    assert status == 501 and b"I don't know how to treat a PUT request." in body


@pytest_twisted.ensureDeferred
async def test_options_star_is_an_empty_200_and_other_methods_on_star_are_405(port) -> None:
    status, headers, body = await ask(port, "OPTIONS", "*")
    assert (status, headers["content-length"], body) == (200, "0", b"")
    status, headers, _ = await ask(port, "GET", "*")
    assert (status, headers["allow"]) == (405, "OPTIONS")


@pytest_twisted.ensureDeferred
async def test_a_resource_that_raises_is_500_and_its_error_is_logged(port, logged_errors) -> None:
    status, _, body = await ask(port, "GET", "/boom")
    assert status == 500 and b"Processing Failed" in body and b"the resource broke" not in body
    [logged] = logged_errors.flush("the resource broke")
    assert "answering b'GET' b'/boom'" in logged
