"""accord-sidecar: the command line.

So far it serves the admin port (/healthz, /readyz, /metrics); the app-facing, inbound and
broker parts land with the sidecar issue.
"""

from __future__ import annotations

import argparse
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Info, generate_latest

from accord_sidecar import __version__


def _admin_app() -> web.Application:
    registry = CollectorRegistry()
    Info("accord_sidecar_build", "Version of the running sidecar.", registry=registry).info(
        {"version": __version__}
    )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accord-sidecar")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--admin-port",
        type=int,
        default=int(os.environ.get("ACCORD_ADMIN_PORT", "9090")),
        help="port of /metrics, /healthz and /readyz (env ACCORD_ADMIN_PORT, default 9090)",
    )
    args = parser.parse_args(argv)
    web.run_app(_admin_app(), host="0.0.0.0", port=args.admin_port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
