"""The 2PC coordinator machine by example (the exploration covers the interleavings)."""

from __future__ import annotations

from typing import Any

from accord_operator.twophase.machine import (
    IN_DOUBT_AFTER,
    PREPARING_SHOWN_AFTER_S,
    Outcome,
    TpcMachine,
    decide,
    record,
)

SPEC = {
    "participants": [{"name": "a", "service": "a"}, {"name": "b", "service": "b"}],
    "prepareTimeoutSeconds": 10,
}


def _run_to_decision(votes: dict[str, str]) -> dict[str, Any]:
    d = decide(SPEC, {}, now=0, generation=1)
    assert {c.participant for c in d.calls} == {"a", "b"}
    assert all(p["call"] == "prepare" for p in d.status["participants"])
    assert not d.write  # presumed abort: phase 1 needs no record before the decision
    st = d.status
    for name, vote in votes.items():
        st = record(SPEC, st, Outcome(name, "prepare", vote=vote), now=1, generation=1).status
    return decide(SPEC, st, now=1, generation=1).status


def test_the_decision_is_in_the_status_that_marks_the_phase_two_calls() -> None:
    st = _run_to_decision({"a": "Commit", "b": "Commit"})
    assert st["decision"] == "Commit" and st["phase"] == "Committing"
    assert [p["call"] for p in st["participants"]] == ["commit", "commit"]


def test_an_answer_that_is_not_a_vote_is_never_a_yes() -> None:
    d = decide(SPEC, {}, now=0, generation=1)
    st = record(SPEC, d.status, Outcome("a", "prepare", error="not a vote"), now=1, generation=1)
    st2 = record(SPEC, st.status, Outcome("b", "prepare", vote="Commit"), now=1, generation=1)
    assert decide(SPEC, st2.status, now=1, generation=1).status["decision"] == "Abort"


def test_a_recorded_decision_never_changes() -> None:
    st = _run_to_decision({"a": "Commit", "b": "Commit"})
    late = record(SPEC, st, Outcome("a", "prepare", vote="Abort"), now=2, generation=1).status
    again = TpcMachine(deleting=True).decide({"spec": SPEC, "metadata": {}}, late, 3).status
    assert again["decision"] == "Commit"


def test_a_quick_phase_one_is_stored_once_with_its_decision() -> None:
    d = decide(SPEC, {}, now=0, generation=1)
    assert "phase" not in d.status and not d.events and not d.write
    assert d.wake_at == PREPARING_SHOWN_AFTER_S  # woken to show it, should it take long
    st = d.status
    for name in ("a", "b"):
        st = record(SPEC, st, Outcome(name, "prepare", vote="Commit"), now=0.5,
                    generation=1).status  # fmt: skip
    d = decide(SPEC, st, now=0.5, generation=1)
    assert d.write and d.status["phase"] == "Committing" and d.status["startedAt"]
    assert [reason for _, reason, _ in d.events] == ["DecidedCommit"]


def test_a_slow_phase_one_is_stored_as_preparing() -> None:
    st = decide(SPEC, {}, now=0, generation=1).status
    st = record(SPEC, st, Outcome("a", "prepare", vote="Commit"), now=0.2, generation=1).status
    assert not decide(SPEC, st, now=0.2, generation=1).write
    d = decide(SPEC, st, now=PREPARING_SHOWN_AFTER_S, generation=1)
    assert d.write and d.status["phase"] == "Preparing"
    assert [reason for _, reason, _ in d.events] == ["Preparing"]
    assert d.status["message"] == "1/2 voted"


def test_a_new_coordinator_on_a_stored_pending_transaction_prepares_again() -> None:
    # Its predecessor may have sent prepares: the fence answers a repeated one with the
    # recorded vote, so phase 1 simply runs again.
    obj = {"spec": SPEC, "metadata": {"generation": 1}}
    d = TpcMachine().decide(obj, {}, 5)
    assert "decision" not in d.status and {c.kind for c in d.calls} == {"prepare"}


def test_a_new_coordinator_presumes_abort_when_nothing_was_decided() -> None:
    preparing = decide(SPEC, {}, now=0, generation=1).status
    preparing = decide(SPEC, preparing, now=PREPARING_SHOWN_AFTER_S, generation=1).status
    obj = {"spec": SPEC, "metadata": {"generation": 1}}
    d = TpcMachine().decide(obj, preparing, 2)
    assert d.status["decision"] == "Abort" and "presumed abort" in d.status["reason"]
    assert {c.kind for c in d.calls} == {"abort"}  # a prepare may be out: abort both


def test_deleted_before_a_decision_it_aborts_everywhere() -> None:
    # Even from a stored Pending: an earlier drive's prepares are not written ahead.
    obj = {"spec": SPEC, "metadata": {"generation": 1}}
    d = TpcMachine(deleting=True).decide(obj, {}, 0)
    assert d.status["decision"] == "Abort" and d.write
    assert sorted((c.participant, c.kind) for c in d.calls) == [("a", "abort"), ("b", "abort")]


def test_an_abort_to_a_participant_without_a_service_is_acknowledged() -> None:
    obj = {"spec": SPEC, "metadata": {"generation": 1}}
    st = TpcMachine(deleting=True).decide(obj, {}, 0).status
    gone = Outcome("a", "abort", retryable=True, error="Service ns/a not found", reached=False)
    st = record(SPEC, st, gone, now=1, generation=1).status
    st = record(SPEC, st, Outcome("b", "abort", ok=True), now=1, generation=1).status
    st = decide(SPEC, st, now=1, generation=1).status
    assert st["phase"] == "Aborted"
    assert st["participants"][0]["lastError"] == "Service ns/a not found"


def test_a_participant_no_prepare_reached_needs_no_abort() -> None:
    st = decide(SPEC, {}, now=0, generation=1).status
    st = record(SPEC, st, Outcome("a", "prepare", retryable=True, error="no Service",
                                   reached=False), now=1, generation=1).status  # fmt: skip
    st = record(SPEC, st, Outcome("b", "prepare", vote="Abort"), now=1, generation=1).status
    d = decide(SPEC, st, now=1, generation=1)
    assert [c.participant for c in d.calls] == ["b"]
    assert d.status["participants"][0]["acked"] is True


def test_phase_two_unacknowledged_becomes_in_doubt_and_keeps_being_retried() -> None:
    st = _run_to_decision({"a": "Commit", "b": "Commit"})
    st = record(SPEC, st, Outcome("a", "commit", ok=True), now=2, generation=1).status
    now = 2.0
    events: list[str] = []
    for _ in range(IN_DOUBT_AFTER):
        d = record(SPEC, st, Outcome("b", "commit", error="HTTP 503"), now=now, generation=1)
        events += [reason for _, reason, _ in d.events]
        now += 60
        d = decide(SPEC, d.status, now=now, generation=1)
        st = d.status
        assert [c.participant for c in d.calls] == ["b"]  # retried, after its backoff
    b = st["participants"][1]
    assert b["inDoubt"] is True and events == ["InDoubt"]
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InDoubt"
    st = record(SPEC, st, Outcome("b", "commit", ok=True), now=now, generation=1).status
    st = decide(SPEC, st, now=now, generation=1).status
    assert st["phase"] == "Committed" and "inDoubt" not in st["participants"][1]
