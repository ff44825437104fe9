"""Resolving participant Services: cached, and one lookup for callers that miss at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from accord_operator.kubeapi import ApiError
from accord_operator.participants import Participants, ServiceNotFound


class SlowApi:
    """Answers a Service read after a pause, counting the reads."""

    def __init__(self, services: dict[str, dict[str, Any]]) -> None:
        self.services = services
        self.reads = 0

    async def get(self, path: str) -> Any:
        self.reads += 1
        await asyncio.sleep(0.05)
        name = path.rsplit("/", 1)[1]
        if name not in self.services:
            raise ApiError(404, {"reason": "NotFound"})
        return {"spec": self.services[name]}


async def test_callers_that_miss_at_once_share_one_lookup() -> None:
    external = {"type": "ExternalName", "externalName": "ledger.example"}
    api = SlowApi({"bank": {"type": "ClusterIP"}, "ext": external})
    participants = Participants(api=api)  # type: ignore[arg-type]
    urls = await asyncio.gather(*(participants.base_url("ns", "bank", 3501) for _ in range(50)))
    assert set(urls) == {"http://bank.ns.svc:3501"}
    assert api.reads == 1
    assert await participants.base_url("ns", "bank", 3501) == "http://bank.ns.svc:3501"
    assert api.reads == 1  # cached
    assert await participants.base_url("ns", "ext", 80) == "http://ledger.example:80"
    assert api.reads == 2


async def test_a_missing_service_is_said_to_every_caller_and_looked_up_again_later() -> None:
    api = SlowApi({})
    participants = Participants(api=api)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(participants.base_url("ns", "nope", 3501) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, ServiceNotFound) for r in results), results
    assert api.reads == 1
    with pytest.raises(ServiceNotFound, match="ns/nope"):
        await participants.base_url("ns", "nope", 3501)
    assert api.reads == 2  # a refusal is not cached: the Service may appear


async def test_one_caller_cancelled_does_not_cancel_the_others_lookup() -> None:
    api = SlowApi({"bank": {}})
    participants = Participants(api=api)  # type: ignore[arg-type]
    first = asyncio.ensure_future(participants.base_url("ns", "bank", 1))
    second = asyncio.ensure_future(participants.base_url("ns", "bank", 1))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == "http://bank.ns.svc:1"
    assert api.reads == 1
