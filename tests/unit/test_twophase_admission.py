"""Admission of a TwoPhaseTransaction: payload bounds (the schema cannot check them) and the
coordinator's finalizer put on at creation."""

from __future__ import annotations

from typing import Any

from accord_operator.twophase.admission import (
    FINALIZER,
    MAX_PAYLOAD_BYTES,
    MAX_TOTAL_PAYLOAD_BYTES,
    finalizers_at_creation,
    payload_errors,
    payload_size,
)


def _spec(*payloads: Any) -> dict[str, Any]:
    return {
        "participants": [
            {"name": f"p{i}", "service": "svc", **({} if p is None else {"payload": p})}
            for i, p in enumerate(payloads)
        ]
    }


def _blob(size: int) -> dict[str, str]:
    """A payload whose compact JSON is exactly `size` bytes."""
    return {"b": "x" * (size - len('{"b":""}'))}


def test_payloads_within_bounds_pass() -> None:
    assert payload_errors(_spec(None, {"amount": 10}, _blob(MAX_PAYLOAD_BYTES))) == []
    assert payload_size(_blob(MAX_PAYLOAD_BYTES)) == MAX_PAYLOAD_BYTES


def test_an_oversize_payload_is_named_with_its_size_and_the_limit() -> None:
    errors = payload_errors(_spec({"a": 1}, _blob(MAX_PAYLOAD_BYTES + 1)))
    assert errors == [
        f"spec.participants[1].payload: Too long: {MAX_PAYLOAD_BYTES + 1} bytes of JSON, "
        f"at most {MAX_PAYLOAD_BYTES} (256 KiB) per participant"
    ]


def test_payloads_that_fit_one_by_one_are_bounded_together() -> None:
    count = MAX_TOTAL_PAYLOAD_BYTES // MAX_PAYLOAD_BYTES + 1
    errors = payload_errors(_spec(*[_blob(MAX_PAYLOAD_BYTES)] * count))
    assert len(errors) == 1 and errors[0].startswith("spec.participants: Too long: payloads")


def test_multibyte_text_counts_in_bytes_not_characters() -> None:
    text = "é" * (MAX_PAYLOAD_BYTES // 2)  # two bytes each in UTF-8: just over the limit
    assert payload_errors(_spec({"t": text}))[0].startswith("spec.participants[0].payload")


def test_the_finalizer_goes_on_at_creation_beside_any_the_creator_set() -> None:
    assert finalizers_at_creation(None) == [FINALIZER]
    assert finalizers_at_creation(["example.com/audit"]) == ["example.com/audit", FINALIZER]
    assert finalizers_at_creation([FINALIZER]) is None  # nothing to change
