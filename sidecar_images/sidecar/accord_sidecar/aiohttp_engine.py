"""ACCORD_HTTP_ENGINE=aiohttp: the sidecar's ports on aiohttp's server, the baseline the
benchmarks compare our own (fasthttp) with. The same routes serve both: aiohttp's request
has what they read, and their Reply becomes aiohttp's response here."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from accord_sidecar.config import Config
from accord_sidecar.errors import error
from accord_sidecar.fasthttp import Reply
from accord_sidecar.inbound import Inbound

log = logging.getLogger("accord.sidecar.http")


class _BrokenRequests(logging.Filter):
    """aiohttp logs a request that is not HTTP (or a client that vanished) as an ERROR with
    a traceback. It is the client's fault and already answered 400: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | ConnectionError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "refused a malformed request: %s", (str(exc).strip(),)
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("aiohttp.server").addFilter(_BrokenRequests())


def to_aiohttp(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body)
    for name, value in reply.headers:
        response.headers.add(name, value)
    if reply.close:
        response.force_close()
    return response


async def serve(
    config: Config,
    route: Callable[[Any], Awaitable[Reply]],
    host: str,
    port: int,
    inbound: Inbound | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `route` for every path and method: (the runner, the port it listens on).
    `inbound`: the inbound port's, which authenticates before it says 100 Continue."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return to_aiohttp(await route(request))
        except (ConnectionError, aiohttp.ClientPayloadError) as exc:
            # The client went away mid-request: theirs to retry, nothing for the ERRORs.
            log.info("%s %s: client went away (%s)", request.method, request.path, exc)
            return to_aiohttp(error(400, "client_gone", str(exc) or type(exc).__name__))
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return to_aiohttp(error(500, "internal", type(exc).__name__))

    async def expect(request: web.Request) -> web.StreamResponse | None:
        """Expect: 100-continue: the caller is authenticated before it sends its body."""
        assert inbound is not None
        verdict = await inbound.auth.check(request.headers.get("Authorization"))
        if verdict.status != 200:
            response = to_aiohttp(inbound.refused(verdict))
            response.force_close()  # its body was never asked for
            return response
        if request.headers.get("Expect", "").lower() != "100-continue":
            return to_aiohttp(error(417, "expectation_failed", "only Expect: 100-continue"))
        if request.version == aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    app = web.Application(client_max_size=config.max_body_bytes)
    app.router.add_route(
        "*", r"/{path:[\s\S]*}", handler, expect_handler=expect if inbound else None
    )
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.shutdown_grace_s,
        # Headers must arrive within this (aiohttp closes a connection still idle or
        # half-way through its headers at keep-alive expiry): no slowloris.
        keepalive_timeout=config.header_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []
    return runner, sockets[0].getsockname()[1] if sockets else port
