"""The sidecar's CloudEvents envelopes against the spec and the official SDK (from PyPI):
every event the sidecar accepts, the SDK parses to the same attributes; every event the
spec forbids, the sidecar refuses naming the attribute."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accord_sidecar.cloudevents import STRUCTURED, EnvelopeError, batch, check, envelope

SOURCE = "accord://shop/orders"
BASE = {"specversion": "1.0", "id": "e-1", "source": "/shop", "type": "order.placed"}


def sdk(event: dict[str, Any]) -> CloudEvent:
    """What a consumer using the official SDK reads from a structured event we deliver."""
    parsed = JSONFormat().read(CloudEvent, json.dumps(event).encode())
    assert isinstance(parsed, CloudEvent)
    return parsed


def structured(event: dict[str, Any]) -> dict[str, Any]:
    return envelope(
        "orders", json.dumps(event).encode(), {"Content-Type": STRUCTURED}, source=SOURCE
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"MyExt": "x"}, "'MyExt' is not an attribute name"),
        ({"my-ext": "x"}, "'my-ext' is not an attribute name"),
        ({"my_ext": "x"}, "'my_ext' is not an attribute name"),
        ({"ext": 1.5}, "extension ext must be"),
        ({"ext": {"a": 1}}, "extension ext must be"),
        ({"ext": [1]}, "extension ext must be"),
        ({"ext": None}, "extension ext must be"),
        ({"ext": 2**31}, "extension ext must be"),
        ({"time": "yesterday"}, "time must be an RFC 3339"),
        ({"time": "2026-01-31 12:00:00"}, "time must be an RFC 3339"),
        ({"time": "2026-01-31T12:00:00"}, "time must be an RFC 3339"),  # no offset
        ({"time": "2026-02-30T12:00:00Z"}, "time must be an RFC 3339"),
        ({"time": 1700000000}, "time must be an RFC 3339"),
        ({"data": 1, "data_base64": "AA=="}, "data or data_base64, not both"),
        ({"data_base64": "not base64!"}, "data_base64 must be a base64"),
        ({"data_base64": 12}, "data_base64 must be a base64"),
        ({"subject": ""}, "subject, when present, must be a non-empty"),
        ({"dataschema": ""}, "dataschema, when present"),
        ({"dataschema": "no scheme"}, "dataschema must be an absolute URI"),
        ({"datacontenttype": "json"}, "datacontenttype must be a media type"),
        ({"id": ""}, "id must be a non-empty string"),
        ({"source": 5}, "source must be a non-empty string"),
        ({"specversion": "0.3"}, "specversion"),
    ],
)
def test_events_the_spec_forbids_are_refused_naming_the_attribute(
    change: dict[str, Any], named: str
) -> None:
    with pytest.raises(EnvelopeError, match=named):
        structured({**BASE, **change})


def test_a_batch_names_the_event_that_is_wrong() -> None:
    body = json.dumps([BASE, {**BASE, "time": "soon"}]).encode()
    with pytest.raises(EnvelopeError, match=r"\[1\]\.time"):
        batch("orders", body, 10)


def test_a_producers_own_topic_extension_is_never_overwritten() -> None:
    event = structured({**BASE, "topic": "billing"})
    assert event["topic"] == "billing"
    assert structured(BASE)["topic"] == "orders"  # ours, when it has none


def test_binary_mode_headers_are_percent_decoded_and_media_type_parameters_kept() -> None:
    """HTTP protocol binding 3.1.3.2, with the SDK producing the request."""
    original = CloudEvent(
        {
            "id": "e-9",
            "source": "/shop",
            "type": "order.placed",
            "subject": 'héllo wörld 100% "quoted"',
            "colour": "blue green",
            "datacontenttype": "text/plain; charset=utf-8",
        },
        "plain text ✓",
    )
    message = ce_http.to_binary(original, JSONFormat())
    event = envelope("orders", message.body, message.headers, source=SOURCE)
    assert event["subject"] == 'héllo wörld 100% "quoted"'
    assert event["colour"] == "blue green"
    assert event["datacontenttype"] == "text/plain; charset=utf-8"
    parsed = sdk(event)
    assert parsed.get_data() == "plain text ✓"
    for name in ("id", "source", "type", "subject", "datacontenttype"):
        assert parsed.get_attributes()[name] == original.get_attributes()[name]
    assert parsed.get_time() == original.get_time()


def test_binary_mode_refuses_what_is_not_an_attribute() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}
    with pytest.raises(EnvelopeError, match="ce-data"):
        envelope("orders", b"{}", {**headers, "ce-data": "x"}, source=SOURCE)
    with pytest.raises(EnvelopeError, match="Content-Type"):
        envelope("orders", b"{}", {**headers, "ce-datacontenttype": "a/b"}, source=SOURCE)
    with pytest.raises(EnvelopeError, match="percent-encoded UTF-8"):
        envelope("orders", b"{}", {**headers, "ce-subject": "%FF%FE"}, source=SOURCE)
    with pytest.raises(EnvelopeError, match="time"):
        envelope("orders", b"{}", {**headers, "ce-time": "now"}, source=SOURCE)


def test_plain_bodies_keep_their_media_type_and_charset() -> None:
    latin = envelope(
        "orders", "café".encode("latin-1"), {"Content-Type": "text/plain; charset=latin-1"},
        source=SOURCE,
    )  # fmt: skip
    assert latin["data"] == "café" and latin["datacontenttype"] == "text/plain; charset=latin-1"
    assert sdk(latin).get_data() == "café"
    binary = envelope("orders", b"\x00\xff", {"Content-Type": "image/png"}, source=SOURCE)
    assert sdk(binary).get_data() == b"\x00\xff"


def test_a_plain_publish_may_choose_its_id_so_a_retry_is_a_duplicate() -> None:
    first = envelope("orders", b"{}", {}, source=SOURCE, event_id="order-7-placed")
    again = envelope("orders", b"{}", {}, source=SOURCE, event_id="order-7-placed")
    assert first["id"] == again["id"] == "order-7-placed"
    with pytest.raises(EnvelopeError, match="Accord-Idempotency-Key"):
        envelope("orders", b"{}", {}, source=SOURCE, event_id="x" * 513)


def test_json_nested_too_deeply_to_parse_is_a_clear_refusal() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(EnvelopeError, match="nested too deeply"):
        envelope("orders", deep, {"Content-Type": "application/json"}, source=SOURCE)
    with pytest.raises(EnvelopeError, match="nested too deeply"):
        envelope("orders", deep, {"Content-Type": STRUCTURED}, source=SOURCE)
    with pytest.raises(EnvelopeError, match="nested too deeply"):
        batch("orders", deep, 10)


# -- beyond examples: whatever a producer sends, we accept only what the SDK reads ----------

_names = st.one_of(
    st.sampled_from(["subject", "time", "dataschema", "datacontenttype", "data", "data_base64"]),
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True),
)
_values = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**33), max_value=2**33),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "2026-01-31T12:00:00Z",
            "2026-01-31T12:00:00.123+02:00",
            "2026-13-01T00:00:00Z",
            "AA==",
            "application/json",
            "text/plain; charset=utf-8",
            "https://schemas.example/v1",
        ]
    ),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.dictionaries(_names, _values, max_size=4))
def test_every_event_we_accept_the_official_sdk_reads_unchanged(extra: dict[str, Any]) -> None:
    candidate = {**BASE, **extra}
    try:
        check(candidate)
    except EnvelopeError:
        return
    event = structured(candidate)
    parsed = sdk(event)  # raises if the SDK finds it invalid
    attributes = parsed.get_attributes()
    for name, value in event.items():
        if name in ("data", "data_base64", "time"):
            continue
        assert attributes[name] == value, name
