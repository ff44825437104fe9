"""Publish (POST /v1/publish/<topic>) and subscriptions that deliver to the app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from typing import Any

import aiohttp
from aiohttp import web

import accord_wire as wire
from accord_sidecar import metrics
from accord_sidecar.broker.nats import Broker, BrokerUnavailable, ConsumerClash, TooLarge
from accord_sidecar.cloudevents import BATCH, STRUCTURED, EnvelopeError, batch, envelope
from accord_sidecar.config import TOPIC, Config
from accord_sidecar.errors import error, read_body

logger = logging.getLogger("accord.sidecar.pubsub")
BATCH_LIMIT = 1000
HEADERS = {"Content-Type": STRUCTURED}


class Publisher:
    """POST /v1/publish/<topic>: a structured, binary or plain CloudEvent (or a batch) onto
    the stream. 200 means stored. 503 means not known to be stored: it may have been, so a
    retry must carry the same event id (a structured or binary event's own id; for a plain
    body, the Accord-Idempotency-Key header), and the broker drops the copy within its
    duplicate window."""

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
        label = metrics.topic_label(topic)
        body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
        if isinstance(body, web.Response):
            return body
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            if content_type == BATCH:
                events = batch(topic, body, BATCH_LIMIT)
            else:
                events = [
                    envelope(
                        topic,
                        body,
                        request.headers,
                        source=f"accord://{self.config.namespace}/{self.config.app_id}",
                        event_id=request.headers.get(wire.IDEMPOTENCY_KEY),
                    )
                ]
        except EnvelopeError as exc:
            metrics.PUBLISHED.labels(label, "invalid").inc()
            return error(400, "invalid_event", str(exc))
        encoded = [json.dumps(e).encode() for e in events]
        for i, data in enumerate(encoded):
            try:
                self.broker.check_size(data, {**HEADERS, "Nats-Msg-Id": events[i]["id"]})
            except TooLarge as exc:
                metrics.PUBLISHED.labels(label, "too_large").inc()
                where = f"event [{i}]: " if content_type == BATCH else ""
                return error(413, "event_too_large", where + str(exc))
        results = await asyncio.gather(
            *(
                self.broker.publish(topic, data, e["id"], HEADERS)
                for e, data in zip(events, encoded, strict=True)
            ),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            metrics.PUBLISHED.labels(label, "unavailable").inc(len(failed))
            if not all(isinstance(r, BrokerUnavailable) for r in failed):
                raise next(r for r in failed if not isinstance(r, BrokerUnavailable))
            if content_type != BATCH:
                return error(
                    503,
                    "broker_unavailable",
                    f"{failed[0]}; the event may have been stored: publish it again with the "
                    f"same id ({events[0]['id']}) and the broker drops the copy",
                )
            return error(
                503,
                "broker_unavailable",
                f"{len(failed)} of {len(events)} events not known to be stored; "
                "publish the batch again (stored ids are dropped as duplicates)",
            )
        out = []
        for e, ack in zip(events, results, strict=True):
            assert not isinstance(ack, BaseException)
            metrics.PUBLISHED.labels(label, "duplicate" if ack.duplicate else "ok").inc()
            out.append({"id": e["id"], "sequence": ack.seq, "duplicate": bool(ack.duplicate)})
        return web.json_response(out[0] if content_type != BATCH else {"results": out})


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
        self.problem: str | None = None  # shown on /readyz while delivery is not happening
        self.label = metrics.topic_label(topic)
        # Read your writes: the stream sequence up to which every event of the topic was
        # settled here, in order (one delivery in flight; else the broker's ack floor).
        self.position = 0
        self._moved = asyncio.Event()  # set on every settle: waiters look again

    async def run(self) -> None:
        """Fetch and deliver until stopped. Never dies: a broker that is away, or that came
        back without this consumer (or the stream), is waited for and the consumer made
        again, with a log line and /readyz saying so meanwhile."""
        bulk = self.config.bulk_max
        idle = 0
        while not self.stopping.is_set():
            try:
                if self._sub is None:
                    await self.broker.wait_connected()
                    self._sub = await self.broker.consumer(
                        self.config.app_id,
                        self.topic,
                        self.config.concurrency * bulk,
                        # A delivery outlives this only if the app hangs past its timeout.
                        ack_wait_s=self.config.timeout_ms / 1000 + 5,
                    )
                    if self.problem is not None:
                        logger.info("subscription %s: delivering again", self.topic)
                    self.problem = None
                free = self.config.concurrency - len(self.in_flight)
                if free <= 0:
                    await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                msgs = await self._sub.fetch(batch=free * bulk, timeout=1)
                idle = 0
            except TimeoutError:
                # Nothing to fetch. A deleted consumer looks just like that: ask the broker
                # now and then (this also keeps the lag gauge fresh without /metrics waiting).
                idle += 1
                if idle % 5 == 0:
                    await self._check_consumer()
                continue
            except ConsumerClash as exc:
                self._trouble(str(exc), logging.ERROR)
                await self._pause(10)
                continue
            except Exception as exc:  # broker away: keep trying, never die
                if self.stopping.is_set():
                    break
                self._trouble(f"{exc or type(exc).__name__}", logging.WARNING)
                self._sub = None
                await self._pause(0.5)
                continue
            if msgs:
                metrics.CONSUMER_LAG.labels(self.label).set(msgs[-1].metadata.num_pending)
            for i in range(0, len(msgs), bulk):
                task = asyncio.create_task(self._deliver(msgs[i : i + bulk]))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            if self.config.concurrency == 1 and self.in_flight:
                await asyncio.wait(self.in_flight)

    async def _check_consumer(self) -> None:
        if not self.broker.connected:
            return
        try:
            alive, lag = await self.broker.consumer_alive(self.config.app_id, self.topic)
        except Exception:
            return  # the broker is slow or away; the next fetch will tell
        if not alive:
            self._trouble(
                "its consumer is gone from the broker; creating it again", logging.WARNING
            )
            self._sub = None
        elif lag is not None:
            metrics.CONSUMER_LAG.labels(self.label).set(lag)

    def _trouble(self, problem: str, level: int) -> None:
        """Log a problem once (not on every retry) and show it on /readyz."""
        if problem != self.problem:
            logger.log(level, "subscription %s: %s", self.topic, problem)
        self.problem = problem

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def stop(self, grace_s: float) -> None:
        """Stop fetching, let deliveries in flight finish; unacked events stay on the broker."""
        self.stopping.set()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=grace_s)

    def _backoff(self, delivered: int) -> float:
        cap = min(
            self.config.redelivery_max_ms, self.config.redelivery_initial_ms * 2 ** (delivered - 1)
        )
        return (cap / 2 + random.random() * cap / 2) / 1000  # equal jitter: never zero

    async def _deliver(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                metrics.REDELIVERIES.labels(self.label).inc()
        if len(msgs) == 1 and self.config.bulk_max == 1:
            outcomes = [await self._post(msgs[0].data)]
        else:
            outcomes = await self._post_bulk(msgs)
        await asyncio.gather(
            *(self._settle(m, o, r) for m, (o, r) in zip(msgs, outcomes, strict=True))
        )

    async def _settle(self, msg: Any, outcome: str, reason: str) -> None:
        delivered = msg.metadata.num_delivered
        metrics.DELIVERIES.labels(self.label, outcome).inc()
        try:
            if outcome in ("success", "drop"):
                await msg.ack()
            elif delivered >= self.config.max_deliveries:
                await self._dead_letter(msg, reason, delivered)
                await msg.ack()
            else:
                await msg.nak(delay=self._backoff(delivered))
                return
        except Exception as exc:
            logger.warning("subscription %s: could not settle event: %s", self.topic, exc)
            return
        if self.config.concurrency == 1:
            self.position = max(self.position, int(msg.metadata.sequence.stream))
            self._moved.set()

    async def processed(self, at_least: int, timeout_s: float) -> tuple[bool, int]:
        """Wait until every event up to stream sequence `at_least` is settled (projected,
        dropped or dead-lettered), at most `timeout_s`: (reached, the position now). The
        broker's ack floor counts too: after a restart, or with deliveries in parallel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        asked = -1.0
        while True:
            if self.position < at_least and loop.time() - asked >= 0.25:
                asked = loop.time()  # the broker, at most 4 times a second per waiter
                with contextlib.suppress(Exception):
                    if self.broker.connected:
                        floor = await self.broker.ack_floor(self.config.app_id, self.topic)
                        self.position = max(self.position, floor)
            if self.position >= at_least:
                return True, self.position
            left = deadline - loop.time()
            if left <= 0:
                return False, self.position
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), min(left, 0.25))

    async def _post_bulk(self, msgs: list[Any]) -> list[tuple[str, str]]:
        """Bulk delivery: one POST of a CloudEvents batch; the app may answer per event with
        {"statuses": [{"id": ..., "status": "SUCCESS" | "RETRY" | "DROP"}]}."""
        events, ids = [], []
        for m in msgs:
            try:
                event = json.loads(m.data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                event = {"data_base64": base64.b64encode(m.data).decode()}
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
        except (ValueError, UnicodeDecodeError, RecursionError):
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
            except (ValueError, UnicodeDecodeError, RecursionError):
                status = ""
        if status == "RETRY":
            return "retry", "app asked to retry"
        if status == "DROP":
            return "drop", "app dropped it"
        return "success", ""

    async def _dead_letter(self, msg: Any, reason: str, delivered: int) -> None:
        try:
            event = json.loads(msg.data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            event = None
        if not isinstance(event, dict):
            event = {"data_base64": base64.b64encode(msg.data).decode()}
        dead = {
            **event,
            "deadletterreason": reason[:1000],
            "deadletterdeliveries": delivered,
            "deadlettertopic": self.topic,
        }
        if dead.get("topic", self.topic) == self.topic:  # ours; a user's own is kept
            dead["topic"] = f"{self.topic}.dlq"
        dlq_id = f"dlq-{event.get('id') or msg.metadata.sequence.stream}"
        data = json.dumps(dead).encode()
        try:
            self.broker.check_size(data, {**HEADERS, "Nats-Msg-Id": dlq_id})
        except TooLarge:
            # The reason made it too big: park it without its data, which stays findable
            # on the stream at this sequence.
            dead.pop("data", None)
            dead.pop("data_base64", None)
            dead["deadletterdataomitted"] = f"stream sequence {msg.metadata.sequence.stream}"
            data = json.dumps(dead).encode()
        await self.broker.publish(f"{self.topic}.dlq", data, dlq_id, HEADERS)
        metrics.DEAD_LETTERED.labels(self.label).inc()
