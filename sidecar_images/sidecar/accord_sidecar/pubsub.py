"""Publish (POST /v1/publish/<topic>) and subscriptions that deliver to the app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
from typing import Any

import accord_wire as wire
from accord_sidecar import metrics
from accord_sidecar.broker.nats import (
    OWNER_TTL_S,
    Broker,
    BrokerUnavailable,
    ConsumerClash,
    TooLarge,
)
from accord_sidecar.cloudevents import BATCH, STRUCTURED, EnvelopeError, batch, envelope
from accord_sidecar.config import TOPIC, Config
from accord_sidecar.errors import error, read_body
from accord_sidecar.fasthttp import Reply, Upstream, UpstreamError, json_reply

logger = logging.getLogger("accord.sidecar.pubsub")
BATCH_LIMIT = 1000
HEADERS = {"Content-Type": STRUCTURED}
NOT_YET = "its consumer is not made yet"


class Publisher:
    """POST /v1/publish/<topic>: a structured, binary or plain CloudEvent (or a batch) onto
    the stream. 200 means stored. 503 means not known to be stored: it may have been, so a
    retry must carry the same event id (a structured or binary event's own id; for a plain
    body, the Accord-Idempotency-Key header), and the broker drops the copy within its
    duplicate window."""

    def __init__(self, config: Config, broker: Broker | None) -> None:
        self.config = config
        self.broker = broker

    async def handle(self, request: Any, topic: str) -> Reply:
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
        if isinstance(body, Reply):
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
            key = request.headers.get(wire.PARTITION_KEY)
            if key is not None and content_type != BATCH:
                if not 0 < len(key) <= 256:
                    raise EnvelopeError(f"{wire.PARTITION_KEY} must be 1 to 256 characters")
                events[0]["partitionkey"] = key
        except EnvelopeError as exc:
            metrics.PUBLISHED.labels(label, "invalid").inc()
            return error(400, "invalid_event", str(exc))
        encoded = [json.dumps(e).encode() for e in events]
        headers = [_headers(e) for e in events]
        for i, data in enumerate(encoded):
            try:
                self.broker.check_size(
                    data, {**headers[i], "Nats-Msg-Id": dedup_id(topic, events[i])}
                )
            except TooLarge as exc:
                metrics.PUBLISHED.labels(label, "too_large").inc()
                where = f"event [{i}]: " if content_type == BATCH else ""
                return error(413, "event_too_large", where + str(exc))
        results = await asyncio.gather(
            *(
                self.broker.publish(topic, data, dedup_id(topic, e), h)
                for e, data, h in zip(events, encoded, headers, strict=True)
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
        return json_reply(out[0] if content_type != BATCH else {"results": out})


def dedup_id(topic: str, event: dict[str, Any]) -> str:
    """What the broker deduplicates a publish by (Nats-Msg-Id): the event's identity, which
    CloudEvents makes source + id, on its topic. The duplicate window is the whole stream's:
    the same id from another source, or on another topic, is another event, never dropped."""
    identity = f"{topic}\n{event.get('source', '')}\n{event['id']}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _headers(event: dict[str, Any]) -> dict[str, str]:
    """The NATS headers of an event on the stream: its partition key ("" for none, or
    one a header cannot carry: a partitioned subscriber then reads it from the event)."""
    key = event.get("partitionkey")
    if key is None:
        return {**HEADERS, wire.PARTITION_KEY: ""}
    if isinstance(key, str) and key.isprintable() and key == key.strip() and 0 < len(key) <= 256:
        return {**HEADERS, wire.PARTITION_KEY: key}
    return HEADERS


def partition_key(msg: Any) -> str:
    """The key that picks an event's partition: its `partitionkey` (from the header our
    publishers add, else from the event); an event without one goes by its id."""
    headers = msg.headers or {}
    key = headers.get(wire.PARTITION_KEY)
    if key:
        return str(key)
    if key is None:  # published by someone else: read the event itself
        try:
            event = json.loads(msg.data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            event = None
        if isinstance(event, dict) and event.get("partitionkey") not in (None, ""):
            return str(event["partitionkey"])
        if isinstance(event, dict) and event.get("id"):
            return str(event["id"])
    return str(headers.get("Nats-Msg-Id") or msg.metadata.sequence.stream)


class AppUnreachable(Exception):
    """No answer from the app (refused, closed, or not in time)."""


class AppDown(AppUnreachable):
    """The app is not listening (starting, or restarting): no connection was made, so the
    event never reached it. Not the event's failure: no attempt is counted, it waits."""


APP_DOWN = "the app is not listening"
CANNOT_PARK = "cannot park an event"
APP_DOWN_WAIT_MAX_S = 1.0  # how long at most between looks at an app that is down
APP_DOWN_HANDOVER_S = 10.0  # an app down this long: its ordered deliveries go to a replica


async def app_listens(host: str, port: int) -> bool:
    """Does something listen on the app's port now? (A connection, no request.)"""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class AppWatch:
    """Whether the app listens, as deliveries find it. A sidecar whose app has not listened
    for APP_DOWN_HANDOVER_S (crash-looping, or stuck starting) gives its ordered
    subscriptions and its partitions to the app's other replicas, as Dapr's app health
    checks stop a sidecar's subscriptions; meanwhile it looks every few seconds, and
    takes its share again once the app listens."""

    def __init__(self, host: str, port: int | None) -> None:
        self.host, self.port = host, port
        self.down_since: float | None = None

    def seen(self, listening: bool, why: str = "") -> None:
        """What a delivery found. Said in the log once per change; /readyz looks at the
        port itself, so no subscription keeps a stale 'not listening' (a replica that
        stands by delivers nothing that would clear it)."""
        if listening:
            if self.down_since is not None:
                logger.info("the app listens again; deliveries go on")
            self.down_since = None
        elif self.down_since is None:
            logger.warning("%s (%s); deliveries wait", APP_DOWN, why)
            self.down_since = asyncio.get_running_loop().time()

    @property
    def gone(self) -> bool:
        """Down long enough for its replica to hand its ordered deliveries over."""
        since = self.down_since
        return since is not None and asyncio.get_running_loop().time() - since >= (
            APP_DOWN_HANDOVER_S
        )

    async def look(self) -> None:
        """While the app is thought down: does it listen now? (A connection, no request.)"""
        if self.down_since is None or self.port is None:
            return
        if await app_listens(self.host, self.port):
            self.seen(True)


class Ownership:
    """Which sidecar of an app delivers an ordered subscription: the holder of a claim on
    the broker (OWNERS_BUCKET, one key per consumer), renewed every OWNER_TTL_S / 5. The
    holder counts itself the owner only until 60% of the claim's life after its last
    renewal was sent, so it stops before the broker can let another sidecar take over."""

    def __init__(self, broker: Broker, key: str, holder: str, app: AppWatch) -> None:
        self.broker = broker
        self.key = key
        self.holder = holder
        self.app = app  # gone: given up, as if not wanted
        self.revision: int | None = None
        self.valid_until = 0.0
        self.gained = 0  # how often this sidecar became the owner
        self.wanted = True  # False: give it up (a partition that another replica should own)
        self.nudged = asyncio.Event()  # `wanted` changed: claim or release now

    @property
    def held(self) -> bool:
        """Deliver now? (Not once this sidecar is to give it up.)"""
        return (
            self.wanted
            and not self.app.gone
            and self.revision is not None
            and asyncio.get_running_loop().time() < self.valid_until
        )

    async def renew(self) -> None:
        """Claim or renew (the caller releases an unwanted claim, once nothing is in
        flight)."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            revision = await asyncio.wait_for(
                self.broker.claim(self.key, self.holder, self.revision), OWNER_TTL_S / 5
            )
        except Exception as exc:  # the broker is away: the claim lapses unless renewed
            logger.debug("claim %s not renewed: %s", self.key, exc)
            return
        if revision is None:
            if self.revision is not None:
                logger.warning("no longer delivering %s: another sidecar owns it", self.key)
            self.revision = None
            return
        if self.revision is None:
            self.gained += 1
        self.revision = revision
        self.valid_until = sent + OWNER_TTL_S * 0.6

    async def release(self) -> None:
        if self.revision is not None:
            revision, self.revision = self.revision, None  # no longer the owner, from now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.broker.release(self.key, revision), 2)


def holder_name(config: Config) -> str:
    """This sidecar, as an owner: its pod (host name) and ports, so that the same sidecar
    restarted takes its claim back at once; the process id too when a port is picked at
    random (two sidecars of one host could share the rest)."""
    ports = (config.http_port, config.inbound_port, config.admin_port)
    name = f"{socket.gethostname()}/{'-'.join(map(str, ports))}"
    return f"{name}/{os.getpid()}" if 0 in ports else name


class Subscriber:
    """One durable pull consumer for one topic, delivering to POST /events/<topic>.

    2xx (or {"status": "SUCCESS"}) acks; {"status": "DROP"} acks without processing;
    anything else is delivered again with backoff, and the last failure after max
    deliveries goes to <topic>.dlq with the reason.

    With concurrency 1 (the default) delivery is ordered per subject: one sidecar of the
    app (the owner, see Ownership) pulls up to `prefetch` events at a time and delivers
    them one after another; a failing event is retried here and holds back the ones after
    it. Other replicas stand by and take over, from the first unacked event, when the owner
    stops or dies. With concurrency > 1 every replica pulls and delivers in parallel.
    """

    def __init__(
        self,
        config: Config,
        broker: Broker,
        session: Any,
        topic: str,
        partition: wire.Partition | None = None,
        app: Upstream | None = None,
        *,
        watch: AppWatch,  # the sidecar's one watch of its app, shared by every subscription
    ) -> None:
        self.config = config
        self.app = app  # our own keep-alive client to the app (None: aiohttp's, `session`)
        self.watch = watch
        self.partition = partition  # (index, count): only the events of this partition
        self.broker = broker
        self.session = session
        self.topic = topic
        self.stopping = asyncio.Event()
        self.in_flight: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        # Shown on /readyz while delivery is not happening (or not set up yet).
        self.problem: str | None = NOT_YET
        self.label = metrics.topic_label(topic)
        self._deliveries: dict[str, Any] = {}  # DELIVERIES' children, by outcome
        self._acks: list[Any] = []  # ordered: acks to send with the next few (_ack_soon)
        self._acks_since = 0.0
        # Read your writes: the stream sequence up to which every event of the topic was
        # settled here, in order (one delivery in flight; else the broker's ack floor).
        self.position = 0
        self._moved = asyncio.Event()  # set on every settle: waiters look again
        self.ordered = config.concurrency == 1 or partition is not None
        self.ownership = Ownership(
            broker,
            wire.consumer_name(config.app_id, topic, partition),
            holder_name(config),
            self.watch,
        )
        self.standby = False  # ordered, and another replica delivers
        # ACCORD_POISON=park: the keys (their parked subjects) whose events wait behind a
        # poison event, read from the broker whenever this sidecar becomes the owner.
        self.parking = config.poison == "park" and self.ordered
        self.parked_keys: set[str] = set()
        self._done_nonce = ""
        self._asked_at = 0.0

    async def run(self) -> None:
        """Fetch and deliver until stopped. Never dies: a broker that is away, or that came
        back without this consumer (or the stream), is waited for and the consumer made
        again, with a log line and /readyz saying so meanwhile."""
        if self.ordered:
            await self._run_ordered()
        else:
            await self._run_concurrent()

    async def _run_ordered(self) -> None:
        renewing = asyncio.create_task(self._keep_ownership())
        try:
            await self._deliver_while_owner()
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def _keep_ownership(self) -> None:
        await self.broker.wait_connected()
        while not self.stopping.is_set():
            self.ownership.nudged.clear()
            await self.watch.look()
            if self.ownership.wanted and not self.watch.gone:
                await self.ownership.renew()
            elif self.ownership.revision is not None:
                # To be given up: deliveries stop at the next event; the one at the app
                # finishes first, so the next owner never overlaps it.
                if self.in_flight:
                    await asyncio.wait(self.in_flight)
                await self.ownership.release()
                why = (
                    f"{APP_DOWN} for {APP_DOWN_HANDOVER_S:g}s" if self.watch.gone else "shared out"
                )
                logger.info("subscription %s: gave up %s (%s)", self.topic, self.ownership.key, why)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ownership.nudged.wait(), OWNER_TTL_S / 5)

    async def _deliver_while_owner(self) -> None:
        prefetch = max(self.config.prefetch, self.config.bulk_max)
        # Held events outlive this only if the owner hangs; a new owner does not wait for
        # it (it rewinds the consumer), nor does this sidecar restarted.
        ack_wait_s = 2 * self.config.timeout_ms / 1000 + self.config.redelivery_max_ms / 1000 + 30
        bound_at = 0  # the ownership (Ownership.gained) the consumer was bound for
        idle = 0
        exists = False  # the consumer, as far as this sidecar knows
        while not self.stopping.is_set():
            try:
                if not self.ownership.held:
                    if not self.standby and self.ownership.gained:
                        logger.info("subscription %s: standing by", self.topic)
                    self.standby = True
                    if self._sub is not None:
                        self._sub = None
                    if not exists:  # a standby too makes it (where a "new" consumer starts)
                        await self.broker.wait_connected()
                        sub = await self.broker.consumer(
                            self.config.app_id,
                            self.topic,
                            prefetch,
                            ack_wait_s,
                            partition=self.partition,
                        )
                        await sub.unsubscribe()
                        exists = True
                    # Ready to take over: nothing it saw while it delivered stands now.
                    self.problem = None
                    await self._pause(0.2)
                    continue
                if self.standby:
                    logger.info("subscription %s: this sidecar delivers", self.topic)
                self.standby = False
                if self._sub is None or bound_at != self.ownership.gained:
                    await self.broker.wait_connected()
                    rewind = bound_at != self.ownership.gained
                    self._sub = await self.broker.consumer(
                        self.config.app_id,
                        self.topic,
                        prefetch,
                        ack_wait_s,
                        rewind=rewind,
                        partition=self.partition,
                    )
                    if self.parking and (rewind or not bound_at):
                        self.parked_keys = set(await self.broker.parked(self.ownership.key))
                    if self.config.reset_path and not await self._reset_app():
                        continue  # stopping, or no longer the owner
                    bound_at = self.ownership.gained
                    self.position = 0  # perhaps a new consumer, or stream: the broker knows
                    exists = True
                    if self.problem is not None and self.problem != NOT_YET:
                        logger.info("subscription %s: delivering again", self.topic)
                    self.problem = None
                if self.parking:
                    await self._obey()
                msgs = await self._sub.fetch(batch=prefetch, timeout=1)
                idle = 0
            except Exception as exc:
                idle += isinstance(exc, TimeoutError)
                exists = exists and isinstance(exc, (TimeoutError, ConsumerClash))
                if not await self._recover(exc, idle):
                    break
                continue
            if msgs:
                metrics.CONSUMER_LAG.labels(self.label).set(msgs[-1].metadata.num_pending)
            task = asyncio.create_task(self._deliver_in_order(msgs, ack_wait_s))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            await asyncio.wait([task])

    async def _deliver_in_order(self, msgs: list[Any], ack_wait_s: float) -> None:
        """Deliver fetched events in stream order, `bulk_max` per POST. Returns early when
        stopping or no longer the owner: the rest stay unacked, for the next owner. Those
        waiting their turn are kept from being handed out again (JetStream's in-progress),
        however long the app takes."""
        bulk = self.config.bulk_max
        i = 0

        async def hold() -> None:
            while True:
                await asyncio.sleep(ack_wait_s / 3)
                for msg in msgs[i:]:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        last = _seq(msgs[-1]) if msgs else 0
        if self.partition is not None:
            index, count = self.partition
            theirs = [m for m in msgs if wire.partition_of(partition_key(m), count) != index]
            for msg in theirs:  # another partition's: settled here by being passed over
                await self._ack(msg)
            if theirs:
                msgs = [m for m in msgs if wire.partition_of(partition_key(m), count) == index]
        holding = asyncio.create_task(hold())
        try:
            while i < len(msgs):
                if self.stopping.is_set() or not self.ownership.held:
                    return
                if self.parking and self._parked(msgs[i]):
                    if not await self._park(msgs[i], ""):
                        return
                    i += 1
                    continue
                chunk = [msgs[i]]
                while len(chunk) < bulk and i + len(chunk) < len(msgs):
                    if self.parking and self._parked(msgs[i + len(chunk)]):
                        break
                    chunk.append(msgs[i + len(chunk)])
                if not await self._deliver_chunk(chunk):
                    return
                self._advance(_seq(chunk[-1]))
                i += len(chunk)
            self._advance(last)
        finally:
            holding.cancel()
            await self._flush_acks()

    async def _deliver_chunk(self, chunk: list[Any]) -> bool:
        """Deliver a run of events until each is acked or dead-lettered: those the app did
        not take are posted again (still in order) after a backoff, holding back every later
        event, and reported failing on the broker meanwhile (the projection's status shows
        it). False when it stopped first (stopping, or no longer the owner)."""
        # Attempts at the app, as the dead-letter rule counts them: only the first pending
        # event's (below). The broker's deliveries count for the first event only: those
        # after it may have been fetched again (a restart rewinds) without being tried.
        attempts = {_seq(m): 1 for m in chunk}
        attempts[_seq(chunk[0])] = chunk[0].metadata.num_delivered
        for msg in chunk:
            if msg.metadata.num_delivered > 1:
                metrics.REDELIVERIES.labels(self.label).inc()
        pending, reported = chunk, False
        while pending:
            outcomes = await self._post_when_up(pending)
            if outcomes is None:
                return False
            again, why = [], ""
            for msg, (outcome, reason) in zip(pending, outcomes, strict=True):
                self._delivered(outcome)
                if outcome not in ("success", "drop"):
                    if attempts[_seq(msg)] < self.config.max_deliveries:
                        why = why or reason
                        again.append(msg)
                        continue
                    try:
                        await self._dead_letter(msg, reason, attempts[_seq(msg)])
                    except Exception as exc:
                        logger.warning(
                            "subscription %s: could not dead-letter: %s", self.topic, exc
                        )
                        again.append(msg)
                        continue
                    if self.parking:  # its key waits behind it, from now on
                        if not await self._park(msg, reason):
                            return False
                        continue
                await self._ack_soon(msg)
            if self.parking:  # those of a key parked just now wait behind its poison event
                for msg in [m for m in again if self._parked(m)]:
                    if not await self._park(msg, ""):
                        return False
                again = [m for m in again if not self._parked(m)]
            pending = again
            if not pending:
                break
            await self._flush_acks()  # those done go out now: the rest may wait a while
            metrics.REDELIVERIES.labels(self.label).inc(len(pending))
            head = _seq(pending[0])
            report = {"sequence": head, "deliveries": attempts[head], "reason": why[:500]}
            reported = True
            if not await self._wait_failing(report, self._backoff(attempts[head])):
                return False
            # The attempt counts for the first event only, as if one event at a time were
            # delivered: the app may have refused the later ones only to keep them behind
            # it (in order), so they are not to reach max deliveries, and be dead-lettered,
            # with it. Each counts its own from when it is first.
            attempts[head] += 1
        if reported:
            await self._report(None)
        return True

    async def _wait_failing(self, report: dict[str, Any], seconds: float) -> bool:
        """The backoff before the next attempt, the failure reported (again every few
        seconds: the broker forgets a report after OWNER_TTL_S). False when stopping or
        no longer the owner."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while True:
            await self._report(report)
            await self._pause(min(until - loop.time(), OWNER_TTL_S / 3))
            if self.stopping.is_set() or not self.ownership.held:
                return False
            if loop.time() >= until:
                return True

    async def _report(self, report: dict[str, Any] | None) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.broker.report_failing(self.ownership.key, report), 2)

    async def _reset_app(self) -> bool:
        """In-place rebuilds: before the first delivery of a consumer that has delivered
        nothing yet (a new generation's), POST the app's reset path (it empties its read
        model for its generation; a repeat is a no-op), until it answers 2xx. False when
        stopping or no longer the owner first."""
        info = await self._sub.consumer_info()
        if int(info.delivered.stream_seq or 0) > 0:
            return True
        body = {"topic": self.topic, "partition": list(self.partition) if self.partition else None}
        attempt = 0
        while True:
            attempt += 1
            try:
                status, answer = await self._app_post(
                    self.config.reset_path, json.dumps(body).encode(), "application/json"
                )
                if 200 <= status < 300:
                    logger.info("subscription %s: the app reset its read model", self.topic)
                    self.problem = None
                    return True
                why = f"HTTP {status}: {answer[:200].decode(errors='replace')}"
            except AppUnreachable as exc:
                why = f"unreachable: {exc}"
            self._trouble(f"the app's {self.config.reset_path} answered {why}", logging.WARNING)
            await self._pause(self._backoff(min(attempt, 10)))
            if self.stopping.is_set() or not self.ownership.held:
                return False

    def _delivered(self, outcome: str) -> None:
        """Count a delivery (the metric's children looked up once per outcome)."""
        child = self._deliveries.get(outcome)
        if child is None:
            child = self._deliveries[outcome] = metrics.DELIVERIES.labels(self.label, outcome)
        child.inc()

    def _parked(self, msg: Any) -> bool:
        return wire.parked_subject(self.ownership.key, partition_key(msg)) in self.parked_keys

    async def _park(self, msg: Any, reason: str) -> bool:
        """Put an event behind its key's poison event (`reason`: it is that event) on the
        parked stream, then ack it; tried until stored. False when stopping or no longer
        the owner first (it stays unacked: the next owner parks it)."""
        key = partition_key(msg)
        headers = {
            "Content-Type": STRUCTURED,
            "Nats-Msg-Id": f"{self.ownership.key}-{_seq(msg)}",  # parked twice: kept once
            "Accord-Stream-Sequence": str(_seq(msg)),
        }
        if key.isprintable() and key == key.strip():
            headers[wire.PARTITION_KEY] = key
        if reason:
            headers["Accord-Parked-Reason"] = " ".join(reason.split())[:500]
        delay = 0.2
        while True:
            try:
                await self.broker.park(self.ownership.key, key, msg.data, headers)
                if self.problem is not None and self.problem.startswith(CANNOT_PARK):
                    self.problem = None  # it could, in the end: nothing stands in the way
                break
            except Exception as exc:
                self._trouble(f"{CANNOT_PARK}: {exc or type(exc).__name__}", logging.WARNING)
                await self._pause(delay)
                delay = min(delay * 2, 5.0)
                if self.stopping.is_set() or not self.ownership.held:
                    return False
        if reason:
            logger.warning(
                "subscription %s: event %d parked with its key %r (its later events wait): %s",
                self.topic, _seq(msg), key, reason[:300],
            )  # fmt: skip
        self.parked_keys.add(wire.parked_subject(self.ownership.key, key))
        metrics.PARKED.labels(self.label).inc()
        await self._ack(msg)
        return True

    async def _obey(self) -> None:
        """Act on what the operator asks of the parked events (at most once a second)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._asked_at < 1:
            return
        self._asked_at = loop.time()
        command = await self.broker.command(self.ownership.key)
        if not command or not command.get("nonce"):
            return
        nonce, action = str(command["nonce"]), command.get("action")
        if nonce != self._done_nonce and action in ("retry", "skip"):
            await self._drain(action == "skip")
            if self.stopping.is_set() or not self.ownership.held:
                return
            self._done_nonce = nonce
        await self.broker.done(self.ownership.key, nonce)

    async def _drain(self, skip: bool) -> None:
        """Deliver every parked key's events again, in order (skip: all but the poison event
        at its head). A key whose events all got through is no longer parked; one whose
        event fails again stays parked from that event on."""
        for subject_ in sorted(await self.broker.parked(self.ownership.key)):
            head, failed_at = True, None
            async for parked in self.broker.parked_events(subject_):
                for msg in parked:
                    if skip and head:
                        head = False
                        continue
                    head = False
                    if not await self._deliver_parked(msg):
                        failed_at = _seq(msg)
                        break
                if failed_at is not None:
                    break
            if failed_at is None:
                await self.broker.unpark(subject_)
                self.parked_keys.discard(subject_)
                logger.info("subscription %s: %s delivered and unparked", self.topic, subject_)
            else:
                await self.broker.unpark(subject_, before=failed_at)
            if self.stopping.is_set() or not self.ownership.held:
                return

    async def _deliver_parked(self, msg: Any) -> bool:
        """One parked event, with the usual retries; False when it keeps failing (or this
        sidecar stops, or is no longer the owner)."""
        for attempt in range(1, self.config.max_deliveries + 1):
            outcomes = await self._post_when_up([msg], single=True)
            if outcomes is None:
                return False
            outcome, reason = outcomes[0]
            self._delivered(outcome)
            if outcome in ("success", "drop"):
                return True
            if attempt == self.config.max_deliveries:
                logger.warning(
                    "subscription %s: a parked event failed again: %s", self.topic, reason
                )
                return False
            await self._pause(self._backoff(attempt))
            if self.stopping.is_set() or not self.ownership.held:
                return False
        return False

    async def _ack_soon(self, msg: Any) -> None:
        """Ordered delivery: an event the app took is acked with the next few (at most 64,
        within 50 ms, and always before a wait): one write to the broker for a burst of
        acks instead of one each. Each event is still acked on its own."""
        loop = asyncio.get_running_loop()
        if not self._acks:
            self._acks_since = loop.time()
        self._acks.append(msg)
        if len(self._acks) >= 64 or loop.time() - self._acks_since > 0.05:
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        for msg in acks:
            await self._ack(msg)

    async def _ack(self, msg: Any) -> None:
        try:
            await msg.ack()
        except Exception as exc:
            logger.warning("subscription %s: could not ack event: %s", self.topic, exc)

    def _advance(self, seq: int) -> None:
        """Every event up to `seq` is settled here: read-your-writes waiters look again."""
        self.position = max(self.position, seq)
        self._moved.set()

    async def _run_concurrent(self) -> None:
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
                    if self.problem is not None and self.problem != NOT_YET:
                        logger.info("subscription %s: delivering again", self.topic)
                    self.problem = None
                # Pull when half the slots are free, not one by one: a pull per event
                # would cost a broker round trip each.
                free = self.config.concurrency - len(self.in_flight)
                if free <= 0 or (self.in_flight and free < self.config.concurrency // 2):
                    await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                msgs = await self._sub.fetch(batch=free * bulk, timeout=1)
                idle = 0
            except Exception as exc:
                idle += isinstance(exc, TimeoutError)
                if not await self._recover(exc, idle):
                    break
                continue
            if msgs:
                metrics.CONSUMER_LAG.labels(self.label).set(msgs[-1].metadata.num_pending)
            for i in range(0, len(msgs), bulk):
                task = asyncio.create_task(self._deliver(msgs[i : i + bulk]))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            if self.config.concurrency == 1 and self.in_flight:
                await asyncio.wait(self.in_flight)

    async def _recover(self, exc: Exception, idle: int) -> bool:
        """After a fetch that raised; False when the sidecar is stopping. Nothing to fetch:
        a deleted consumer looks just like that, so ask the broker now and then (this also
        keeps the lag gauge fresh without /metrics waiting). A clash: wait, said. Anything
        else is the broker away: bind again after a pause, never die."""
        if isinstance(exc, TimeoutError):
            if idle % 5 == 0:
                await self._check_consumer()
            return True
        if isinstance(exc, ConsumerClash):
            self._trouble(str(exc), logging.ERROR)
            await self._pause(10)
            return True
        if self.stopping.is_set():
            return False
        self._trouble(f"{exc or type(exc).__name__}", logging.WARNING)
        self._sub = None
        await self._pause(0.5)
        return True

    async def _check_consumer(self) -> None:
        if not self.broker.connected:
            return
        try:
            alive, lag = await self.broker.consumer_alive(
                self.config.app_id, self.topic, self.partition
            )
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
        """Stop fetching, let deliveries in flight finish; unacked events stay on the broker
        (an ordered subscription gives up its ownership: a standby takes over now)."""
        self.stopping.set()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=grace_s)
        if self.ordered:
            await self.ownership.release()

    async def _post_when_up(
        self, msgs: list[Any], single: bool = False, hold: bool = False
    ) -> list[tuple[str, str]] | None:
        """POST events to the app (one structured event when `single` or one at a time is
        configured, else a batch): the outcome of each. A POST that found no one listening
        (the app starting or restarting) never reached the app, so it is no attempt: it is
        made again, after a wait (shown on /readyz), until the app takes it (`hold`: keeping
        the events in progress on the broker meanwhile). None when stopping, or no longer
        the owner, first."""
        looked = 0
        while True:
            if single or (len(msgs) == 1 and self.config.bulk_max == 1):
                outcomes = [await self._post(msgs[0].data)]
            else:
                outcomes = await self._post_bulk(msgs)
            self.watch.seen(outcomes[0][0] != "down", outcomes[0][1])
            if outcomes[0][0] != "down":  # one POST: all or none reached the app
                return outcomes
            await self._flush_acks()  # those done go out before a wait
            await self._pause(min(APP_DOWN_WAIT_MAX_S, 0.05 * 2**looked))
            if self.stopping.is_set() or (self.ordered and not self.ownership.held):
                return None
            looked += 1
            for msg in msgs if hold else ():
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def _backoff(self, delivered: int) -> float:
        cap = min(
            self.config.redelivery_max_ms, self.config.redelivery_initial_ms * 2 ** (delivered - 1)
        )
        return (cap / 2 + random.random() * cap / 2) / 1000  # equal jitter: never zero

    async def _deliver(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                metrics.REDELIVERIES.labels(self.label).inc()
        # Kept here (in progress on the broker) while the app is down: given back, they
        # would come again counted as delivered once more.
        outcomes = await self._post_when_up(msgs, hold=True)
        if outcomes is None:
            return  # stopping: unacked, the broker hands them out again
        await asyncio.gather(
            *(self._settle(m, o, r) for m, (o, r) in zip(msgs, outcomes, strict=True))
        )

    async def _settle(self, msg: Any, outcome: str, reason: str) -> None:
        delivered = msg.metadata.num_delivered
        self._delivered(outcome)
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
                        floor = await self.broker.ack_floor(
                            self.config.app_id, self.topic, self.partition
                        )
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
        try:
            status, body = await self._app_post(
                f"/events/{self.topic}", json.dumps(events).encode(), BATCH
            )
        except AppDown as exc:
            return [("down", str(exc))] * len(msgs)
        except AppUnreachable as exc:
            return [("retry", f"app unreachable: {exc}")] * len(msgs)
        if not 200 <= status < 300:
            why = f"app answered HTTP {status}: {body[:200].decode(errors='replace')}"
            return [("retry", why)] * len(msgs)
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
        try:
            code, body = await self._app_post(f"/events/{self.topic}", data, STRUCTURED)
        except AppDown as exc:
            return "down", str(exc)
        except AppUnreachable as exc:
            return "retry", f"app unreachable: {exc}"
        if not 200 <= code < 300:
            return "retry", f"app answered HTTP {code}: {body[:200].decode(errors='replace')}"
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

    async def _app_post(self, path: str, data: bytes, content_type: str) -> tuple[int, bytes]:
        """POST to the app: (status, body). AppUnreachable when no answer came in time."""
        timeout_s = self.config.timeout_ms / 1000
        if self.app is not None:
            try:
                status, _, body = await self.app.request(
                    "POST", path, [("Content-Type", content_type)], data, timeout_s
                )
            except UpstreamError as exc:
                raise (AppUnreachable if exc.sent else AppDown)(str(exc)) from None
            return status, body
        import aiohttp  # the baseline engine: aiohttp's client

        url = f"http://{self.config.app_host}:{self.config.app_port}{path}"
        try:
            async with self.session.post(
                url,
                data=data,
                headers={"Content-Type": content_type},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as r:
                return r.status, await r.read()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise AppDown(str(exc) or type(exc).__name__) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AppUnreachable(str(exc) or type(exc).__name__) from None

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
            "deadletterapp": self.config.app_id,
        }
        if dead.get("topic", self.topic) == self.topic:  # ours; a user's own is kept
            dead["topic"] = f"{self.topic}.dlq"
        # Per consumer: two subscriptions dead-lettering one event are two records.
        which = dedup_id(self.topic, event) if event.get("id") else msg.metadata.sequence.stream
        dlq_id = f"dlq-{self.ownership.key}-{which}"
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
        ack = await self.broker.publish(f"{self.topic}.dlq", data, dlq_id, HEADERS)
        if ack.duplicate:  # dead-lettered already (a retry after a lost answer): counted
            return
        metrics.DEAD_LETTERED.labels(self.label).inc()
        with contextlib.suppress(Exception):  # the count in a projection's status
            await asyncio.wait_for(self.broker.count_dead_letter(self.ownership.key), 2)


def _seq(msg: Any) -> int:
    return int(msg.metadata.sequence.stream)


class PartitionGroup:
    """A subscription split into `count` partitions by partition key (ACCORD_PARTITIONS):
    one ordered Subscriber per partition, each with its own consumer, so the events of one
    key keep their order while partitions are delivered side by side. The app's replicas
    share the partitions out: each says it is alive (OWNERS_BUCKET, every OWNER_TTL_S / 5),
    and the replica ranked k of n wants the partitions i with i % n == k. A partition
    changes hands only through its claim: the old owner gives it up (or its claim lapses)
    before the new one delivers, from the first unacked event, so a partition never has
    two owners and never a gap."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        session: Any,
        topic: str,
        count: int,
        app: Upstream | None = None,
        *,
        watch: AppWatch,
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.group = wire.consumer_name(config.app_id, topic)
        self.holder = holder_name(config).replace("/", "_")
        self.watch = watch
        self.subscribers = [
            Subscriber(config, broker, session, topic, (i, count), app, watch=watch)
            for i in range(count)
        ]
        for sub in self.subscribers:
            sub.ownership.wanted = False  # until the replicas are known
        self.members: list[str] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        tasks = [asyncio.create_task(s.run()) for s in self.subscribers]
        try:
            await self.broker.wait_connected()
            while not self.stopping.is_set():
                await self.share()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), OWNER_TTL_S / 5)
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def share(self) -> None:
        """Which partitions this replica wants, from who is alive now (not this one while
        its app is gone: it leaves the member list, the others share its partitions)."""
        await self.watch.look()
        if self.watch.gone:
            if self.members:
                logger.warning(
                    "subscription %s: %s for %gs; its partitions go to the other replicas",
                    self.topic, APP_DOWN, APP_DOWN_HANDOVER_S,
                )  # fmt: skip
                self.members = []
                await self.broker.leave(self.group, self.holder)
            for sub in self.subscribers:
                sub.ownership.nudged.set()  # give up now
            return
        try:
            members = await asyncio.wait_for(
                self.broker.members(self.group, self.holder), OWNER_TTL_S / 5
            )
        except Exception as exc:
            logger.debug("subscription %s: members not known: %s", self.topic, exc)
            return  # as before; claims not renewed lapse on their own
        if self.holder not in members:
            members = sorted([*members, self.holder])
        if members != self.members:
            rank, n = members.index(self.holder), len(members)
            mine = [i for i in range(len(self.subscribers)) if i % n == rank]
            logger.info(
                "subscription %s: %d replica(s); this one takes partitions %s",
                self.topic,
                n,
                ",".join(map(str, mine)) or "none",
            )
            self.members = members
        rank, n = members.index(self.holder), len(members)
        for i, sub in enumerate(self.subscribers):
            wanted = i % n == rank
            if sub.ownership.wanted != wanted:
                sub.ownership.wanted = wanted
                sub.ownership.nudged.set()

    async def stop(self, grace_s: float) -> None:
        self.stopping.set()
        await asyncio.gather(*(s.stop(grace_s) for s in self.subscribers))
        await self.broker.leave(self.group, self.holder)

    async def processed(self, at_least: int, timeout_s: float) -> tuple[bool, int]:
        """Read your writes: every partition has settled every event up to `at_least`."""
        results = await asyncio.gather(
            *(s.processed(at_least, timeout_s) for s in self.subscribers)
        )
        return all(ok for ok, _ in results), min(position for _, position in results)
