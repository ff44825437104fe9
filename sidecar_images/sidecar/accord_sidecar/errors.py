"""One shape for every error the sidecar itself returns: {"error": {"code", "message"}}."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from accord_sidecar import fasthttp
from accord_sidecar.fasthttp import Reply

log = logging.getLogger("accord.sidecar.http")


def error(status: int, code: str, message: str) -> Reply:
    return fasthttp.error_reply(status, code, message)


async def read_body(request: Any, limit: int, timeout_s: float = 60) -> bytes | Reply:
    """The request body; or a 413 when it is over the limit, a 408 when it does not arrive
    within timeout_s (a client trickling its body cannot hold the connection), a 400 when
    the client gave up half-way. Never an error with a traceback in the log."""
    if isinstance(request, fasthttp.Request):
        try:
            return await request.read(limit, timeout_s)
        except fasthttp.BodyError as exc:
            return _closing(error(exc.status, exc.code, exc.message))
    import aiohttp  # an aiohttp request (ACCORD_HTTP_ENGINE=aiohttp): aiohttp is loaded

    if not request.body_exists:
        return b""
    if request.content_length is not None and request.content_length > limit:
        return _closing(error(413, "body_too_large", f"body is over the {limit}-byte limit"))
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    return _closing(
                        error(413, "body_too_large", f"body is over the {limit}-byte limit")
                    )
                chunks.append(chunk)
    except TimeoutError:
        log.info("%s %s: body not received within %ss", request.method, request.path, timeout_s)
        return _closing(error(408, "body_timeout", f"the body did not arrive within {timeout_s}s"))
    except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError) as exc:
        log.info("%s %s: client gave up sending its body (%s)", request.method, request.path, exc)
        return _closing(error(400, "body_incomplete", "the body ended before its length"))
    return b"".join(chunks)


def _closing(reply: Reply) -> Reply:
    """A response after which the connection closes (its unread body is not drained)."""
    reply.close = True
    return reply
