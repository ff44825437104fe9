"""A minimal HTTP app for benchmarks: answers every request with 200 and counts events.

python bench/sink.py --port 8099      GET /_count -> {"events": N, "unique": M}
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    seen: set[str] = set()
    counts = {"events": 0}

    async def event(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        events = parsed if isinstance(parsed, list) else [parsed]  # a CloudEvents batch, or one
        counts["events"] += len(events)
        seen.update(e["id"] for e in events if isinstance(e, dict) and "id" in e)
        return web.Response(status=204)

    async def count(_: web.Request) -> web.Response:
        return web.json_response({"events": counts["events"], "unique": len(seen)})

    async def ping(_: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_post("/events/{topic}", event)
    app.router.add_get("/_count", count)
    app.router.add_route("*", "/{path:.*}", ping)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
