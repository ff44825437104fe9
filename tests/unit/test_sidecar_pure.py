"""The sidecar's pure parts: retry policy, breaker, budget, envelopes, dedup table."""

from __future__ import annotations

import email.utils
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accord_sidecar.broker.nats import durable_name
from accord_sidecar.cloudevents import EnvelopeError, batch, envelope
from accord_sidecar.dedup import DedupTable, Stored
from accord_sidecar.resiliency import (
    BreakerState,
    CircuitBreaker,
    RetryBudget,
    RetryPolicy,
    may_retry_request,
    retry_after_seconds,
    retryable_status,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_full_jitter_stays_under_the_growing_cap() -> None:
    policy = RetryPolicy(max_attempts=5, initial_s=0.1, max_s=1.0)
    assert [policy.delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.delay(3, rng=lambda: 0.0) == 0.0
    assert RetryPolicy(initial_s=0.3, max_s=1, exponential=False).delay(7) == 0.3


def test_what_is_retried() -> None:
    assert may_retry_request("GET", {}) and may_retry_request("PUT", {})
    assert not may_retry_request("POST", {})
    assert may_retry_request("POST", {"accord-idempotency-key": "k"})
    # The one rule (accord_wire.try_again): 5xx, 408, 409 and 429 mean "try again".
    assert [s for s in (200, 400, 404, 408, 409, 429, 500, 503) if retryable_status(s)] == [
        408, 409, 429, 500, 503,
    ]  # fmt: skip


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_seconds("3") == 3.0
    date = email.utils.formatdate(1_000_010, usegmt=True)
    assert retry_after_seconds(date, now=1_000_000) == pytest.approx(10.0)
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_breaker_opens_fails_fast_and_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=5, clock=clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.record(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.t += 5
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.t += 5
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=1, clock=Clock())
    for ok in (False, True, False, True, False):
        breaker.record(ok)
    assert breaker.state is BreakerState.CLOSED


def test_retry_budget_is_a_fraction_of_recent_requests_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(percent=20, window_s=10, min_retries=3, clock=clock)
    for _ in range(100):
        budget.record_request()
    granted = sum(budget.try_spend() for _ in range(100))
    assert granted == 3 + 20
    clock.t += 11  # the window has passed: only the floor again
    assert sum(budget.try_spend() for _ in range(10)) == 3


def test_plain_body_is_wrapped_in_a_cloudevent() -> None:
    e = envelope(
        "orders", b'{"n": 1}', {"Content-Type": "application/json"}, source="accord://ns/app"
    )
    assert e["specversion"] == "1.0" and e["data"] == {"n": 1} and e["source"] == "accord://ns/app"
    assert e["topic"] == "orders" and e["id"]
    b = envelope("orders", b"\x00\x01", {"Content-Type": "application/octet-stream"}, source="s")
    assert b["data_base64"] == "AAE="


@pytest.mark.parametrize(
    ("body", "headers", "named"),
    [
        (b"{", {"Content-Type": "application/json"}, "not JSON"),
        (b"[]", {"Content-Type": "application/cloudevents+json"}, "JSON object"),
        (
            b'{"specversion": "0.3", "id": "1", "source": "s", "type": "t"}',
            {"Content-Type": "application/cloudevents+json"},
            "specversion",
        ),
        (
            b"x",
            {
                "ce-specversion": "1.0",
                "ce-source": "s",
                "ce-type": "t",
                "Content-Type": "text/plain",
            },
            "ce-id",
        ),
        (b"\xff", {"Content-Type": "text/plain"}, "UTF-8"),
    ],
)
def test_bad_events_are_named(body: bytes, headers: dict[str, str], named: str) -> None:
    with pytest.raises(EnvelopeError, match=named):
        envelope("orders", body, headers, source="s")


def test_batch_names_the_bad_index_and_the_limit() -> None:
    good = {"specversion": "1.0", "id": "1", "source": "s", "type": "t"}
    with pytest.raises(EnvelopeError, match=r"\[1\]\.type"):
        batch("t", json.dumps([good, {**good, "type": ""}]).encode(), 10)
    with pytest.raises(EnvelopeError, match="at most 2"):
        batch("t", json.dumps([good] * 3).encode(), 2)


def test_dedup_table_is_lru_and_ttl_bounded() -> None:
    now = [100.0]
    table = DedupTable(max_entries=2, ttl_s=10, clock=lambda: now[0])
    for key in "abc":
        table.put(key, Stored(200, [], key.encode(), now[0]))
    assert table.get("a") is None and table.get("b") is not None and len(table) == 2
    now[0] += 11
    assert table.get("c") is None  # expired


def test_dedup_file_survives_a_restart_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "dedup.jsonl"
    table = DedupTable(max_entries=10, ttl_s=3600, path=path)
    table.put("k1", Stored(201, [("Content-Type", "application/json")], b'{"ok": 1}', 1e12))
    with open(path, "a") as f:
        f.write('{"k": "k2", "s": 2')  # the process died mid-write
    again = DedupTable(max_entries=10, ttl_s=3600, path=path, clock=lambda: 1e12)
    stored = again.get("k1")
    assert stored is not None and stored.status == 201 and stored.body == b'{"ok": 1}'
    assert again.get("k2") is None


def test_the_journal_survives_a_restart_drops_old_entries_and_ignores_a_torn_line(
    tmp_path: Path,
) -> None:
    from accord_sidecar.journal import Journal

    now = [1000.0]
    path = tmp_path / "journal.jsonl"
    j = Journal(path, retention_s=100, max_entries=3, clock=lambda: now[0])
    j.record("u/a", "compensation")
    now[0] += 50
    j.record("u/b", "compensation")
    with open(path, "a") as f:
        f.write('{"k": "u/c", "s": "compensat')  # SIGKILL in the middle of a write
    now[0] += 60  # u/a is now 110 s old: past the retention
    again = Journal(path, retention_s=100, max_entries=3, clock=lambda: now[0])
    assert (again.get("u/a"), again.get("u/b"), again.get("u/c")) == (None, "compensation", None)
    for k in ("x", "y", "z"):
        again.record(k, "compensation")
    assert len(again) == 3 and again.get("u/b") is None  # bounded: the oldest goes first


def test_retry_budget_memory_is_bounded_under_an_hour_of_steady_load() -> None:
    """Nothing is kept per request: an hour at 200 req/s against a healthy target (no
    retries asked, so nothing ever trimmed the window before) leaves the window's buckets."""
    clock = Clock()
    budget = RetryBudget(percent=20, window_s=10, min_retries=3, clock=clock)
    for _ in range(3600 * 200):
        budget.record_request()
        clock.t += 1 / 200
    assert len(budget) <= 11
    # ...and it still budgets: 20% of the last 9 to 10 s of requests (one-second buckets),
    # plus the floor.
    assert 3 + 0.2 * 200 * 9 <= sum(budget.try_spend() for _ in range(1000)) <= 3 + 0.2 * 2000


def test_consumer_names_are_injective_where_joined_names_collide() -> None:
    """App "order" on topic "service-events" and app "order-service" on topic "events" once
    shared one consumer (and each took the other's events)."""
    a, b = durable_name("order", "service-events"), durable_name("order-service", "events")
    assert a != b
    assert durable_name("a.b", "c") != durable_name("a_b", "c")
    long = "x" * 300
    assert durable_name(long, "t") != durable_name(long + "y", "t")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,200}", durable_name(long, long + ".z"))


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.text(min_size=1, max_size=70), st.text(min_size=1, max_size=70)),
    st.tuples(st.text(min_size=1, max_size=70), st.text(min_size=1, max_size=70)),
)
def test_different_subscriptions_never_share_a_consumer(
    one: tuple[str, str], other: tuple[str, str]
) -> None:
    if one != other:
        assert durable_name(*one) != durable_name(*other)
