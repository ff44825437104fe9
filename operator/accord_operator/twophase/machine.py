"""The two-phase commit coordinator as a pure machine (decide/record) for the shared driver.

Phase 1 asks every participant to prepare, in parallel; all `commit` votes within
prepareTimeoutSeconds -> Commit; any abort vote, a refusal, an answer it cannot parse or the
deadline -> Abort. The decision goes into the status in the same write that marks the
phase-2 calls, so no commit or abort is sent before the decision is stored (the driver
writes ahead). A decision, once stored, never changes: every later decide reads it.

Phase 1 is not written ahead (presumed abort needs no record before the decision): a
transaction whose votes all come back within PREPARING_SHOWN_AFTER_S goes from Pending
straight to its decision in one write. One that takes longer is stored as Preparing then, so
kubectl shows it. A coordinator that starts on a stored Pending transaction runs phase 1
again (a prepare is idempotent at the fence: a participant prepared by a predecessor answers
its recorded vote); one that starts on a stored Preparing transaction (its predecessor died
before deciding) decides Abort at once; one with a recorded decision finishes phase 2 with
it. An Abort decided without knowing what went out (that recovery, or a deletion) sends an
abort to every participant. Two coordinators racing on one object write over the version
they read (optimistic concurrency): the first decision stored wins and the other reads it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from accord_operator import decision
from accord_operator.conditions import Condition, set_condition

Kind = Literal["prepare", "commit", "abort"]
Status = dict[str, Any]
Spec = Mapping[str, Any]

TERMINAL = ("Committed", "Aborted")
PREPARING_SHOWN_AFTER_S = 1.0  # phase 1 still undecided this long after it began: stored
IN_DOUBT_AFTER = 5  # phase-2 attempts without an acknowledgement: the participant is in doubt
ERROR_LIMIT = 4000
PREPARE_RETRY_S = (0.2, 2.0)  # a transient prepare failure is tried again inside the deadline
PHASE2_RETRY_S = (0.5, 30.0)  # phase 2 is retried forever, backing off to this

# What a decision counts (the world turns them into metrics).
FINISHED_AS = "finished"  # (outcome): Committed or Aborted
DECIDED = "decided"  # (Commit|Abort)
PHASE = "phase"  # (phase): entered
IN_DOUBT = "in_doubt"  # (): a participant became in doubt
PHASE_SECONDS = "phase_seconds"  # (phase, seconds): how long phase 1 or phase 2 took

CONDITIONS = (
    ("Ready", ("Committed",)),
    ("Reconciling", ("Pending", "Preparing", "Committing", "Aborting")),
    ("Stalled", ("Aborted",)),
)


@dataclass(frozen=True)
class Call:
    participant: str
    kind: Kind
    attempt: int
    timeout_s: float


@dataclass(frozen=True)
class Outcome:
    participant: str
    kind: Kind
    vote: str | None = None  # prepare: "Commit" or "Abort" when the answer says so
    ok: bool = False  # commit/abort: acknowledged
    retryable: bool = False  # no answer we can use, but trying again may give one
    error: str = ""
    reached: bool = True  # False only when the request certainly never got there


Decision = decision.Decision[Call]


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _copy(status: Mapping[str, Any]) -> Status:
    st = dict(status)
    st["participants"] = [dict(p) for p in status.get("participants") or []]
    return st


def _parts(st: Status) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in st["participants"]}


def _prepare_deadline(spec: Spec, st: Status) -> float:
    return epoch(st["startedAt"]) + int(spec.get("prepareTimeoutSeconds", 30))


def _due(p: Mapping[str, Any], now: float) -> bool:
    at = p.get("nextAttemptAt")
    return at is None or epoch(at) <= now


def _backoff(attempts: int, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(min(high, low * 2 ** max(0, attempts - 1)))


def decide(
    spec: Spec,
    status: Mapping[str, Any],
    *,
    now: float,
    generation: int,
    recovering: bool = False,
    deleting: bool = False,
) -> Decision:
    """The next status and the calls to make. `recovering`: this coordinator has just
    started on the object (presumed abort applies); `deleting`: its deletion was asked."""
    st = _copy(status)
    was = st.get("phase", "Pending")
    d = Decision(status=st)
    names = [p["name"] for p in spec["participants"]]
    if not st.get("participants"):
        st["participants"] = [{"name": n, "attempts": 0} for n in names]
    parts = _parts(st)

    if was in TERMINAL:
        return _finish(d, spec, generation, now, was)
    if "decision" not in st:
        if deleting:
            # A prepare may be out (phase 1 is not written ahead): abort everywhere.
            _decide(d, "Abort", "deleted before a decision", now, sent_unknown=True)
        elif was == "Pending":
            st.setdefault("startedAt", iso(now))
            if now >= epoch(st["startedAt"]) + PREPARING_SHOWN_AFTER_S:
                st["phase"] = "Preparing"  # slow: stored, so kubectl shows it
                d.events.append(("Normal", "Preparing", f"asking {len(names)} to prepare"))
        elif recovering:
            _decide(d, "Abort", "the coordinator restarted before deciding (presumed abort)",
                    now, sent_unknown=True)  # fmt: skip
        if "decision" not in st:
            _phase_one(d, spec, parts, now)
            if st.get("phase", "Pending") == "Pending" and d.wake_at is not None:
                d.wake_at = min(d.wake_at, epoch(st["startedAt"]) + PREPARING_SHOWN_AFTER_S)
    if "decision" in st:
        _phase_two(d, spec, parts, now)
    marked = {p["name"]: p.get("call") for p in st["participants"]}
    before = {p["name"]: p.get("call") for p in status.get("participants") or []}
    # Stored now only when a phase-2 call starts (written ahead) or the phase or decision
    # moves; prepares (presumed abort), votes and acknowledgements wait for that next write.
    d.write = (
        any(c and c != "prepare" and c != before.get(n) for n, c in marked.items())
        or st.get("phase", "Pending") != was
        or st.get("decision") != status.get("decision")
        or bool(d.events)
    )
    return _finish(d, spec, generation, now, was)


def _phase_one(d: Decision, spec: Spec, parts: dict[str, dict[str, Any]], now: float) -> None:
    st = d.status
    deadline = _prepare_deadline(spec, st)
    refused = [p for p in st["participants"] if p.get("vote") in ("Abort", "Timeout")]
    if refused:
        p = refused[0]
        why = p.get("lastError") or "voted abort"
        _decide(d, "Abort", f"{p['name']} {'timed out' if p['vote'] == 'Timeout' else why}", now)
        return
    if all(p.get("vote") == "Commit" for p in st["participants"]):
        _decide(d, "Commit", "every participant voted commit", now)
        return
    if now >= deadline:
        late = [p for p in st["participants"] if "vote" not in p]
        for p in late:
            p["vote"] = "Timeout"  # (a prepare still out is dropped by _decide, as reached)
        _decide(d, "Abort", f"{late[0]['name']} did not vote within the prepare timeout", now)
        return
    wake = deadline
    for spec_p in spec["participants"]:
        p = parts[spec_p["name"]]
        if "vote" in p:
            continue
        if p.get("call") != "prepare":
            if not _due(p, now):
                wake = min(wake, epoch(p["nextAttemptAt"]))
                continue
            p["call"] = "prepare"  # written ahead: stored before it is sent
            p["attempts"] = int(p.get("attempts", 0)) + 1
            p.pop("nextAttemptAt", None)
        d.calls.append(Call(p["name"], "prepare", int(p["attempts"]), max(0.05, deadline - now)))
    d.wake_at = wake


def _decide(
    d: Decision, outcome: str, reason: str, now: float, *, sent_unknown: bool = False
) -> None:
    """sent_unknown: this coordinator cannot know which prepares went out (a predecessor's
    are not written ahead): every participant counts as reached, and is sent the abort."""
    st = d.status
    st["decision"] = outcome
    st["decidedAt"] = iso(now)
    st["reason"] = reason[:ERROR_LIMIT]
    st["phase"] = "Committing" if outcome == "Commit" else "Aborting"
    for p in st["participants"]:
        if p.get("call") == "prepare" or sent_unknown:
            p.pop("call", None)  # a reply still on its way is only noted
            p["reached"] = True
        p.pop("nextAttemptAt", None)
        p["phase2Attempts"] = 0
        if outcome == "Abort" and not p.get("reached"):
            # No prepare ever got there (the Service was missing, no connection was made):
            # it holds nothing, and an abort has nothing to undo.
            p["acked"] = True
    d.counts.append((DECIDED, (outcome,)))
    if "startedAt" in st:
        d.counts.append((PHASE_SECONDS, ("prepare", now - epoch(st["startedAt"]))))
    d.events.append(
        ("Normal" if outcome == "Commit" else "Warning", f"Decided{outcome}", st["reason"])
    )


def _phase_two(d: Decision, spec: Spec, parts: dict[str, dict[str, Any]], now: float) -> None:
    st = d.status
    kind: Kind = "commit" if st["decision"] == "Commit" else "abort"
    timeout = float(spec.get("commitTimeoutSeconds", 30))
    wake: float | None = None
    for spec_p in spec["participants"]:
        p = parts[spec_p["name"]]
        if p.get("acked"):
            continue
        if p.get("call") != kind:
            if not _due(p, now):
                at = epoch(p["nextAttemptAt"])
                wake = at if wake is None else min(wake, at)
                continue
            p["call"] = kind
            p["phase2Attempts"] = int(p.get("phase2Attempts", 0)) + 1
            p["attempts"] = int(p.get("attempts", 0)) + 1
            p.pop("nextAttemptAt", None)
        d.calls.append(Call(p["name"], kind, int(p["phase2Attempts"]), timeout))
    d.wake_at = wake
    if all(p.get("acked") for p in st["participants"]):
        outcome = "Committed" if kind == "commit" else "Aborted"
        st["phase"] = outcome
        st["finishedAt"] = iso(now)
        d.counts.append((FINISHED_AS, (outcome,)))
        d.counts.append((PHASE_SECONDS, (kind, now - epoch(st["decidedAt"]))))
        d.events.append(("Normal", outcome, f"every participant acknowledged {kind}"))


def record(
    spec: Spec, status: Mapping[str, Any], outcome: Outcome, *, now: float, generation: int
) -> Decision:
    st = _copy(status)
    was = st.get("phase", "Pending")
    d = Decision(status=st)
    p = _parts(st).get(outcome.participant)
    if p is None:
        return _finish(d, spec, generation, now, was)
    if p.get("call") == outcome.kind:
        p.pop("call")
    if outcome.kind == "prepare" and outcome.reached:
        p["reached"] = True
    if outcome.error:
        p["lastError"] = outcome.error[:ERROR_LIMIT]
    if outcome.kind == "prepare":
        if "decision" in st:
            if outcome.vote and "vote" not in p:
                p["vote"] = outcome.vote  # for the record: the decision stands
            return _finish(d, spec, generation, now, was)
        if outcome.vote in ("Commit", "Abort"):
            p["vote"] = outcome.vote
        elif outcome.retryable:
            p["nextAttemptAt"] = iso(now + _backoff(int(p.get("attempts", 1)), PREPARE_RETRY_S))
        else:
            p["vote"] = "Abort"  # a refusal or an answer we cannot read is never a yes
        return _finish(d, spec, generation, now, was)
    wanted = "commit" if st.get("decision") == "Commit" else "abort"
    if outcome.kind != wanted:
        return _finish(d, spec, generation, now, was)  # a stale reply from before a restart
    if outcome.ok:
        p["acked"] = True
        p.pop("lastError", None)
        p.pop("inDoubt", None)
        return _finish(d, spec, generation, now, was)
    if outcome.kind == "abort" and not outcome.reached:
        # No Service: nothing can be held behind it. (A participant prepared before its
        # Service went away learns the abort by reading the outcome itself.)
        p["acked"] = True
        p.pop("inDoubt", None)
        return _finish(d, spec, generation, now, was)
    attempts = int(p.get("phase2Attempts", 1))
    p["nextAttemptAt"] = iso(now + _backoff(attempts, PHASE2_RETRY_S))
    if attempts >= IN_DOUBT_AFTER and not p.get("inDoubt"):
        p["inDoubt"] = True
        d.counts.append((IN_DOUBT, ()))
        d.events.append(
            (
                "Warning",
                "InDoubt",
                f"{p['name']} has not acknowledged {wanted} after {attempts} attempts "
                f"({p.get('lastError', 'no answer')}); still retrying",
            )
        )
    return _finish(d, spec, generation, now, was)


def _finish(d: Decision, spec: Spec, generation: int, now: float, was: str) -> Decision:
    st = d.status
    phase = st.get("phase", "Pending")
    if phase != was:
        d.counts.append((PHASE, (phase,)))
    parts = st.get("participants") or []
    acked = sum(bool(p.get("acked")) for p in parts)
    st["progress"] = f"{acked}/{len(spec['participants'])}"
    doubtful = [p["name"] for p in parts if p.get("inDoubt")]
    if doubtful:
        st["message"] = f"in doubt: {', '.join(doubtful)} (not acknowledged; still retrying)"
    elif phase == "Preparing":
        voted = sum("vote" in p for p in parts)
        st["message"] = f"{voted}/{len(parts)} voted"
    elif phase in ("Committing", "Aborting"):
        st["message"] = (
            f"{st['decision']} decided ({st.get('reason', '')}); {acked}/{len(parts)} acknowledged"
        )
    elif phase in TERMINAL:
        st["message"] = f"{phase}: {st.get('reason', '')}"
    st["observedGeneration"] = generation
    conditions: list[Condition] = list(st.get("conditions") or [])
    t = iso(now)
    for type_, true_in in CONDITIONS:
        stalled = type_ == "Stalled" and bool(doubtful)
        conditions = set_condition(
            conditions,
            type=type_,
            status="True" if phase in true_in or stalled else "False",
            reason="InDoubt" if stalled else phase,
            message=str(st.get("message") or phase),
            generation=generation,
            now=t,
        )
    st["conditions"] = conditions
    return d


class TpcMachine:
    """decide/record over the TwoPhaseTransaction object, for the shared driver. The first
    decide of a machine is a recovery: a new coordinator presumes abort."""

    def __init__(self, *, deleting: bool = False) -> None:
        self.deleting = deleting
        self._recovering = True

    def decide(self, obj: Mapping[str, Any], status: Status, now: float) -> Decision:
        recovering, self._recovering = self._recovering, False
        return decide(
            obj["spec"],
            status,
            now=now,
            generation=int(obj["metadata"].get("generation", 1)),
            recovering=recovering,
            deleting=self.deleting,
        )

    def record(
        self, obj: Mapping[str, Any], status: Status, outcome: Outcome, now: float
    ) -> Decision:
        return record(
            obj["spec"],
            status,
            outcome,
            now=now,
            generation=int(obj["metadata"].get("generation", 1)),
        )

    def finished(self, status: Mapping[str, Any]) -> bool:
        return status.get("phase") in TERMINAL

    def slot(self, call: Call) -> tuple[str, str]:
        return (call.participant, call.kind)
