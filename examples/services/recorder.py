"""A small real participant service for demos and tests: it records every call it gets and
can be told to misbehave, so tests can check what actually reached it.

    python examples/services/recorder.py --port 8081 [--name inventory]

GET  /_calls                     every call recorded: method, path, headers, body
POST /_behave {"rules": [...]}   how to answer, first matching rule wins:
     {"path": "/flaky", "fail": 2, "status": 503, "retryAfter": "1"}   fail the first 2 calls
     {"path": "/events/orders", "fail": 3, "status": 500}              per event id for events
     {"path": "/events/orders", "id": "e-1", "status": 500}             only event e-1
     {"path": "/events/orders", "reply": {"status": "DROP"}}
     {"path": "/slow", "delayMs": 2000}
     {"path": "/charge", "status": 402, "body": {"error": "declined"}}
anything else                    200 with {"ok": true, "path": ..., "n": <call number>}

Like any well-behaved participant it deduplicates: a call carrying an Accord-Idempotency-Key
it has already answered (below 500) gets the same answer again with Accord-Replayed: true
(as the sidecar does), recorded with "replayed": true, and no rule is consulted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, Any]] = []
        self.rules: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        self.answers: dict[str, tuple[int, Any]] = {}
        self.active = 0  # calls being answered right now

    async def control(self, request: web.Request) -> web.Response:
        if request.method == "GET" and request.path == "/_calls":
            return web.json_response(self.calls)
        payload = await request.json()
        self.rules = list(payload.get("rules", []))
        if payload.get("reset"):
            self.calls.clear()
            self.seen.clear()
            self.answers.clear()
        return web.json_response({"rules": self.rules})

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/_"):
            return await self.control(request)
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        call = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,  # as sent: what a proxy in front must not change
            "query": request.query_string,
            "headers": dict(request.headers),
            "body": body,
            "concurrent": self.active,  # other calls in progress when this one arrived
        }
        self.calls.append(call)
        idem = request.headers.get("Accord-Idempotency-Key")
        if idem and idem in self.answers:
            call["replayed"] = True
            status, payload = self.answers[idem]
            call["status"] = status
            return web.json_response(payload, status=status, headers={"Accord-Replayed": "true"})
        self.active += 1
        try:
            response = await self._answer(request, body)
        finally:
            self.active -= 1
        call["status"] = response.status
        if idem and response.status < 500 and response.status not in (408, 409, 429):
            assert isinstance(response.body, bytes)
            self.answers[idem] = (response.status, json.loads(response.body))
        return response

    async def _answer(self, request: web.Request, body: Any) -> web.Response:
        # Events are counted per event id, so "fail 3" means 3 deliveries of each event.
        key = request.path
        if isinstance(body, dict) and request.path.startswith("/events/") and "id" in body:
            key = f"{request.path}#{body['id']}"
        self.seen[key] += 1
        n = self.seen[key]
        for rule in self.rules:
            if rule.get("path") not in (None, request.path):
                continue
            if "id" in rule and not (isinstance(body, dict) and body.get("id") == rule["id"]):
                continue  # a rule for one event only
            if "fail" in rule and n > rule["fail"]:
                continue
            if "delayMs" in rule:
                await asyncio.sleep(rule["delayMs"] / 1000)
                if not {"reply", "status"} & rule.keys():
                    break
            headers = {"Retry-After": str(rule["retryAfter"])} if "retryAfter" in rule else {}
            if "reply" in rule:
                status = rule.get("status", 200)
                return web.json_response(rule["reply"], status=status, headers=headers)
            if "status" in rule:
                return web.json_response(
                    rule.get("body", {"error": "told to fail"}),
                    status=rule["status"],
                    headers=headers,
                )
        return web.json_response({"ok": True, "service": self.name, "path": request.path, "n": n})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="recorder")
    args = parser.parse_args()
    recorder = Recorder(args.name)
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", r"/{path:[\s\S]*}", recorder.handle)
    print(f"{args.name} listening on {args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
