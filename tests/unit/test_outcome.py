"""What a participant's sidecar takes a 404 to mean when it reads a transaction's outcome."""

from __future__ import annotations

import json
from typing import Any

import pytest

from accord_sidecar.outcome import _is_gone


class Answer:
    def __init__(self, body: str) -> None:
        self.body = body

    async def json(self, content_type: Any = None) -> Any:
        return json.loads(self.body)


NOT_FOUND = {
    "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
    "details": {"name": "t9", "group": "accord.dev", "kind": "twophasetransactions"},
}  # fmt: skip


async def test_the_api_servers_not_found_for_this_transaction_means_it_is_gone() -> None:
    assert await _is_gone(Answer(json.dumps(NOT_FOUND)), "t9")


@pytest.mark.parametrize(
    "body",
    [
        "<html>404 page not found</html>",  # a proxy, or a wrong address
        json.dumps({**NOT_FOUND, "details": {"name": "other"}}),
        json.dumps({**NOT_FOUND, "reason": "Forbidden"}),
        json.dumps([NOT_FOUND]),
    ],
)
async def test_any_other_404_says_nothing_about_the_transaction(body: str) -> None:
    assert not await _is_gone(Answer(body), "t9")
