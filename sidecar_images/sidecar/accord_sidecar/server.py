"""The sidecar process: three listeners, the broker, the subscriptions, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from accord_sidecar import metrics, outcome
from accord_sidecar.auth import Authenticator
from accord_sidecar.broker.nats import Broker, StreamSettings
from accord_sidecar.config import Config
from accord_sidecar.dedup import DedupTable
from accord_sidecar.errors import error, never_crash
from accord_sidecar.inbound import Inbound
from accord_sidecar.invoke import Invoker
from accord_sidecar.journal import Journal
from accord_sidecar.pubsub import PartitionGroup, Publisher, Subscriber

logger = logging.getLogger("accord.sidecar")


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


class Sidecar:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.broker = (
            Broker(
                config.nats_url,
                StreamSettings(
                    max_age_s=config.stream_max_age_s,
                    max_bytes=config.stream_max_bytes,
                    replicas=config.stream_replicas,
                    storage=config.stream_storage,
                    new_consumers_start=config.new_subscriptions_start,
                ),
            )
            if config.nats_url
            else None
        )
        self.stop_requested = asyncio.Event()
        self.runners: list[web.AppRunner] = []
        self.subscribers: list[Subscriber] = []
        self.groups: dict[str, PartitionGroup] = {}  # partitioned subscriptions, by topic
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None
        self.ports: dict[str, int] = {}

    # -- the three apps ----------------------------------------------------------------------
    def _app_api(self, invoker: Invoker, publisher: Publisher) -> web.Application:
        app = web.Application(middlewares=[never_crash], client_max_size=self.config.max_body_bytes)
        app.router.add_route("*", r"/v1/invoke/{service}/{path:[\s\S]*}", invoker.handle)
        app.router.add_post("/v1/publish/{topic}", publisher.handle)

        async def shutdown(_: web.Request) -> web.Response:
            # For apps in pods without native sidecars (e.g. a Job): ask the sidecar to exit.
            self.stop_requested.set()
            return web.json_response({"status": "shutting down"}, status=202)

        app.router.add_post("/v1/shutdown", shutdown)
        app.router.add_get("/v1/subscriptions/{topic}/processed", self._processed)
        return app

    async def _processed(self, request: web.Request) -> web.Response:
        """Read your writes: GET /v1/subscriptions/<topic>/processed?atLeast=S[&timeoutMs=T]
        answers once every event of the topic up to stream sequence S (what /v1/publish
        returned) is settled here, or 504 after T (5000, at most 60000) ms."""
        topic = request.match_info["topic"]
        sub: Subscriber | PartitionGroup | None = self.groups.get(topic) or next(
            (s for s in self.subscribers if s.topic == topic), None
        )
        if sub is None:
            return error(404, "not_subscribed", f"this sidecar does not subscribe to {topic!r}")
        try:
            at_least = int(request.query.get("atLeast", "0"))
            timeout_ms = int(request.query.get("timeoutMs", "5000"))
        except ValueError:
            return error(400, "bad_request", "atLeast and timeoutMs are whole numbers")
        if at_least < 0 or not 0 <= timeout_ms <= 60_000:
            return error(400, "bad_request", "atLeast >= 0 and 0 <= timeoutMs <= 60000")
        reached, position = await sub.processed(at_least, timeout_ms / 1000)
        body = {"topic": topic, "processed": position, "atLeast": at_least}
        if not reached:
            return web.json_response({**body, "error": "timeout"}, status=504)
        return web.json_response(body)

    def _inbound(self, inbound: Inbound) -> web.Application:
        app = web.Application(middlewares=[never_crash], client_max_size=self.config.max_body_bytes)
        app.router.add_route("*", r"/{path:[\s\S]*}", inbound.handle, expect_handler=inbound.expect)
        return app

    def _admin(self) -> web.Application:
        async def prometheus(_: web.Request) -> web.Response:
            # Never waits on the broker: the subscriptions keep their lag gauges fresh.
            return web.Response(
                body=generate_latest(metrics.REGISTRY),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            problems = []
            if self.stop_requested.is_set():
                problems.append("shutting down")
            if self.broker is not None:
                if not self.broker.connected:
                    problems.append(
                        f"pub/sub: {self.broker.problem or 'broker not connected'} "
                        "(invoke and inbound calls work)"
                    )
                elif self.broker.problem:
                    problems.append(f"pub/sub: {self.broker.problem}")
            problems += [
                f"subscription {s.topic}: {s.problem}" for s in self.subscribers if s.problem
            ]
            if self.config.app_port is not None and not await self._app_reachable():
                problems.append(f"app port {self.config.app_port} not reachable")
            if problems:
                return error(503, "not_ready", "; ".join(problems))
            return web.json_response({"status": "ready"})

        app = web.Application(middlewares=[never_crash])
        app.router.add_get("/metrics", prometheus)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app

    async def _app_reachable(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.config.app_host, self.config.app_port), timeout=1
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
        )
        dedup_path = Path(c.data_dir) / "dedup.jsonl" if c.data_dir else None
        if dedup_path is not None:
            dedup_path.parent.mkdir(parents=True, exist_ok=True)
        dedup = DedupTable(c.dedup_max_entries, c.dedup_ttl_s, dedup_path)
        journal = Journal(
            Path(c.data_dir) / "journal.jsonl" if c.data_dir else None,
            c.journal_retention_s,
            c.journal_max_entries,
        )
        metrics.configure([*c.services, *c.targets], c.subscribe)
        invoker = Invoker(c, self.session)
        inbound = Inbound(c, self.session, Authenticator(c, self.session), dedup, journal)
        publisher = Publisher(c, self.broker)
        for name, app, host, port in (
            ("http", self._app_api(invoker, publisher), "127.0.0.1", c.http_port),
            ("inbound", self._inbound(inbound), c.bind_host, c.inbound_port),
            ("admin", self._admin(), c.bind_host, c.admin_port),
        ):
            runner = web.AppRunner(
                app,
                access_log=None,
                shutdown_timeout=c.shutdown_grace_s,
                # Headers must arrive within this (aiohttp closes a connection still idle
                # or half-way through its headers at keep-alive expiry): no slowloris.
                keepalive_timeout=c.header_timeout_s,
            )
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            self.runners.append(runner)
            sockets = site._server.sockets if site._server else []
            self.ports[name] = sockets[0].getsockname()[1] if sockets else port
        self.tasks.append(asyncio.create_task(outcome.watch(c, inbound, self.session)))
        if self.broker is not None:
            # In the background: invoke and inbound serve at once, broker or not.
            self.tasks.append(asyncio.create_task(self.broker.connect()))
            for topic in c.subscribe:
                if c.partitions > 1:
                    group = PartitionGroup(c, self.broker, self.session, topic, c.partitions)
                    self.groups[topic] = group
                    self.subscribers += group.subscribers
                    self.tasks.append(asyncio.create_task(group.run()))
                    continue
                sub = Subscriber(c, self.broker, self.session, topic)
                self.subscribers.append(sub)
                self.tasks.append(asyncio.create_task(sub.run()))
        logger.info("accord-sidecar ready: %s", " ".join(f"{k}={v}" for k, v in self.ports.items()))
        print(f"accord-sidecar listening {self.ports}", flush=True)

    async def stop(self) -> None:
        """Stop taking work, finish deliveries in flight, close the broker cleanly."""
        c = self.config
        for sub in self.subscribers:
            sub.stopping.set()
        await asyncio.gather(
            *(s.stop(c.shutdown_grace_s) for s in self.subscribers),
            *(g.stop(c.shutdown_grace_s) for g in self.groups.values()),
        )
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for runner in self.runners:
            await runner.cleanup()
        if self.broker is not None:
            await self.broker.close()
        if self.session is not None:
            await self.session.close()


async def serve(config: Config) -> None:
    sidecar = Sidecar(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.stop_requested.set)
    await sidecar.start()
    await sidecar.stop_requested.wait()
    logger.info("shutting down")
    await sidecar.stop()
