"""What the broker says about a projection's progress: the operator's one connection to
NATS JetStream, read only. Lag and position come from the consumer the projector's sidecar
made (its own pending counts), never from counting in our own code."""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import nats
from nats.js.errors import NotFoundError

import accord_wire as wire
from accord_operator.projection.plan import Progress

logger = logging.getLogger("accord.projection.broker")

CONNECT_TIMEOUT_S = 2.0


class BrokerUnavailable(Exception):
    """The broker cannot be asked now (the message says why)."""


class BrokerView:
    """Reads streams and consumers; connects on first use and again after a loss."""

    def __init__(self, url: str) -> None:
        self.url = url
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

    async def progress(self, app_id: str, topic: str, known_position: int) -> Progress:
        """The figures of the consumer `app_id` made for `topic` (accord_wire.durable_name),
        and when the event at its position was published (read only when the position
        moved past `known_position`)."""
        js = await self._js()
        subject = wire.subject(topic)
        try:
            stream = await js.stream_info(wire.STREAM, subjects_filter=subject)
        except NotFoundError:
            return Progress(stream_found=False, topic_events=0)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read stream {wire.STREAM}: {exc}") from None
        topic_events = int((stream.state.subjects or {}).get(subject, 0))
        try:
            info = await js.consumer_info(wire.STREAM, wire.durable_name(app_id, topic))
        except NotFoundError:
            return Progress(stream_found=True, topic_events=topic_events)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read the projector's consumer: {exc}") from None
        position = int(info.ack_floor.stream_seq or 0)
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
            pending=int(info.num_pending or 0),
            ack_pending=int(info.num_ack_pending or 0),
            position=position,
            redelivered=int(info.num_redelivered or 0),
            last_event_time=when,
        )

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


def _rfc3339(value: Any) -> str | None:
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, str) and value:
        return value[:19] + "Z" if "T" in value else None
    return None
