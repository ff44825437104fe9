"""One shape for every error the sidecar itself returns: {"error": {"code", "message"}}."""

from __future__ import annotations

from aiohttp import web


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def read_body(request: web.Request, limit: int) -> bytes | web.Response:
    """The request body, or a 413 error response when it is over the limit."""
    if not request.body_exists:
        return b""
    if request.content_length is not None and request.content_length > limit:
        return error(413, "body_too_large", f"body is over the {limit}-byte limit")
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return error(413, "body_too_large", f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@web.middleware
async def never_crash(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    """Anything unexpected becomes a JSON 500 instead of a dropped connection."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except Exception as exc:
        request.app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal", f"{type(exc).__name__}")
