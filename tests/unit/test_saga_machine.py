"""The saga state machine, driven by a simulated participant and a virtual clock."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accord_operator.decision import Decision
from accord_operator.driver import Driver
from accord_operator.kinds import SagaStatus
from accord_operator.saga.machine import Call, Outcome, SagaMachine, decide, epoch
from tests.unit.test_kinds import conforms

UID = "uid-1"
Behaviour = Callable[[Call], Outcome]


def step(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "action": {"http": {"service": name, "path": "/do"}},
        "compensation": {"http": {"service": name, "path": "/undo"}},
        "retry": {"maxAttempts": 3, "backoff": {"initialSeconds": 1, "maxSeconds": 10}},
        **extra,
    }


def ok(call: Call) -> Outcome:
    return Outcome(call.step, call.kind, ok=True, output={"by": call.step})


def refuse(*steps: str, kind: str = "action") -> Behaviour:
    def behave(call: Call) -> Outcome:
        if call.step in steps and call.kind == kind:
            return Outcome(
                call.step, call.kind, ok=False, retryable=False, error="HTTP 402 declined"
            )
        return ok(call)

    return behave


def flaky(failures: dict[tuple[str, str], int]) -> Behaviour:
    """Fail (retryably) the first N attempts of (step, kind)."""

    def behave(call: Call) -> Outcome:
        if call.attempt <= failures.get((call.step, call.kind), 0):
            return Outcome(call.step, call.kind, ok=False, retryable=True, error="HTTP 503")
        return ok(call)

    return behave


class Crash(Exception):
    """The operator process dies."""


class MemoryStore:
    """The saga object in memory: every write is stored, like an API server with no rival."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.obj: dict[str, Any] = {
            "metadata": {"uid": UID, "generation": 1, "annotations": {}, "resourceVersion": "1"},
            "spec": spec,
            "status": {},
        }
        self.writes = 0

    async def read(self) -> dict[str, Any]:
        return copy.deepcopy(self.obj)

    async def write(
        self, obj: dict[str, Any], status: dict[str, Any], written: dict[str, Any]
    ) -> dict[str, Any] | None:
        assert self.obj["status"] == written, "a write over a status it did not decide from"
        # Every field the machine writes is one the schema keeps (the API server prunes others).
        assert conforms(status, SagaStatus) == []
        self.obj["status"] = copy.deepcopy(status)
        self.writes += 1
        return None

    async def refresh(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "metadata": copy.deepcopy(self.obj["metadata"])}


class Sim:
    """Runs the real driver loop (accord_operator.driver) over the saga machine, with an
    in-memory store, a simulated participant and a virtual clock."""

    def __init__(self, spec: dict[str, Any], behave: Behaviour, now: float = 1_000_000.0) -> None:
        self.spec, self.behave, self.now = spec, behave, now
        self.store = MemoryStore(spec)
        self.calls: list[Call] = []
        self.rounds: list[list[Call]] = []
        self.events: list[tuple[str, str, str]] = []
        self.counts: list[tuple[str, tuple[str, ...]]] = []
        self.waits = 0
        self._crash = False
        self._round_of: object = None
        self._driver: Driver[Call, Outcome] | None = None
        self._ev = asyncio.new_event_loop()  # one loop: calls may stay in flight across ticks
        self._machine = SagaMachine(rng=lambda: 0.5)

    @property
    def status(self) -> dict[str, Any]:
        """What the loop holds: the stored status with the latest outcomes recorded."""
        return self._driver.status if self._driver else self.store.obj["status"]

    # the World the driver runs in
    def time(self) -> float:
        return self.now

    async def wait(self, seconds: float) -> bool:
        self.now += seconds
        self.waits += 1
        assert self.waits < 5000, f"no terminal phase: {self.status}"
        await asyncio.sleep(0)
        return False

    def tell(self, obj: dict[str, Any], decision: Decision[Any]) -> None:
        self.events += decision.events
        self.counts += decision.counts

    async def act(self, call: Call, obj: dict[str, Any], status: dict[str, Any]) -> Outcome:
        if self._crash:
            raise Crash
        self.calls.append(call)
        if status is not self._round_of:  # every call of one round gets the same status
            self._round_of = status
            self.rounds.append([])
        self.rounds[-1].append(call)
        return self.behave(call)

    def _loop(self, deleting: bool = False, redrive: str | None = None, generation: int = 1):
        meta = self.store.obj["metadata"]
        meta["generation"] = generation
        if redrive is not None:
            meta["annotations"]["accord.dev/redrive"] = redrive
        self._machine.deleting = deleting
        if self._driver is None:
            world = type("W", (), {"now": self.time, "wait": self.wait, "tell": self.tell})()
            self._driver = Driver(self._machine, self.store, self.act, world)
        elif self._driver.obj is not None:
            self._driver.obj["metadata"] = copy.deepcopy(meta)
        return self._driver

    def tick(self, crash: bool = False, **kw: Any) -> list[Call]:
        """One round of the loop; when nothing was due, the clock moves to when it is. With
        `crash`, the process dies once the round has written ahead, before any call is made:
        the next round is a new loop, started from the store."""
        self._crash = crash
        try:
            turn = self._ev.run_until_complete(self._loop(**kw).round())
        except Crash:
            self._driver = None
            return []
        finally:
            self._crash = False
        if not turn.calls and turn.wait:
            self.now += turn.wait
        return turn.calls

    def run(self, **kw: Any) -> dict[str, Any]:
        status = self._ev.run_until_complete(self._loop(**kw).run(watch_finished=False))
        assert status.get("phase") in ("Succeeded", "Compensated", "Failed"), status
        assert self.store.obj["status"] == status, "the loop returned before storing"
        return status

    def trace(self) -> list[str]:
        return [f"{c.step}:{c.kind}" for c in self.calls]

    def phases(self) -> dict[str, str]:
        return {s["name"]: s["phase"] for s in self.status["steps"]}


ORDER = {"steps": [step("reserve"), step("charge"), step("ship")]}


def test_happy_path_runs_steps_in_order() -> None:
    sim = Sim(ORDER, ok)
    status = sim.run()
    assert status["phase"] == "Succeeded" and status["progress"] == "3/3"
    assert sim.trace() == ["reserve:action", "charge:action", "ship:action"]
    assert status["steps"][0]["output"] == {"by": "reserve"}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_conditions_read_as_kstatus_says() -> None:
    # Success: Ready. Ended without success: Stalled (abnormal-true), not Ready, so
    # `kubectl wait --for=condition=Ready` succeeds only on success and scripts stop early.
    assert conditions(Sim(ORDER, ok).run()) == {
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }
    assert conditions(Sim(ORDER, refuse("charge")).run()) == {
        "Ready": "False", "Reconciling": "False", "Stalled": "True"}  # fmt: skip
    first = decide(ORDER, {}, uid="u", now=0.0, generation=3)
    assert conditions(first.status) == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert {c["observedGeneration"] for c in first.status["conditions"]} == {3}


def test_conditions_of_older_operators_are_dropped() -> None:
    status = decide(ORDER, {}, uid="u", now=0.0).status
    status["conditions"].append(
        {"type": "Progressing", "status": "True", "reason": "Running", "message": "",
         "lastTransitionTime": "t"}
    )  # fmt: skip
    assert set(conditions(decide(ORDER, status, uid="u", now=1.0).status)) == {
        "Ready", "Reconciling", "Stalled"}  # fmt: skip


def test_failure_at_step_k_compensates_k_minus_1_to_1_in_reverse() -> None:
    spec = {"steps": [step("a"), step("b"), step("c"), step("d")]}
    sim = Sim(spec, refuse("c"))
    status = sim.run()
    assert status["phase"] == "Compensated"
    assert sim.trace() == ["a:action", "b:action", "c:action", "b:compensation", "a:compensation"]
    assert sim.phases() == {"a": "Compensated", "b": "Compensated", "c": "Failed", "d": "Skipped"}
    assert "step c failed: HTTP 402 declined" in status["message"]


def test_business_refusal_is_not_retried_but_5xx_is() -> None:
    sim = Sim(ORDER, refuse("reserve"))
    sim.run()
    assert sim.trace() == ["reserve:action"]
    sim = Sim(ORDER, flaky({("charge", "action"): 2}))
    assert sim.run()["phase"] == "Succeeded"
    assert sim.trace().count("charge:action") == 3
    assert sim.status["steps"][1]["attempts"] == 3


def test_retries_wait_for_the_backoff() -> None:
    sim = Sim(
        {
            "steps": [
                step("a", retry={"maxAttempts": 3, "backoff": {"initialSeconds": 4}, "jitter": 0})
            ]
        },
        flaky({("a", "action"): 1}),
    )
    start = sim.now
    sim.tick()  # attempt 1 fails
    next_at = epoch(sim.status["steps"][0]["nextAttemptAt"])
    assert next_at == pytest.approx(start + 4)
    assert sim.tick() == []  # nothing is due: the clock moves to the wake time
    assert sim.now == pytest.approx(start + 4)
    assert [c.attempt for c in sim.tick()] == [2]


def test_exhausted_retries_fail_the_step_for_good() -> None:
    sim = Sim(ORDER, flaky({("charge", "action"): 99}))
    assert sim.run()["phase"] == "Compensated"
    assert sim.trace() == ["reserve:action"] + ["charge:action"] * 3 + ["reserve:compensation"]


def test_parallel_branches_start_together_and_join() -> None:
    spec = {
        "steps": [
            step("flight", dependsOn=[]),
            step("hotel", dependsOn=[]),
            step("charge", dependsOn=["flight", "hotel"]),
            step("notify"),
        ]
    }
    sim = Sim(spec, ok)
    sim.run()
    assert [[c.step for c in r] for r in sim.rounds] == [
        ["flight", "hotel"],
        ["charge"],
        ["notify"],
    ]


def test_completed_parallel_branches_are_compensated_in_parallel() -> None:
    spec = {
        "steps": [
            step("flight", dependsOn=[]),
            step("hotel", dependsOn=[]),
            step("charge", dependsOn=["flight", "hotel"]),
        ]
    }
    sim = Sim(spec, refuse("charge"))
    assert sim.run()["phase"] == "Compensated"
    assert [sorted(c.step for c in r) for r in sim.rounds][-1] == ["flight", "hotel"]


def test_compensation_waits_for_dependents_to_be_undone() -> None:
    spec = {
        "steps": [
            step("a"),
            step("b", dependsOn=["a"]),
            step("c", dependsOn=["a"]),
            step("d", dependsOn=["b", "c"]),
        ]
    }
    sim = Sim(spec, refuse("d"))
    sim.run()
    rounds = [sorted(f"{c.step}:{c.kind}" for c in r) for r in sim.rounds]
    assert rounds[-2:] == [["b:compensation", "c:compensation"], ["a:compensation"]]


def test_steps_after_the_pivot_are_retried_forward_never_compensated() -> None:
    spec = {
        "steps": [
            step("reserve"),
            {**step("charge", compensable=False), "compensation": None},
            step("ship", retry={"maxAttempts": 2}),
        ]
    }
    spec["steps"][1].pop("compensation")
    sim = Sim(spec, flaky({("ship", "action"): 7}))
    status = sim.run()
    assert status["phase"] == "Succeeded"
    assert sim.trace().count("ship:action") == 8  # well past maxAttempts 2
    assert not any(c.kind == "compensation" for c in sim.calls)


def test_refusal_after_the_pivot_needs_a_human_then_redrive_resumes() -> None:
    spec = {"steps": [step("reserve"), step("charge", compensable=False), step("ship")]}
    spec["steps"][1].pop("compensation")
    behaviour = {"refuse": True}

    def behave(call: Call) -> Outcome:
        if call.step == "ship" and behaviour["refuse"]:
            return Outcome(call.step, call.kind, ok=False, error="HTTP 400 bad address")
        return ok(call)

    sim = Sim(spec, behave)
    status = sim.run()
    assert status["phase"] == "Failed" and "step ship after the pivot" in status["message"]
    assert not any(c.kind == "compensation" for c in sim.calls)
    behaviour["refuse"] = False
    assert sim.run(redrive="fixed-address")["phase"] == "Succeeded"
    assert sim.status["lastRedrive"] == "fixed-address"
    assert (
        sim.run(redrive="fixed-address")["phase"] == "Succeeded"
    )  # the same token does nothing twice


def test_compensation_failing_for_good_stops_in_failed_and_redrive_finishes_it() -> None:
    state = {"broken": True}

    def behave(call: Call) -> Outcome:
        if call.step == "b" and call.kind == "compensation" and state["broken"]:
            return Outcome(
                call.step, call.kind, ok=False, retryable=True, error="HTTP 500 ledger down"
            )
        if call.step == "c":
            return Outcome(call.step, call.kind, ok=False, error="HTTP 409 conflict")
        return ok(call)

    sim = Sim({"steps": [step("a"), step("b"), step("c")]}, behave)
    status = sim.run()
    assert status["phase"] == "Failed"
    assert "compensation of step b failed: HTTP 500 ledger down" in status["message"]
    assert sim.phases()["b"] == "CompensationFailed" and sim.phases()["a"] == "Succeeded"
    assert ("Warning", "Failed", status["message"]) in sim.events
    state["broken"] = False
    assert sim.run(redrive="1")["phase"] == "Compensated"
    assert sim.trace()[-2:] == ["b:compensation", "a:compensation"]


def test_a_redrive_after_a_refusal_sends_a_new_key_after_no_answer_the_same() -> None:
    spec = {"steps": [step("reserve"), step("charge", compensable=False), step("ship")]}
    spec["steps"][1].pop("compensation")
    answers = iter(["refuse", "ok"])

    def behave(call: Call) -> Outcome:
        if call.step != "ship":
            return ok(call)
        if next(answers) == "refuse":
            return Outcome(call.step, call.kind, ok=False, error="HTTP 400 bad address")
        return Outcome(call.step, call.kind, ok=True, replayed=True)

    sim = Sim(spec, behave)
    assert sim.run()["phase"] == "Failed"
    assert sim.status["steps"][2]["refused"] is True
    assert sim.run(redrive="fixed")["phase"] == "Succeeded"
    first, again = [c.key for c in sim.calls if c.step == "ship"]
    assert (first, again) == (f"{UID}/ship/action", f"{UID}/ship/action/r1")
    ship = sim.status["steps"][2]
    assert ship["keyGeneration"] == 1 and ship["replayed"] is True and "refused" not in ship

    # A compensation that got no answer (it may have happened) keeps its key on a redrive.
    state = {"down": True}

    def flaky_undo(call: Call) -> Outcome:
        if call.step == "a" and call.kind == "compensation" and state["down"]:
            return Outcome(call.step, call.kind, ok=False, retryable=True, unknown=True)
        if call.step == "b":
            return Outcome(call.step, call.kind, ok=False, error="HTTP 402")
        return ok(call)

    sim = Sim({"steps": [step("a"), step("b")]}, flaky_undo)
    assert sim.run()["phase"] == "Failed"
    state["down"] = False
    assert sim.run(redrive="1")["phase"] == "Compensated"
    assert {c.key for c in sim.calls if c.kind == "compensation"} == {f"{UID}/a/compensation"}


def test_the_first_cause_survives_a_redrive_and_the_saga_is_counted_once() -> None:
    state = {"broken": True}

    def behave(call: Call) -> Outcome:
        if call.step == "a" and call.kind == "compensation" and state["broken"]:
            return Outcome(call.step, call.kind, ok=False, error="HTTP 422 ledger locked")
        if call.step == "b":
            return Outcome(call.step, call.kind, ok=False, error="HTTP 402 declined")
        return ok(call)

    sim = Sim({"steps": [step("a"), step("b")]}, behave)
    assert sim.run()["phase"] == "Failed"
    assert sim.status["cause"] == "step b failed: HTTP 402 declined"
    state["broken"] = False
    status = sim.run(redrive="t-1")
    assert status["phase"] == "Compensated"
    assert status["cause"] == "step b failed: HTTP 402 declined"
    assert "first cause: step b failed: HTTP 402 declined" in status["message"]
    assert [c for c in sim.counts if c[0] == "finished"] == [("finished", ("Failed",))]
    assert status["progress"] == "0/2"  # nothing is in effect once compensated


def test_a_call_never_outlives_the_saga_deadline() -> None:
    spec = {"timeoutSeconds": 10, "steps": [step("a", timeoutSeconds=60), step("b")]}
    d = decide(spec, {}, uid=UID, now=1000.0)
    assert d.calls[0].timeout_s == 10  # the saga's deadline comes first
    later = decide(spec, d.status, uid=UID, now=1007.5)  # a restart resends it
    assert later.calls[0].timeout_s == pytest.approx(2.5)
    alone = decide({"steps": [step("a", timeoutSeconds=60)]}, {}, uid=UID, now=1000.0)
    assert alone.calls[0].timeout_s == 60


def test_saga_timeout_is_a_failure() -> None:
    spec = {
        "timeoutSeconds": 10,
        "steps": [step("a"), step("b", retry={"maxAttempts": 100}), step("c")],
    }
    sim = Sim(spec, flaky({("b", "action"): 1000}))
    status = sim.run()
    assert status["phase"] == "Compensated" and "timed out after 10s" in status["message"]
    assert sim.phases() == {"a": "Compensated", "b": "Failed", "c": "Skipped"}


def test_restart_mid_step_resends_the_same_attempt_under_the_same_key() -> None:
    sim = Sim(ORDER, ok)
    assert sim.tick(crash=True) == []  # the operator dies after writing ahead
    assert sim.store.obj["status"]["steps"][0]["inFlight"] == "action"  # stored first
    (again,) = sim.tick()  # a new loop, from the store
    assert (again.step, again.attempt, again.key) == ("reserve", 1, f"{UID}/reserve/action")
    assert sim.run()["phase"] == "Succeeded"
    assert sim.trace() == ["reserve:action", "charge:action", "ship:action"]


def test_the_machine_counts_what_happened() -> None:
    sim = Sim(ORDER, flaky({("charge", "action"): 99}))
    sim.run()
    assert sorted(sim.counts) == sorted(
        [("retry", ("action",))] * 2
        + [("compensated", ())]
        + [("phase", (p,)) for p in ("Running", "Compensating", "Compensated")]
        + [("finished", ("Compensated",))]
    )


class RivalStore(MemoryStore):
    """Another controller wrote first: the first write finds the saga moved on."""

    def __init__(self, spec: dict[str, Any], rival_status: dict[str, Any]) -> None:
        super().__init__(spec)
        self.rival_status = rival_status

    async def write(
        self, obj: dict[str, Any], status: dict[str, Any], written: dict[str, Any]
    ) -> dict[str, Any] | None:
        if self.rival_status:
            self.obj["status"], self.rival_status = self.rival_status, {}
            return copy.deepcopy(self.obj)
        return await super().write(obj, status, written)


def test_a_lost_write_is_decided_again_and_never_told() -> None:
    rival = decide(ORDER, {}, uid=UID, now=999.0).status  # the rival started the saga
    sim = Sim(ORDER, ok)
    sim.store = RivalStore(ORDER, rival)
    assert sim.tick() == []  # our write lost: nothing called, nothing told
    assert sim.events == [] and sim.calls == []
    (call,) = sim.tick()  # decided again from the rival's status: its attempt, its key
    assert (call.step, call.attempt) == ("reserve", 1)
    assert sim.run()["phase"] == "Succeeded"
    # Only the decisions that were stored were told: the rival's "started" is not ours.
    assert [e[1] for e in sim.events] == ["Succeeded"]


def test_unknown_outcome_counts_as_completed_for_compensation() -> None:
    def behave(call: Call) -> Outcome:
        if call.step == "b" and call.kind == "action":
            return Outcome("b", "action", ok=False, retryable=True, unknown=True, error="timeout")
        if call.step == "c":
            return Outcome("c", "action", ok=False, error="HTTP 400")
        return ok(call)

    spec = {
        "steps": [
            step("a", dependsOn=[]),
            step("b", dependsOn=[], retry={"maxAttempts": 1}),
            step("c", dependsOn=[]),
        ]
    }
    sim = Sim(spec, behave)
    sim.run()
    assert "b:compensation" in sim.trace()  # it may have happened: undo it (idempotently)


def test_deleting_a_running_saga_compensates_it() -> None:
    sim = Sim(ORDER, ok)
    sim.tick()
    sim.tick()  # reserve and charge done
    assert sim.run(deleting=True)["phase"] == "Compensated"
    assert sim.trace()[-2:] == ["charge:compensation", "reserve:compensation"]
    assert "deleted" in sim.status["message"]


def test_a_step_without_compensation_has_nothing_to_undo() -> None:
    spec = {"steps": [step("a"), step("b"), step("c")]}
    spec["steps"][1].pop("compensation")
    sim = Sim(spec, refuse("c"))
    assert sim.run()["phase"] == "Compensated"
    assert sim.trace() == ["a:action", "b:action", "c:action", "a:compensation"]


def test_output_is_bounded() -> None:
    big = {"blob": "x" * 100_000}
    sim = Sim({"steps": [step("a")]}, lambda c: Outcome(c.step, c.kind, ok=True, output=big))
    out = sim.run()["steps"][0]["output"]
    assert out["truncated"] is True and out["size"] > 100_000


# -- properties over any behaviour ----------------------------------------------------------------

_outcomes = st.sampled_from(["ok", "ok", "ok", "retry", "refuse", "unknown"])


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, 5),
    parallel=st.booleans(),
    pivot=st.one_of(st.none(), st.integers(0, 4)),
    script=st.lists(_outcomes, min_size=1, max_size=40),
    restarts=st.lists(st.booleans(), max_size=40),
)
def test_invariants_hold_for_any_participant_behaviour(
    n: int, parallel: bool, pivot: int | None, script: list[str], restarts: list[bool]
) -> None:
    steps = [step(f"s{i}", **({"dependsOn": []} if parallel else {})) for i in range(n)]
    if pivot is not None and pivot < n:
        steps[pivot]["compensable"] = False
        steps[pivot].pop("compensation")
    spec = {"steps": steps}
    done_at_participant: list[str] = []
    undone_at_participant: list[str] = []
    keys: dict[tuple[str, str], set[str]] = {}
    it = iter(script)

    def behave(call: Call) -> Outcome:
        keys.setdefault((call.step, call.kind), set()).add(call.key)
        what = next(it, "ok")
        if call.kind == "compensation":
            what = "ok" if what in ("refuse", "unknown") else what  # undo does not refuse here
        if what == "ok":
            (done_at_participant if call.kind == "action" else undone_at_participant).append(
                call.step
            )
            return ok(call)
        if what == "unknown":
            done_at_participant.append(call.step)  # it did happen; the answer was lost
            return Outcome(
                call.step, call.kind, ok=False, retryable=True, unknown=True, error="timeout"
            )
        return Outcome(call.step, call.kind, ok=False, retryable=what == "retry", error=what)

    sim = Sim(spec, behave)
    restart = iter(restarts)
    for _ in range(2000):
        if sim.status.get("phase") in ("Succeeded", "Compensated", "Failed"):
            break
        # Some rounds, the operator dies right after its write-ahead: the stored status says
        # attempts are in flight, and a new loop starts from the store.
        sim.tick(crash=next(restart, False))
    status = sim.status
    assert status["phase"] in ("Succeeded", "Compensated", "Failed")
    # One key per (step, kind), ever.
    assert all(len(v) == 1 for v in keys.values())
    if status["phase"] == "Compensated":
        # Everything that happened at a participant was undone, and nothing else.
        compensable = {s["name"] for s in steps if "compensation" in s}
        assert set(undone_at_participant) == set(done_at_participant) & compensable
        # Never undone twice with success, never before being done.
        assert len(undone_at_participant) == len(set(undone_at_participant))
    if status["phase"] == "Succeeded":
        assert undone_at_participant == []
        assert {s["name"] for s in steps} <= set(done_at_participant)


def test_only_finished_sagas_with_a_ttl_expire() -> None:
    from accord_operator.saga.machine import expires_at, iso

    done = {"phase": "Succeeded", "finishedAt": iso(1000.0)}
    assert expires_at({"ttlSecondsAfterFinished": 30}, done) == 1030.0
    assert expires_at({"ttlSecondsAfterFinished": 0}, {**done, "phase": "Compensated"}) == 1000.0
    assert expires_at({}, done) is None  # no TTL: kept
    assert expires_at({"ttlSecondsAfterFinished": 0}, {**done, "phase": "Failed"}) is None
    assert expires_at({"ttlSecondsAfterFinished": 0}, {"phase": "Running"}) is None


def test_a_slow_branch_does_not_hold_up_an_independent_one() -> None:
    """The slow call only answers once the step after the fast branch has been called: a
    driver that waited for a whole round would never get there."""
    spec = {
        "steps": [
            step("slow", dependsOn=[]),
            step("fast", dependsOn=[]),
            step("after-fast", dependsOn=["fast"]),
        ]
    }
    store = MemoryStore(spec)
    started: list[str] = []
    stored_when_called: list[bool] = []
    after_fast_called = asyncio.Event()

    async def act(call: Call, obj: dict[str, Any], status: dict[str, Any]) -> Outcome:
        started.append(call.step)
        if call.step == "after-fast":
            after_fast_called.set()
        # Written ahead: the store already says this call is in flight.
        (mine,) = [s for s in store.obj["status"]["steps"] if s["name"] == call.step]
        stored_when_called.append(mine.get("inFlight") == call.kind)
        if call.step == "slow":
            await after_fast_called.wait()
        return ok(call)

    class World:
        def now(self) -> float:
            return 1_000_000.0

        async def wait(self, seconds: float) -> bool:
            await asyncio.sleep(0)
            return False

        def tell(self, obj: dict[str, Any], decision: Decision[Any]) -> None:
            pass

    driver: Driver[Call, Outcome] = Driver(SagaMachine(), store, act, World())
    status = asyncio.run(asyncio.wait_for(driver.run(watch_finished=False), 10))
    assert status["phase"] == "Succeeded"
    assert started == ["slow", "fast", "after-fast"]
    assert all(stored_when_called)
