"""The 2PC participant fence as pure rules: from what the journal holds for a transaction
and the message that came, what to record (durably, first), whether the app is called,
and what to answer. The shell (inbound.py) records, calls and answers; this decides.

States per transaction, in the order they can follow each other:

    (none) -> preparing -> voted-commit -> committing -> committed
                        -> voted-abort  -> aborting   -> aborted
    (none) -> aborted (an abort before any prepare: an empty rollback)

Guarantees: a repeated prepare gets the recorded vote without the app; commit and abort are
idempotent; an abort before any prepare is recorded and answered without the app, and a
later prepare of that transaction is refused (anti-suspension); a commit for a transaction
never prepared (or that voted abort) is refused and never reaches the app (empty commit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["prepare", "commit", "abort"]

PREPARING = "preparing"
VOTED_COMMIT = "voted-commit"
VOTED_ABORT = "voted-abort"
COMMITTING = "committing"
COMMITTED = "committed"
ABORTING = "aborting"
ABORTED = "aborted"
STATES = (PREPARING, VOTED_COMMIT, VOTED_ABORT, COMMITTING, COMMITTED, ABORTING, ABORTED)


@dataclass(frozen=True)
class Step:
    """What to do with a message: record `record` first (None: nothing), then call the app
    or answer `answer` (status, body) without it."""

    record: str | None = None
    call_app: bool = False
    answer: tuple[int, dict[str, Any]] | None = None


def _refuse(why: str) -> Step:
    return Step(answer=(409, {"error": {"code": "fenced", "message": why}}))


def on_message(kind: Kind, state: str | None) -> Step:
    if kind == "prepare":
        if state is None or state == PREPARING:
            # (preparing: a previous call's answer was lost in a crash; the app is asked
            # again, as it must be idempotent per transaction.)
            return Step(record=PREPARING if state is None else None, call_app=True)
        if state in (VOTED_COMMIT, COMMITTING, COMMITTED):
            return Step(answer=(200, {"vote": "commit", "replayed": True}))
        if state == VOTED_ABORT:
            return Step(answer=(200, {"vote": "abort", "replayed": True}))
        return Step(
            answer=(
                200,
                {"vote": "abort", "reason": "this transaction was aborted here before its "
                 "prepare arrived; the late prepare is refused"},
            )
        )  # fmt: skip
    if kind == "commit":
        if state in (VOTED_COMMIT, COMMITTING):
            return Step(record=COMMITTING if state == VOTED_COMMIT else None, call_app=True)
        if state == COMMITTED:
            return Step(answer=(200, {"acked": True, "replayed": True}))
        if state is None:
            return _refuse("commit for a transaction never prepared here; not passed to the app")
        if state == PREPARING:
            return _refuse("commit before this participant's vote was recorded; not passed on")
        return _refuse(f"commit for a transaction that {state.replace('-', ' ')} here")
    # abort
    if state is None:
        return Step(record=ABORTED, answer=(200, {"acked": True, "empty": True}))
    if state == ABORTED:
        return Step(answer=(200, {"acked": True, "replayed": True}))
    if state in (COMMITTING, COMMITTED):
        return _refuse("abort for a transaction that committed here")
    return Step(record=ABORTING if state != ABORTING else None, call_app=True)


def after_app(
    kind: Kind, status: int, body: bytes, try_again: bool
) -> tuple[str | None, int, dict[str, Any]]:
    """(state to record, status, body to answer) once the app answered. `try_again`: the
    answer says so (5xx, 408, 409, 429, or no answer): nothing is recorded and the
    coordinator calls again."""
    if try_again:
        return None, status, _error("app_unavailable", f"the app answered {status}; try again")
    if kind == "prepare":
        vote = _vote(status, body)
        return (VOTED_COMMIT if vote == "commit" else VOTED_ABORT), 200, {"vote": vote}
    if 200 <= status < 300:
        return (COMMITTED if kind == "commit" else ABORTED), 200, {"acked": True}
    # A definitive refusal of a phase-2 message: the decision is not the app's to refuse.
    return None, 502, _error("app_refused", f"the app refused {kind} with {status}; try again")


def _vote(status: int, body: bytes) -> str:
    """An answer that is not a clear 2xx {"vote": "commit"} is an abort vote."""
    if not 200 <= status < 300:
        return "abort"
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "abort"
    if isinstance(parsed, dict) and str(parsed.get("vote", "")).lower() == "commit":
        return "commit"
    return "abort"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
