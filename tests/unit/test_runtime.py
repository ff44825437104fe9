"""The kopf settings the operator runs with."""

from __future__ import annotations

import kopf

from accord_operator import runtime


def test_the_watch_takes_in_new_objects_faster_than_the_benchmarks_offer_them() -> None:
    # An idle worker keeps its slot: the intake is worker_limit / idle_timeout objects a
    # second. With kopf's default (5 s) that was 20/s, under the 40/s bench/tpc_throughput.py
    # offers, and the watch stalled for every object.
    settings = kopf.OperatorSettings()
    runtime.configure(settings)
    assert settings.queueing.worker_limit is not None
    assert settings.queueing.worker_limit / settings.queueing.idle_timeout >= 100


def test_only_unfinished_transactions_and_sagas_are_watched() -> None:
    settings = kopf.OperatorSettings()
    runtime.configure(settings)
    selectors = set(settings.watching.field_selectors.values())
    assert "status.phase!=Committed,status.phase!=Aborted" in selectors
    assert "status.phase!=Succeeded,status.phase!=Compensated" in selectors
