"""Chaos: many sagas while the operator is SIGKILLed and restarted at random moments.

Every invariant is checked from the participants' own records, not from our status.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster
from tests.support.operator import run_operator
from tests.support.saga import saga_bed, slow_fenced_participant, step

SAGAS = 60
TERMINAL = ("Succeeded", "Compensated", "Failed")


def test_sagas_survive_operator_sigkills(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    with saga_bed(
        cluster, namespace, tmp_path, "inventory", "payment", "shipping", operator=False
    ) as bed:
        # Slow enough that kills land mid-call.
        expected = _orders(bed, SAGAS, delay_ms=40)

        kills = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with run_operator(cluster, tmp_path, "--controller-only", "-n", namespace) as op:
                time.sleep(rng.uniform(0.3, 2.5))
                if _phases(cluster, namespace, expected) and kills >= 5:
                    break
                assert op.proc is not None
                op.proc.kill()  # SIGKILL: no cleanup, no final status write
                op.proc.wait()
                kills += 1
        # One last, undisturbed operator finishes whatever is left.
        with run_operator(cluster, tmp_path, "--controller-only", "-n", namespace):
            end = time.monotonic() + 120
            while not _phases(cluster, namespace, expected) and time.monotonic() < end:
                time.sleep(0.5)
        phases = _phases(cluster, namespace, expected, all_phases=True)
        assert kills >= 5
        assert phases == expected, {k: v for k, v in phases.items() if expected[k] != v}

        sagas = {
            s["metadata"]["name"]: s
            for s in json.loads(cluster.kubectl("get", "saga", "-n", namespace, "-o", "json"))[
                "items"
            ]
        }
        _check_participant_records(bed.services, sagas, expected, namespace)


def _orders(bed: Any, count: int, *, delay_ms: int) -> dict[str, str]:
    """Apply `count` order sagas (every third declined at payment, which refuses
    "/charge-declined"), participants answering after delay_ms; the phase each must end in."""
    for service in bed.services.values():
        service.behave(
            {"path": "/charge-declined", "status": 402, "body": {"error": "declined"}},
            {"delayMs": delay_ms},
        )
    expected: dict[str, str] = {}
    for i in range(count):
        declined = i % 3 == 0
        name = f"order-{i}"
        expected[name] = "Compensated" if declined else "Succeeded"
        steps = [
            step("reserve", "inventory", "reserve", "release"),
            step("charge", "payment", "charge-declined" if declined else "charge", "refund"),
            step("ship", "shipping", "ship", "recall"),
        ]
        bed.apply(bed.saga(name, steps, input={"order": i}))
    return expected


def _phases(
    cluster: Cluster, namespace: str, expected: dict[str, str], all_phases: bool = False
) -> Any:
    items = json.loads(cluster.kubectl("get", "saga", "-n", namespace, "-o", "json"))["items"]
    phases = {s["metadata"]["name"]: (s.get("status") or {}).get("phase") for s in items}
    if all_phases:
        return phases
    return len(phases) == len(expected) and all(p in TERMINAL for p in phases.values())


def _check_participant_records(
    services: dict[str, Any], sagas: dict[str, Any], expected: dict[str, str], namespace: str
) -> None:
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)  # (saga, path) -> keys seen
    done: dict[str, list[str]] = defaultdict(list)  # saga -> paths that executed with 2xx
    for service in services.values():
        for call in service.calls():
            saga = call["headers"]["Accord-Saga"].split("/", 1)[1]
            keys[(saga, call["path"])].add(call["headers"]["Accord-Idempotency-Key"])
            if not call.get("replayed") and 200 <= call["status"] < 300:
                done[saga].append(call["path"].lstrip("/"))

    # No action is ever delivered under two different keys, and the key is the stable one.
    for (saga, path), seen in keys.items():
        assert len(seen) == 1, (saga, path, seen)
        uid = sagas[saga]["metadata"]["uid"]
        assert next(iter(seen)).startswith(f"{uid}/"), (saga, seen)

    for saga, outcome in expected.items():
        executed = done[saga]
        assert len(executed) == len(set(executed)), f"{saga} executed something twice: {executed}"
        if outcome == "Succeeded":
            assert sorted(executed) == ["charge", "reserve", "ship"], (saga, executed)
        else:
            # Compensations ran exactly for the steps that completed, in reverse order.
            assert executed == ["reserve", "release"], (saga, executed)


def test_two_controllers_and_a_sigkilled_leader_execute_nothing_twice(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Two controller replicas with leader election; the leader is SIGKILLed mid-run (its
    lease expires, the standby takes over) and comes back as a standby. 50 sagas end as
    they should, and the participants' own records show nothing executed twice."""
    import contextlib
    import signal

    from accord_operator.leader import LEASE_NAME

    sagas_n = 50
    with saga_bed(
        cluster, namespace, tmp_path, "inventory", "payment", "shipping", operator=False
    ) as bed:
        # Every saga still in flight when the leader dies.
        expected = _orders(bed, sagas_n, delay_ms=1500)

        def controller(stack: contextlib.ExitStack, name: str) -> Any:
            (tmp_path / name).mkdir()
            env = {
                "ACCORD_LEADER_ELECTION": "true",
                "ACCORD_OPERATOR_NAMESPACE": namespace,
                "POD_NAME": name,
            }
            return stack.enter_context(
                run_operator(
                    cluster, tmp_path / name, "--controller-only", "-n", namespace, env=env
                )
            )

        def holder() -> str:
            lease = cluster.kubectl("get", "lease", LEASE_NAME, "-n", namespace, "-o", "json")
            return str(json.loads(lease)["spec"].get("holderIdentity") or "")

        with contextlib.ExitStack() as stack:
            ops = {name: controller(stack, name) for name in ("ctl-a", "ctl-b")}
            deadline = time.monotonic() + 30
            while not holder() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.5)  # mid-run: some sagas done, some in flight
            leader = holder()
            assert leader in ops and not _phases(cluster, namespace, expected)
            ops[leader].proc.send_signal(signal.SIGKILL)
            ops[leader].proc.wait()
            controller(stack, f"{leader}-again")  # back as a standby
            end = time.monotonic() + 150
            while not _phases(cluster, namespace, expected) and time.monotonic() < end:
                time.sleep(0.5)
            assert holder() != leader
        phases = _phases(cluster, namespace, expected, all_phases=True)
        assert phases == expected, {k: v for k, v in phases.items() if expected[k] != v}
        sagas = {
            s["metadata"]["name"]: s
            for s in json.loads(cluster.kubectl("get", "saga", "-n", namespace, "-o", "json"))[
                "items"
            ]
        }
        _check_participant_records(bed.services, sagas, expected, namespace)


def test_late_commits_under_sigkills_leave_nothing_held(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Payment sits behind a real sidecar, behind a slow link that holds "/charge-slow" for
    10 s and delivers it even after the operator gave up (1 s timeout, 2 attempts). Those
    sagas compensate while their charges are still on the way; the operator is SIGKILLed at
    random moments meanwhile. From the app's own records: no charge without its refund after
    it, and every saga that succeeded was charged once."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    with (
        saga_bed(cluster, namespace, tmp_path, "inventory", "payment", operator=False) as bed,
        slow_fenced_participant(bed, "payment", tmp_path, "/charge-slow=10000") as payment,
    ):
        quick = {"maxAttempts": 2, "backoff": {"initialSeconds": 0.1, "maxSeconds": 0.2}}
        expected: dict[str, str] = {}
        for i in range(20):
            late = i % 2 == 0
            charge = step("charge", "payment", "charge-slow" if late else "charge", "refund",
                          timeoutSeconds=1, retry=quick)  # fmt: skip
            name = f"order-{i}"
            expected[name] = "Compensated" if late else "Succeeded"
            bed.apply(bed.saga(name, [step("reserve", "inventory", "reserve", "release"),
                                      payment.via(charge)]))  # fmt: skip
        env = {"ACCORD_PARTICIPANT_TOKEN": payment.token}
        args = ("--controller-only", "-n", namespace)
        kills = 0
        for _ in range(4):
            with run_operator(cluster, tmp_path, *args, env=env) as op:
                time.sleep(rng.uniform(0.5, 2.5))
                assert op.proc is not None
                op.proc.kill()
                op.proc.wait()
                kills += 1
        with run_operator(cluster, tmp_path, *args, env=env):
            end = time.monotonic() + 120
            while not _phases(cluster, namespace, expected) and time.monotonic() < end:
                time.sleep(0.5)
            time.sleep(11)  # every held charge has come through the link by now
        assert _phases(cluster, namespace, expected, all_phases=True) == expected
        calls = bed.services["payment"].calls()
    # The app's own records: what it executed, per saga, in order.
    executed: dict[str, list[str]] = defaultdict(list)
    for call in calls:
        if not call.get("replayed") and 200 <= call["status"] < 300:
            executed[call["headers"]["Accord-Saga"].split("/", 1)[1]].append(call["path"])
    for name, outcome in expected.items():
        paths = executed[name]
        if outcome == "Succeeded":
            assert paths == ["/charge"], (name, paths)
        else:
            # Nothing charged after the refund: a late charge never reached the app.
            assert "/charge-slow" not in paths[paths.index("/refund") :], (name, paths)
            assert paths.count("/charge-slow") <= paths.count("/refund"), (name, paths)
    assert kills == 4
