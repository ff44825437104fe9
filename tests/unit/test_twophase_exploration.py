"""Every interleaving, to a bound: the pure 2PC coordinator (twophase.machine) and the pure
participant fence (accord_sidecar.fence), with two participants, two coordinators that may
race on one object, messages duplicated, lost (a timeout) or delivered in any order,
coordinators and participants' sidecars crashing, the transaction deleted (its coordinator
starts again, told to abort), and time passing the prepare deadline.

Asserted in every state reached: no participant's app commits while another's aborts (a vote
to abort included); the stored decision, once written, never changes; no app commits without
a stored Commit; Committed means every app committed; Aborted leaves no app holding a
prepare (a late prepare after the abort never gets through).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from accord_operator.twophase.machine import Outcome, TpcMachine
from accord_sidecar import fence

P = ("a", "b")
SPEC = {
    "participants": [{"name": n, "service": n} for n in P],
    "prepareTimeoutSeconds": 30,
    "commitTimeoutSeconds": 5,
}
OBJ = {"metadata": {"uid": "u", "generation": 1}, "spec": SPEC}


@dataclass(frozen=True)
class World:
    stored: str  # the status in the API server, as JSON
    version: int
    decisions: tuple[str, ...]  # every decision ever stored, in order
    # per coordinator: (status JSON, version, flying, fresh)
    coords: tuple[tuple[Any, ...], ...]
    deleting: bool  # its deletion was asked: every coordinator drives it with deleting
    net: tuple[
        tuple[Any, ...], ...
    ]  # messages: ("req", c, p, kind) | ("rep", c, p, kind, vote, ok, retry)
    journals: tuple[str | None, ...]  # per participant: the fence's state
    apps: tuple[str | None, ...]  # per participant: prepared | committed | aborted | refused
    now: int
    faults: int  # faults still allowed on this path
    kinds: frozenset[str]  # which: duplicate, lose, coordinator, sidecar, delete


def _coordinator_round(w: World, c: int, outcome: Outcome | None) -> World:
    """One driver round of coordinator c: record a reply (if any), decide, write ahead
    (over the version it read), then send the calls not already in flight."""
    status_json, version, flying, fresh = w.coords[c]
    machine = TpcMachine(deleting=w.deleting)
    machine._recovering = fresh
    status = json.loads(status_json)
    if outcome is not None:
        status = machine.record(OBJ, status, outcome, w.now).status
        flying = tuple(f for f in flying if f != (outcome.participant, outcome.kind))
    d = machine.decide(OBJ, status, w.now)
    new_json = json.dumps(d.status, sort_keys=True)
    coords = list(w.coords)
    # Stored only when the machine says so (or it finished), as the driver does; else kept
    # in memory (lost if this coordinator dies) and the calls due are still sent.
    must = d.write or machine.finished(d.status)
    if must and (new_json != status_json or outcome is not None):
        if version != w.version:  # someone else wrote: re-read, decide again next round
            coords[c] = (w.stored, w.version, flying, False)
            return replace(w, coords=tuple(coords))
        decisions = w.decisions
        decided = d.status.get("decision")
        if decided and (not decisions or decisions[-1] != decided):
            decisions = (*decisions, decided)
        w = replace(w, stored=new_json, version=w.version + 1, decisions=decisions)
        version = w.version
    sends = [
        (call.participant, call.kind)
        for call in d.calls
        if (call.participant, call.kind) not in flying
    ]
    coords[c] = (new_json, version, _bag({*flying, *sends}), False)
    net = w.net + tuple(("req", c, p, k) for p, k in sends)
    return replace(w, coords=tuple(coords), net=_bag(net))


def _bag(items: Any) -> tuple[Any, ...]:
    """A multiset as a canonical tuple (messages are unordered: any order is explored)."""
    return tuple(sorted(items, key=repr))


def _without(net: tuple[Any, ...], i: int) -> tuple[Any, ...]:
    return net[:i] + net[i + 1 :]


def _deliver(w: World, rest: tuple[Any, ...], c: int, p: str, kind: Any) -> list[World]:
    """A request reaches p's sidecar: the fence records first; then the app answers (a prepare
    with either vote), or the sidecar dies before or after the app acted (its answer lost)."""
    j = P.index(p)
    step = fence.on_message(kind, w.journals[j])
    journals = list(w.journals)
    if step.record is not None:
        journals[j] = step.record
    base = replace(w, net=rest, journals=tuple(journals))
    if not step.call_app:
        assert step.answer is not None
        return [replace(base, net=_bag((*rest, _reply(c, p, kind, *step.answer))))]
    out = []
    votes = ("commit", "abort") if kind == "prepare" else ("",)
    lost = ("rep", c, p, kind, None, False, True)  # the caller's timeout
    crash = w.faults - 1
    sidecar = w.faults and "sidecar" in w.kinds
    if sidecar:  # died after recording, before the app was called
        out.append(replace(base, net=_bag((*rest, lost)), faults=crash))
    for vote in votes:
        apps = list(w.apps)
        if kind == "prepare":
            # Voting abort is aborting: the app gave up its part on its own.
            apps[j] = "prepared" if vote == "commit" else "aborted"
        elif kind == "commit":
            apps[j] = "committed"
        else:
            apps[j] = "aborted"
        acted = replace(base, apps=tuple(apps))
        if sidecar:  # died after the app acted, before recording its answer
            out.append(replace(acted, net=_bag((*rest, lost)), faults=crash))
        body = json.dumps({"vote": vote}).encode() if vote else b"{}"
        record, code, answer = fence.after_app(kind, 200, body, False)
        if record is not None:
            journals[j] = record
        out.append(
            replace(
                acted,
                journals=tuple(journals),
                net=_bag((*rest, _reply(c, p, kind, code, answer))),
            )
        )
        journals = list(base.journals)
    return out


def successors(w: World) -> list[World]:
    out = [_coordinator_round(w, c, None) for c in range(len(w.coords))]
    # Requests to different participants commute (they touch disjoint state): deliver those
    # of one participant at a time, in any order among themselves (partial-order reduction).
    first = min((m[2] for m in w.net if m[0] == "req"), default=None)
    for i, msg in enumerate(w.net):
        rest = _without(w.net, i)
        if msg[0] == "req" and msg[2] != first:
            continue
        if msg[0] == "req":
            _, c, p, kind = msg
            out += _deliver(w, rest, c, p, kind)
            if w.faults and "duplicate" in w.kinds:  # duplicated on the way
                out.append(replace(w, net=_bag((*w.net, msg)), faults=w.faults - 1))
        else:
            _, c, p, kind, vote, ok, retry = msg
            error = "" if ok or vote else "no answer"
            outcome = Outcome(p, kind, vote=vote, ok=ok, retryable=retry, error=error)
            if (p, kind) in w.coords[c][2]:
                out.append(_coordinator_round(replace(w, net=rest), c, outcome))
            else:
                out.append(replace(w, net=rest))  # nobody waits for it any more
        if w.faults and "lose" in w.kinds:  # lost: the caller's timeout makes it a failure
            c, p, kind = msg[1], msg[2], msg[3]
            timeout = ("rep", c, p, kind, None, False, True)
            out.append(replace(w, net=_bag((*rest, timeout)), faults=w.faults - 1))
    if w.faults and "coordinator" in w.kinds:  # a coordinator dies; a new one starts
        for c in range(len(w.coords)):
            coords = list(w.coords)
            coords[c] = (w.stored, w.version, (), True)
            net = tuple(m for m in w.net if not (m[0] == "rep" and m[1] == c))
            out.append(replace(w, coords=tuple(coords), net=net, faults=w.faults - 1))
    if w.faults and "delete" in w.kinds and not w.deleting:
        # Deleted: the supervisor drives it again, with deleting, from what is stored.
        coords = tuple((w.stored, w.version, (), True) for _ in w.coords)
        net = tuple(m for m in w.net if m[0] != "rep")
        out.append(replace(w, coords=coords, net=net, deleting=True, faults=w.faults - 1))
    if w.now < 40:  # time passes (past the 30 s prepare deadline after two ticks)
        out.append(replace(w, now=w.now + 20))
    return out


def _reply(c: int, p: str, kind: str, status: int, body: dict[str, Any]) -> tuple[Any, ...]:
    vote = None
    if kind == "prepare" and status == 200:
        vote = "Commit" if body.get("vote") == "commit" else "Abort"
    ok = kind != "prepare" and status == 200
    retry = (kind != "prepare" and status != 200) or (kind == "prepare" and status != 200)
    return ("rep", c, p, kind, vote, ok, retry)


def check(w: World) -> None:
    # Atomic: no app commits while another aborts (voting abort included).
    assert not ("committed" in w.apps and "aborted" in w.apps), w
    # One decision, for good; and no commit without it stored.
    assert len(w.decisions) <= 1, w.decisions
    if "committed" in w.apps:
        assert w.decisions == ("Commit",), w
    phase = json.loads(w.stored).get("phase")
    if phase == "Committed":  # acknowledged means done
        assert all(a == "committed" for a in w.apps), w
    if phase == "Aborted":  # nothing left held: no late prepare got through (suspension)
        for p, app in zip(P, w.apps, strict=True):
            pending = any(m[0] == "req" and m[2] == p for m in w.net)
            assert app != "prepared" or pending, w


ALL = frozenset({"duplicate", "lose", "coordinator", "sidecar", "delete"})


def explore(
    coordinators: int, depth: int, faults: int, kinds: frozenset[str] = ALL
) -> tuple[int, set[tuple[str, tuple[str | None, ...]]]]:
    """(states reached, the finished transactions seen: stored phase and the apps' states)."""
    start = World(
        stored="{}",
        version=0,
        decisions=(),
        coords=tuple(("{}", 0, (), True) for _ in range(coordinators)),
        deleting=False,
        net=(),
        journals=(None, None),
        apps=(None, None),
        now=0,
        faults=faults,
        kinds=kinds,
    )
    seen = {start: 0}
    queue = deque([start])
    ends: set[tuple[str, tuple[str | None, ...]]] = set()
    while queue:
        w = queue.popleft()
        check(w)
        phase = json.loads(w.stored).get("phase", "")
        if phase in ("Committed", "Aborted"):
            ends.add((phase, w.apps))
        if seen[w] >= depth:
            continue
        for nxt in successors(w):
            if nxt not in seen:
                seen[nxt] = seen[w] + 1
                queue.append(nxt)
    return len(seen), ends


def _both_outcomes(ends: set[tuple[str, tuple[str | None, ...]]]) -> None:
    """The bound is deep enough to finish transactions both ways (else it proved little)."""
    assert ("Committed", ("committed", "committed")) in ends
    assert any(phase == "Aborted" for phase, _ in ends)


def test_any_one_fault_anywhere_to_depth_14() -> None:
    states, ends = explore(coordinators=1, depth=14, faults=1)
    assert states > 30_000
    _both_outcomes(ends)


def test_any_two_faults_anywhere_to_depth_12() -> None:
    states, ends = explore(coordinators=1, depth=12, faults=2)
    assert states > 200_000
    _both_outcomes(ends)


def test_two_coordinators_racing_on_one_transaction() -> None:
    states, ends = explore(coordinators=2, depth=11, faults=0)
    assert states > 10_000
    _both_outcomes(ends)
