"""Admission review -> decision -> patch, with errors turned into clear refusals."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jsonpatch
import kopf

from accord_operator.injector.config import INJECT, AnnotationError
from accord_operator.injector.patch import Injector, build_patch, decide
from accord_operator.metrics import INJECTIONS

logger = logging.getLogger("accord.injector")


def _asked(pod: Mapping[str, Any], namespace_enabled: bool) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return namespace_enabled or str(annotations.get(INJECT, "")).lower() == "true"


def mutate(
    body: Mapping[str, Any],
    patch: kopf.Patch,
    injector: Injector,
    *,
    namespace: str,
    namespace_enabled: bool,
) -> None:
    namespace = (body.get("metadata") or {}).get("namespace") or namespace
    try:
        decision = decide(
            body,
            namespace=namespace,
            namespace_enabled=namespace_enabled,
            operator_namespace=injector.operator_namespace,
        )
        if not decision.inject:
            INJECTIONS.labels("skipped").inc()
            return
        ops = build_patch(body, injector)
    except AnnotationError as exc:
        INJECTIONS.labels("refused").inc()
        raise kopf.AdmissionError(f"accord sidecar injection: {exc}", code=400) from None
    except Exception as exc:
        # A pod we cannot make sense of: refuse it only if it asked for the sidecar, so
        # that a bug here never blocks workloads that do not use Accord.
        logger.exception("cannot inject into pod in %s", namespace)
        if _asked(body, namespace_enabled):
            INJECTIONS.labels("refused").inc()
            raise kopf.AdmissionError(
                f"accord sidecar injection: cannot parse the pod ({type(exc).__name__}: {exc})",
                code=400,
            ) from None
        INJECTIONS.labels("skipped").inc()
        return
    patch.fns.append(lambda b: jsonpatch.apply_patch(b, ops, in_place=True))
    INJECTIONS.labels("injected").inc()
