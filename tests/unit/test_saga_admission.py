"""Which sagas need their creator to be allowed to create pods, and what a refusal says."""

from __future__ import annotations

from accord_operator.saga.admission import JobStep, job_steps, pod_access_review, refusal


def test_every_job_is_found_with_its_field() -> None:
    spec = {
        "steps": [
            {"name": "a", "action": {"http": {"service": "s"}}},
            {"name": "b", "action": {"job": {"image": "i", "serviceAccountName": "robot"}},
             "compensation": {"job": {"image": "j"}}},
        ]
    }  # fmt: skip
    assert job_steps(spec) == [
        JobStep("spec.steps[1].action.job", "robot"),
        JobStep("spec.steps[1].compensation.job", ""),
    ]
    assert job_steps({"steps": [{"name": "a", "action": {"http": {}}}]}) == []


def test_the_review_asks_for_the_requesting_user_exactly() -> None:
    user = {"username": "alice", "uid": "u1", "groups": ["devs"], "extra": {"scopes": ["x"]}}
    review = pod_access_review(user, "shop")["spec"]
    assert review == {
        "user": "alice",
        "uid": "u1",
        "groups": ["devs"],
        "extra": {"scopes": ["x"]},
        "resourceAttributes": {"namespace": "shop", "verb": "create", "resource": "pods"},
    }


def test_a_refusal_names_the_field_the_user_and_the_permission() -> None:
    message = refusal([JobStep("spec.steps[0].action.job", "")], {"username": "bob"}, "shop")
    assert message.startswith("spec.steps[0].action.job: ")
    assert "bob may not create pods in namespace shop (missing permission: create pods)" in message
