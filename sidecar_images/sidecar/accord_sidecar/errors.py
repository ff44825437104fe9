"""One shape for every error the sidecar itself returns: {"error": {"code", "message"}}."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

log = logging.getLogger("accord.sidecar.http")


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def read_body(
    request: web.Request, limit: int, timeout_s: float = 60
) -> bytes | web.Response:
    """The request body; or a 413 when it is over the limit, a 408 when it does not arrive
    within timeout_s (a client trickling its body cannot hold the connection), a 400 when
    the client gave up half-way. Never an error with a traceback in the log."""
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


def _closing(response: web.Response) -> web.Response:
    """A response after which the connection closes (its unread body is not drained)."""
    response.force_close()
    return response


@web.middleware
async def never_crash(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    """Anything unexpected becomes a JSON 500 instead of a dropped connection."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except (ConnectionError, aiohttp.ClientPayloadError) as exc:
        # The client went away mid-request: theirs to retry, nothing for our log's ERRORs.
        log.info("%s %s: client went away (%s)", request.method, request.path, exc)
        return error(400, "client_gone", str(exc) or type(exc).__name__)
    except Exception as exc:
        request.app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal", f"{type(exc).__name__}")
