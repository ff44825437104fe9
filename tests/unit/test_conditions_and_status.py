from __future__ import annotations

from accord_operator.conditions import find, set_condition
from accord_operator.status import accepted_status


def test_new_condition_is_added_with_transition_time() -> None:
    out = set_condition(
        [], type="Ready", status="False", reason="Pending", message="m", generation=1, now="t1"
    )
    assert out == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Pending",
            "message": "m",
            "lastTransitionTime": "t1",
            "observedGeneration": 1,
        }
    ]


def test_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition(
        [], type="Ready", status="False", reason="A", message="", generation=1, now="t1"
    )
    same = set_condition(
        first, type="Ready", status="False", reason="B", message="x", generation=2, now="t2"
    )
    ready = find(same, "Ready")
    assert ready is not None
    assert (
        ready["lastTransitionTime"] == "t1"
        and ready["reason"] == "B"
        and ready["observedGeneration"] == 2
    )
    flipped = set_condition(
        same, type="Ready", status="True", reason="C", message="", generation=2, now="t3"
    )
    assert find(flipped, "Ready") == {
        **ready,
        "status": "True",
        "reason": "C",
        "message": "",
        "lastTransitionTime": "t3",
    }


def test_other_conditions_keep_their_order() -> None:
    conds = set_condition(
        [], type="A", status="True", reason="r", message="", generation=1, now="t"
    )
    conds = set_condition(
        conds, type="B", status="True", reason="r", message="", generation=1, now="t"
    )
    conds = set_condition(
        conds, type="A", status="False", reason="r", message="", generation=1, now="t"
    )
    assert [c["type"] for c in conds] == ["A", "B"]


def test_new_resource_becomes_pending() -> None:
    patch = accepted_status({}, 1, "t", kind="SagaWorkflow")
    assert patch["phase"] == "Pending" and patch["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in patch["conditions"]} == {
        "Ready": "False",
        "Reconciling": "True",
        "Stalled": "False",
    }


def test_restart_never_rewinds_a_phase() -> None:
    running = {
        "phase": "Running",
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Running",
                "message": "",
                "lastTransitionTime": "t0",
                "observedGeneration": 1,
            }
        ],
    }
    patch = accepted_status(running, 2, "t9", kind="SagaWorkflow")
    assert "phase" not in patch
    assert patch["observedGeneration"] == 2
    assert patch["conditions"][0]["lastTransitionTime"] == "t0"
    assert patch["conditions"][0]["observedGeneration"] == 2


def test_progress_starts_at_zero_of_total() -> None:
    assert accepted_status({}, 1, "t", kind="SagaWorkflow", total=3)["progress"] == "0/3"
    assert "progress" not in accepted_status({}, 1, "t", kind="CQRSProjection")
