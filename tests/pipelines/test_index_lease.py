"""The index root's writer lease and compare-and-set of CURRENT (pipelines.index_lease), and their use by the indexing job.

Leases are tested on local disk (threads and processes), on the session's moto S3 server and on memory://;
one tiny build (random-weight model, 40 documents) checks that a build superseded meanwhile leaves CURRENT alone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import REPOSITORY, build_index_flags, synthetic_documents, write_jsonl

from pipelines import index_lease, index_store, storage
from pipelines.index_lease import (
    LeaseHeldError,
    LeaseLostError,
    LeaseUnsupportedError,
    acquire,
    compare_and_publish,
    read_current,
    read_lease,
    writer_lease,
)

# --- helpers -------------------------------------------------------------------------------------


def finished_version(root: str, version_id: str) -> None:
    """A version folder with a manifest (all that publishing checks)."""
    storage.write_json_atomically(storage.join_url(index_store.version_url(root, version_id), "manifest.json"), {"version_id": version_id})


def race(root: str, contenders: int, **options) -> tuple[list, list]:
    """``contenders`` threads acquire the lease at the same moment with no waiting; (leases won, errors)."""
    barrier = threading.Barrier(contenders)
    won, refused = [], []

    def contend(number: int) -> None:
        barrier.wait()
        try:
            won.append(acquire(root, owner=f"thread {number}", timeout_s=0, **options))
        except LeaseHeldError as error:
            refused.append(error)

    threads = [threading.Thread(target=contend, args=(number,)) for number in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


@pytest.fixture(params=["local", "s3", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        yield str(tmp_path / "index")
        return
    if request.param == "s3":
        yield request.getfixturevalue("s3_bucket") + "/index"
        return
    namespace = f"lease-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{namespace}/index"
    storage.remove_tree(f"memory://{namespace}")


# --- acquisition, waiting, breaking, renewal (every storage kind) --------------------------------


def test_only_one_of_several_simultaneous_writers_gets_the_lease(root):
    for _ in range(3):
        won, refused = race(root, 4)
        assert len(won) == 1 and len(refused) == 3
        assert read_lease(root).token == won[0].info.token
        won[0].release()
        assert read_lease(root) is None


def test_a_second_writer_waits_then_fails_naming_the_holder(root):
    with writer_lease(root, owner="first build", timeout_s=0, ttl_s=30):
        started = time.monotonic()
        with pytest.raises(LeaseHeldError) as raised:
            acquire(root, owner="second build", timeout_s=0.5, poll_s=0.05)
        assert time.monotonic() - started >= 0.5
        message = str(raised.value)
        assert "\n" not in message
        for part in ("owner 'first build'", f"host {socket.gethostname()}", f"pid {os.getpid()}", "lease expires 20", "waited 0.5 s"):
            assert part in message
        with pytest.raises(LeaseHeldError, match="not waiting"):
            acquire(root, owner="third build", timeout_s=0)
    assert read_lease(root) is None  # released on leaving the block


def test_a_waiting_writer_gets_the_lease_once_released(root):
    first = acquire(root, owner="first", timeout_s=0, ttl_s=30)
    threading.Timer(0.3, first.release).start()
    with writer_lease(root, owner="second", timeout_s=10, poll_s=0.05) as second:
        assert read_lease(root).owner == "second" and second.held


def test_an_expired_lease_is_broken_and_its_holder_can_no_longer_publish(root):
    finished_version(root, "v1")
    stale = acquire(root, owner="killed build", timeout_s=0, ttl_s=0.3)  # never renewed, as if the process was killed
    with pytest.raises(LeaseHeldError):
        acquire(root, owner="too early", timeout_s=0)
    time.sleep(0.4)
    with writer_lease(root, owner="next build", timeout_s=0) as lease:
        assert read_lease(root).owner == "next build"
        with pytest.raises(LeaseLostError):
            stale.check()
        with pytest.raises(LeaseLostError):
            compare_and_publish(root, None, "v1", lease=stale)
        stale.release()  # must not delete the new holder's lease
        assert read_lease(root).token == lease.info.token
    assert read_current(root) is None


def test_several_writers_breaking_one_expired_lease_at_once_leave_one_holder(root):
    acquire(root, owner="killed build", timeout_s=0, ttl_s=0.2)
    time.sleep(0.3)
    won, refused = race(root, 4)
    assert len(won) == 1 and len(refused) == 3
    assert read_lease(root).token == won[0].info.token
    won[0].release()


def test_renewal_keeps_the_lease_past_its_ttl(root):
    with writer_lease(root, owner="long build", timeout_s=0, ttl_s=0.6, renew_every_s=0.1) as lease:
        first_expiry = lease.info.expires_epoch
        time.sleep(1.5)
        lease.check()
        assert lease.info.expires_epoch > first_expiry + 0.8
        with pytest.raises(LeaseHeldError, match="long build"):
            acquire(root, owner="other", timeout_s=0)
    assert read_lease(root) is None


def test_the_lease_is_released_when_the_block_fails(root):
    with pytest.raises(RuntimeError, match="boom"), writer_lease(root, owner="failing job", timeout_s=0):
        raise RuntimeError("boom")
    with writer_lease(root, owner="next", timeout_s=0):
        pass


# --- local disk across processes, unsupported storage --------------------------------------------

HOLD_IN_A_PROCESS = """
import sys, time
from pipelines.index_lease import LeaseHeldError, acquire
try:
    lease = acquire(sys.argv[1], owner=sys.argv[2], timeout_s=0, ttl_s=30)
except LeaseHeldError:
    print("refused", flush=True)
else:
    print("acquired", flush=True)
    time.sleep(2.0)
    lease.release()
"""


def test_only_one_process_gets_the_lease_on_local_disk(tmp_path):
    root = str(tmp_path / "index")
    processes = [subprocess.Popen([sys.executable, "-c", HOLD_IN_A_PROCESS, root, f"process {number}"], cwd=REPOSITORY,
                                  stdout=subprocess.PIPE, text=True) for number in range(3)]
    outcomes = sorted(process.communicate(timeout=60)[0].strip() for process in processes)
    assert outcomes == ["acquired", "refused", "refused"]
    assert read_lease(root) is None


KILLED_HOLDER = """
import os, sys
from pipelines.index_lease import acquire
acquire(sys.argv[1], owner="killed build", timeout_s=0, ttl_s=600)
os._exit(9)  # as if killed: no release
"""


def test_the_lease_of_a_process_gone_from_this_machine_is_broken_at_once(tmp_path):
    root = str(tmp_path / "index")
    subprocess.run([sys.executable, "-c", KILLED_HOLDER, root], cwd=REPOSITORY, check=False, timeout=60)
    stale = read_lease(root)
    assert stale.owner == "killed build" and not stale.expired() and stale.holder_gone()
    with writer_lease(root, owner="rerun", timeout_s=0) as lease:
        assert read_lease(root).token == lease.info.token
        assert not lease.info.holder_gone()  # a live holder on this machine keeps its lease


def test_storage_without_an_atomic_create_is_refused():
    with pytest.raises(LeaseUnsupportedError, match="no writer lease on http"):
        acquire("http://127.0.0.1:9/index", timeout_s=0)


# --- compare-and-set of CURRENT ------------------------------------------------------------------


def test_compare_and_publish_moves_current_only_from_the_expected_version(tmp_path):
    root = str(tmp_path / "index")
    for version in ("v1", "v2", "v3"):
        finished_version(root, version)
    with writer_lease(root, timeout_s=0) as lease:
        assert compare_and_publish(root, None, "v1", lease=lease)  # no CURRENT yet
        assert read_current(root) == "v1"
        assert compare_and_publish(root, "v1", "v2", lease=lease)
        assert not compare_and_publish(root, "v1", "v3", lease=lease)  # CURRENT moved to v2 meanwhile
        assert read_current(root) == "v2"
        assert not compare_and_publish(root, None, "v3", lease=lease)
        assert compare_and_publish(root, "v1", "v2", lease=lease)  # already there: nothing to move
    with pytest.raises(LeaseLostError):
        compare_and_publish(root, "v2", "v3", lease=lease)  # released
    assert read_current(root) == "v2"


# --- the indexing job ----------------------------------------------------------------------------


def test_a_build_superseded_during_the_build_leaves_current_alone(ray_session, tiny_bi_encoder, tmp_path, monkeypatch, capsys):
    from jobs.build_index import main as build_index_job

    corpus = write_jsonl(tmp_path / "corpus.jsonl", synthetic_documents(40, seed=3))
    root = str(tmp_path / "index")
    flags = build_index_flags(corpus, root, tiny_bi_encoder, "--embedding.max-seq-length", "32", "--sparse", "off")
    write_version = index_store.Manifest.write_version

    def newer_build_publishes_first(manifest, *args, **kwargs):
        # Another writer (that ignored the lease, or whose lease outlived ours) published while this build ran.
        finished_version(root, "newer")
        index_store.publish(root, "newer")
        return write_version(manifest, *args, **kwargs)

    monkeypatch.setattr(index_store.Manifest, "write_version", newer_build_publishes_first)
    summary = build_index_job(flags)
    assert (summary["published"], summary["superseded_by"]) == (False, "newer")
    assert read_current(root) == "newer"
    assert storage.exists(storage.join_url(index_store.version_url(root, summary["version_id"]), "manifest.json"))  # finished
    assert f"version {summary['version_id']} is finished but NOT published" in capsys.readouterr().out
    assert read_lease(root) is None

    monkeypatch.setattr(index_store.Manifest, "write_version", write_version)
    rerun = build_index_job(flags)  # starts from "newer": publishing the finished version is now a forward move
    assert rerun["version_id"] == summary["version_id"] and rerun["published"] is True
    assert read_current(root) == summary["version_id"]


def test_a_build_while_another_writer_holds_the_lease_fails_at_once_naming_it(tiny_bi_encoder, tmp_path):
    from jobs.build_index import main as build_index_job
    from pipelines.cli import run_job

    corpus = write_jsonl(tmp_path / "corpus.jsonl", synthetic_documents(5))
    root = str(tmp_path / "index")
    with writer_lease(root, owner="jobs.versions rollback", timeout_s=0):
        with pytest.raises(LeaseHeldError, match="owner 'jobs.versions rollback'.*not waiting"):
            build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, "--lock-timeout", "0"))
        assert run_job(build_index_job, build_index_flags(corpus, root, tiny_bi_encoder, "--lock-timeout", "0")) == 1  # one line, status 1
    assert not storage.exists(storage.join_url(root, "versions"))
    assert index_lease.read_lease(root) is None


def test_a_build_on_storage_without_leases_warns_and_goes_on(monkeypatch, capsys):
    from pipelines import indexing

    def unsupported(*args, **kwargs):
        raise LeaseUnsupportedError("gs://bucket/index: no writer lease on gs:// storage")

    monkeypatch.setattr(indexing.index_lease, "acquire", unsupported)
    with indexing.build_lease(indexing.BuildIndexConfig(corpus="corpus", index="gs://bucket/index")) as lease:
        assert lease is None
    assert "building without a writer lease: run one writer at a time on this root" in capsys.readouterr().out
