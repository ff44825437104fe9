"""A slow network link for tests: an HTTP relay that holds requests for some paths before
passing them on, and passes them on even when the caller has given up (as a congested
network or a retransmitting proxy does). Run as its own process:

    python tests/support/slow_link.py --port P --target http://127.0.0.1:T --hold /charge=3000
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp
from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--hold", action="append", default=[], help="PATH=MILLISECONDS")
    args = parser.parse_args()
    holds = {p: int(ms) / 1000 for p, ms in (h.split("=", 1) for h in args.hold)}
    background: set[asyncio.Task[Any]] = set()

    async def relay(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        session: aiohttp.ClientSession = request.app["session"]

        async def pass_on() -> tuple[int, bytes, dict[str, str]]:
            await asyncio.sleep(holds.get(request.path, 0))
            async with session.request(
                request.method, args.target + request.path_qs, data=body, headers=headers
            ) as r:
                out = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
                return r.status, await r.read(), out

        task = asyncio.ensure_future(pass_on())  # goes on if the caller hangs up
        background.add(task)
        task.add_done_callback(background.discard)
        status, data, out = await asyncio.shield(task)
        return web.Response(status=status, body=data, headers=out)

    async def session_ctx(app: web.Application) -> Any:
        app["session"] = aiohttp.ClientSession()
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
