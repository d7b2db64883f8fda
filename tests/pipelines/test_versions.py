"""Index versions as a lifecycle (pipelines.versions, jobs.versions): list, show, rollback, pin, prune, build --keep.

One root with two real versions (40 synthetic documents, then the first 30 of them: no second embedding stage, tiny model, BM25 on) is built once per module;
each test works on a copy. Time is moved forward by passing ``now`` rather than by waiting.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from conftest import build_index_flags, synthetic_documents, write_jsonl

from jobs.versions import main as versions_job
from pipelines import index_store, storage, versions
from pipelines.cli import run_job

FLAGS = ("--embedding.precision", "fp32", "--embedding.max-seq-length", "32", "--faiss.shards", "2")
LATER = datetime.timedelta(days=2)


@pytest.fixture(scope="module")
def two_versions(ray_session, tiny_bi_encoder, tmp_path_factory):
    """(root, [older id, newer id], corpus of the newer): built with jobs.build_index; the newer one is CURRENT."""
    from jobs.build_index import main as build

    folder = tmp_path_factory.mktemp("versions")
    root = folder / "index"
    ids = []
    for count in (40, 30):
        corpus = write_jsonl(folder / f"corpus-{count}" / "corpus.jsonl", synthetic_documents(count))
        ids.append(build(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS))["version_id"])
    return root, ids, corpus


@pytest.fixture
def root(two_versions, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(two_versions[0], copy)
    return str(copy)


def files_under(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(directory, name), root) for directory, _, names in os.walk(root) for name in names}


def flip_byte(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = run_job(versions_job, list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def later() -> datetime.datetime:
    return versions.utc_now() + LATER


def test_durations():
    assert versions.parse_duration("7d") == datetime.timedelta(days=7)
    assert versions.parse_duration("12h") == datetime.timedelta(hours=12)
    assert versions.parse_duration("30m") == datetime.timedelta(minutes=30)
    assert versions.parse_duration("1d12h") == datetime.timedelta(hours=36)
    assert versions.parse_duration("0") == datetime.timedelta(0)
    for bad in ("7", "d", "7x", "-1d", "7d 3"):
        with pytest.raises(ValueError):
            versions.parse_duration(bad)


def test_list_and_show_print_tables_and_json(root, two_versions, capsys):
    older, newer = two_versions[1]
    unfinished = os.path.join(root, "versions", "f" * 16)
    os.makedirs(unfinished)
    Path(unfinished, "shard-00000.json").write_text("{}")

    status, out, _ = run(capsys, "list", "--index", root)
    assert status == 0
    assert out.index(older) < out.index(newer) < out.index("unfinished") < out.index("f" * 16)
    assert "CURRENT" in out.splitlines()[next(number for number, line in enumerate(out.splitlines()) if newer in line)]

    status, out, _ = run(capsys, "list", "--index", root, "--json")
    listed = json.loads(out)
    assert [row["version_id"] for row in listed["finished"]] == [older, newer]
    assert [row["current"] for row in listed["finished"]] == [False, True]
    assert [row["documents"] for row in listed["finished"]] == [40, 30]
    assert all(row["bytes"] > 0 and row["shards"] == 2 and row["sparse"] and row["factory"] == "Flat" for row in listed["finished"])
    assert [row["version_id"] for row in listed["unfinished"]] == ["f" * 16] and listed["unfinished"][0]["age_seconds"] < 3600

    status, out, _ = run(capsys, "show", "--index", root)
    assert status == 0 and f"index version {newer}" in out and "manifest.json" in out and "CURRENT" in out
    status, out, _ = run(capsys, "show", "--index", root, "--version", older, "--json")
    shown = json.loads(out)
    assert shown["manifest"]["version_id"] == older and shown["summary"]["indexed"] == 40 and not shown["version"]["current"]
    assert [entry["version_id"] for entry in json.loads(run(capsys, "show", "--index", root, "--json")[1])["history"]] == [newer]


def test_rollback_validates_then_moves_current_and_records_it(root, two_versions, capsys):
    older, newer = two_versions[1]
    status, out, _ = run(capsys, "rollback", "--index", root, "--to", older)
    assert status == 0 and f"CURRENT -> {older}" in out
    assert index_store.current_version_id(root) == older
    assert index_store.load_index(root, with_vectors=True).count == 40
    history = versions.read_history(root)
    assert [(entry["version_id"], entry["previous"], entry["reason"]) for entry in history][-1] == (older, newer, "rollback")
    # the newer one is now the recently superseded version: a prune keeps it (and CURRENT) whatever --keep says
    plan = versions.plan_prune(root, keep=1)
    assert not plan.versions and {row["version_id"] for row in plan.kept} == {older, newer}


def test_rollback_refuses_unfinished_and_damaged_versions(root, two_versions, capsys):
    older, newer = two_versions[1]
    unfinished = os.path.join(root, "versions", "0" * 16)
    os.makedirs(unfinished)
    Path(unfinished, "trained.faiss").write_bytes(b"x")
    status, _, err = run(capsys, "rollback", "--index", root, "--to", "0" * 16)
    assert status == 1 and len(err.strip().splitlines()) == 1 and "unfinished" in err

    shard = os.path.join(root, "versions", older, "shard-00000.faiss")
    flip_byte(shard, len(Path(shard).read_bytes()) // 2)
    status, _, err = run(capsys, "rollback", "--index", root, "--to", older)
    assert status == 1 and len(err.strip().splitlines()) == 1 and "shard-00000.faiss" in err and "damaged" in err
    assert index_store.current_version_id(root) == newer


def test_rollback_refuses_a_damaged_shared_file(root, two_versions):
    older = two_versions[1][0]
    manifest = index_store.read_manifest(root, older)
    vectors = os.path.join(root, manifest["shards"][1]["vectors_file"])
    flip_byte(vectors, -1)
    with pytest.raises(index_store.IndexValidationError, match="vectors/.*damaged"):
        versions.rollback(root, older)
    os.remove(os.path.join(root, manifest["documents_store"]["files"][0]["file"]))
    with pytest.raises(index_store.IndexValidationError, match="missing"):
        versions.validate_version(root, older)


def test_pinned_versions_are_never_pruned(root, two_versions, capsys):
    older, _newer = two_versions[1]
    status, out, _ = run(capsys, "pin", "--index", root, "--version", older, "--note", "audit")
    assert status == 0 and f"pinned {older}" in out
    record = json.loads(Path(root, "pins", f"{older}.json").read_text())
    assert record["note"] == "audit" and record["pinned_by"] and record["pinned_at"]
    assert json.loads(run(capsys, "list", "--index", root, "--json")[1])["finished"][0]["pinned"]
    plan = versions.prune(root, keep=1, now=later())
    assert not plan.versions and any(row["version_id"] == older and "pinned" in row["why"] for row in plan.kept)

    status, out, _ = run(capsys, "unpin", "--index", root, "--version", older, "--json")
    assert json.loads(out) == {"version_id": older, "was_pinned": True}
    assert run(capsys, "pin", "--index", root, "--version", "9" * 16)[0] == 1  # no such version
    plan = versions.prune(root, keep=1, now=later())
    assert [row["version_id"] for row in plan.versions] == [older]


def test_prune_keeps_current_and_the_recently_superseded_then_removes_old_versions_and_unreferenced_files(root, two_versions, capsys):
    older, newer = two_versions[1]
    # a killed build's leftovers: an unfinished version folder, document-store parts, and a store of another model
    for leftover in (f"versions/{'a' * 16}/shard-00000.json", f"documents/parts-{uuid.uuid4().hex}/part-0.arrow", "embeddings/other-model-0123456789/part-0.parquet"):
        os.makedirs(os.path.dirname(os.path.join(root, leftover)), exist_ok=True)
        Path(root, leftover).write_bytes(b"leftover")
    before = files_under(root)

    # now: the older version stopped being current seconds ago, the leftovers were just written: nothing goes
    status, out, _ = run(capsys, "prune", "--index", root, "--keep", "1")
    assert status == 0 and "nothing to remove" in out and "current until" in out
    assert files_under(root) == before

    # two days later, dry run: the plan, and nothing removed
    plan = versions.prune(root, keep=1, now=later(), dry_run=True)
    assert files_under(root) == before
    assert [row["version_id"] for row in plan.versions] == [older]
    assert [row["version_id"] for row in plan.unfinished] == ["a" * 16]
    removed_shared = {row["path"] for row in plan.shared}
    newer_manifest = index_store.read_manifest(root, newer)
    still_used = {reference.path for reference in versions.referenced_files(newer_manifest) if reference.shared}
    older_only = {reference.path for reference in versions.referenced_files(index_store.read_manifest(root, older)) if reference.shared} - still_used
    assert older_only and older_only <= removed_shared and not removed_shared & still_used
    assert "embeddings/other-model-0123456789" in removed_shared and any(path.startswith("documents/parts-") for path in removed_shared)
    assert f"embeddings/{newer_manifest['model']['key']}" not in removed_shared  # the model the newer version uses
    assert plan.bytes_freed > 0
    assert versions.prune(root, keep=1, older_than="7d", now=later(), dry_run=True).versions == []  # created 2 days "ago"

    done = versions.prune(root, keep=1, now=later())
    assert done.to_dict()["bytes_freed"] == plan.bytes_freed
    after = files_under(root)
    assert not any(path.startswith((f"versions/{older}", f"versions/{'a' * 16}")) for path in after)
    assert not any(path.startswith(("documents/parts-", "embeddings/other-model")) for path in after)
    assert not (removed_shared & after) and still_used <= after
    assert index_store.load_index(root, with_vectors=True).count == 30
    versions.validate_version(root, newer)
    assert versions.plan_prune(root, keep=1, now=later()).bytes_freed == 0


def test_without_history_the_current_pointer_bounds_supersession(root, two_versions):
    older, _newer = two_versions[1]
    shutil.rmtree(os.path.join(root, "history"))  # a root published before history/ existed
    assert not versions.plan_prune(root, keep=1).versions  # CURRENT was written seconds ago
    assert [row["version_id"] for row in versions.plan_prune(root, keep=1, now=later()).versions] == [older]


def test_build_index_keep_prunes_after_publishing(root, two_versions, tiny_bi_encoder, ray_session):
    from jobs.build_index import main as build

    older, newer = two_versions[1]
    corpus = two_versions[2]
    summary = build(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS[:-2], "--faiss.shards", "1", "--keep", "1", "--keep-grace", "0"))
    newest = summary["version_id"]
    assert newest not in (older, newer) and sorted(summary["pruned"]["versions"]) == sorted([older, newer])
    assert index_store.current_version_id(root) == newest
    assert os.listdir(os.path.join(root, "versions")) == [newest]
    referenced = {reference.path for reference in versions.referenced_files(index_store.read_manifest(root, newest))}
    shared = {path for path in files_under(root) if path.split("/")[0] in versions.SHARED_FILE_FOLDERS}
    assert shared == {path for path in referenced if path.split("/")[0] in versions.SHARED_FILE_FOLDERS}
    versions.validate_version(root, newest)


def test_the_commands_on_memory_storage(root, two_versions, capsys):
    from pipelines.runtime import _copy_tree

    older, newer = two_versions[1]
    url = f"memory://versions-{uuid.uuid4().hex[:8]}/index"
    _copy_tree(root, url)
    listed = json.loads(run(capsys, "list", "--index", url, "--json")[1])
    assert [row["version_id"] for row in listed["finished"]] == [older, newer]
    assert run(capsys, "rollback", "--index", url, "--to", older)[0] == 0
    assert index_store.current_version_id(url) == older
    assert run(capsys, "pin", "--index", url, "--version", older)[0] == 0
    status, out, _ = run(capsys, "prune", "--index", url, "--keep", "1", "--dry-run", "--json")
    assert status == 0 and json.loads(out)["versions"] == []
    plan = versions.prune(url, keep=1, now=later() + LATER)
    assert [row["version_id"] for row in plan.versions] == [] and plan.kept  # older is CURRENT and pinned, newer is the newest
    assert run(capsys, "unpin", "--index", url, "--version", older)[0] == 0
    assert run(capsys, "rollback", "--index", url, "--to", newer)[0] == 0
    plan = versions.prune(url, keep=1, now=later())
    assert [row["version_id"] for row in plan.versions] == [older] and plan.shared
    assert not storage.exists(index_store.version_url(url, older))
    versions.validate_version(url, newer)


@pytest.mark.s3
def test_list_rollback_and_prune_on_s3(root, two_versions, s3_bucket, capsys):
    older, newer = two_versions[1]
    url = f"{s3_bucket}/index"
    filesystem, path = storage.filesystem_and_path(url)
    filesystem.put(root.rstrip("/") + "/", path + "/", recursive=True)
    listed = json.loads(run(capsys, "list", "--index", url, "--json")[1])
    assert [(row["version_id"], row["current"]) for row in listed["finished"]] == [(older, False), (newer, True)]
    assert run(capsys, "rollback", "--index", url, "--to", older)[0] == 0
    assert index_store.current_version_id(url) == older
    assert run(capsys, "rollback", "--index", url, "--to", newer)[0] == 0
    assert versions.plan_prune(url, keep=1).versions == []  # older was current a moment ago
    plan = versions.prune(url, keep=1, now=later())
    assert [row["version_id"] for row in plan.versions] == [older] and plan.shared
    assert not storage.exists(index_store.version_url(url, older))
    versions.validate_version(url, newer)
