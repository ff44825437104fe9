"""CloudEvents 1.0 JSON envelopes: structured (application/cloudevents+json), binary
(ce-* headers) or a plain body that the sidecar wraps. Pure functions."""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from collections.abc import Mapping
from typing import Any

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
_REQUIRED = ("id", "source", "type")


class EnvelopeError(ValueError):
    """The request does not make a valid CloudEvent; the message names what is wrong."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _check(event: Mapping[str, Any], where: str) -> None:
    if event.get("specversion") != "1.0":
        raise EnvelopeError(f'{where}specversion must be "1.0"')
    for attr in _REQUIRED:
        value = event.get(attr)
        if not isinstance(value, str) or not value:
            raise EnvelopeError(f"{where}{attr} must be a non-empty string")


def envelope(topic: str, body: bytes, headers: Mapping[str, str], *, source: str) -> dict[str, Any]:
    """The structured CloudEvent to publish for one request. EnvelopeError on bad input."""
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = lower.get("content-type", "application/json").split(";")[0].strip().lower()

    if content_type == STRUCTURED:
        try:
            event = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeError(f"body is not JSON: {exc}") from None
        return structured(topic, event, "")

    if "ce-specversion" in lower:
        event = {k[3:]: v for k, v in lower.items() if k.startswith("ce-") and len(k) > 3}
        _check(event, "header ce-")
        event["datacontenttype"] = content_type
        event.update(_data(body, content_type))
        event.setdefault("time", _now())
        event["topic"] = topic
        return event

    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": source,
        "type": "dev.accord.published",
        "time": _now(),
        "datacontenttype": content_type,
        "topic": topic,
    }
    event.update(_data(body, content_type))
    return event


def structured(topic: str, event: Any, where: str) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise EnvelopeError(f"{where}a structured CloudEvent must be a JSON object")
    _check(event, where)
    event.setdefault("time", _now())
    event["topic"] = topic
    return event


def batch(topic: str, body: bytes, limit: int) -> list[dict[str, Any]]:
    """A CloudEvents batch (JSON array of structured events); errors name the index."""
    try:
        events = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"body is not JSON: {exc}") from None
    if not isinstance(events, list) or not events:
        raise EnvelopeError("a CloudEvents batch must be a non-empty JSON array")
    if len(events) > limit:
        raise EnvelopeError(f"a batch holds at most {limit} events, not {len(events)}")
    return [structured(topic, e, f"[{i}].") for i, e in enumerate(events)]


def _data(body: bytes, content_type: str) -> dict[str, Any]:
    if not body:
        return {}
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return {"data": json.loads(body)}
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeError(f"body is not JSON: {exc}") from None
    if content_type.startswith("text/"):
        try:
            return {"data": body.decode()}
        except UnicodeDecodeError:
            raise EnvelopeError("text body is not UTF-8") from None
    return {"data_base64": base64.b64encode(body).decode()}
