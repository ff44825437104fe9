"""The sidecar process: three listeners, the broker, the subscriptions, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from accord_sidecar import fasthttp, metrics, outcome
from accord_sidecar.auth import Authenticator
from accord_sidecar.broker.nats import Broker, StreamSettings
from accord_sidecar.config import Config
from accord_sidecar.dedup import DedupTable
from accord_sidecar.errors import error
from accord_sidecar.fasthttp import Reply, json_reply
from accord_sidecar.inbound import Inbound
from accord_sidecar.invoke import Invoker
from accord_sidecar.journal import Journal
from accord_sidecar.pubsub import (
    APP_DOWN,
    AppWatch,
    PartitionGroup,
    Publisher,
    Subscriber,
    app_listens,
)
from accord_sidecar.session import LazySession

logger = logging.getLogger("accord.sidecar")
Route = Callable[[Any], Awaitable[Reply]]


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
        self.runners: list[Any] = []  # aiohttp's (ACCORD_HTTP_ENGINE=aiohttp)
        self.servers: list[fasthttp.Server] = []
        self.pool: fasthttp.Pool | None = None
        self.subscribers: list[Subscriber] = []
        self.groups: dict[str, PartitionGroup] = {}  # partitioned subscriptions, by topic
        self.tasks: list[asyncio.Task[None]] = []
        self.session = LazySession()
        self.ports: dict[str, int] = {}

    # -- the three ports' routes (one set for both engines) -----------------------------------
    def _api(self, invoker: Invoker, publisher: Publisher) -> Route:
        """The app-facing port: invoke, publish, shutdown, read-your-writes."""

        async def route(request: Any) -> Reply:
            raw = request.raw_path
            if raw.startswith("/v1/invoke/") and "/" in raw[len("/v1/invoke/") + 1 :]:
                return await invoker.handle(request)
            parts = request.path.split("/")
            method = request.method
            if len(parts) == 4 and parts[1:3] == ["v1", "publish"] and parts[3]:
                if method != "POST":
                    return _not_allowed(method)
                return await publisher.handle(request, parts[3])
            if parts == ["", "v1", "shutdown"]:
                if method != "POST":
                    return _not_allowed(method)
                # For apps in pods without native sidecars (e.g. a Job): ask it to exit.
                self.stop_requested.set()
                return json_reply({"status": "shutting down"}, 202)
            if (
                len(parts) == 5
                and parts[1:3] == ["v1", "subscriptions"]
                and parts[3]
                and (parts[4] == "processed")
            ):
                if method not in ("GET", "HEAD"):
                    return _not_allowed(method)
                return await self._processed(request, parts[3])
            return error(404, "not_found", "Not Found")

        return route

    async def _processed(self, request: Any, topic: str) -> Reply:
        """Read your writes: GET /v1/subscriptions/<topic>/processed?atLeast=S[&timeoutMs=T]
        answers once every event of the topic up to stream sequence S (what /v1/publish
        returned) is settled here, or 504 after T (5000, at most 60000) ms."""
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
            return json_reply({**body, "error": "timeout"}, 504)
        return json_reply(body)

    def _admin(self) -> Route:
        """Metrics, liveness and readiness."""

        async def route(request: Any) -> Reply:
            path = request.path
            if path not in ("/metrics", "/healthz", "/readyz"):
                return error(404, "not_found", "Not Found")
            if request.method not in ("GET", "HEAD"):
                return _not_allowed(request.method)
            if path == "/metrics":
                # Never waits on the broker: the subscriptions keep their lag gauges fresh.
                body = generate_latest(metrics.REGISTRY)
                return Reply(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)
            if path == "/healthz":
                return json_reply({"status": "ok"})
            problems = await self._not_ready()
            if problems:
                return error(503, "not_ready", "; ".join(problems))
            return json_reply({"status": "ready"})

        return route

    async def _not_ready(self) -> list[str]:
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
        problems += [f"subscription {s.topic}: {s.problem}" for s in self.subscribers if s.problem]
        if self.config.app_port is not None and not await app_listens(
            self.config.app_host, self.config.app_port
        ):
            problems.append(f"{APP_DOWN}: app port {self.config.app_port} not reachable")
        return problems

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
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
        fast = c.http_engine == "fast"
        self.pool = fasthttp.Pool() if fast else None
        invoker = Invoker(c, self.session, self.pool)
        inbound = Inbound(
            c, self.session, Authenticator(c, self.session), dedup, journal, self.pool
        )
        publisher = Publisher(c, self.broker)
        ports = (
            ("http", self._api(invoker, publisher), "127.0.0.1", c.http_port),
            ("inbound", inbound.handle, c.bind_host, c.inbound_port),
            ("admin", self._admin(), c.bind_host, c.admin_port),
        )
        if fast:
            limits = fasthttp.Limits(c.max_body_bytes, c.header_timeout_s)
            for name, route, host, port in ports:
                server = fasthttp.Server(route, limits)
                self.ports[name] = await server.start(host, port)
                self.servers.append(server)
        else:
            from accord_sidecar import aiohttp_engine  # the baseline: imports aiohttp

            for name, route, host, port in ports:
                expect = inbound if name == "inbound" else None
                runner, self.ports[name] = await aiohttp_engine.serve(c, route, host, port, expect)
                self.runners.append(runner)
        self.tasks.append(asyncio.create_task(outcome.watch(c, inbound, self.session)))
        if self.broker is not None:
            # In the background: invoke and inbound serve at once, broker or not.
            self.tasks.append(asyncio.create_task(self.broker.connect()))
            app = self.pool.get(c.app_host, c.app_port) if self.pool and c.app_port else None
            watch = AppWatch(c.app_host, c.app_port)  # one app behind every subscription
            for topic in c.subscribe:
                if c.partitions > 1:
                    group = PartitionGroup(
                        c, self.broker, self.session, topic, c.partitions, app, watch=watch
                    )
                    self.groups[topic] = group
                    self.subscribers += group.subscribers
                    self.tasks.append(asyncio.create_task(group.run()))
                    continue
                sub = Subscriber(c, self.broker, self.session, topic, app=app, watch=watch)
                self.subscribers.append(sub)
                self.tasks.append(asyncio.create_task(sub.run()))
        logger.info("accord-sidecar ready: %s", " ".join(f"{k}={v}" for k, v in self.ports.items()))
        print(f"accord-sidecar listening {self.ports}", flush=True)
        # What start made lives as long as the process: out of the collector's way, and
        # collections of the young generation rarer (a request makes short-lived objects).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)

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
        await asyncio.gather(*(s.stop(c.shutdown_grace_s) for s in self.servers))
        for runner in self.runners:
            await runner.cleanup()
        if self.pool is not None:
            self.pool.close()
        if self.broker is not None:
            await self.broker.close()
        await self.session.close()


def _not_allowed(method: str) -> Reply:
    return error(405, "method_not_allowed", f"{method} is not allowed here")


async def serve(config: Config) -> None:
    sidecar = Sidecar(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.stop_requested.set)
    await sidecar.start()
    await sidecar.stop_requested.wait()
    logger.info("shutting down")
    await sidecar.stop()
