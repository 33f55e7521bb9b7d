"""Plain HTTP GETs on the WebSocket port (``/health``, ``/metrics``), and a tiny server.

The link layer only routes: a route is a callable the node provides that
returns ``(status, content_type, body)``; what a body says (Prometheus text,
JSON about the database) is the node's business. A request that is not a
plain GET of a known path is handed on, bytes intact, to the WebSocket
handshake (:class:`ReplayStream`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import trio

__all__ = [
    "MAX_HEAD",
    "HttpResponse",
    "HttpRoute",
    "ReplayStream",
    "answer",
    "plain_get",
    "read_head",
    "respond",
    "serve_http",
    "url_host",
]

log = logging.getLogger("bettensor_ws.http")

HttpResponse = tuple[int, str, bytes]
"""``(status, content_type, body)``."""

HttpRoute = Callable[[], Awaitable[HttpResponse]]

MAX_HEAD = 8192
"""Bytes of a request head read before deciding what it is; a WebSocket upgrade
request from any client we know is far smaller."""

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
            500: "Internal Server Error", 503: "Service Unavailable"}


def url_host(host: str) -> str:
    """``host`` as a URL spells it: an IPv6 address in brackets (``[::]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ReplayStream(trio.abc.Stream):
    """``stream`` with ``prefix`` (bytes already read from it) read again first."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def read_head(stream: trio.abc.Stream, limit: int = MAX_HEAD) -> bytes:
    """Bytes up to the end of the request head (``\\r\\n\\r\\n``), at most ``limit``
    (and whatever else arrived in the same reads), or less at end of stream."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = await stream.receive_some(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def plain_get(head: bytes) -> str | None:
    """The path of a complete GET request head that asks for no upgrade, else None."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = head[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
        return None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return None
    return parts[1].split(b"?", 1)[0].decode("latin-1")


async def answer(stream: trio.abc.Stream, response: HttpResponse) -> None:
    """Send one HTTP/1.1 response and say the connection closes."""
    status, content_type, body = response
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    await stream.send_all(head + body)


async def respond(stream: trio.abc.Stream, path: str, routes: Mapping[str, HttpRoute]) -> None:
    """Answer ``GET path`` from ``routes`` (404 for any other path); a route that
    fails answers 500, logged."""
    route = routes.get(path)
    if route is None and path == "/ws":
        response: HttpResponse = (426, "text/plain; charset=utf-8", b"this is a WebSocket endpoint\n")
    elif route is None:
        response = (404, "text/plain; charset=utf-8", b"not found\n")
    else:
        try:
            response = await route()
        except Exception:
            log.exception("HTTP route %s failed", path)
            response = (500, "text/plain; charset=utf-8", b"internal error\n")
    await answer(stream, response)


async def serve_http(
    routes: Mapping[str, HttpRoute],
    host: str,
    port: int,
    *,
    request_timeout: float = 10.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A minimal HTTP server answering GETs of ``routes`` (the miner's metrics port)."""

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            with trio.fail_after(request_timeout):
                head = await read_head(stream)
                path = plain_get(head)
                if path is None:
                    await answer(stream, (400, "text/plain; charset=utf-8", b"GET only\n"))
                else:
                    await respond(stream, path, routes)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            log.debug("HTTP client dropped or too slow")
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", url_host(host), bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(bound)
