"""CloudEvents 1.0 JSON envelopes: structured (application/cloudevents+json), binary
(ce-* headers, HTTP protocol binding) or a plain body that the sidecar wraps. Pure
functions; an event the spec forbids is refused (EnvelopeError names the attribute), so
every event the sidecar stores parses in any conforming SDK.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
_REQUIRED = ("id", "source", "type")
_STRING_ATTRIBUTES = ("datacontenttype", "dataschema", "subject")
_NAME = re.compile(r"^[a-z0-9]+$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+\s*(;.*)?$", re.S)
_INT32 = (-(2**31), 2**31 - 1)


class EnvelopeError(ValueError):
    """The request does not make a valid CloudEvent; the message names what is wrong."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def loads(body: bytes | str) -> Any:
    """JSON from a client: any failure (also nesting too deep to parse) is an EnvelopeError."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise EnvelopeError("body is not JSON we take: nested too deeply") from None


def media_type(content_type: str) -> str:
    """'Application/JSON; charset=utf-8' -> 'application/json'."""
    return content_type.split(";")[0].strip().lower()


def check(event: Mapping[str, Any], where: str = "") -> None:
    """The CloudEvents 1.0 rules for one event in JSON format; EnvelopeError names the
    first attribute that breaks them."""
    if event.get("specversion") != "1.0":
        raise EnvelopeError(f'{where}specversion must be "1.0"')
    for attr in _REQUIRED:
        value = event.get(attr)
        if not isinstance(value, str) or not value:
            raise EnvelopeError(f"{where}{attr} must be a non-empty string")
    for attr in _STRING_ATTRIBUTES:
        if attr in event and (not isinstance(event[attr], str) or not event[attr]):
            raise EnvelopeError(f"{where}{attr}, when present, must be a non-empty string")
    if "datacontenttype" in event and not _MEDIA_TYPE.match(event["datacontenttype"]):
        raise EnvelopeError(f"{where}datacontenttype must be a media type (RFC 2046)")
    if "dataschema" in event and not re.match(
        r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", event["dataschema"]
    ):
        raise EnvelopeError(f"{where}dataschema must be an absolute URI")
    if "time" in event:
        _check_time(event["time"], where)
    if "data" in event and "data_base64" in event:
        raise EnvelopeError(f"{where}an event has data or data_base64, not both")
    if "data_base64" in event:
        raw = event["data_base64"]
        try:
            if not isinstance(raw, str):
                raise ValueError
            base64.b64decode(raw, validate=True)
        except (ValueError, binascii.Error):
            raise EnvelopeError(f"{where}data_base64 must be a base64 string") from None
    for name, value in event.items():
        if name in ("data", "data_base64", "specversion", *_REQUIRED, *_STRING_ATTRIBUTES, "time"):
            continue
        if not _NAME.match(name):
            raise EnvelopeError(
                f"{where}{name!r} is not an attribute name (lower-case letters and digits only)"
            )
        _check_extension(name, value, where)


def _check_time(value: Any, where: str) -> None:
    ok = isinstance(value, str) and _RFC3339.match(value) is not None
    if ok:
        try:
            datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            ok = False
    if not ok:
        raise EnvelopeError(f"{where}time must be an RFC 3339 timestamp, e.g. 2026-01-31T12:00:00Z")


def _check_extension(name: str, value: Any, where: str) -> None:
    if isinstance(value, (bool, str)):
        return
    if isinstance(value, int) and _INT32[0] <= value <= _INT32[1]:
        return
    raise EnvelopeError(f"{where}extension {name} must be a string, a boolean or a 32-bit integer")


def envelope(
    topic: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    source: str,
    event_id: str | None = None,
) -> dict[str, Any]:
    """The structured CloudEvent to publish for one request. EnvelopeError on bad input.
    event_id: the client's id for a plain body (so a retry is a duplicate, not a new event)."""
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = lower.get("content-type", "").strip()
    kind = media_type(content_type)

    if kind == STRUCTURED:
        return structured(topic, loads(body or b"null"), "")

    if "ce-specversion" in lower:
        return _binary(topic, body, lower, content_type)

    if event_id is not None and (not event_id or len(event_id) > 512):
        raise EnvelopeError("Accord-Idempotency-Key (the event id) must be 1 to 512 characters")
    event = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": "dev.accord.published",
        "time": _now(),
        "datacontenttype": content_type or "application/json",
        "topic": topic,
    }
    event.update(_data(body, event["datacontenttype"]))
    check(event)
    return event


def _binary(topic: str, body: bytes, lower: Mapping[str, str], content_type: str) -> dict[str, Any]:
    """HTTP binding, binary mode: each ce-<name> header is an attribute, its value
    percent-decoded (section 3.1.3.2); Content-Type is datacontenttype, parameters kept."""
    event: dict[str, Any] = {}
    for key, value in lower.items():
        if not key.startswith("ce-"):
            continue
        name = key[3:]
        if name in ("data", "datacontenttype", "data_base64") or not _NAME.match(name):
            raise EnvelopeError(
                f"header {key} is not a context attribute "
                + (
                    "(datacontenttype is the Content-Type header)"
                    if name == "datacontenttype"
                    else "(lower-case letters and digits only; data is the body)"
                )
            )
        try:
            event[name] = percent_decode(value)
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise EnvelopeError(f"header {key} is not percent-encoded UTF-8") from None
    if content_type:
        event["datacontenttype"] = content_type
    event.update(_data(body, content_type or "application/json"))
    event.setdefault("time", _now())
    event.setdefault("topic", topic)
    check(event, "header ce-")
    return event


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def percent_decode(value: str) -> str:
    """RFC 3986 percent-decoding of a header value to UTF-8 ('+' stays '+')."""
    raw = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode("latin-1"))
    return raw.decode("utf-8")


def structured(topic: str, event: Any, where: str) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise EnvelopeError(f"{where}a structured CloudEvent must be a JSON object")
    check(event, where)
    event.setdefault("time", _now())
    event.setdefault("topic", topic)  # never over a producer's own extension of that name
    return event


def batch(topic: str, body: bytes, limit: int) -> list[dict[str, Any]]:
    """A CloudEvents batch (JSON array of structured events); errors name the index."""
    events = loads(body or b"null")
    if not isinstance(events, list) or not events:
        raise EnvelopeError("a CloudEvents batch must be a non-empty JSON array")
    if len(events) > limit:
        raise EnvelopeError(f"a batch holds at most {limit} events, not {len(events)}")
    return [structured(topic, e, f"[{i}].") for i, e in enumerate(events)]


def _data(body: bytes, content_type: str) -> dict[str, Any]:
    if not body:
        return {}
    kind = media_type(content_type)
    if kind == "application/json" or kind.endswith("+json"):
        return {"data": loads(body)}
    if kind.startswith("text/"):
        charset = _charset(content_type)
        try:
            return {"data": body.decode(charset)}
        except (UnicodeDecodeError, LookupError):
            raise EnvelopeError(f"text body is not {charset}") from None
    return {"data_base64": base64.b64encode(body).decode()}


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"') or "UTF-8"
    return "UTF-8"
