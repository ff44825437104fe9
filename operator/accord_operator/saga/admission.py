"""Admission of sagas with job steps (pure): a job step runs a pod, so a saga that has one
may be created only by someone who could create that pod in its namespace. Otherwise
`create sagaworkflows` would be `create pods` (any image, any service account) in
disguise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobStep:
    field: str  # spec.steps[2].compensation.job
    service_account: str  # "" for the namespace's default


def job_steps(spec: Mapping[str, Any]) -> list[JobStep]:
    """Every job a saga's spec would run, with the field that asks for it."""
    found = []
    for i, step in enumerate(spec.get("steps") or []):
        for kind in ("action", "compensation"):
            job = (step.get(kind) or {}).get("job")
            if isinstance(job, Mapping):
                found.append(
                    JobStep(f"spec.steps[{i}].{kind}.job", str(job.get("serviceAccountName") or ""))
                )
    return found


def pod_access_review(userinfo: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """The SubjectAccessReview asking whether the requesting user may create pods there
    (which is all it takes to run a pod as any service account of the namespace)."""
    spec: dict[str, Any] = {
        "user": userinfo.get("username", ""),
        "groups": list(userinfo.get("groups") or []),
        "resourceAttributes": {"namespace": namespace, "verb": "create", "resource": "pods"},
    }
    if userinfo.get("uid"):
        spec["uid"] = userinfo["uid"]
    if userinfo.get("extra"):
        spec["extra"] = {k: list(v) for k, v in userinfo["extra"].items()}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


def refusal(steps: list[JobStep], userinfo: Mapping[str, Any], namespace: str) -> str:
    """The message a refused saga gets: which field, who, and which permission is missing."""
    fields = ", ".join(s.field for s in steps)
    user = userinfo.get("username", "?")
    return (
        f"{fields}: a job step runs a pod, and {user} may not create pods in namespace "
        f"{namespace} (missing permission: create pods); ask for it, or use http steps"
    )
