"""NATS JetStream: one stream for every Accord topic, durable pull consumers per subscription.

Topic `orders.events` is subject `accord.orders.events` in stream ACCORD; `<topic>.dlq` is
the dead-letter topic. Publishes carry Nats-Msg-Id = a hash of the event's topic, source
and id, so JetStream's duplicate window drops a re-published event (and only that).

The broker may be away when the sidecar starts, may go away later, and may come back empty
(its store lost, the stream or a consumer deleted). None of that stops the sidecar: it
connects in the background, and recreates the stream and its consumers when they are gone,
saying so in its log and on /readyz meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import accord_wire as wire

# nats-py loads aiohttp for its WebSocket transport, which the sidecar never uses (nats://
# only): kept from loading it, so that a sidecar starts without aiohttp (a tenth of a
# second). Anything that does need aiohttp later imports it as usual.
_unloaded = "aiohttp" not in sys.modules
if _unloaded:
    sys.modules["aiohttp"] = None  # type: ignore[assignment]
try:
    import nats
    from nats.aio.client import Client
    from nats.js import JetStreamContext, api
    from nats.js.errors import (
        BadRequestError,
        BucketNotFoundError,
        KeyNotFoundError,
        KeyWrongLastSequenceError,
        NoStreamResponseError,
        NotFoundError,
    )
finally:
    if _unloaded:
        del sys.modules["aiohttp"]

logger = logging.getLogger("accord.sidecar.broker")

STREAM = wire.STREAM
PREFIX = wire.SUBJECT_PREFIX
durable_name = wire.durable_name
DUPLICATE_WINDOW_S = wire.STREAM_DUPLICATE_WINDOW_S
# Ordered subscriptions: which sidecar of an app delivers (one at a time), a key per consumer
# in this bucket. The broker forgets a claim OWNER_TTL_S after it was last renewed.
OWNERS_BUCKET = wire.OWNERS_BUCKET
OWNER_TTL_S = 10.0
_HEADER_OVERHEAD = len("NATS/1.0\r\n\r\n")


subject = wire.subject


def legacy_durable_name(app_id: str, topic: str) -> str:
    """The name sidecars before 0.2 used (not injective); read only, to carry its position
    over to the new consumer on upgrade."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{app_id}-{topic}")[:200]


def owner(app_id: str, topic: str, partition: wire.Partition | None = None) -> str:
    """Written into a consumer's description: whose it is, checked on every bind."""
    part = f" partition={partition[0]}/{partition[1]}" if partition else ""
    return f"accord app={app_id} topic={topic}{part}"


class BrokerUnavailable(Exception):
    """The broker did not acknowledge in time (disconnected or overloaded)."""


class TooLarge(Exception):
    """The event is over the broker's max payload; the message names the limit."""


class ConsumerClash(Exception):
    """The consumer this subscription needs exists and belongs to another subscription."""


@dataclass(frozen=True)
class StreamSettings:
    """The stream's limits and what a new consumer replays (chart values -> env)."""

    max_age_s: int = 0  # 0: kept until max_bytes (or forever)
    max_bytes: int = -1
    replicas: int = 1
    storage: str = "file"
    new_consumers_start: str = "all"  # "all": from the first stored event; "new": from now

    def config(self) -> api.StreamConfig:
        fields = wire.stream_config(self.max_age_s, self.max_bytes, self.replicas, self.storage)
        return api.StreamConfig(**{**fields, "storage": api.StorageType(fields["storage"])})


class Broker:
    def __init__(self, url: str, stream: StreamSettings | None = None) -> None:
        self.url = url
        self.stream = stream or StreamSettings()
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.problem: str | None = f"not connected to NATS at {url} yet"
        self._connected = asyncio.Event()
        self._stream_lock = asyncio.Lock()
        self._last_failure_log = 0.0
        self._recheck: asyncio.Task[None] | None = None
        self._closing = False
        self._had_stream = False  # seen once: missing later means the broker lost it
        self._owners_kv: Any = None
        self._counts_kv: Any = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def max_payload(self) -> int:
        """The broker's limit on one message (headers included), learnt at connect."""
        return self.nc.max_payload if self.nc is not None else 1 << 20

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def connect(self) -> None:
        """Connect, retrying forever (meant to run as a background task: cancel it to stop),
        then make sure the stream exists."""

        async def disconnected() -> None:
            if self._closing:
                return  # ours: not news
            logger.warning("disconnected from NATS at %s; reconnecting", self.url)

        async def reconnected() -> None:
            logger.info("reconnected to NATS at %s", self.url)
            self.problem = None
            # The broker may be back without its store: have the stream before it is needed.
            self._recheck = asyncio.create_task(self._ensure_stream_logged())

        async def error(exc: Exception) -> None:
            # nats-py's first connect swallows a cancel that lands in its cleanup and tries
            # again forever: a stop that came meanwhile ends it here (called in its loop).
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            # Called on every failed attempt: say it now and then, not 4 times a second.
            now = time.monotonic()
            if now - self._last_failure_log > 30:
                self._last_failure_log = now
                logger.warning("cannot reach NATS at %s (%s); retrying", self.url, exc)

        logger.info("connecting to NATS at %s", self.url)
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
        self.js = self.nc.jetstream()
        logger.info("connected to NATS at %s (max payload %d bytes)", self.url, self.max_payload)
        while True:
            try:
                await self.ensure_stream()
                break
            except Exception as exc:
                self.problem = f"stream {STREAM} not available: {exc or type(exc).__name__}"
                logger.warning("%s; retrying", self.problem)
                await asyncio.sleep(1)
        self.problem = None
        self._connected.set()

    async def _ensure_stream_logged(self) -> None:
        try:
            await self.ensure_stream()
        except Exception as exc:
            self.problem = f"stream {STREAM} not available: {exc or type(exc).__name__}"
            logger.warning("%s", self.problem)

    async def ensure_stream(self) -> None:
        """The stream exists with our settings: created when missing (a broker that came
        back empty), updated when its limits differ from the configured ones."""
        assert self.js is not None
        async with self._stream_lock:
            want = self.stream.config()
            try:
                info = await self.js.stream_info(STREAM)
            except NotFoundError:
                try:
                    await self.js.add_stream(want)
                    self.problem = None
                    if self._had_stream:
                        logger.warning(
                            "stream %s was missing on the broker; created it again", STREAM
                        )
                    else:
                        logger.info("created stream %s", STREAM)
                except BadRequestError:
                    pass  # another sidecar created it first
                self._had_stream = True
                return
            self._had_stream = True
            have = info.config
            if (have.max_age or None, have.max_bytes, have.num_replicas) != (
                want.max_age,
                want.max_bytes,
                want.num_replicas,
            ):
                have.max_age, have.max_bytes = want.max_age, want.max_bytes
                have.num_replicas = want.num_replicas
                await self.js.update_stream(have)
                logger.info("stream %s limits updated to the configured ones", STREAM)

    def check_size(self, data: bytes, headers: dict[str, str]) -> None:
        size = len(data) + _HEADER_OVERHEAD + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > self.max_payload:
            raise TooLarge(
                f"the event is {size} bytes with its envelope; the broker takes at most "
                f"{self.max_payload} bytes per message (NATS max_payload)"
            )

    async def publish(
        self, topic: str, data: bytes, msg_id: str, headers: dict[str, str], timeout: float = 5.0
    ) -> api.PubAck:
        """Publish and wait for JetStream's ack; retried across reconnects (and waiting for
        the first connection) until timeout. TooLarge at once for a message the broker
        would refuse."""
        headers = {**headers, "Nats-Msg-Id": msg_id}
        self.check_size(data, headers)
        deadline = asyncio.get_running_loop().time() + timeout
        if not self._connected.is_set():
            # Still connecting (the sidecar has just started): wait for it, as a publish
            # waits across a reconnect, within the same time.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), timeout)
            if self.js is None or not self._connected.is_set():
                raise BrokerUnavailable(self.problem or f"not connected to NATS at {self.url}")
        delay = 0.05
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return await self.js.publish(
                    subject(topic), data, timeout=max(0.1, min(remaining, 2.0)), headers=headers
                )
            except NoStreamResponseError as exc:
                # No stream takes the subject: the broker came back without it.
                last: Exception = exc
                try:
                    await self.ensure_stream()
                except Exception as again:
                    last = again
            except Exception as exc:
                last = exc
            if asyncio.get_running_loop().time() + delay >= deadline:
                raise BrokerUnavailable(
                    f"broker did not acknowledge: {last or type(last).__name__}"
                ) from last
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def consumer(
        self,
        app_id: str,
        topic: str,
        max_ack_pending: int,
        ack_wait_s: float = 30,
        rewind: bool = False,
        partition: wire.Partition | None = None,
    ) -> Any:
        """The durable pull subscription of app_id on topic, created when missing (also when
        the broker lost it). ack_wait_s: how long an unacked event (its sidecar died
        mid-delivery) waits before JetStream delivers it again. rewind: events handed out
        and not acked (to a sidecar that stopped or died) come first again, now, in stream
        order (the consumer is made again from its ack floor): an ordered subscription's
        new owner needs them before any later event. ConsumerClash when the name is taken
        by another subscription."""
        assert self.js is not None
        durable = wire.consumer_name(app_id, topic, partition)
        mine = owner(app_id, topic, partition)
        try:
            info = await self.js.consumer_info(STREAM, durable)
        except NotFoundError as exc:
            if "stream" in str(exc).lower():
                await self.ensure_stream()
            await self._create_consumer(
                app_id, topic, durable, max_ack_pending, ack_wait_s, partition=partition
            )
        else:
            c = info.config
            if c.filter_subject != subject(topic) or c.description != mine:
                raise ConsumerClash(
                    f"consumer {durable} on stream {STREAM} is {c.description or 'unlabelled'} "
                    f"(subject {c.filter_subject}), not {mine}; "
                    "not delivering from it"
                )
            if rewind and info.num_ack_pending:
                floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
                await self.js.delete_consumer(STREAM, durable)
                await self._create_consumer(
                    app_id,
                    topic,
                    durable,
                    max_ack_pending,
                    ack_wait_s,
                    start_seq=floor + 1,
                    partition=partition,
                )
                logger.info(
                    "consumer %s: %d events handed out and not acked are delivered again, "
                    "from stream sequence %d",
                    durable,
                    info.num_ack_pending,
                    floor + 1,
                )
            elif c.max_ack_pending != max_ack_pending or c.ack_wait != ack_wait_s:
                await self.js.add_consumer(  # an update: the sidecar's settings changed
                    STREAM, c.evolve(max_ack_pending=max_ack_pending, ack_wait=ack_wait_s)
                )
        return await self.js.pull_subscribe_bind(durable, stream=STREAM)

    async def claim(self, key: str, holder: str, revision: int | None) -> int | None:
        """Take or keep the ownership of `key` for `holder` (a claim the broker forgets
        OWNER_TTL_S after its last renewal). revision: of this holder's last claim, None
        when it has none. The new revision, or None while another holder has it. A holder
        that restarted (same name) takes its own claim back at once."""
        try:
            return await self._claim(key, holder, revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            raise
        except Exception:
            self._owners_kv = None  # the broker may have lost the bucket: made again next time
            raise

    async def _claim(self, key: str, holder: str, revision: int | None) -> int | None:
        kv = await self._owners()
        if revision is not None:
            try:
                return await kv.update(key, holder.encode(), last=revision)
            except KeyWrongLastSequenceError:
                pass  # lapsed (and perhaps taken): claim it like anyone else
        try:
            return await kv.create(key, holder.encode())
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                return None  # it lapsed just now: the next claim takes it
            if entry.value != holder.encode():
                return None
            try:
                return await kv.update(key, holder.encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                return None

    async def release(self, key: str, revision: int) -> None:
        """Give up a claim (only if still ours), so another holder takes it now."""
        kv = await self._owners()
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
            await kv.delete(key, last=revision)

    async def members(self, group: str, holder: str) -> list[str]:
        """Say `holder` is alive in `group` (for OWNER_TTL_S) and list who is, sorted: the
        replicas sharing a partitioned subscription."""
        kv = await self._owners()
        try:
            await kv.put(f"m.{group}.{holder}", b"")
            info = await self.js.stream_info(  # type: ignore[union-attr]
                f"KV_{OWNERS_BUCKET}", subjects_filter=f"$KV.{OWNERS_BUCKET}.m.{group}.>"
            )
        except Exception:
            self._owners_kv = None  # the broker may have lost the bucket: made again next time
            raise
        prefix = f"$KV.{OWNERS_BUCKET}.m.{group}."
        return sorted(s[len(prefix) :] for s in (info.state.subjects or {}))

    async def report_failing(self, consumer: str, report: dict[str, Any] | None) -> None:
        """Say that an ordered consumer's head event keeps failing (None: no longer), for
        the operator's status; the broker forgets it OWNER_TTL_S after the last report."""
        kv = await self._owners()
        try:
            if report is None:
                await self.js.purge_stream(  # type: ignore[union-attr]
                    f"KV_{OWNERS_BUCKET}",
                    subject=f"$KV.{OWNERS_BUCKET}.{wire.failing_key(consumer)}",
                )
            else:
                await kv.put(wire.failing_key(consumer), json.dumps(report).encode())
        except Exception:
            self._owners_kv = None
            raise

    async def park(self, consumer: str, key: str, data: bytes, headers: dict[str, str]) -> None:
        """Keep an event of a parked key, after those parked before it (stored when this
        returns: JetStream acknowledged it)."""
        assert self.js is not None
        subject_ = wire.parked_subject(consumer, key)
        for attempt in (1, 2):
            try:
                await self.js.publish(subject_, data, headers=headers, timeout=5)
                return
            except NoStreamResponseError:
                if attempt == 2:
                    raise
                await self.js.add_stream(
                    api.StreamConfig(
                        name=wire.PARKED_STREAM,
                        subjects=[wire.PARKED_PREFIX + ">"],
                        storage=api.StorageType.FILE,
                        num_replicas=self.stream.replicas,
                        duplicate_window=DUPLICATE_WINDOW_S,
                    )
                )

    async def parked(self, consumer: str) -> dict[str, int]:
        """The parked keys of a consumer (their subjects) and how many events each holds."""
        assert self.js is not None
        try:
            info = await self.js.stream_info(
                wire.PARKED_STREAM, subjects_filter=wire.parked_subject(consumer)
            )
        except NotFoundError:
            return {}
        return {str(k): int(v) for k, v in (info.state.subjects or {}).items()}

    async def parked_events(self, subject_: str) -> AsyncIterator[list[Any]]:
        """The events parked on one subject, in order, in batches (an ephemeral consumer:
        the events stay on the stream until unpark)."""
        assert self.js is not None
        sub = await self.js.pull_subscribe(
            subject_,
            stream=wire.PARKED_STREAM,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=-1, inactive_threshold=30.0
            ),
        )
        try:
            while True:
                try:
                    batch = await sub.fetch(256, timeout=0.5)
                except TimeoutError:
                    return
                for msg in batch:  # read: acked on this throwaway consumer only
                    with contextlib.suppress(Exception):
                        await msg.ack()
                yield batch
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def unpark(self, subject_: str, before: int | None = None) -> None:
        """Drop one key's parked events (those before stream sequence `before`, or all)."""
        assert self.js is not None
        await self.js.purge_stream(wire.PARKED_STREAM, subject=subject_, seq=before)

    async def command(self, consumer: str) -> dict[str, Any] | None:
        """What the operator asks of this consumer's parked events, if anything."""
        kv = await self._owners()
        try:
            entry = await kv.get(wire.command_key(consumer))
            value = json.loads(entry.value or b"null")
        except KeyNotFoundError:
            return None
        except Exception:
            self._owners_kv = None
            raise
        return value if isinstance(value, dict) else None

    async def done(self, consumer: str, nonce: str) -> None:
        kv = await self._owners()
        await kv.put(f"done.{consumer}", nonce.encode())

    async def count_dead_letter(self, consumer: str) -> None:
        """One more event dead-lettered by this consumer (COUNTS_BUCKET, kept: no TTL)."""
        assert self.js is not None
        if self._counts_kv is None:
            try:
                self._counts_kv = await self.js.key_value(wire.COUNTS_BUCKET)
            except BucketNotFoundError:
                self._counts_kv = await self.js.create_key_value(
                    bucket=wire.COUNTS_BUCKET, history=1, replicas=self.stream.replicas
                )
        kv, key = self._counts_kv, wire.dead_lettered_key(consumer)
        for _ in range(10):  # compare-and-set: another partition's owner may count too
            try:
                entry = await kv.get(key)
                await kv.update(key, str(int(entry.value or b"0") + 1).encode(), entry.revision)
                return
            except KeyNotFoundError:
                try:
                    await kv.create(key, b"1")
                    return
                except KeyWrongLastSequenceError:
                    continue
            except KeyWrongLastSequenceError:
                continue

    async def leave(self, group: str, holder: str) -> None:
        """No longer one of `group` (the others share its partitions out at once)."""
        assert self.js is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.js.purge_stream(
                    f"KV_{OWNERS_BUCKET}", subject=f"$KV.{OWNERS_BUCKET}.m.{group}.{holder}"
                ),
                2,
            )

    async def _owners(self) -> Any:
        assert self.js is not None
        if self._owners_kv is None:
            try:
                self._owners_kv = await self.js.key_value(OWNERS_BUCKET)
            except BucketNotFoundError:
                self._owners_kv = await self.js.create_key_value(
                    bucket=OWNERS_BUCKET, ttl=OWNER_TTL_S, history=1, replicas=self.stream.replicas
                )
        return self._owners_kv

    async def _create_consumer(
        self,
        app_id: str,
        topic: str,
        durable: str,
        max_ack_pending: int,
        ack_wait_s: float,
        start_seq: int | None = None,
        partition: wire.Partition | None = None,
    ) -> None:
        assert self.js is not None
        start: dict[str, Any] = {
            "deliver_policy": api.DeliverPolicy.NEW
            if self.stream.new_consumers_start == "new"
            else api.DeliverPolicy.ALL
        }
        if start_seq is not None:
            start = {
                "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": start_seq,
            }
        legacy = legacy_durable_name(app_id, topic)
        try:
            carry = start_seq is None and partition is None
            old = await self.js.consumer_info(STREAM, legacy) if carry else None
        except NotFoundError:
            old = None
        if old is not None and old.config.filter_subject == subject(topic):
            # Upgrade: carry on from where the old consumer of this subscription stood.
            start = {
                "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": (old.ack_floor.stream_seq if old.ack_floor else 0) + 1,
            }
        await self.js.add_consumer(
            STREAM,
            api.ConsumerConfig(
                durable_name=durable,
                description=owner(app_id, topic, partition),
                filter_subject=subject(topic),
                ack_policy=api.AckPolicy.EXPLICIT,
                max_ack_pending=max_ack_pending,
                ack_wait=ack_wait_s,
                max_deliver=-1,  # the sidecar dead-letters itself, with the failure reason
                **start,
            ),
        )
        logger.info("created consumer %s for topic %s", durable, topic)
        if old is not None and old.config.filter_subject == subject(topic):
            try:
                await self.js.delete_consumer(STREAM, legacy)
                logger.info("moved consumer %s to %s", legacy, durable)
            except NotFoundError:
                pass

    async def consumer_alive(
        self, app_id: str, topic: str, partition: wire.Partition | None = None
    ) -> tuple[bool, int | None]:
        """(whether the consumer still exists, events not yet acked) from the broker."""
        assert self.js is not None
        try:
            name = wire.consumer_name(app_id, topic, partition)
            info = await self.js.consumer_info(STREAM, name, timeout=2)
        except NotFoundError:
            return False, None
        return True, info.num_pending + info.num_ack_pending

    async def ack_floor(
        self, app_id: str, topic: str, partition: wire.Partition | None = None
    ) -> int:
        """The stream sequence up to which the consumer has every event settled (0: none)."""
        assert self.js is not None
        try:
            name = wire.consumer_name(app_id, topic, partition)
            info = await self.js.consumer_info(STREAM, name, timeout=2)
        except NotFoundError:
            return 0
        return int(info.ack_floor.stream_seq or 0)

    async def close(self) -> None:
        self._closing = True
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):  # acks sent, then gone; a dead broker waits not
                await asyncio.wait_for(self.nc.flush(timeout=2), timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), timeout=3)
