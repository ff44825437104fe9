"""Every Kubernetes API call each component makes, as RBAC sees it: the chart grants exactly
these (tests compare the chart's rules with this table, and this table with the calls the
API server's audit log saw in a real cluster).

Keys are (apiGroup, resource[/subresource]); values the verbs.
"""

from __future__ import annotations

from typing import Final

Grants = dict[tuple[str, str], frozenset[str]]

_KINDS = ("sagaworkflows", "twophasetransactions", "cqrsprojections")

# The reconcilers (kopf and our own client).
CONTROLLER: Final[Grants] = {
    # kopf lists and watches the three kinds and patches its annotations and finalizer;
    # the saga driver reads its saga, and deletes finished ones whose
    # ttlSecondsAfterFinished passed; every reconciler patches the status subresource.
    **{("accord.dev", kind): frozenset({"list", "watch", "patch"}) for kind in _KINDS},
    ("accord.dev", "sagaworkflows"): frozenset({"get", "list", "watch", "patch", "delete"}),
    # The coordinator reads its transaction and puts its finalizer on and takes it off.
    ("accord.dev", "twophasetransactions"): frozenset({"get", "list", "watch", "patch"}),
    **{("accord.dev", f"{kind}/status"): frozenset({"patch"}) for kind in _KINDS},
    # A job step's pod has blockOwnerDeletion on its saga: clusters enforcing owner
    # references check update on the owner's finalizers when the pod is created.
    ("accord.dev", "sagaworkflows/finalizers"): frozenset({"update"}),
    # Job steps: create the pod, poll it, delete it on timeout; the miss detector watches.
    ("", "pods"): frozenset({"get", "list", "watch", "create", "delete"}),
    # Participants resolved from their Service; a projection's query Service made.
    ("", "services"): frozenset({"get", "create", "patch"}),
    # A projection's projectors, one Deployment per generation (the old one removed).
    ("apps", "deployments"): frozenset({"get", "list", "create", "patch", "delete"}),
    ("accord.dev", "cqrsprojections/finalizers"): frozenset({"update"}),
    ("", "events"): frozenset({"create"}),
    ("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"list", "watch"}),
    ("", "namespaces"): frozenset({"get"}),  # is injection enabled there (miss detector)
    # TokenRequest for its own account, for the participant audience (a namespaced Role).
    ("", "serviceaccounts/token"): frozenset({"create"}),
    # The leader Lease (a namespaced Role; get and update only on that Lease).
    ("coordination.k8s.io", "leases"): frozenset({"get", "create", "update"}),
}

# Granted, but no in-cluster scenario makes the call (so the audit log cannot show it):
# why each is still needed.
CONTROLLER_NOT_SEEN: Final[dict[tuple[str, str], tuple[frozenset[str], str]]] = {
    ("accord.dev", "sagaworkflows/finalizers"): (
        frozenset({"update"}),
        "checked by the API server inside pod creation, never called directly",
    ),
    ("", "pods"): (frozenset({"delete"}), "only when a job step's pod outlives its timeout"),
    ("accord.dev", "twophasetransactions"): (
        frozenset({"get"}),
        "a transaction is driven from the object its watch delivered and read again only when "
        "a write finds it changed meanwhile (no in-cluster scenario races two writers)",
    ),
    ("accord.dev", "cqrsprojections/finalizers"): (
        frozenset({"update"}),
        "checked by the API server inside the creation of a projection's Deployment",
    ),
}

# The admission webhook: only the question whether a saga's creator may create the pods
# of its job steps (SubjectAccessReview).
WEBHOOK: Final[Grants] = {
    ("authorization.k8s.io", "subjectaccessreviews"): frozenset({"create"}),
    # kopf resolves the custom resource its saga admission handler is for.
    ("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"list", "watch"}),
}


def rules_to_grants(rules: list[dict[str, object]]) -> Grants:
    """An RBAC rules list as the same table (resourceNames ignored: they only narrow)."""
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule.get("apiGroups") or []:  # type: ignore[attr-defined]
            for resource in rule.get("resources") or []:  # type: ignore[attr-defined]
                grants.setdefault((str(group), str(resource)), set()).update(
                    str(v)
                    for v in rule.get("verbs") or []  # type: ignore[attr-defined]
                )
    return {key: frozenset(verbs) for key, verbs in grants.items()}
