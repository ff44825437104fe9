"""The loop every reconciler that calls out runs on: read -> decide -> write ahead -> act ->
record. The saga runs on it; 2PC will (its "decision in .status before any phase-2 call" is
the saga's "nothing is called before it is stored").

Three parts plug in, each an interface so the unit tests run this very loop in memory:
- a `Machine` (pure): from the object and its status, decide the next status and the calls
  to make; from a call's outcome, record the next status. It says what happened (Events,
  metric increments) in its `Decision`, so no one diffs two statuses to guess.
- a `Store`: reads the object and writes its status over the version it was decided from.
  A write that finds the object changed returns the object as it is now: the loop forgets
  what it decided and decides again from that (optimistic concurrency). Calls already made
  are made again under their idempotency keys.
- a `World`: makes a call, tells what was decided (only once it is stored), keeps time.

The promise: nothing is called before the status that says it will be is stored, and nothing
is told (Event, metric) that was not stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from accord_operator.decision import Decision, Status

Obj = dict[str, Any]  # the resource as the API server returns it

C = TypeVar("C")  # a call
O = TypeVar("O")  # noqa: E741 - an outcome
C_contra = TypeVar("C_contra", contravariant=True)
O_co = TypeVar("O_co", covariant=True)
O_contra = TypeVar("O_contra", contravariant=True)

IDLE_S = 2.0  # a finished object waits for something outside to change (a redrive)
MAX_SLEEP_S = 5.0  # never sleep longer: a stop or a change is seen this soon


class Machine(Protocol[C, O_contra]):
    def decide(self, obj: Obj, status: Status, now: float) -> Decision[C]: ...

    def record(self, obj: Obj, status: Status, outcome: O_contra, now: float) -> Decision[C]: ...

    def finished(self, status: Mapping[str, Any]) -> bool:
        """Nothing to do until something outside the status changes."""
        ...

    def slot(self, call: C) -> Hashable:
        """What a call works on (a saga: its step and kind). While a call is in flight, the
        machine may ask for it again (its write-ahead mark says so): the driver does not
        make it twice."""
        ...


class Store(Protocol):
    async def read(self) -> Obj: ...

    async def write(self, obj: Obj, status: Status, written: Status) -> Obj | None:
        """Store `status` over `written`, the status last read or written. None when stored
        (obj's resourceVersion is updated in place); else the object as it is now."""
        ...

    async def refresh(self, obj: Obj) -> Obj:
        """The object with what may wake a finished one (its annotations) brought up to date."""
        ...


class World(Protocol):
    def now(self) -> float: ...

    async def wait(self, seconds: float) -> bool:
        """Sleep; True when the caller wants the loop to stop."""
        ...

    def tell(self, obj: Obj, decision: Decision[Any]) -> None:
        """Events and metrics of a decision that is stored."""
        ...


class Actor(Protocol[C_contra, O_co]):
    async def __call__(self, call: C_contra, obj: Obj, status: Status) -> O_co: ...


@dataclass
class Round(Generic[C]):
    calls: list[C]  # started in this round (empty: nothing was due)
    wait: float | None  # seconds until something is due; None: finished (or changed: 0)


class Driver(Generic[C, O]):
    """One object's loop. `round()` is one turn, `run()` loops them until finished or told
    to stop. Not safe to share between tasks: one driver per object at a time.

    Calls complete on their own: a round starts what is due, then waits for the first call
    to finish (or for something to come due), records it, and the next round decides, writes
    and starts what that made ready, while slower calls stay in flight. One slow branch
    never holds up an independent one, and every call is still written ahead."""

    def __init__(
        self, machine: Machine[C, O], store: Store, act: Actor[C, O], world: World
    ) -> None:
        self.machine, self.store, self.act, self.world = machine, store, act, world
        self.obj: Obj | None = None
        self.status: Status = {}
        self._written: Status = {}
        # Decided since the last write: told once it is stored, forgotten if it is not.
        self._pending: list[Decision[C]] = []
        self._flying: dict[asyncio.Task[O], C] = {}  # calls in flight, in start order

    async def start(self, obj: Obj | None = None) -> None:
        """Begin from `obj` when the caller has just read it, else read it."""
        self._load(obj if obj is not None else await self.store.read())

    def _load(self, obj: Obj) -> None:
        self.obj = obj
        self.status = self._written = dict(obj.get("status") or {})
        self._pending.clear()

    async def round(self) -> Round[C]:
        if self.obj is None:
            await self.start()
        obj = self.obj
        assert obj is not None
        d = self.machine.decide(obj, self.status, self.world.now())
        self._pending.append(d)
        self.status = d.status
        # One write per round: the outcomes of the last calls together with the write-ahead
        # of the next ones.
        if self.status != self._written and (d.write or self.machine.finished(self.status)):
            fresh = await self.store.write(obj, self.status, self._written)
            if fresh is not None:
                self._load(fresh)
                return Round([], 0.0)
            self._written = self.status
        for done in self._pending:
            self.world.tell(obj, done)
        self._pending.clear()
        busy = {self.machine.slot(c) for c in self._flying.values()}
        started = [c for c in d.calls if self.machine.slot(c) not in busy]
        status = self.status
        for call in started:
            self._flying[asyncio.ensure_future(self.act(call, obj, status))] = call
        if self._flying:
            due = None if d.wake_at is None else max(0.01, d.wake_at - self.world.now())
            await asyncio.wait(self._flying, timeout=due, return_when=asyncio.FIRST_COMPLETED)
            for task in [t for t in self._flying if t.done()]:  # in the order they started
                del self._flying[task]
                try:
                    outcome = task.result()
                except BaseException:
                    self.abandon()  # the loop is over: its write-ahead marks resend them
                    raise
                r = self.machine.record(obj, self.status, outcome, self.world.now())
                self._pending.append(r)
                self.status = r.status
            return Round(started, 0.0)
        if self.machine.finished(self.status):
            return Round([], None)
        wake = d.wake_at if d.wake_at is not None else self.world.now() + IDLE_S
        return Round([], max(0.0, wake - self.world.now()))

    def abandon(self) -> None:
        """Stop waiting for the calls in flight (the process is going away)."""
        for task in self._flying:
            task.cancel()
        self._flying.clear()

    async def run(self, *, watch_finished: bool | Callable[[Status], bool]) -> Status:
        """Loop until finished (stored and told), or, for a finished status that
        `watch_finished` says to watch, until the world says stop; such an object is
        re-read now and then for what may wake it."""
        watch = watch_finished if callable(watch_finished) else (lambda _: watch_finished)
        while True:
            turn = await self.round()
            if turn.wait == 0.0:
                continue
            if turn.wait is None and not watch(self.status):
                return self.status
            if await self.world.wait(min(IDLE_S if turn.wait is None else turn.wait, MAX_SLEEP_S)):
                return self.status
            if turn.wait is None:
                assert self.obj is not None
                self.obj = await self.store.refresh(self.obj)
