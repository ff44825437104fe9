"""Admission of TwoPhaseTransactions (pure): the coordinator's finalizer goes on at creation
(one write fewer per transaction than the coordinator adding it), and payloads are bounded,
because the schema cannot measure free-form JSON. Each payload travels in one `/prepare`
body, which the participant's sidecar caps at 1 MiB by default, and all of them are stored
in one object, which etcd caps at 1.5 MiB. Without the bound a big payload is stored and
then fails at prepare time, and a bigger one fails with a raw storage error that names no
field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from accord_operator.resources import GROUP

FINALIZER = f"{GROUP}/tpc-phase2"  # deletion waits until every participant acknowledged
# Well below the sidecar's default ACCORD_MAX_BODY_BYTES (1 MiB), leaving room for the
# envelope ({"txid", "payload"}) and for a sidecar configured lower.
MAX_PAYLOAD_BYTES = 256 << 10
# Well below etcd's request limit (1.5 MiB), leaving room for status and metadata.
MAX_TOTAL_PAYLOAD_BYTES = 1 << 20


def payload_size(payload: Any) -> int:
    """Bytes the payload takes on the wire, as compact JSON (what /prepare sends)."""
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def payload_errors(spec: Mapping[str, Any]) -> list[str]:
    """Every bound a spec breaks, each naming its field, its size and the limit."""
    errors = []
    total = 0
    for i, participant in enumerate(spec.get("participants") or []):
        if not isinstance(participant, Mapping) or "payload" not in participant:
            continue
        size = payload_size(participant["payload"])
        total += size
        if size > MAX_PAYLOAD_BYTES:
            errors.append(
                f"spec.participants[{i}].payload: Too long: {size} bytes of JSON, "
                f"at most {MAX_PAYLOAD_BYTES} (256 KiB) per participant"
            )
    if total > MAX_TOTAL_PAYLOAD_BYTES:
        errors.append(
            f"spec.participants: Too long: payloads total {total} bytes of JSON, "
            f"at most {MAX_TOTAL_PAYLOAD_BYTES} (1 MiB) per transaction"
        )
    return errors


def finalizers_at_creation(finalizers: list[str] | None) -> list[str] | None:
    """The object's finalizers with the coordinator's added; None when it is there already."""
    have = list(finalizers or [])
    return None if FINALIZER in have else [*have, FINALIZER]
