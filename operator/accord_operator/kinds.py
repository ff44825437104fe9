"""Spec and status of each kind, as the machines read and write them (pure types).

tests/unit/test_kinds.py checks these against crds/ in both directions (every field here is
in the schema, every field of the schema is here), and the saga simulator checks that every
status the real machine stores uses only these fields. A field added on one side only fails
the suite.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from accord_operator.conditions import Condition

# -- SagaWorkflow ------------------------------------------------------------------------------


class HttpCall(TypedDict):
    service: str
    path: str
    port: NotRequired[int]
    method: NotRequired[Literal["POST", "PUT", "PATCH", "DELETE"]]


class EnvVar(TypedDict):
    name: str
    value: NotRequired[str]


class JobCall(TypedDict):
    image: str
    command: NotRequired[list[str]]
    args: NotRequired[list[str]]
    env: NotRequired[list[EnvVar]]
    serviceAccountName: NotRequired[str]
    securityContext: NotRequired[dict[str, Any]]  # free-form, as in a pod


class Action(TypedDict):
    http: NotRequired[HttpCall]
    job: NotRequired[JobCall]


class Backoff(TypedDict):
    initialSeconds: NotRequired[float]
    maxSeconds: NotRequired[float]
    multiplier: NotRequired[float]


class Retry(TypedDict):
    maxAttempts: NotRequired[int]
    backoff: NotRequired[Backoff]
    jitter: NotRequired[float]


class SagaStep(TypedDict):
    name: str
    action: Action
    dependsOn: NotRequired[list[str]]
    compensation: NotRequired[Action]
    retry: NotRequired[Retry]
    timeoutSeconds: NotRequired[int]
    compensable: NotRequired[bool]


class SagaSpec(TypedDict):
    steps: list[SagaStep]
    input: NotRequired[Any]  # free-form JSON given to every step
    timeoutSeconds: NotRequired[int]
    ttlSecondsAfterFinished: NotRequired[int]


SagaPhase = Literal["Pending", "Running", "Compensating", "Succeeded", "Compensated", "Failed"]
StepPhase = Literal[
    "Pending",
    "Running",
    "Succeeded",
    "Failed",
    "Skipped",
    "Compensating",
    "Compensated",
    "CompensationFailed",
]


class StepStatus(TypedDict):
    name: str
    phase: StepPhase
    attempts: int
    compensationAttempts: NotRequired[int]
    startedAt: NotRequired[str]
    finishedAt: NotRequired[str]
    compensatedAt: NotRequired[str]
    lastError: NotRequired[str]
    output: NotRequired[Any]  # free-form: what the participant answered (bounded)
    completedSeq: NotRequired[int]
    inFlight: NotRequired[Literal["action", "compensation"]]  # written before the call
    nextAttemptAt: NotRequired[str]
    outcomeUnknown: NotRequired[bool]
    refused: NotRequired[bool]  # the last answer was a definitive refusal
    replayed: NotRequired[bool]  # the last answer came from the participant sidecar's store
    keyGeneration: NotRequired[int]  # bumped by a redrive after a refusal: a new key
    pod: NotRequired[str]  # a job step's pod


class SagaStatus(TypedDict):
    phase: NotRequired[SagaPhase]
    observedGeneration: NotRequired[int]
    currentStep: NotRequired[str]
    progress: NotRequired[str]
    message: NotRequired[str]
    startedAt: NotRequired[str]
    finishedAt: NotRequired[str]
    steps: NotRequired[list[StepStatus]]
    completions: NotRequired[int]
    lastRedrive: NotRequired[str]
    forwardFailure: NotRequired[str]
    abortReason: NotRequired[str]
    cause: NotRequired[str]  # what first made it compensate or stop; survives a redrive
    conditions: NotRequired[list[Condition]]


# -- TwoPhaseTransaction -----------------------------------------------------------------------


class TwoPhaseParticipant(TypedDict):
    name: str
    service: str
    port: NotRequired[int]
    pathPrefix: NotRequired[str]
    payload: NotRequired[dict[str, Any]]  # free-form JSON sent with /prepare


class TwoPhaseSpec(TypedDict):
    participants: list[TwoPhaseParticipant]
    prepareTimeoutSeconds: NotRequired[int]
    commitTimeoutSeconds: NotRequired[int]


class ParticipantStatus(TypedDict):
    name: str
    vote: NotRequired[str]
    acked: NotRequired[bool]
    attempts: NotRequired[int]
    lastError: NotRequired[str]
    call: NotRequired[str]  # written ahead: prepare, commit or abort is out
    nextAttemptAt: NotRequired[str]
    phase2Attempts: NotRequired[int]
    inDoubt: NotRequired[bool]
    reached: NotRequired[bool]


class TwoPhaseStatus(TypedDict):
    phase: NotRequired[str]
    observedGeneration: NotRequired[int]
    startedAt: NotRequired[str]
    finishedAt: NotRequired[str]
    decision: NotRequired[str]
    decidedAt: NotRequired[str]
    reason: NotRequired[str]
    progress: NotRequired[str]
    message: NotRequired[str]
    participants: NotRequired[list[ParticipantStatus]]
    conditions: NotRequired[list[Condition]]


# -- CQRSProjection ----------------------------------------------------------------------------


class Source(TypedDict):
    topic: str
    startFrom: NotRequired[str]
    maxDeliveries: NotRequired[int]


class Projector(TypedDict):
    image: str
    command: NotRequired[list[str]]
    args: NotRequired[list[str]]
    imagePullPolicy: NotRequired[str]
    port: NotRequired[int]
    batchSize: NotRequired[int]
    env: NotRequired[list[EnvVar]]


class ProjectionSpec(TypedDict):
    source: Source
    projector: Projector
    replicas: NotRequired[int]
    partitions: NotRequired[int]
    paused: NotRequired[bool]
    rebuildGeneration: NotRequired[int]
    rebuild: NotRequired[str]  # BlueGreen | InPlace


class ParkedCommand(TypedDict):
    action: str  # retry | skip
    nonce: str


class ProjectionStatus(TypedDict):
    phase: NotRequired[str]
    observedGeneration: NotRequired[int]
    servingGeneration: NotRequired[int]
    observedRebuildGeneration: NotRequired[int]
    position: NotRequired[int]
    lag: NotRequired[int]
    eventsProcessed: NotRequired[int]
    lastEventTime: NotRequired[str]
    readyReplicas: NotRequired[int]
    parkedKeys: NotRequired[int]
    parkedEvents: NotRequired[int]
    deadLettered: NotRequired[int]
    parkedCommand: NotRequired[ParkedCommand]
    message: NotRequired[str]
    conditions: NotRequired[list[Condition]]


# Each kind's plural, with its spec and status types.
KINDS: dict[str, tuple[type, type]] = {
    "sagaworkflows": (SagaSpec, SagaStatus),
    "twophasetransactions": (TwoPhaseSpec, TwoPhaseStatus),
    "cqrsprojections": (ProjectionSpec, ProjectionStatus),
}
