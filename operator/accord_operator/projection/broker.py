"""What the broker says about a projection's progress: the operator's one connection to
NATS JetStream, read only but for one thing: passing on a request to retry or skip parked
events (accord.dev/parked) to the projectors' sidecars. Lag and position come from the
consumers the projectors' sidecars made (their own pending counts), never from counting in
our own code."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
from typing import Any

import nats
from nats.js import api
from nats.js.errors import NotFoundError

import accord_wire as wire
from accord_operator.projection.plan import Progress

logger = logging.getLogger("accord.projection.broker")

CONNECT_TIMEOUT_S = 2.0


class BrokerUnavailable(Exception):
    """The broker cannot be asked now (the message says why)."""


class BrokerView:
    """Reads streams and consumers; connects on first use and again after a loss."""

    def __init__(self, url: str, stream: dict[str, Any] | None = None) -> None:
        self.url = url
        self.stream = stream or wire.stream_config()  # made as the sidecars would make it
        self._nc: Any = None
        self._lock = asyncio.Lock()

    async def _js(self) -> Any:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                if not self.url:
                    raise BrokerUnavailable("no broker configured (ACCORD_NATS_URL)")

                async def quiet(exc: Exception) -> None:  # said once, by the caller
                    logger.debug("broker %s: %s", self.url, exc)

                try:
                    # No reconnecting inside the client: a lost connection is closed, and
                    # the next pass connects again (a pass never hangs on the broker).
                    self._nc = await asyncio.wait_for(
                        nats.connect(
                            self.url,
                            connect_timeout=CONNECT_TIMEOUT_S,
                            allow_reconnect=False,
                            max_reconnect_attempts=0,
                            error_cb=quiet,
                            name="accord-operator",
                        ),
                        CONNECT_TIMEOUT_S * 2,
                    )
                except Exception as exc:
                    self._nc = None
                    raise BrokerUnavailable(f"broker {self.url} unreachable: {exc}") from None
            return self._nc.jetstream()

    async def progress(
        self, app_id: str, topic: str, known_position: int, partitions: int = 1
    ) -> Progress:
        """The figures of the consumers `app_id` made for `topic` (one, or one per
        partition: accord_wire.consumer_name), a failure its sidecar reports, and when the
        event at the position was published (read only when the position moved past
        `known_position`). Partitioned: the position is the lowest of the partitions' (all
        of them have projected everything up to it), the lag the highest."""
        js = await self._js()
        subject = wire.subject(topic)
        try:
            stream = await js.stream_info(wire.STREAM, subjects_filter=subject)
        except NotFoundError:
            stream = await self._make_stream(js, subject)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read stream {wire.STREAM}: {exc}") from None
        wrong = _unfit(stream.config, subject)
        if wrong:
            return Progress(stream_found=True, topic_events=0, stream_problem=wrong)
        topic_events = int((stream.state.subjects or {}).get(subject, 0))
        names = (
            [wire.consumer_name(app_id, topic)]
            if partitions <= 1
            else [wire.consumer_name(app_id, topic, (i, partitions)) for i in range(partitions)]
        )
        infos = []
        for name in names:
            try:
                infos.append(await js.consumer_info(wire.STREAM, name))
            except NotFoundError:
                return Progress(stream_found=True, topic_events=topic_events)
            except Exception as exc:
                raise BrokerUnavailable(f"cannot read the projector's consumer: {exc}") from None
        position = min(int(i.ack_floor.stream_seq or 0) for i in infos)
        when = None
        if position and position != known_position:
            try:
                msg = await js.get_msg(wire.STREAM, position)
                when = _rfc3339(msg.time)
            except Exception:  # expired meanwhile: the time is only a nicety
                when = None
        return Progress(
            stream_found=True,
            topic_events=topic_events,
            consumer_found=True,
            pending=max(int(i.num_pending or 0) for i in infos),
            ack_pending=max(int(i.num_ack_pending or 0) for i in infos),
            position=position,
            redelivered=sum(int(i.num_redelivered or 0) for i in infos),
            last_event_time=when,
            failing=await self._failing(js, names),
            **await self._parked(js, names),
            dead_lettered=await self._dead_lettered(js, names),
        )

    async def _dead_lettered(self, js: Any, consumers: list[str]) -> int:
        """Events these consumers sent to the dead-letter topic (their sidecars count)."""
        try:
            kv = await js.key_value(wire.COUNTS_BUCKET)
        except Exception:
            return 0  # nothing was ever dead-lettered
        total = 0
        for name in consumers:
            with contextlib.suppress(Exception):
                total += int((await kv.get(wire.dead_lettered_key(name))).value or b"0")
        return total

    async def _parked(self, js: Any, consumers: list[str]) -> dict[str, int]:
        """How many keys, and events, wait behind poison events on these consumers."""
        keys = events = 0
        for name in consumers:
            try:
                info = await js.stream_info(
                    wire.PARKED_STREAM, subjects_filter=wire.parked_subject(name)
                )
            except NotFoundError:
                break  # none parked yet, anywhere
            except Exception:
                continue  # a nicety: the next pass tells
            subjects = info.state.subjects or {}
            keys += len(subjects)
            events += sum(int(n) for n in subjects.values())
        return {"parked_keys": keys, "parked_events": events}

    async def ask(self, consumers: list[str], action: str, nonce: str) -> bool:
        """Ask the owners of these consumers to `action` (retry | skip) their parked events
        (asked again every pass: the broker forgets a request after 10 s); whether all have
        done it."""
        js = await self._js()
        try:
            kv = await js.key_value(wire.OWNERS_BUCKET)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach {wire.OWNERS_BUCKET}: {exc}") from None
        done = 0
        for name in consumers:
            try:
                answer = await kv.get(f"done.{name}")
                if answer.value == nonce.encode():
                    done += 1
                    continue
            except Exception:
                pass
            await kv.put(
                wire.command_key(name), json.dumps({"action": action, "nonce": nonce}).encode()
            )
        return done == len(consumers)

    async def _make_stream(self, js: Any, subject: str) -> Any:
        """The write side's stream, made (with the chart's settings) when a projection
        needs it before any sidecar made it."""
        config = api.StreamConfig(
            **{**self.stream, "storage": api.StorageType(self.stream["storage"])}
        )
        try:
            await js.add_stream(config)
            logger.info("created stream %s for the projections' topics", wire.STREAM)
        except Exception as exc:  # made meanwhile by a sidecar, or the broker is away
            logger.debug("stream %s not created: %s", wire.STREAM, exc)
        try:
            return await js.stream_info(wire.STREAM, subjects_filter=subject)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read stream {wire.STREAM}: {exc}") from None

    async def _failing(self, js: Any, consumers: list[str]) -> str | None:
        """What the sidecar reports failing on one of these consumers (None: nothing)."""
        try:
            kv = await js.key_value(wire.OWNERS_BUCKET)
        except Exception:
            return None  # no bucket yet: no ordered subscription ever ran
        for name in consumers:
            try:
                entry = await kv.get(wire.failing_key(name))
                report = json.loads(entry.value or b"{}")
            except Exception:
                continue
            if isinstance(report, dict):
                return (
                    f"event {report.get('sequence')} failed {report.get('deliveries')} "
                    f"time(s): {str(report.get('reason', ''))[:300]}"
                )
        return None

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


def _unfit(config: Any, subject: str) -> str | None:
    """Why the stream cannot be a projection's source (None: it can): it must take the
    topic's subject and keep events by limits (a replay reads them again)."""
    subjects = list(config.subjects or [])
    if not any(wire.subject_matches(p, subject) for p in subjects):
        return (
            f"stream {wire.STREAM} does not take subject {subject} (its subjects: "
            f"{', '.join(subjects) or 'none'}); events of the topic are not kept"
        )
    retention = getattr(config.retention, "value", config.retention) or "limits"
    if retention != "limits":
        return (
            f"stream {wire.STREAM} has retention {retention}: a projection needs limits "
            "(events kept after delivery, for replays and rebuilds)"
        )
    return None


def _rfc3339(value: Any) -> str | None:
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, str) and value:
        return value[:19] + "Z" if "T" in value else None
    return None
