"""The SagaWorkflow state machine: plain functions over plain data. No kopf, no HTTP, no clock.

`decide` says what must happen next given what the status says has happened; `record`
folds the outcome of one call into the status. Each says what happened (Events, metric
increments) in its Decision. The shared driver (accord_operator.driver, through
`SagaMachine`) writes the status `decide` returns *before* it makes the calls (write-ahead:
an attempt in flight is visible after a crash) and re-sends such an attempt with the same
idempotency key to learn its outcome.

Rules:
- A step starts when its dependencies have succeeded: `dependsOn` when given, else the
  step listed before it.
- A failure is retried per the step's policy; a business refusal (4xx but 408/409/429) is
  not. Once retries are spent the step has failed for good.
- A step failing for good before the pivot (`compensable: false`) has succeeded starts
  compensation: every step whose action completed is compensated, a step only after every
  completed step that depends on it (reverse completion order; independent branches in
  parallel). A step whose last attempt may have reached the participant (timeout,
  connection lost) counts as completed: its compensation must be a no-op if nothing
  happened.
- Once the pivot has succeeded, the saga only goes forward: later steps are retried
  without limit; a business refusal there needs a human (phase Failed).
- A compensation that fails for good stops the saga in Failed with the step and error.
"""

from __future__ import annotations

import copy
import datetime
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from accord_operator import decision
from accord_operator.conditions import Condition, set_condition
from accord_operator.kinds import SagaSpec
from accord_wire import REDRIVE, saga_key

Kind = Literal["action", "compensation"]
Status = dict[str, Any]
Spec = SagaSpec
Rng = Callable[[], float]

TERMINAL = ("Succeeded", "Compensated", "Failed")
# What a decision counts (metric increments), with their labels.
RETRY = "retry"  # (action|compensation): an attempt failed and another is scheduled
COMPENSATED = "compensated"  # (): a step was undone
FINISHED_AS = "finished"  # (phase): the saga first reached a terminal phase
PHASE = "phase"  # (phase): the saga entered a phase
# Finished for good: nothing held, nothing to redrive, nothing to compensate on delete. Such
# a saga needs no controller any more (and no finalizer: deleting it never hangs). A Failed
# saga still holds what its compensation could not release.
FINISHED = ("Succeeded", "Compensated")


def needs_controller(status: Mapping[str, Any] | None) -> bool:
    """Whether the operator must still drive (and guard the deletion of) this saga."""
    return (status or {}).get("phase") not in FINISHED


def expires_at(spec: Spec, status: Mapping[str, Any] | None) -> float | None:
    """When a finished saga with `ttlSecondsAfterFinished` is due for deletion; else None."""
    ttl = spec.get("ttlSecondsAfterFinished")
    status = status or {}
    if ttl is None or status.get("phase") not in FINISHED or not status.get("finishedAt"):
        return None
    return epoch(str(status["finishedAt"])) + float(ttl)


OUTPUT_LIMIT = 16 * 1024
ERROR_LIMIT = 4000
COMPLETED = ("Succeeded", "Compensating", "Compensated", "CompensationFailed")
# Steps whose action is in effect now (progress counts these: a compensated saga has none).
IN_EFFECT = ("Succeeded", "Compensating", "CompensationFailed")
# Each condition and the phases in which it is True, as kstatus reads them: Ready on
# success; Reconciling (abnormal-true) while work is under way; Stalled (abnormal-true) once
# it ended without success, so `kubectl wait --for=condition=Ready` succeeds on success and
# scripts can stop early on failure.
CONDITIONS = (
    ("Ready", ("Succeeded",)),
    ("Reconciling", ("Pending", "Running", "Compensating")),
    ("Stalled", ("Compensated", "Failed")),
)


@dataclass(frozen=True)
class Call:
    step: str
    kind: Kind
    attempt: int
    key: str  # saga uid + step + kind: stable across retries and restarts
    timeout_s: float


@dataclass(frozen=True)
class Outcome:
    step: str
    kind: Kind
    ok: bool
    retryable: bool = False
    error: str = ""
    output: Any = None
    unknown: bool = False  # the request may have reached the participant
    replayed: bool = False  # the participant's sidecar answered from its store (Accord-Replayed)


Decision = decision.Decision[Call]


# -- time as the status stores it ------------------------------------------------------------


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


# -- the spec, read with its defaults ----------------------------------------------------------


def idempotency_key(uid: str, step: str, kind: Kind, generation: int = 0) -> str:
    """Stable across retries and restarts. A redrive after a definitive refusal starts a new
    generation: the refusal proved nothing happened, and a deduplicating participant would
    otherwise replay its stored refusal. (The format is the wire's: the participant's
    sidecar pairs an action with its compensation by it.)"""
    return saga_key(uid, step, kind, generation)


def dependencies(spec: Spec) -> dict[str, list[str]]:
    steps = spec["steps"]
    deps: dict[str, list[str]] = {}
    for i, s in enumerate(steps):
        deps[s["name"]] = (
            list(s["dependsOn"]) if "dependsOn" in s else ([steps[i - 1]["name"]] if i else [])
        )
    return deps


def _retry(step: Mapping[str, Any]) -> tuple[int, float, float, float, float]:
    r = step.get("retry") or {}
    b = r.get("backoff") or {}
    return (
        int(r.get("maxAttempts", 3)),
        float(b.get("initialSeconds", 1)),
        float(b.get("maxSeconds", 30)),
        float(b.get("multiplier", 2)),
        float(r.get("jitter", 0.2)),
    )


def backoff(step: Mapping[str, Any], attempt: int, rng: Rng) -> float:
    """Delay after failed attempt number `attempt`, with +-jitter so sagas do not align."""
    _, initial, cap, multiplier, jitter = _retry(step)
    delay = min(cap, initial * multiplier ** (attempt - 1))
    return max(0.0, delay * (1 + jitter * (2 * rng() - 1)))


def _compensable(step: Mapping[str, Any]) -> bool:
    return bool(step.get("compensable", True))


# -- decide --------------------------------------------------------------------------------


def _steps(status: Status) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status.get("steps", [])}


def _pivot_done(spec: Spec, steps: dict[str, dict[str, Any]]) -> bool:
    return any(
        not _compensable(s) and steps[s["name"]]["phase"] in COMPLETED for s in spec["steps"]
    )


def _start_attempt(
    st: dict[str, Any],
    kind: Kind,
    now: float,
    uid: str,
    spec_step: Mapping[str, Any],
    resend: bool,
    deadline: float | None = None,
) -> Call:
    counter = "attempts" if kind == "action" else "compensationAttempts"
    if not resend:
        st[counter] = st.get(counter, 0) + 1
    st["inFlight"] = kind
    st.pop("nextAttemptAt", None)
    return Call(
        st["name"],
        kind,
        st[counter],
        idempotency_key(uid, st["name"], kind, int(st.get("keyGeneration", 0))),
        _timeout(spec_step, now, deadline),
    )


def _timeout(spec_step: Mapping[str, Any], now: float, deadline: float | None) -> float:
    """A call's deadline: the step's timeout, or the saga's deadline if that comes first."""
    step_timeout = float(spec_step.get("timeoutSeconds", 30))
    if deadline is None:
        return step_timeout
    return max(0.05, min(step_timeout, deadline - now))


def _continue(
    s: dict[str, Any],
    kind: Kind,
    spec_step: Mapping[str, Any],
    uid: str,
    now: float,
    d: Decision,
    deadline: float | None = None,
) -> None:
    """A step already under way: re-send an attempt in flight, start a due retry, or wait."""
    if s.get("inFlight"):
        d.calls.append(_start_attempt(s, kind, now, uid, spec_step, True, deadline))
    elif epoch(s["nextAttemptAt"]) <= now:
        d.calls.append(_start_attempt(s, kind, now, uid, spec_step, False, deadline))
    else:
        d.wake_at = min(d.wake_at or float("inf"), epoch(s["nextAttemptAt"]))


def decide(
    spec: Spec,
    status: Mapping[str, Any],
    *,
    uid: str,
    now: float,
    generation: int = 1,
    deleting: bool = False,
    redrive: str | None = None,
) -> Decision:
    st: Status = copy.deepcopy(dict(status))
    d = Decision(st)
    by_name = {s["name"]: s for s in spec["steps"]}
    phase = st.get("phase") or "Pending"
    was = phase

    if phase == "Pending":
        st.update(phase="Running", startedAt=iso(now), message="")
        st["steps"] = [
            {"name": s["name"], "phase": "Pending", "attempts": 0} for s in spec["steps"]
        ]
        d.events.append(("Normal", "Running", "saga started"))
        phase = "Running"

    if phase == "Failed" and redrive and redrive != st.get("lastRedrive"):
        phase = _redrive(st, spec, redrive, d)

    steps = _steps(st)
    if phase in TERMINAL:
        return _finish(d, spec, generation, now, was)

    deadline = None
    if phase == "Running":
        timeout = spec.get("timeoutSeconds")
        pivot_done = _pivot_done(spec, steps)
        if timeout and not pivot_done:
            deadline = epoch(st["startedAt"]) + float(timeout)
        if not pivot_done and timeout and now >= epoch(st["startedAt"]) + float(timeout):
            _abort(st, f"saga timed out after {timeout}s", d)
        elif not pivot_done and deleting:
            _abort(st, "saga deleted while running", d)
        elif timeout and not pivot_done:
            d.wake_at = epoch(st["startedAt"]) + float(timeout)

    if st["phase"] == "Running":
        _run(spec, st, by_name, steps, uid, now, d, deadline)
    if st["phase"] == "Compensating":
        _compensate(spec, st, by_name, steps, uid, now, d)
    return _finish(d, spec, generation, now, was)


def _abort(st: Status, why: str, d: Decision) -> None:
    """Stop going forward: pending steps are skipped, waiting retries given up."""
    for s in st["steps"]:
        if s["phase"] == "Pending":
            s["phase"] = "Skipped"
        elif s["phase"] == "Running" and not s.get("inFlight"):
            s.update(phase="Failed", lastError=s.get("lastError") or why)
            s.pop("nextAttemptAt", None)
    st["abortReason"] = why


def _run(
    spec: Spec,
    st: Status,
    by_name: dict[str, Any],
    steps: dict[str, Any],
    uid: str,
    now: float,
    d: Decision,
    deadline: float | None = None,
) -> None:
    deps = dependencies(spec)
    failed = [s for s in st["steps"] if s["phase"] == "Failed"]
    if failed or st.get("abortReason"):
        # Resolve attempts whose outcome is unknown before undoing anything.
        for s in st["steps"]:
            if s["phase"] == "Pending":
                s["phase"] = "Skipped"
            elif s["phase"] == "Running" and s.get("inFlight") == "action":
                d.calls.append(
                    _start_attempt(s, "action", now, uid, by_name[s["name"]], resend=True)
                )
            elif s["phase"] == "Running":
                s.update(
                    phase="Failed", lastError=s.get("lastError") or "given up: saga is compensating"
                )
                s.pop("nextAttemptAt", None)
        if not d.calls:
            why = st.pop("abortReason", None) or (
                f"step {failed[0]['name']} failed: {failed[0].get('lastError', '')}"
                if failed
                else ""
            )
            st.update(phase="Compensating", message=why)
            st.setdefault("cause", why)
            d.events.append(("Warning", "Compensating", why))
        return

    for spec_step in spec["steps"]:
        s = steps[spec_step["name"]]
        if s["phase"] == "Running":
            _continue(s, "action", spec_step, uid, now, d, deadline)
        elif s["phase"] == "Pending" and all(
            steps[x]["phase"] == "Succeeded" for x in deps[s["name"]]
        ):
            s.update(phase="Running", startedAt=iso(now))
            d.calls.append(_start_attempt(s, "action", now, uid, spec_step, False, deadline))

    if all(s["phase"] == "Succeeded" for s in st["steps"]):
        st.update(phase="Succeeded", finishedAt=iso(now), message="all steps succeeded")
        d.events.append(("Normal", "Succeeded", f"all {len(st['steps'])} steps succeeded"))


def _needs_undo(s: Mapping[str, Any]) -> bool:
    return s["phase"] == "Succeeded" or (s["phase"] == "Failed" and bool(s.get("outcomeUnknown")))


def _compensate(
    spec: Spec,
    st: Status,
    by_name: dict[str, Any],
    steps: dict[str, Any],
    uid: str,
    now: float,
    d: Decision,
) -> None:
    deps = dependencies(spec)
    dependents: dict[str, list[str]] = {n: [] for n in deps}
    for n, ds in deps.items():
        for x in ds:
            dependents[x].append(n)

    def undone(name: str) -> bool:
        s = steps[name]
        return s["phase"] in ("Compensated", "Pending", "Skipped") or (
            s["phase"] == "Failed" and not s.get("outcomeUnknown")
        )

    for spec_step in reversed(spec["steps"]):
        s = steps[spec_step["name"]]
        if s["phase"] == "Compensating":
            _continue(s, "compensation", spec_step, uid, now, d)
        elif _needs_undo(s) and all(undone(x) for x in dependents[s["name"]]):
            if not spec_step.get("compensation"):
                s.update(phase="Compensated", compensatedAt=iso(now))  # nothing to undo
                d.counts.append((COMPENSATED, ()))
                continue
            s["phase"] = "Compensating"
            d.calls.append(_start_attempt(s, "compensation", now, uid, spec_step, resend=False))
    if (
        not d.calls
        and d.wake_at is None
        and not any(_needs_undo(s) or s["phase"] == "Compensating" for s in st["steps"])
    ):
        st.update(phase="Compensated", finishedAt=iso(now))
        d.events.append(
            (
                "Warning",
                "Compensated",
                f"every completed step was compensated ({st.get('message', '')})",
            )
        )


def _redrive(st: Status, spec: Spec, token: str, d: Decision) -> str:
    """A human fixed what stopped the saga: resume from where it stopped."""
    st["lastRedrive"] = token
    resumed = "Failed"
    for s in st["steps"]:
        if s["phase"] == "CompensationFailed":
            s.update(phase="Succeeded", compensationAttempts=0)
            s.pop("nextAttemptAt", None)
            resumed = "Compensating"
        elif s["phase"] == "Failed" and st.get("forwardFailure") == s["name"]:
            s.update(phase="Running", attempts=0, nextAttemptAt=iso(0))
            resumed = "Running"
        else:
            continue
        if s.pop("refused", False):
            # The participant said no for good, so nothing happened: send it again as a new
            # request, not as a repeat it would answer from its stored refusal.
            s["keyGeneration"] = int(s.get("keyGeneration", 0)) + 1
    if resumed != "Failed":
        st.pop("forwardFailure", None)
        st.pop("finishedAt", None)
        cause = st.get("cause")
        st.update(
            phase=resumed,
            message=f"redriven ({token})" + (f"; first cause: {cause}" if cause else ""),
        )
        d.events.append(("Normal", "Redriven", f"resumed in phase {resumed}"))
    return resumed


# -- record ------------------------------------------------------------------------------------


def record(
    spec: Spec,
    status: Mapping[str, Any],
    outcome: Outcome,
    *,
    now: float,
    generation: int = 1,
    rng: Rng = random.random,
) -> Decision:
    st: Status = copy.deepcopy(dict(status))
    d = Decision(st)
    was = st.get("phase") or "Pending"
    s = _steps(st)[outcome.step]
    spec_step = next(x for x in spec["steps"] if x["name"] == outcome.step)
    s.pop("inFlight", None)
    # What the participant's last answer was: replayed from its store, a definitive refusal.
    if outcome.replayed:
        s["replayed"] = True
    else:
        s.pop("replayed", None)
    if not outcome.ok and not outcome.retryable and not outcome.unknown:
        s["refused"] = True
    else:
        s.pop("refused", None)
    if outcome.kind == "action":
        _record_action(spec, st, s, spec_step, outcome, now, rng, d)
    else:
        _record_compensation(st, s, spec_step, outcome, now, rng, d)
    return _finish(d, spec, generation, now, was)


def _record_action(
    spec: Spec,
    st: Status,
    s: dict[str, Any],
    spec_step: Mapping[str, Any],
    outcome: Outcome,
    now: float,
    rng: Rng,
    d: Decision,
) -> None:
    if outcome.ok:
        st["completions"] = st.get("completions", 0) + 1
        s.update(phase="Succeeded", finishedAt=iso(now), completedSeq=st["completions"])
        s.pop("outcomeUnknown", None)
        s.pop("lastError", None)
        if outcome.output is not None:
            s["output"] = bounded_output(outcome.output)
        return
    s["lastError"] = outcome.error[:ERROR_LIMIT]
    # Sticky: once an attempt may have reached the participant, a later refusal does not
    # prove that nothing happened (a participant that does not deduplicate can say no twice).
    s["outcomeUnknown"] = bool(s.get("outcomeUnknown")) or outcome.unknown
    max_attempts = _retry(spec_step)[0]
    forward = _pivot_done(spec, _steps(st)) and _compensable(spec_step)
    if (
        outcome.retryable
        and (forward or s["attempts"] < max_attempts)
        and st["phase"] == "Running"
        and not st.get("abortReason")
    ):
        s["nextAttemptAt"] = iso(now + backoff(spec_step, s["attempts"], rng))
        d.counts.append((RETRY, ("action",)))
        return
    s.update(phase="Failed", finishedAt=iso(now))
    d.events.append(
        ("Warning", "StepFailed", f"step {s['name']} failed for good: {s['lastError']}")
    )
    if forward:
        st.update(
            phase="Failed",
            finishedAt=iso(now),
            forwardFailure=s["name"],
            message=f"step {s['name']} after the pivot was refused: {s['lastError']}; "
            "fix it and annotate accord.dev/redrive",
        )
        st.setdefault("cause", f"step {s['name']} after the pivot was refused: {s['lastError']}")
        d.events.append(("Warning", "Failed", st["message"]))


def _record_compensation(
    st: Status,
    s: dict[str, Any],
    spec_step: Mapping[str, Any],
    outcome: Outcome,
    now: float,
    rng: Rng,
    d: Decision,
) -> None:
    if outcome.ok:
        s.update(phase="Compensated", compensatedAt=iso(now))  # lastError keeps why it was undone
        d.counts.append((COMPENSATED, ()))
        return
    s["lastError"] = outcome.error[:ERROR_LIMIT]
    if outcome.retryable and s["compensationAttempts"] < _retry(spec_step)[0]:
        s["nextAttemptAt"] = iso(now + backoff(spec_step, s["compensationAttempts"], rng))
        d.counts.append((RETRY, ("compensation",)))
        return
    s.update(phase="CompensationFailed", finishedAt=iso(now))
    st.update(
        phase="Failed",
        finishedAt=iso(now),
        message=f"compensation of step {s['name']} failed: {s['lastError']}; "
        "fix it and annotate accord.dev/redrive",
    )
    st.setdefault("cause", f"compensation of step {s['name']} failed: {s['lastError']}")
    d.events.append(("Warning", "Failed", st["message"]))


def bounded_output(output: Any) -> Any:
    import json

    text = json.dumps(output)
    if len(text) <= OUTPUT_LIMIT:
        return output
    return {"truncated": True, "size": len(text), "head": text[:1024]}


# -- the parts every status gets ---------------------------------------------------------------


def _finish(d: Decision, spec: Spec, generation: int, now: float, was: str) -> Decision:
    st = d.status
    if st.get("phase", "Pending") != was:
        d.counts.append((PHASE, (st["phase"],)))
        # Once per saga: a redriven saga was counted when it first stopped.
        if st["phase"] in TERMINAL and not st.get("lastRedrive"):
            d.counts.append((FINISHED_AS, (st["phase"],)))
    steps = st.get("steps", [])
    done = sum(s["phase"] in IN_EFFECT for s in steps)
    st["progress"] = f"{done}/{len(spec['steps'])}"
    current = next((s["name"] for s in steps if s["phase"] in ("Running", "Compensating")), None)
    if current:
        st["currentStep"] = current
    else:
        st.pop("currentStep", None)
    st["observedGeneration"] = generation
    phase = st.get("phase", "Pending")
    # Only ours (older operators also wrote Progressing and Degraded).
    ours = {type_ for type_, _ in CONDITIONS}
    conditions: list[Condition] = [c for c in st.get("conditions") or [] if c["type"] in ours]
    t = iso(now)
    message = st.get("message", "") or phase
    for type_, true_in in CONDITIONS:
        conditions = set_condition(
            conditions,
            type=type_,
            status="True" if phase in true_in else "False",
            reason=phase,
            message=message,
            generation=generation,
            now=t,
        )
    st["conditions"] = conditions
    return d


# -- the machine as the shared driver plugs it in ----------------------------------------------


class SagaMachine:
    """decide/record over the saga object: its uid, generation and redrive annotation."""

    def __init__(self, *, deleting: bool = False, rng: Rng = random.random) -> None:
        self.deleting = deleting
        self.rng = rng

    def decide(self, obj: Mapping[str, Any], status: Status, now: float) -> Decision:
        meta = obj["metadata"]
        return decide(
            obj["spec"],
            status,
            uid=meta["uid"],
            now=now,
            generation=int(meta.get("generation", 1)),
            deleting=self.deleting,
            redrive=(meta.get("annotations") or {}).get(REDRIVE),
        )

    def record(
        self, obj: Mapping[str, Any], status: Status, outcome: Outcome, now: float
    ) -> Decision:
        generation = int(obj["metadata"].get("generation", 1))
        return record(obj["spec"], status, outcome, now=now, generation=generation, rng=self.rng)

    def finished(self, status: Mapping[str, Any]) -> bool:
        return status.get("phase") in TERMINAL

    def slot(self, call: Call) -> tuple[str, str]:
        return (call.step, call.kind)
