"""TwoPhaseTransaction end to end on the local control plane: a real operator, real ledger
participants with their own databases, behind real sidecars (the fence)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

import accord_wire as wire
from accord_operator.envtest.controlplane import free_port
from tests.support.cluster import Cluster
from tests.support.dataplane import request, slow_link, wait_until
from tests.support.tpc import TOKEN, TpcBed, tpc_bed

pytestmark = pytest.mark.integration


@pytest.fixture
def bed(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[TpcBed]:
    with tpc_bed(cluster, namespace, tmp_path, "ledger-a", "ledger-b") as b:
        b.participants["ledger-a"].ledger.deposit("alice", 10_000)
        yield b


def _transfer(bed: TpcBed, name: str, cents: int, **spec: object) -> dict:
    return bed.transaction(
        name,
        {
            "ledger-a": {"account": "alice", "amountCents": -cents},
            "ledger-b": {"account": "bob", "amountCents": cents},
        },
        **spec,
    )


def test_all_vote_commit_and_every_participant_commits(bed: TpcBed) -> None:
    op = bed.start_operator()
    uid = bed.apply(_transfer(bed, "t1", 5_000))["metadata"]["uid"]
    tx = bed.wait("t1", "Committed")
    st = tx["status"]
    assert st["decision"] == "Commit" and st["progress"] == "2/2"
    assert [p["vote"] for p in st["participants"]] == ["Commit", "Commit"]
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False",
    }  # fmt: skip
    assert bed.outcomes(uid) == {"ledger-a": "committed", "ledger-b": "committed"}
    a, b = (bed.participants[n].ledger.state() for n in ("ledger-a", "ledger-b"))
    assert a["balances"] == {"alice": 5_000} and b["balances"] == {"bob": 5_000}
    # Votes back within a second: no Preparing write, the decision is the first one.
    assert bed.events("t1") == ["DecidedCommit", "Committed"]
    op.wait_metric("accord_transactions_total", 1, outcome="Committed")
    op.wait_metric("accord_transaction_decisions_total", 1, decision="Commit")
    # Finished: our finalizer goes (in the write after the final status: a status write
    # cannot change metadata), and deleting it takes no time.
    bed.cluster.wait_for(
        "tpc", "t1", bed.namespace,
        lambda o: "accord.dev/tpc-phase2" not in (o["metadata"].get("finalizers") or []),
        timeout=30,
    )  # fmt: skip
    printed = bed.cluster.kubectl("get", "tpc", "t1", "-n", bed.namespace)
    assert "Committed" in printed and "Commit" in printed and "2/2" in printed


def test_one_abort_vote_aborts_everywhere(bed: TpcBed) -> None:
    bed.start_operator()
    uid = bed.apply(_transfer(bed, "t2", 50_000))["metadata"]["uid"]  # alice has 10,000
    st = bed.wait("t2", "Aborted")["status"]
    assert st["decision"] == "Abort" and "ledger-a" in st["reason"]
    assert bed.outcomes(uid) == {"ledger-a": "aborted", "ledger-b": "aborted"}
    assert bed.participants["ledger-b"].ledger.state()["holds"] == {}  # released
    assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "True"
    assert bed.events("t2") == ["DecidedAbort", "Aborted"]


def test_a_participant_that_does_not_vote_in_time_aborts_it(bed: TpcBed) -> None:
    bed.participants["ledger-b"].ledger.behave(delayMs=4000)
    bed.start_operator()
    uid = bed.apply(_transfer(bed, "t3", 1_000, prepareTimeoutSeconds=1))["metadata"]["uid"]
    st = bed.wait("t3", "Aborted")["status"]
    assert "ledger-b" in st["reason"] and "prepare timeout" in st["reason"]
    # ledger-b's prepare was still at the app when the abort came: its sidecar let it
    # finish, then aborted it. Nothing stays held anywhere.
    wait_until(lambda: bed.outcomes(uid) == {"ledger-a": "aborted", "ledger-b": "aborted"})
    assert bed.participants["ledger-b"].ledger.state()["holds"] == {}


def test_the_operator_killed_before_deciding_presumes_abort(bed: TpcBed) -> None:
    # ledger-b takes 3 s to vote: phase 1 is stored as Preparing after a second.
    bed.participants["ledger-b"].ledger.behave(delayMs=3000)
    op = bed.start_operator()
    uid = bed.apply(_transfer(bed, "t4", 1_000, prepareTimeoutSeconds=30))["metadata"]["uid"]
    bed.cluster.wait_for("tpc", "t4", bed.namespace,
                         lambda o: (o.get("status") or {}).get("phase") == "Preparing")  # fmt: skip
    op.proc.kill()
    op.proc.wait()
    bed.participants["ledger-b"].ledger.behave()
    bed.start_operator()
    st = bed.wait("t4", "Aborted")["status"]
    assert "presumed abort" in st["reason"]
    wait_until(lambda: bed.outcomes(uid) == {"ledger-a": "aborted", "ledger-b": "aborted"})
    assert bed.events("t4") == ["Preparing", "DecidedAbort", "Aborted"]


def test_the_operator_killed_before_phase_one_was_stored_prepares_again(bed: TpcBed) -> None:
    """Killed while the prepares were out and nothing was stored yet (phase 1 is not written
    ahead): the next operator runs phase 1 again. ledger-a answers its second prepare with
    the vote its fence recorded, without asking the app again."""
    ledger_b = bed.participants["ledger-b"].ledger
    ledger_b.behave(delayMs=600)  # answers within the second: Preparing is never stored
    op = bed.start_operator()
    uid = bed.apply(_transfer(bed, "t4b", 1_000))["metadata"]["uid"]
    wait_until(lambda: ledger_b.state()["calls"].get("prepare"), interval=0.02)
    op.proc.send_signal(signal.SIGSTOP)  # frozen at once: it writes nothing more
    op.proc.kill()
    op.proc.wait()
    assert "phase" not in (bed.get("t4b").get("status") or {}), "stored before the kill"
    bed.start_operator()
    st = bed.wait("t4b", "Committed")["status"]
    assert st["decision"] == "Commit"
    assert bed.outcomes(uid) == {"ledger-a": "committed", "ledger-b": "committed"}
    assert bed.participants["ledger-a"].ledger.state()["calls"]["prepare"] == 1


def test_the_operator_killed_mid_phase_two_finishes_with_the_same_decision(bed: TpcBed) -> None:
    bed.participants["ledger-b"].ledger.behave(delayMs=1500)  # holds its vote a moment
    op = bed.start_operator()
    tx = _transfer(bed, "t5", 2_000)
    uid = bed.apply(tx)["metadata"]["uid"]
    # ledger-b answers its commits with 503 for a while: phase 2 is under way, unfinished.
    wait_until(lambda: bed.participants["ledger-b"].ledger.state()["calls"].get("prepare"))
    bed.participants["ledger-b"].ledger.behave(fail=3)
    bed.cluster.wait_for("tpc", "t5", bed.namespace,
                         lambda o: (o.get("status") or {}).get("decision") is not None)  # fmt: skip
    op.proc.kill()
    op.proc.wait()
    decided = bed.get("t5")["status"]["decision"]
    bed.start_operator()
    st = bed.wait("t5", "Committed", "Aborted")["status"]
    assert st["decision"] == decided
    expected = "committed" if decided == "Commit" else "aborted"
    assert bed.outcomes(uid) == {"ledger-a": expected, "ledger-b": expected}


def test_deletion_waits_for_phase_two(bed: TpcBed) -> None:
    ledger_b = bed.participants["ledger-b"].ledger
    ledger_b.behave(delayMs=1500)  # holds its vote a moment
    bed.start_operator()
    uid = bed.apply(_transfer(bed, "t6", 1_000))["metadata"]["uid"]
    wait_until(lambda: ledger_b.state()["calls"].get("prepare"))
    ledger_b.behave(fail=6)  # its commit fails a few times
    bed.cluster.wait_for(
        "tpc", "t6", bed.namespace, lambda o: (o.get("status") or {}).get("phase") == "Committing"
    )
    bed.cluster.kubectl("delete", "tpc", "t6", "-n", bed.namespace, "--wait=false")
    time.sleep(1)
    assert bed.get("t6")["metadata"].get("deletionTimestamp")  # still there: phase 2 runs
    wait_until(
        lambda: "t6" not in bed.cluster.kubectl("get", "tpc", "-n", bed.namespace, "-o", "name"),
        timeout=90,
    )
    assert bed.outcomes(uid) == {"ledger-a": "committed", "ledger-b": "committed"}


def test_a_participant_that_crashes_after_voting_yes_commits_when_back(bed: TpcBed) -> None:
    ledger_b = bed.participants["ledger-b"].ledger
    bed.start_operator()
    ledger_b.behave(delayMs=1500)
    uid = bed.apply(_transfer(bed, "t7", 1_000))["metadata"]["uid"]
    bed.cluster.wait_for("tpc", "t7", bed.namespace,
                         lambda o: (o.get("status") or {}).get("decision") == "Commit")  # fmt: skip
    ledger_b.kill()  # voted yes (in its own database); its commit now finds nobody
    time.sleep(2)
    ledger_b.start()
    bed.wait("t7", "Committed")
    assert bed.outcomes(uid) == {"ledger-a": "committed", "ledger-b": "committed"}


def test_two_coordinators_racing_agree_on_one_decision(bed: TpcBed) -> None:
    bed.start_operator()
    bed.start_operator()  # no leader election: both drive every transaction
    uids = [bed.apply(_transfer(bed, f"r{i}", 100))["metadata"]["uid"] for i in range(6)]
    for i, uid in enumerate(uids):
        st = bed.wait(f"r{i}", "Committed", "Aborted")["status"]
        expected = "committed" if st["decision"] == "Commit" else "aborted"
        assert bed.outcomes(uid) == {"ledger-a": expected, "ledger-b": expected}
        assert bed.events(f"r{i}").count(f"Decided{st['decision']}") >= 1
        assert f"Decided{'Abort' if st['decision'] == 'Commit' else 'Commit'}" not in bed.events(
            f"r{i}"
        )


def test_the_fence_answers_abort_before_prepare_and_refuses_an_empty_commit(
    bed: TpcBed,
) -> None:
    """Straight at a participant's sidecar, as a late or reordered message would come."""
    p = bed.participants["ledger-b"]
    url = p.sidecar.inbound

    def send(kind: str, txid: str) -> tuple[int, dict]:
        payload = {"account": "bob", "amountCents": 1}
        status, body, _ = request(
            "POST", f"{url}/{kind}", {"txid": txid, "payload": payload},
            headers={"Authorization": f"Bearer {TOKEN}", wire.TRANSACTION: txid,
                     wire.TPC_PHASE: kind},
        )  # fmt: skip
        return status, body

    assert send("abort", "x1") == (200, {"acked": True, "empty": True})
    status, body = send("prepare", "x1")  # the late prepare: refused (no suspension)
    assert status == 200 and body["vote"] == "abort"
    status, body = send("commit", "x2")  # never prepared
    assert status == 409 and "never prepared" in body["error"]["message"]
    assert send("prepare", "x3") == (200, {"vote": "commit"})
    assert send("prepare", "x3")[1] == {"vote": "commit", "replayed": True}
    assert send("commit", "x3") == (200, {"acked": True})
    assert send("commit", "x3")[1] == {"acked": True, "replayed": True}
    assert send("abort", "x3")[0] == 409  # committed here: an abort is a protocol error
    calls = p.ledger.state()["calls"]
    assert calls == {"prepare": 1, "commit": 1}  # only x3's, once each


def _outcome_reader(
    cluster: Cluster, namespace: str, tmp_path: Path, name: str, *, granted: bool = True
) -> dict[str, dict[str, str]]:
    """A service account for participant `name` that may get transactions in its namespace
    (once granted: _grant_reading), and its sidecar's env to ask for outcomes after 1 s."""
    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    cluster.kubectl("create", "role", "tpc-reader", "--verb=get",
                    "--resource=twophasetransactions.accord.dev", "-n", namespace)  # fmt: skip
    if granted:
        _grant_reading(cluster, namespace, name)
    token = tmp_path / f"{name}.token"
    token.write_text(cluster.kubectl("create", "token", name, "-n", namespace).strip())
    assert cluster.cp.dir is not None
    return {
        name: {
            "ACCORD_KUBE_API_URL": cluster.cp.server,
            "ACCORD_KUBE_CA_FILE": str(cluster.cp.dir / "pki" / "ca.crt"),
            "ACCORD_KUBE_TOKEN_FILE": str(token),
            "ACCORD_TPC_OUTCOME_AFTER_S": "1",
        }
    }


def _grant_reading(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("create", "rolebinding", "tpc-reader", "--role=tpc-reader",
                    f"--serviceaccount={namespace}:{name}", "-n", namespace)  # fmt: skip


def test_a_participant_that_hears_nothing_reads_the_outcome_itself(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """ledger-b voted commit; the coordinator died before its commit got through and never
    came back. ledger-b's sidecar reads the transaction with its own service account (get
    on twophasetransactions in its namespace, nothing more) and applies the decision."""
    env = _outcome_reader(cluster, namespace, tmp_path, "ledger-b")
    with tpc_bed(cluster, namespace, tmp_path, "ledger-a", "ledger-b", sidecar_env=env) as bed:
        bed.participants["ledger-a"].ledger.deposit("alice", 10_000)
        ledger_b = bed.participants["ledger-b"].ledger
        # ledger-b is reached through a link that holds every commit for a minute.
        target = bed.participants["ledger-b"].sidecar.inbound
        with slow_link(target, tmp_path, "/commit=60000") as port:
            op = bed.start_operator()
            tx = _transfer(bed, "t8", 1_000)
            tx["spec"]["participants"][1]["port"] = port
            uid = bed.apply(tx)["metadata"]["uid"]
            bed.cluster.wait_for(
                "tpc", "t8", bed.namespace,
                lambda o: (o.get("status") or {}).get("decision") == "Commit",
            )  # fmt: skip
            op.proc.kill()  # the coordinator is gone for good; its commit to b is held
            op.proc.wait()
            wait_until(lambda: uid in ledger_b.state()["committed"], timeout=30)
        log = bed.participants["ledger-b"].sidecar.log.read_text()
        assert "applied its recorded commit" in log
        # The app was told as the coordinator tells it: the transaction's name included.
        assert f"ledger-b: commit {namespace}/t8 ->" in ledger_b.log.read_text()


def test_a_participant_whose_transaction_is_gone_presumes_abort(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """ledger-b voted commit, ledger-a refused (an overdraft). The abort to ledger-b is held
    on the way and ledger-b's Service is deleted: the coordinator lets it go (nothing can be
    held behind a Service that is gone) and the transaction ends Aborted; then it is
    deleted. ledger-b's sidecar, never told, reads the transaction (once it may): gone, so
    it presumes abort, as the coordinator would, and the hold is released."""
    env = _outcome_reader(cluster, namespace, tmp_path, "ledger-b", granted=False)
    with tpc_bed(cluster, namespace, tmp_path, "ledger-a", "ledger-b", sidecar_env=env) as bed:
        bed.participants["ledger-a"].ledger.deposit("alice", 10_000)
        bed.participants["ledger-a"].ledger.behave(delayMs=500)  # ledger-b votes first
        ledger_b = bed.participants["ledger-b"].ledger
        target = bed.participants["ledger-b"].sidecar.inbound
        with slow_link(target, tmp_path, "/abort=60000") as port:
            bed.start_operator()
            tx = _transfer(bed, "t9", 50_000, commitTimeoutSeconds=2)
            tx["spec"]["participants"][1]["port"] = port
            uid = bed.apply(tx)["metadata"]["uid"]
            wait_until(lambda: uid in ledger_b.state()["holds"])
            bed.cluster.kubectl("delete", "service", "ledger-b", "-n", namespace)
            st = bed.wait("t9", "Aborted", timeout=60)["status"]
            b = st["participants"][1]
            assert b["acked"] is True and "not found" in b["lastError"], b
            assert uid in ledger_b.state()["holds"]  # still held: never told
            bed.cluster.kubectl("delete", "tpc", "t9", "-n", namespace, "--wait=true")
            _grant_reading(cluster, namespace, "ledger-b")
            wait_until(lambda: uid not in ledger_b.state()["holds"], timeout=30)
        assert uid in ledger_b.state()["aborted"]
        log = bed.participants["ledger-b"].sidecar.log.read_text()
        assert "is gone: presumed abort" in log and "applied its recorded abort" in log


def test_the_operator_killed_after_deciding_before_phase_two_arrived_commits(
    bed: TpcBed, tmp_path: Path
) -> None:
    """The decision is stored and the commits are on their way, held in the links to both
    participants, when the operator is SIGKILLed and the links go down with what they held:
    no participant heard phase 2. The next operator finishes it with the stored decision."""
    ports = {name: free_port() for name in bed.participants}
    with ExitStack() as held:
        for name, port in ports.items():
            target = bed.participants[name].sidecar.inbound
            held.enter_context(slow_link(target, tmp_path, "/commit=60000", port=port))
        op = bed.start_operator()
        tx = _transfer(bed, "t10", 1_000)
        for p in tx["spec"]["participants"]:
            p["port"] = ports[p["name"]]
        uid = bed.apply(tx)["metadata"]["uid"]
        decided = lambda o: (o.get("status") or {}).get("decision") == "Commit"  # noqa: E731
        bed.cluster.wait_for("tpc", "t10", bed.namespace, decided)
        op.proc.kill()
        op.proc.wait()
    # The links are down with what they held: phase 2 reached no one.
    assert bed.outcomes(uid) == {"ledger-a": "held", "ledger-b": "held"}
    assert bed.get("t10")["status"]["phase"] == "Committing"
    with ExitStack() as links:
        for name, port in ports.items():
            target = bed.participants[name].sidecar.inbound
            links.enter_context(slow_link(target, tmp_path, port=port))
        bed.start_operator()
        st = bed.wait("t10", "Committed")["status"]
        assert st["decision"] == "Commit"
        assert bed.outcomes(uid) == {"ledger-a": "committed", "ledger-b": "committed"}
