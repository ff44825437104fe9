"""A minimal HTTP app for benchmarks: answers every request with 200 and counts events.
Plain asyncio protocols over httptools on uvloop, so that the app costs little beside the
sidecar being measured (an aiohttp app spent more per event than the sidecar did).

python bench/sink.py --port 8099      GET /_count -> {"events": N, "unique": M}
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httptools
import uvloop

seen: set[str] = set()
counts = {"events": 0}


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.url.startswith(b"/events/"):
            self._count(b"".join(self.body))
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            return
        if self.url == b"/_count":
            body = json.dumps({"events": counts["events"], "unique": len(seen)}).encode()
        else:
            body = b"pong"
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    @staticmethod
    def _count(raw: bytes) -> None:
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = None
        events = parsed if isinstance(parsed, list) else [parsed]  # a CloudEvents batch, or one
        counts["events"] += len(events)
        seen.update(e["id"] for e in events if isinstance(e, dict) and "id" in e)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
