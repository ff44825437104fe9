"""The Accord API: group, version and the three kinds (crds/ holds their schemas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

GROUP: Final = "accord.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short: str


SAGA: Final = Kind("SagaWorkflow", "sagaworkflows", "saga")
TWO_PHASE: Final = Kind("TwoPhaseTransaction", "twophasetransactions", "tpc")
PROJECTION: Final = Kind("CQRSProjection", "cqrsprojections", "proj")
KINDS: Final = (SAGA, TWO_PHASE, PROJECTION)
