"""The inbound participant port: authenticate, deduplicate by Accord-Idempotency-Key,
forward to the app."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import accord_wire as wire
from accord_sidecar import fence, metrics
from accord_sidecar.auth import Authenticator, Verdict
from accord_sidecar.config import Config
from accord_sidecar.dedup import DedupTable, Stored
from accord_sidecar.errors import error, read_body
from accord_sidecar.fasthttp import Pool, Reply, UpstreamError, json_reply
from accord_sidecar.invoke import forward_headers, forward_list
from accord_sidecar.journal import Journal

IDEMPOTENCY_KEY = wire.IDEMPOTENCY_KEY
log = logging.getLogger("accord.sidecar.inbound")
MAX_KEY_LENGTH = 512


COMPENSATED = "compensation"  # the journal's state for a pair whose compensation was asked


class Inbound:
    def __init__(
        self,
        config: Config,
        session: Any,
        auth: Authenticator,
        dedup: DedupTable,
        journal: Journal | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.config = config
        self.session = session
        # Our own keep-alive client to the app (None: aiohttp's, ACCORD_HTTP_ENGINE=aiohttp).
        self.app = pool.get(config.app_host, config.app_port) if pool and config.app_port else None
        self._counted: dict[tuple[int, str], Any] = {}  # INBOUND_REQUESTS' children
        self.auth = auth
        self.dedup = dedup
        self.journal = journal if journal is not None else Journal(None, 7 * 86400, 100_000)
        self._in_flight: dict[str, asyncio.Future[Stored | None]] = {}
        self._actions: dict[str, asyncio.Future[None]] = {}  # saga actions at the app, by pair
        self._tx_locks: dict[str, asyncio.Lock] = {}  # one 2PC message per transaction at once

    @staticmethod
    def refused(verdict: Verdict) -> Reply:
        code = {401: "unauthenticated", 403: "forbidden"}.get(verdict.status, "auth_unavailable")
        return error(verdict.status, code, verdict.message)

    async def handle(self, request: Any) -> Reply:
        started = time.perf_counter()
        response, outcome = await self._handle(request)
        child = self._counted.get((response.status, outcome))
        if child is None:
            child = metrics.INBOUND_REQUESTS.labels(str(response.status), outcome)
            self._counted[(response.status, outcome)] = child
        child.inc()
        metrics.INBOUND_LATENCY.observe(time.perf_counter() - started)
        return response

    async def _handle(self, request: Any) -> tuple[Reply, str]:
        # Before anything is read from the body.
        verdict = await self.auth.check(request.headers.get("Authorization"))
        if verdict.status != 200:
            return self.refused(verdict), "refused"
        if self.config.app_port is None:
            return error(503, "no_app", "this sidecar has no app port (ACCORD_APP_PORT)"), "error"
        body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
        if isinstance(body, Reply):
            return body, "refused"
        phase, txid = request.headers.get(wire.TPC_PHASE), request.headers.get(wire.TRANSACTION)
        if phase is not None or txid is not None:
            return await self._transaction(request, body, phase, txid)
        key = request.headers.get(IDEMPOTENCY_KEY)
        if key is None:
            return self._respond(await self._forward(request, body)), "forwarded"
        if not key or len(key) > MAX_KEY_LENGTH:
            return error(
                400,
                "invalid_idempotency_key",
                f"{IDEMPOTENCY_KEY} must be 1 to {MAX_KEY_LENGTH} characters",
            ), "refused"

        stored = self.dedup.get(key)
        if stored is not None:
            return self._respond(stored, replayed=True), "replayed"
        saga = wire.saga_key_pair(key)
        if saga is not None and saga[1] == COMPENSATED:
            await self._compensation_first(saga[0])
        waiting = self._in_flight.get(key)
        if waiting is not None:
            # A concurrent duplicate waits for the first call and gets its answer.
            first = await asyncio.shield(waiting)
            if first is not None:
                return self._respond(first, replayed=True), "replayed"
        # Last before the app, with no await until the action is registered below.
        if saga is not None and saga[1] != COMPENSATED and self.journal.get(saga[0]) == COMPENSATED:
            return self._fenced(key, saga[0]), "fenced"
        future: asyncio.Future[Stored | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        # A saga action at the app: a compensation of the same step waits for it to finish.
        action: asyncio.Future[None] | None = None
        if saga is not None and saga[1] == "action" and saga[0] not in self._actions:
            action = asyncio.get_running_loop().create_future()
            self._actions[saga[0]] = action
        result: Stored | None = None
        try:
            result = await self._forward(request, body)
            # Only final answers are kept: a 5xx, 408, 409 or 429 says "try again".
            if final(result.status):
                self.dedup.put(key, result)
            return self._respond(result), "forwarded"
        finally:
            if action is not None and saga is not None:
                self._actions.pop(saga[0], None)
                action.set_result(None)
            self._in_flight.pop(key, None)
            future.set_result(result if result is not None and final(result.status) else None)

    async def _transaction(
        self, request: Any, body: bytes, phase: str | None, txid: str | None
    ) -> tuple[Reply, str]:
        if phase not in wire.TPC_PHASES or not txid or len(txid) > MAX_KEY_LENGTH:
            return error(
                400,
                "invalid_transaction",
                f"{wire.TPC_PHASE} must be one of {', '.join(wire.TPC_PHASES)} and "
                f"{wire.TRANSACTION} 1 to {MAX_KEY_LENGTH} characters",
            ), "refused"
        kind: fence.Kind = phase  # type: ignore[assignment]
        ref = request.headers.get(wire.TRANSACTION_REF, "")
        prefix = request.raw_path.split("?")[0].removesuffix(f"/{kind}")

        async def call_app() -> Stored:
            return await self._forward(request, body)

        status, answer, outcome = await self.transaction_step(txid, kind, call_app, ref, prefix)
        return json_reply(answer, status), outcome

    async def transaction_step(
        self,
        txid: str,
        kind: fence.Kind,
        call_app: Callable[[], Awaitable[Stored]],
        ref: str = "",
        prefix: str = "",
    ) -> tuple[int, dict[str, Any], str]:
        """The 2PC fence: one message of a transaction at a time here; the journal is
        written (fsynced) before the app is called, and answers what it already knows.
        (status, body, outcome for the metrics). A commit vote also keeps where the
        transaction lives and the app's path, so the outcome can be asked for later."""
        key = f"tpc/{txid}"
        lock = self._tx_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                step = fence.on_message(kind, self.journal.get(key))
                if step.record is not None:
                    self.journal.record(key, step.record)
                if not step.call_app:
                    assert step.answer is not None
                    status, answer = step.answer
                    if status >= 400:
                        metrics.FENCED.inc()
                        log.warning("transaction %s: %s refused: %s", txid, kind,
                                    answer["error"]["message"])  # fmt: skip
                    return status, answer, "fenced" if status >= 400 else "replayed"
                result = await call_app()
                record, status, answer = fence.after_app(
                    kind, result.status, result.body, wire.try_again(result.status)
                )
                if record == fence.VOTED_COMMIT and ref:
                    self.journal.record(f"tpc-ref/{txid}", json.dumps([ref, prefix]))
                if record is not None:
                    self.journal.record(key, record)
                return status, answer, "forwarded"
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._tx_locks.pop(key, None)

    def in_doubt_here(self, older_than_s: float) -> list[tuple[str, str, str, str]]:
        """Transactions this participant voted commit for, that long ago, and has not
        finished since: (txid, its state, namespace/name, the app's path prefix). A state
        of committing or aborting knows the decision; voted-commit must ask for it."""
        out = []
        now = time.time()
        unfinished = (fence.VOTED_COMMIT, fence.COMMITTING, fence.ABORTING)
        for key, (state, at) in self.journal.items():
            if not key.startswith("tpc/") or state not in unfinished or now - at < older_than_s:
                continue
            txid = key.removeprefix("tpc/")
            where = self.journal.get(f"tpc-ref/{txid}", touch=False)
            if isinstance(where, str):
                ref, prefix = json.loads(where)
                out.append((txid, state, ref, prefix))
        return out

    async def apply_outcome(self, txid: str, kind: fence.Kind, ref: str, prefix: str) -> int:
        """Deliver a recorded decision to the app as the coordinator would (same body, same
        headers), through the fence (so a later coordinator message is answered from the
        journal)."""
        headers = {"Content-Type": "application/json", wire.TRANSACTION: txid,
                   wire.TRANSACTION_REF: ref, wire.TPC_PHASE: kind}  # fmt: skip

        async def call_app() -> Stored:
            body = json.dumps({"txid": txid}).encode()
            return await self._call_app("POST", f"{prefix}/{kind}", headers, body)

        status, _, _ = await self.transaction_step(txid, kind, call_app)
        return status

    async def _compensation_first(self, pair: str) -> None:
        """The saga fence, compensation side: journaled (durably) before the app sees it, so
        any later action of the same step is refused; and it waits for an action of that
        step still at the app, so it undoes what that action did."""
        if self.journal.get(pair) != COMPENSATED:
            self.journal.record(pair, COMPENSATED)
        action = self._actions.get(pair)
        if action is not None:
            await asyncio.shield(action)

    def _fenced(self, key: str, pair: str) -> Reply:
        """The saga fence, action side: an action that arrives once its compensation was
        asked never reaches the app. It would land after the undo and stay (the saga would
        say Compensated while the effect is held)."""
        metrics.FENCED.inc()
        log.warning("fenced: action %s came after its compensation; not passed to the app", key)
        return error(
            410,
            "compensated",
            f"the compensation for {pair} has already been asked for; this late action is "
            "refused and was not passed to the app",
        )

    async def _forward(self, request: Any, body: bytes) -> Stored:
        headers = forward_headers(request.headers)
        headers.popall("Authorization", None)  # the caller's credential is for us, not the app
        # The raw target as the caller sent it: nothing decoded or normalised on the way.
        return await self._call_app(request.method, request.raw_path, headers, body)

    async def _call_app(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> Stored:
        if self.app is not None:
            try:
                status, answer, data = await self.app.request(
                    method, raw_path, headers, body, self.config.timeout_ms / 1000
                )
            except UpstreamError as exc:
                if exc.code == "timeout":
                    return _error_stored(504, "timeout", "the app did not answer in time")
                return _error_stored(502, "app_unreachable", str(exc))
            return Stored(status, forward_list(answer), data, time.time())
        import aiohttp  # the baseline engine: aiohttp's client
        from yarl import URL

        url = URL(f"http://{self.config.app_host}:{self.config.app_port}{raw_path}", encoded=True)
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_ms / 1000),
            ) as r:
                data = await r.read()
                return Stored(r.status, list(forward_headers(r.headers).items()), data, time.time())
        except TimeoutError:
            return _error_stored(504, "timeout", "the app did not answer in time")
        except aiohttp.ClientError as exc:
            return _error_stored(502, "app_unreachable", str(exc) or type(exc).__name__)

    @staticmethod
    def _respond(stored: Stored, replayed: bool = False) -> Reply:
        headers = list(stored.headers)
        if replayed:
            headers.append((wire.REPLAYED, "true"))
        return Reply(stored.status, headers, stored.body)


def final(status: int) -> bool:
    """An answer to keep for its idempotency key: anything but "try again"."""
    return not wire.try_again(status)


def _error_stored(status: int, code: str, message: str) -> Stored:
    r = error(status, code, message)
    return Stored(status, [("Content-Type", "application/json")], r.body, time.time())
