"""NATS JetStream: one stream for every Accord topic, durable pull consumers per subscription.

Topic `orders.events` is subject `accord.orders.events` in stream ACCORD; `<topic>.dlq` is
the dead-letter topic. Publishes carry Nats-Msg-Id = the CloudEvent id, so JetStream's
duplicate window drops a re-published event.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

logger = logging.getLogger("accord.sidecar.broker")

STREAM = "ACCORD"
PREFIX = "accord."
DUPLICATE_WINDOW_S = 120


def subject(topic: str) -> str:
    return PREFIX + topic


def durable_name(app_id: str, topic: str) -> str:
    # Durable names may not contain '.', '*', '>' or whitespace.
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{app_id}-{topic}")[:200]


class BrokerUnavailable(Exception):
    """The broker did not acknowledge in time (disconnected or overloaded)."""


class Broker:
    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, timeout: float = 30.0) -> None:
        async def disconnected() -> None:
            logger.warning("disconnected from NATS; reconnecting")

        async def reconnected() -> None:
            logger.info("reconnected to NATS")

        async def error(exc: Exception) -> None:
            logger.debug("NATS: %s", exc)

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                self.nc = await nats.connect(
                    self.url,
                    max_reconnect_attempts=-1,  # forever: a broker restart must not kill us
                    reconnect_time_wait=0.25,
                    connect_timeout=2,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                    name="accord-sidecar",
                )
                break
            except Exception as exc:  # nats raises several unrelated types on refusal
                if asyncio.get_running_loop().time() > deadline:
                    raise BrokerUnavailable(f"cannot connect to {self.url}: {exc}") from exc
                await asyncio.sleep(0.5)
        self.js = self.nc.jetstream()
        await self.ensure_stream()

    async def ensure_stream(self) -> None:
        assert self.js is not None
        try:
            await self.js.stream_info(STREAM)
        except NotFoundError:
            await self.js.add_stream(
                api.StreamConfig(
                    name=STREAM,
                    subjects=[PREFIX + ">"],
                    storage=api.StorageType.FILE,
                    duplicate_window=DUPLICATE_WINDOW_S,
                )
            )

    async def publish(
        self, topic: str, data: bytes, msg_id: str, headers: dict[str, str], timeout: float = 5.0
    ) -> api.PubAck:
        """Publish and wait for JetStream's ack; retried across reconnects until timeout."""
        assert self.js is not None
        deadline = asyncio.get_running_loop().time() + timeout
        delay = 0.05
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return await self.js.publish(
                    subject(topic),
                    data,
                    timeout=max(0.1, min(remaining, 2.0)),
                    headers={**headers, "Nats-Msg-Id": msg_id},
                )
            except Exception as exc:
                if asyncio.get_running_loop().time() + delay >= deadline:
                    raise BrokerUnavailable(
                        f"broker did not acknowledge: {exc or type(exc).__name__}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def pull(
        self, topic: str, durable: str, max_ack_pending: int, ack_wait_s: float = 30
    ) -> Any:
        """A durable pull consumer. ack_wait_s: how long an unacked event (its sidecar died
        mid-delivery) waits before JetStream delivers it again."""
        assert self.js is not None
        return await self.js.pull_subscribe(
            subject(topic),
            durable=durable,
            stream=STREAM,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                max_ack_pending=max_ack_pending,
                ack_wait=ack_wait_s,
                max_deliver=-1,  # the sidecar dead-letters itself, with the failure reason
            ),
        )

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except Exception:  # a broker that is down cannot be drained
                await self.nc.close()
