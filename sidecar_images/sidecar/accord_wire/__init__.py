"""The wire between Accord's operator and its sidecar: one home for every name and rule both
sides must agree on (headers, annotations, which answers mean "try again", the environment
the injector writes for the sidecar). Pure constants and functions, no dependencies: the
operator and the sidecar both import it, and never each other. It lives beside the sidecar
because the sidecar's image is built from that directory; the operator's wheel carries it
too. tests/unit/test_wire.py proves each side uses it."""

from __future__ import annotations

from typing import Any, Final

# -- HTTP headers ------------------------------------------------------------------------------

IDEMPOTENCY_KEY: Final = "Accord-Idempotency-Key"  # <saga uid>/<step>/<action|compensation>
SAGA: Final = "Accord-Saga"  # <namespace>/<name> of the calling saga
STEP: Final = "Accord-Step"  # the step's name
REPLAYED: Final = "Accord-Replayed"  # "true": a stored answer, the app was not called again
ATTEMPTS: Final = "Accord-Attempts"  # how many attempts the sidecar made for an invoke
# 2PC calls (POST <pathPrefix>/prepare, /commit, /abort): the participant's sidecar fences
# them by these, whatever the path prefix.
TRANSACTION: Final = "Accord-Transaction"  # the transaction's uid (its txid)
TRANSACTION_REF: Final = "Accord-Transaction-Ref"  # <namespace>/<name>, to ask for the outcome
TPC_PHASE: Final = "Accord-Tpc-Phase"  # prepare | commit | abort
# On a publish: the event's partition key (its CloudEvents `partitionkey`); on the stream,
# a NATS header carrying it ("" for none), so a partition is chosen without parsing.
PARTITION_KEY: Final = "Accord-Partition-Key"
TPC_PHASES: Final = ("prepare", "commit", "abort")

# -- annotations and labels --------------------------------------------------------------------

PREFIX: Final = "accord.dev/"
INJECT: Final = PREFIX + "inject"  # on a pod: "true" asks for the sidecar, "false" refuses it
NAMESPACE_LABEL: Final = PREFIX + "injection"  # on a namespace: "enabled"
SIDECAR_STATUS: Final = PREFIX + "sidecar-status"  # written by the injector
NATIVE_SIDECAR: Final = PREFIX + "native-sidecar"
REDRIVE: Final = PREFIX + "redrive"  # on a Failed saga: any new value resumes it
SKIP_COMPENSATION: Final = PREFIX + "skip-compensation"  # on a saga being deleted
# The audience of the token the operator sends participants (TokenRequest / TokenReview).
PARTICIPANT_AUDIENCE: Final = "accord.dev/participant"

# -- answers -----------------------------------------------------------------------------------

# A 4xx is a definitive refusal (the action did not happen, do not retry), except these,
# which say "not now": timeout, conflict (e.g. a duplicate still in progress), too many.
TRY_AGAIN_4XX: Final = frozenset({408, 409, 429})


def try_again(status: int) -> bool:
    """Whether an HTTP answer means "try again" (5xx, 408, 409, 429), not a final answer.
    The operator retries such a step; the sidecar retries such an invoke and never stores
    it as the answer to an idempotency key."""
    return status >= 500 or status in TRY_AGAIN_4XX


# -- the sidecar's environment, as the injector writes it --------------------------------------


class SidecarEnv:
    """Names of the variables the injector sets on the sidecar container (the sidecar reads
    these, and more of its own: see accord_sidecar.config)."""

    APP_ID: Final = "ACCORD_APP_ID"
    HTTP_PORT: Final = "ACCORD_HTTP_PORT"
    INBOUND_PORT: Final = "ACCORD_INBOUND_PORT"
    ADMIN_PORT: Final = "ACCORD_ADMIN_PORT"
    NATS_URL: Final = "ACCORD_NATS_URL"
    LOG_LEVEL: Final = "ACCORD_LOG_LEVEL"
    DATA_DIR: Final = "ACCORD_DATA_DIR"
    POD_NAMESPACE: Final = "ACCORD_POD_NAMESPACE"
    APP_PORT: Final = "ACCORD_APP_PORT"
    TOKEN_AUDIENCE: Final = "ACCORD_TOKEN_AUDIENCE"
    SUBSCRIBE: Final = "ACCORD_SUBSCRIBE"
    RETRY_MAX_ATTEMPTS: Final = "ACCORD_RETRY_MAX_ATTEMPTS"
    RETRY_INITIAL_MS: Final = "ACCORD_RETRY_INITIAL_MS"
    RETRY_MAX_MS: Final = "ACCORD_RETRY_MAX_MS"
    TIMEOUT_MS: Final = "ACCORD_TIMEOUT_MS"
    TARGETS: Final = "ACCORD_TARGETS"
    CONCURRENCY: Final = "ACCORD_CONCURRENCY"
    BULK_MAX: Final = "ACCORD_BULK_MAX"
    PARTITIONS: Final = "ACCORD_PARTITIONS"
    POISON: Final = "ACCORD_POISON"
    RESET_PATH: Final = "ACCORD_RESET_PATH"
    MAX_DELIVERIES: Final = "ACCORD_MAX_DELIVERIES"
    TPC_OUTCOME_AFTER_S: Final = "ACCORD_TPC_OUTCOME_AFTER_S"
    # The stream and new subscriptions: one setting for the whole cluster (chart values
    # nats.stream.*), passed from the operator's env to every sidecar unchanged.
    STREAM_MAX_AGE_S: Final = "ACCORD_STREAM_MAX_AGE_S"
    STREAM_MAX_BYTES: Final = "ACCORD_STREAM_MAX_BYTES"
    STREAM_REPLICAS: Final = "ACCORD_STREAM_REPLICAS"
    STREAM_STORAGE: Final = "ACCORD_STREAM_STORAGE"
    NEW_SUBSCRIPTIONS_START: Final = "ACCORD_NEW_SUBSCRIPTIONS_START"
    BROKER: Final = (
        STREAM_MAX_AGE_S,
        STREAM_MAX_BYTES,
        STREAM_REPLICAS,
        STREAM_STORAGE,
        NEW_SUBSCRIPTIONS_START,
    )


# Each broker setting's allowed values: (lowest, highest) or the choices.
BROKER_SETTINGS: Final[dict[str, tuple[int, int] | tuple[str, ...]]] = {
    SidecarEnv.STREAM_MAX_AGE_S: (0, 10 * 365 * 86400),
    SidecarEnv.STREAM_MAX_BYTES: (-1, 2**62),
    SidecarEnv.STREAM_REPLICAS: (1, 5),
    SidecarEnv.STREAM_STORAGE: ("file", "memory"),
    SidecarEnv.NEW_SUBSCRIPTIONS_START: ("all", "new"),
}


def check_broker_setting(name: str, raw: str) -> str:
    """The value as the sidecar reads it; ValueError naming the variable when it is not one
    the sidecar takes (the operator checks at start, so no sidecar fails on it later)."""
    allowed = BROKER_SETTINGS[name]
    value = raw.strip().lower()
    if isinstance(allowed[0], int):
        lo, hi = allowed
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer") from None
        if not lo <= number <= hi:
            raise ValueError(f"{name}={number} is out of range ({lo} to {hi})")
        return str(number)
    if value not in allowed:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(map(str, allowed))}")
    return value


class AppEnv:
    """Names of the variables the injector adds to the app's containers."""

    HTTP_PORT: Final = "ACCORD_HTTP_PORT"
    SIDECAR_URL: Final = "ACCORD_SIDECAR_URL"


# -- per-target invoke policies (annotation accord.dev/target-policies, env ACCORD_TARGETS) -----

# Each field a target's policy may set, with its bounds.
TARGET_FIELDS: Final[dict[str, tuple[int, int]]] = {
    "timeoutMs": (1, 3_600_000),
    "maxAttempts": (1, 100),
    "initialMs": (0, 3_600_000),
    "maxMs": (0, 3_600_000),
    "breakerFailures": (1, 10_000),
    "breakerCooldownMs": (1, 3_600_000),
    "retryBudgetPercent": (0, 1000),
}


def check_targets(data: object, where: str) -> dict[str, dict[str, int]]:
    """Per-target policies, checked the same way where the injector reads them (from an
    annotation) and where the sidecar does (from its env). ValueError names `where` and the
    field: a policy one side accepts, the other never refuses."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object of service -> policy")
    out: dict[str, dict[str, int]] = {}
    for service, policy in data.items():
        if not isinstance(policy, dict):
            raise ValueError(f"{where}.{service} must be an object")
        checked: dict[str, int] = {}
        for key, value in policy.items():
            if key not in TARGET_FIELDS:
                raise ValueError(
                    f"{where}.{service}.{key} is not one of {', '.join(TARGET_FIELDS)}"
                )
            lo, hi = TARGET_FIELDS[key]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{where}.{service}.{key} must be an integer from {lo} to {hi}")
            checked[key] = value
        out[str(service)] = checked
    return out


# -- saga idempotency keys ---------------------------------------------------------------------

SAGA_KINDS: Final = ("action", "compensation")


def saga_key(uid: str, step: str, kind: str, generation: int = 0) -> str:
    """<saga uid>/<step>/<action|compensation>, and /r<generation> after a redrive that
    followed a definitive refusal (the refusal proved nothing happened: a new request)."""
    base = f"{uid}/{step}/{kind}"
    return f"{base}/r{generation}" if generation else base


def saga_key_pair(key: str) -> tuple[str, str] | None:
    """(pair, kind) of a saga key, where the action and the compensation of one step (and
    one generation) share the pair; None for any other key."""
    parts = key.split("/")
    generation = ""
    if len(parts) >= 4 and parts[-1][:1] == "r" and parts[-1][1:].isdigit():
        generation = parts.pop()
    if len(parts) < 3 or parts[-1] not in SAGA_KINDS:
        return None
    kind = parts.pop()
    return "/".join([*parts, generation] if generation else parts), kind


# -- the broker's layout (the sidecar subscribes; the operator reads projections' progress) ----

STREAM: Final = "ACCORD"  # one JetStream stream for every Accord topic
SUBJECT_PREFIX: Final = "accord."  # topic `orders.events` is subject `accord.orders.events`


def subject(topic: str) -> str:
    return SUBJECT_PREFIX + topic


STREAM_DUPLICATE_WINDOW_S: Final = 120


def stream_config(
    max_age_s: int = 0, max_bytes: int = -1, replicas: int = 1, storage: str = "file"
) -> dict[str, Any]:
    """The stream's configuration (the fields of nats-py's StreamConfig) from the chart's
    settings: whoever makes it first (a sidecar, or the operator for a projection) makes
    the same stream."""
    return {
        "name": STREAM,
        "subjects": [SUBJECT_PREFIX + ">"],
        "storage": storage,
        "duplicate_window": STREAM_DUPLICATE_WINDOW_S,
        "max_age": float(max_age_s) if max_age_s else None,
        "max_bytes": max_bytes,
        "num_replicas": replicas,
    }


def durable_name(app_id: str, topic: str) -> str:
    """The consumer of one app on one topic: readable, and injective. Two different
    (app, topic) pairs never share a consumer (the hash is over the exact pair), so no
    app receives another app's events, however names are joined or truncated."""
    import hashlib
    import re

    readable = re.sub(r"[^A-Za-z0-9_-]", "_", f"{app_id[:60]}-{topic[:60]}")
    digest = hashlib.sha256(f"{app_id}\n{topic}".encode()).hexdigest()[:16]
    return f"{readable}-{digest}"


Partition = tuple[int, int]  # (index, count): partition index of count


def consumer_name(app_id: str, topic: str, partition: Partition | None = None) -> str:
    """The consumer of one app on one topic, or on one partition of it (a partitioned
    subscription has one consumer per partition; '#' and '/' never occur in a topic)."""
    if partition is None:
        return durable_name(app_id, topic)
    index, count = partition
    return durable_name(app_id, f"{topic}#{index}/{count}")


def partition_of(key: str, count: int) -> int:
    """The partition of a partition key: stable across processes and versions (CRC-32)."""
    import zlib

    return zlib.crc32(key.encode()) % count


OWNERS_BUCKET: Final = "ACCORD_OWNERS"  # NATS key-value: who delivers, who is failing
COUNTS_BUCKET: Final = "ACCORD_COUNTS"  # NATS key-value, kept: what each consumer counted


def dead_lettered_key(consumer: str) -> str:
    """How many events a consumer sent to the dead-letter topic (a decimal number)."""
    return f"dead.{consumer}"


def failing_key(consumer: str) -> str:
    """The key under which an ordered consumer's sidecar reports its head event failing
    (JSON {"sequence", "deliveries", "reason"}); gone once it is settled."""
    return f"failing.{consumer}"


# Parked events (a poison event's key, when a subscription parks rather than dead-letters:
# ACCORD_POISON=park): kept, in order, in their own stream (no age limit: they wait for a
# decision), one subject per consumer and key.
PARKED_STREAM: Final = "ACCORD_PARKED"
PARKED_PREFIX: Final = "accord-parked."


def parked_subject(consumer: str, key: str | None = None) -> str:
    """The subject of one key's parked events on a consumer (None: all of its keys)."""
    import hashlib

    if key is None:
        return f"{PARKED_PREFIX}{consumer}.>"
    return f"{PARKED_PREFIX}{consumer}.{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def command_key(consumer: str) -> str:
    """Where the operator asks an ordered consumer's owner to act on its parked events
    (JSON {"action": "retry" | "skip", "nonce"}), and `done.<consumer>` where it answers."""
    return f"cmd.{consumer}"


def stream_config_from_env(env: dict[str, str]) -> dict[str, Any]:
    """stream_config from the broker settings as passed to every sidecar (SidecarEnv.BROKER),
    each checked as the sidecar checks it."""

    def value(name: str, default: str) -> str:
        return check_broker_setting(name, env.get(name) or default)

    return stream_config(
        int(value(SidecarEnv.STREAM_MAX_AGE_S, "0")),
        int(value(SidecarEnv.STREAM_MAX_BYTES, "-1")),
        int(value(SidecarEnv.STREAM_REPLICAS, "1")),
        value(SidecarEnv.STREAM_STORAGE, "file"),
    )


def subject_matches(pattern: str, subject_: str) -> bool:
    """NATS subject matching: '*' is one token, '>' the rest (one token at least)."""
    want, have = pattern.split("."), subject_.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
