"""Sample participant services for the saga demo: inventory, payment, shipping.

    python examples/services/shop.py --role payment --port 8082

Each speaks the saga wire contract (POST JSON {"input", "outputs"}; 2xx = done, JSON body
= the step's output) and deduplicates by Accord-Idempotency-Key, as participants must.
Payment declines orders over 1,000.00 (amountCents > 100000) with a 402: a business
refusal, which makes the saga compensate. `POST /_limit {"declineAboveCents": N}` (on the
app's own port, so from inside the pod only) changes that limit, as an operator raising a
customer's credit limit would.

With `--events TOPIC` each answered call is also published, through the sidecar
(ACCORD_SIDECAR_URL), as a domain event {"orderId", "role", "action", "status"} keyed by the
order (partition key) with the saga call's idempotency key as its id: what an order-summary
projection reads (examples/projection-order-summary.yaml). A call whose event cannot be
published gets a 503, so the saga retries it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Any

from aiohttp import ClientError, ClientSession, web

DECLINE_ABOVE_CENTS = 100_000


def answer(
    role: str,
    path: str,
    body: dict[str, Any],
    ids: itertools.count[int],
    limit: int = DECLINE_ABOVE_CENTS,
) -> tuple[int, dict[str, Any]]:
    order = (body.get("input") or {}).get("orderId", "?")
    if role == "payment" and path == "/charge":
        amount = int((body.get("input") or {}).get("amountCents", 0))
        if amount > limit:
            return 402, {
                "error": f"card declined for order {order}: {amount / 100:.2f} is over the limit"
            }
        return 200, {"chargeId": f"ch_{next(ids)}", "amountCents": amount}
    results = {
        ("inventory", "/reserve"): lambda: {"reservationId": f"rsv_{next(ids)}", "order": order},
        ("inventory", "/release"): lambda: {"released": True, "order": order},
        ("payment", "/refund"): lambda: {"refunded": True, "order": order},
        ("shipping", "/ship"): lambda: {"tracking": f"TRK{next(ids):06d}", "order": order},
        ("shipping", "/recall"): lambda: {"recalled": True, "order": order},
    }
    make = results.get((role, path))
    if make is None:
        return 200, {"ok": True, "role": role, "path": path}
    return 200, make()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--role", required=True, choices=["inventory", "payment", "shipping", "generic"]
    )
    # Loopback: behind its sidecar, only the sidecar reaches the app.
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", metavar="TOPIC", help="publish each answered call here")
    args = parser.parse_args()
    sidecar = os.environ.get("ACCORD_SIDECAR_URL", "http://127.0.0.1:3500")
    ids = itertools.count(1)
    done: dict[str, tuple[int, dict[str, Any]]] = {}
    limit = {"declineAboveCents": DECLINE_ABOVE_CENTS}

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/_limit":
            limit["declineAboveCents"] = int((await request.json())["declineAboveCents"])
            return web.json_response(limit)
        key = request.headers.get("Accord-Idempotency-Key")
        if key and key in done:
            status, payload = done[key]
            return web.json_response(payload, status=status, headers={"Accord-Replayed": "true"})
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        status, payload = answer(
            args.role,
            request.path,
            body if isinstance(body, dict) else {},
            ids,
            limit["declineAboveCents"],
        )
        if args.events and not await publish(request.path, body, status, key):
            return web.json_response({"error": "could not publish the event; retry"}, status=503)
        if key:
            done[key] = (status, payload)
        print(f"{args.role}: {request.path} -> {status} {json.dumps(payload)}", flush=True)
        return web.json_response(payload, status=status)

    async def publish(path: str, body: Any, status: int, key: str | None) -> bool:
        order = str(((body if isinstance(body, dict) else {}).get("input") or {}).get("orderId"))
        event = {"orderId": order, "role": args.role, "action": path.strip("/"),
                 "status": "done" if status < 300 else "refused"}  # fmt: skip
        headers = {"Accord-Partition-Key": order}
        if key:
            headers["Accord-Idempotency-Key"] = key  # a retried call: the same event
        try:
            async with (
                ClientSession() as session,
                session.post(
                    f"{sidecar}/v1/publish/{args.events}", json=event, headers=headers
                ) as r,
            ):
                return r.status == 200
        except ClientError:
            return False

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
