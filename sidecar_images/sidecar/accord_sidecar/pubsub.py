"""Publish (POST /v1/publish/<topic>) and subscriptions that deliver to the app."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import aiohttp
from aiohttp import web

from accord_sidecar import metrics
from accord_sidecar.broker.nats import Broker, BrokerUnavailable, durable_name
from accord_sidecar.cloudevents import BATCH, STRUCTURED, EnvelopeError, batch, envelope
from accord_sidecar.config import TOPIC, Config
from accord_sidecar.errors import error, read_body

logger = logging.getLogger("accord.sidecar.pubsub")
BATCH_LIMIT = 1000


class Publisher:
    def __init__(self, config: Config, broker: Broker | None) -> None:
        self.config = config
        self.broker = broker

    async def handle(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        if not TOPIC.match(topic) or len(topic) > 200 or topic.endswith(".dlq"):
            return error(
                400,
                "invalid_topic",
                f"{topic!r} is not a topic (letters, digits, '_' and '-' in '.'-separated tokens; "
                "not a .dlq topic)",
            )
        if self.broker is None:
            return error(503, "no_broker", "this sidecar has no broker (ACCORD_NATS_URL)")
        body = await read_body(request, self.config.max_body_bytes)
        if isinstance(body, web.Response):
            return body
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == BATCH:
            return await self._batch(topic, body)
        try:
            event = envelope(
                topic,
                body,
                request.headers,
                source=f"accord://{self.config.namespace}/{self.config.app_id}",
            )
        except EnvelopeError as exc:
            metrics.PUBLISHED.labels(topic, "invalid").inc()
            return error(400, "invalid_event", str(exc))
        try:
            ack = await self.broker.publish(
                topic, json.dumps(event).encode(), event["id"], {"Content-Type": STRUCTURED}
            )
        except BrokerUnavailable as exc:
            metrics.PUBLISHED.labels(topic, "unavailable").inc()
            return error(503, "broker_unavailable", str(exc))
        metrics.PUBLISHED.labels(topic, "duplicate" if ack.duplicate else "ok").inc()
        return web.json_response(
            {"id": event["id"], "sequence": ack.seq, "duplicate": bool(ack.duplicate)}
        )

    async def _batch(self, topic: str, body: bytes) -> web.Response:
        """CloudEvents batch mode: all events stored, or a 503 the app retries whole
        (the broker drops the ones already stored, by id)."""
        assert self.broker is not None
        try:
            events = batch(topic, body, BATCH_LIMIT)
        except EnvelopeError as exc:
            metrics.PUBLISHED.labels(topic, "invalid").inc()
            return error(400, "invalid_event", str(exc))
        results = await asyncio.gather(
            *(
                self.broker.publish(
                    topic, json.dumps(e).encode(), e["id"], {"Content-Type": STRUCTURED}
                )
                for e in events
            ),
            return_exceptions=True,
        )
        failed = [
            e["id"] for e, r in zip(events, results, strict=True) if isinstance(r, BaseException)
        ]
        if failed:
            metrics.PUBLISHED.labels(topic, "unavailable").inc(len(failed))
            return error(
                503,
                "broker_unavailable",
                f"{len(failed)} of {len(events)} events not stored; "
                "publish the batch again (stored ids are dropped as duplicates)",
            )
        out = []
        for e, ack in zip(events, results, strict=True):
            assert not isinstance(ack, BaseException)
            metrics.PUBLISHED.labels(topic, "duplicate" if ack.duplicate else "ok").inc()
            out.append({"id": e["id"], "sequence": ack.seq, "duplicate": bool(ack.duplicate)})
        return web.json_response({"results": out})


class Subscriber:
    """One durable pull consumer for one topic, delivering to POST /events/<topic>.

    2xx (or {"status": "SUCCESS"}) acks; {"status": "DROP"} acks without processing;
    anything else is redelivered with backoff, and the last failure after max deliveries
    goes to <topic>.dlq with the reason. With concurrency 1 (the default) a failing event
    holds back the ones after it: delivery stays ordered per subject.
    """

    def __init__(
        self, config: Config, broker: Broker, session: aiohttp.ClientSession, topic: str
    ) -> None:
        self.config = config
        self.broker = broker
        self.session = session
        self.topic = topic
        self.stopping = asyncio.Event()
        self.in_flight: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    async def run(self) -> None:
        durable = durable_name(self.config.app_id, self.topic)
        bulk = self.config.bulk_max
        while not self.stopping.is_set():
            try:
                if self._sub is None:
                    self._sub = await self.broker.pull(
                        self.topic,
                        durable,
                        self.config.concurrency * bulk,
                        # A delivery outlives this only if the app hangs past its timeout.
                        ack_wait_s=self.config.timeout_ms / 1000 + 5,
                    )
                free = self.config.concurrency - len(self.in_flight)
                if free <= 0:
                    await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                msgs = await self._sub.fetch(batch=free * bulk, timeout=1)
            except TimeoutError:
                continue
            except Exception as exc:  # broker away: keep trying, never die
                if self.stopping.is_set():
                    break
                logger.warning("subscription %s: %s", self.topic, exc or type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for i in range(0, len(msgs), bulk):
                task = asyncio.create_task(self._deliver(msgs[i : i + bulk]))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            if self.config.concurrency == 1 and self.in_flight:
                await asyncio.wait(self.in_flight)

    async def stop(self, grace_s: float) -> None:
        """Stop fetching, let deliveries in flight finish; unacked events stay on the broker."""
        self.stopping.set()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=grace_s)

    async def lag(self) -> None:
        if self._sub is None:
            return
        try:
            info = await self._sub.consumer_info()
        except Exception:
            return
        metrics.CONSUMER_LAG.labels(self.topic).set(info.num_pending + info.num_ack_pending)

    def _backoff(self, delivered: int) -> float:
        cap = min(
            self.config.redelivery_max_ms, self.config.redelivery_initial_ms * 2 ** (delivered - 1)
        )
        return (cap / 2 + random.random() * cap / 2) / 1000  # equal jitter: never zero

    async def _deliver(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                metrics.REDELIVERIES.labels(self.topic).inc()
        if len(msgs) == 1 and self.config.bulk_max == 1:
            outcomes = [await self._post(msgs[0].data)]
        else:
            outcomes = await self._post_bulk(msgs)
        await asyncio.gather(
            *(self._settle(m, o, r) for m, (o, r) in zip(msgs, outcomes, strict=True))
        )

    async def _settle(self, msg: Any, outcome: str, reason: str) -> None:
        delivered = msg.metadata.num_delivered
        metrics.DELIVERIES.labels(self.topic, outcome).inc()
        try:
            if outcome in ("success", "drop"):
                await msg.ack()
            elif delivered >= self.config.max_deliveries:
                await self._dead_letter(msg, reason, delivered)
                await msg.ack()
            else:
                await msg.nak(delay=self._backoff(delivered))
        except Exception as exc:
            logger.warning("subscription %s: could not settle event: %s", self.topic, exc)

    async def _post_bulk(self, msgs: list[Any]) -> list[tuple[str, str]]:
        """Bulk delivery: one POST of a CloudEvents batch; the app may answer per event with
        {"statuses": [{"id": ..., "status": "SUCCESS" | "RETRY" | "DROP"}]}."""
        events, ids = [], []
        for m in msgs:
            try:
                event = json.loads(m.data)
            except (ValueError, UnicodeDecodeError):
                event = {"data_base64": m.data.hex()}
            events.append(event)
            ids.append(str(event.get("id", "")) if isinstance(event, dict) else "")
        url = f"http://{self.config.app_host}:{self.config.app_port}/events/{self.topic}"
        try:
            async with self.session.post(
                url,
                data=json.dumps(events),
                headers={"Content-Type": BATCH},
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_ms / 1000),
            ) as r:
                body = await r.read()
                if not 200 <= r.status < 300:
                    why = f"app answered HTTP {r.status}: {body[:200].decode(errors='replace')}"
                    return [("retry", why)] * len(msgs)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return [("retry", f"app unreachable: {exc or type(exc).__name__}")] * len(msgs)
        try:
            answer = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            answer = {}
        statuses = answer.get("statuses") if isinstance(answer, dict) else None
        if not isinstance(statuses, list):
            return [("success", "")] * len(msgs)
        by_id = {
            str(x.get("id")): str(x.get("status", "")).upper()
            for x in statuses
            if isinstance(x, dict)
        }
        out = []
        for event_id in ids:
            status = by_id.get(event_id, "RETRY")  # not answered for: not done
            out.append(
                {"SUCCESS": ("success", ""), "DROP": ("drop", "app dropped it")}.get(
                    status,
                    (
                        "retry",
                        "app asked to retry" if status == "RETRY" else "app did not answer for it",
                    ),
                )
            )
        return out

    async def _post(self, data: bytes) -> tuple[str, str]:
        url = f"http://{self.config.app_host}:{self.config.app_port}/events/{self.topic}"
        try:
            async with self.session.post(
                url,
                data=data,
                headers={"Content-Type": STRUCTURED},
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_ms / 1000),
            ) as r:
                body = await r.read()
                if not 200 <= r.status < 300:
                    return (
                        "retry",
                        f"app answered HTTP {r.status}: {body[:200].decode(errors='replace')}",
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return "retry", f"app unreachable: {exc or type(exc).__name__}"
        status = ""
        if body:
            try:
                parsed = json.loads(body)
                status = str(parsed.get("status", "")).upper() if isinstance(parsed, dict) else ""
            except (ValueError, UnicodeDecodeError):
                status = ""
        if status == "RETRY":
            return "retry", "app asked to retry"
        if status == "DROP":
            return "drop", "app dropped it"
        return "success", ""

    async def _dead_letter(self, msg: Any, reason: str, delivered: int) -> None:
        try:
            event = json.loads(msg.data)
            event_id = str(event.get("id", ""))
        except (ValueError, UnicodeDecodeError, AttributeError):
            event, event_id = {"data_base64": msg.data.hex()}, ""
        dead = {
            **(event if isinstance(event, dict) else {}),
            "topic": f"{self.topic}.dlq",
            "deadletterreason": reason[:1000],
            "deadletterdeliveries": delivered,
            "deadlettertopic": self.topic,
        }
        dlq_id = f"dlq-{event_id or msg.metadata.sequence.stream}"
        await self.broker.publish(
            f"{self.topic}.dlq", json.dumps(dead).encode(), dlq_id, {"Content-Type": STRUCTURED}
        )
        metrics.DEAD_LETTERED.labels(self.topic).inc()
