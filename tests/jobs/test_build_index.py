"""The indexing job end to end (jobs.build_index): counts and quarantine, search, resume, storage kinds, clusters.

Every build uses the tiny random model (the slow SciFact test excepted) and the session's Ray. The
damaged corpus is indexed once per session (conftest.damaged_corpus_index); tests that change an
index work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest

from jobs.build_index import main as build_index_job
from pipelines import index_store, storage
from pipelines.documents import CorpusError
from pipelines.index_store import load_index

from conftest import DAMAGED_CORPUS_BUILD_FLAGS, REPOSITORY, SCIFACT, build_index_flags, check_report, synthetic_documents

# --- helpers -------------------------------------------------------------------------------------


def quarantine_rows(root: str, manifest: dict) -> list[dict]:
    url = index_store.version_url(root, manifest["version_id"]) + "/quarantine"
    tables = [storage.read_parquet(part) for part in storage.list_files(url, ".parquet")]
    return pa.concat_tables(tables).sort_by([("source_file", "ascending"), ("source_row", "ascending")]).to_pylist() if tables else []


def file_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def search_own_vectors(loaded, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed document's own stored vector searched in every shard, merged: (queries' positions, top-k positions)."""
    vectors = np.vstack([shard.vectors for shard in loaded.shards])
    positions = np.concatenate([shard.first_position + np.arange(len(shard.vectors)) for shard in loaded.shards])
    scores, found = zip(*(shard.index.search(vectors, k) for shard in loaded.shards))
    scores, found = np.hstack(scores), np.hstack(found)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return positions, np.take_along_axis(found, best, axis=1)


def file_stamps(folder) -> dict[str, int]:
    """mtime of every file under a folder, by relative path."""
    stamps = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            stamps[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
    return stamps


def assert_is_file_of(url: str, protocol: str, path: str) -> None:
    """``url`` names ``path`` on storage of ``protocol`` (however the URL spells it)."""
    filesystem, found = storage.filesystem_and_path(url)
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    assert protocol in protocols and found.strip("/") == path.strip("/"), url


def check_damaged_corpus_result(summary, root, corpus, damaged_corpus, protocol, corpus_path) -> dict:
    """The acceptance checks shared by every storage kind: counts, quarantine rows, ids; returns the manifest."""
    assert summary["documents_read"] == damaged_corpus.rows_read == 254
    assert summary["indexed"] == len(damaged_corpus.indexed_ids) == 240
    assert summary["quarantined"] == len(damaged_corpus.quarantined) == 14
    assert summary["duplicate_ids"] == 2
    loaded = load_index(root)
    manifest = loaded.manifest
    assert manifest["counts"] == {"documents_read": 254, "quarantined": 14, "indexed": 240}
    assert manifest["corpus"]["url"] == corpus
    for url, name in zip(manifest["corpus"]["files"], ("a.jsonl", "b.parquet")):
        assert_is_file_of(url, protocol, f"{corpus_path}/{name}")
    assert loaded.doc_ids["id"].to_pylist() == damaged_corpus.indexed_ids
    assert loaded.doc_ids["position"].to_pylist() == list(range(240))

    rows = quarantine_rows(root, manifest)
    found = sorted((file_name(row["source_file"]), row["source_row"], row["field"], row["reason"]) for row in rows)
    assert [entry[:3] for entry in found] == [entry[:3] for entry in damaged_corpus.quarantined]
    for (_, _, _, reason), (_, _, _, expected) in zip(found, damaged_corpus.quarantined):
        assert reason.startswith(expected), (reason, expected)
    for row in rows:
        assert_is_file_of(row["source_file"], protocol, f"{corpus_path}/{file_name(row['source_file'])}")
        assert row["raw"], row
    duplicates = {row["id"]: row["reason"] for row in rows if row["reason"].startswith("duplicate id")}
    assert set(duplicates) == {"d3", "d10"}
    for identifier, line in (("d3", 3), ("d10", 11)):  # the kept copies: lines of a.jsonl
        first_file = duplicates[identifier].removeprefix("duplicate id (first seen in ").rsplit(" row ", 1)
        assert_is_file_of(first_file[0], protocol, f"{corpus_path}/a.jsonl")
        assert first_file[1] == f"{line})"
    return manifest


# --- the acceptance scenario, on local disk ------------------------------------------------------


def test_damaged_corpus_gives_the_expected_counts_and_quarantine(damaged_corpus_index, damaged_corpus):
    summary = damaged_corpus_index.summary
    root = str(damaged_corpus_index.root)
    manifest = check_damaged_corpus_result(summary, root, str(damaged_corpus.folder), damaged_corpus, "file", str(damaged_corpus.folder))
    assert (summary["embedded"], summary["reused_embeddings"], summary["shards"]) == (240, 0, 3)
    assert [(entry["first_position"], entry["count"]) for entry in manifest["shards"]] == [(0, 80), (80, 80), (160, 80)]
    assert manifest["index"]["factory"] == "IVF4,Flat" and manifest["index"]["nprobe"] == 4
    assert manifest["model"]["dimension"] == 32 and manifest["model"]["metric"] == "inner_product"
    assert index_store.current_version_id(root) == summary["version_id"] == manifest["version_id"]
    summary_file = json.loads((damaged_corpus_index.root / "versions" / summary["version_id"] / "summary.json").read_text())
    # summary.json is written with the manifest, before CURRENT moves: the publish outcome is the job's alone.
    assert summary_file == {key: value for key, value in summary.items() if key not in ("index", "published", "superseded_by")}
    assert summary["published"] is True


def test_every_document_is_found_by_its_own_vector(damaged_corpus_index, damaged_corpus, tiny_bi_encoder):
    loaded = load_index(str(damaged_corpus_index.root), with_vectors=True)
    positions, found = search_own_vectors(loaded)
    assert np.array_equal(positions, np.arange(240))
    assert all(position in row for position, row in zip(positions, found))
    assert np.mean(found[:, 0] == positions) >= 0.99

    # The vector at a position is the model's embedding of that document (title, space, text).
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_bi_encoder, device="cpu")
    records = {record["_id"]: record for record in map(json.loads, damaged_corpus.files["a.jsonl"].decode().splitlines()[:5])}
    stored = np.vstack([shard.vectors for shard in loaded.shards])
    for position in (0, 1, 2):
        record = records[loaded.doc_ids["id"][position].as_py()]
        expected = model.encode([f"{record['title']} {record['text']}"], normalize_embeddings=True)[0]
        np.testing.assert_allclose(stored[position], expected, atol=1e-3)  # stored as float16 (relative rounding <= 2^-11)


# --- unreadable files stop the job before any work -----------------------------------------------


def test_a_corrupt_parquet_file_stops_the_job_naming_the_file(ray_session, tiny_bi_encoder, damaged_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(damaged_corpus.folder, corpus)
    (corpus / "c.parquet").write_bytes(b"PAR1\x00\x01 not a parquet file PAR1")
    with pytest.raises(CorpusError, match=f"file://{corpus}/c.parquet: cannot read as Parquet"):
        build_index_job(build_index_flags(corpus, tmp_path / "index", tiny_bi_encoder))
    assert not (tmp_path / "index").exists()


def test_a_file_without_a_text_column_stops_the_job_naming_the_file(ray_session, tiny_bi_encoder, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"_id": "1", "text": "fine"}) + "\n")
    (corpus / "b.jsonl").write_text(json.dumps({"_id": "2", "body": "wrong column"}) + "\n")
    with pytest.raises(CorpusError, match=f"file://{corpus}/b.jsonl: no text column 'text'"):
        build_index_job(build_index_flags(corpus, tmp_path / "index", tiny_bi_encoder))
    assert not (tmp_path / "index").exists()


def test_a_corpus_without_one_valid_row_stops_the_job(ray_session, tiny_bi_encoder, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"_id": "a", "text": ""}\n{"_id": null, "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=f"{corpus}: no valid documents among 3 rows"):
        build_index_job(build_index_flags(corpus, tmp_path / "index", tiny_bi_encoder))
    assert not (tmp_path / "index").exists()


# --- resume --------------------------------------------------------------------------------------


@pytest.fixture
def index_copy(damaged_corpus_index, tmp_path):
    root = tmp_path / "index"
    shutil.copytree(damaged_corpus_index.root, root)
    return root


def test_a_rerun_embeds_nothing_and_reuses_everything(index_copy, damaged_corpus, damaged_corpus_index, tiny_bi_encoder):
    before = file_stamps(index_copy)
    summary = build_index_job(build_index_flags(damaged_corpus.folder, index_copy, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
    assert summary["version_id"] == damaged_corpus_index.summary["version_id"]
    assert (summary["embedded"], summary["reused_embeddings"], summary["indexed"]) == (0, 240, 240)
    after = file_stamps(index_copy)
    assert {name for name in after if after[name] != before.get(name)} <= {"CURRENT"}


def test_a_rerun_after_a_crash_mid_fill_rebuilds_only_that_shard(index_copy, damaged_corpus, damaged_corpus_index, tiny_bi_encoder):
    version = damaged_corpus_index.summary["version_id"]
    folder = index_copy / "versions" / version
    original = json.loads((folder / "manifest.json").read_text())
    # The job died while filling shard 1: no shard 1 files, no summary, manifest or CURRENT yet.
    for name in ("shard-00001.faiss", "shard-00001.json", "summary.json", "manifest.json"):
        (folder / name).unlink()
    (index_copy / original["shards"][1]["vectors_file"]).unlink()  # shared by versions under the root's vectors/
    (index_copy / "CURRENT").unlink()
    before = file_stamps(index_copy)

    summary = build_index_job(build_index_flags(damaged_corpus.folder, index_copy, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
    assert summary["version_id"] == version
    assert (summary["embedded"], summary["reused_embeddings"], summary["indexed"], summary["quarantined"]) == (0, 240, 240, 14)
    after = file_stamps(index_copy)
    unchanged = {name for name in before if after.get(name) == before[name]}
    assert {f"versions/{version}/{name}" for name in ("trained.faiss", "shard-00000.faiss", "shard-00002.faiss", "shard-00000.json", "shard-00002.json")} <= unchanged
    assert not any(name.startswith("embeddings/") for name in set(after) - unchanged)  # nothing embedded again
    assert {original["shards"][shard]["vectors_file"] for shard in (0, 2)} <= unchanged  # shards 0 and 2: their vectors files are referenced
    assert f"versions/{version}/shard-00001.faiss" in after and original["shards"][1]["vectors_file"] in after
    loaded = load_index(str(index_copy), with_vectors=True)
    assert loaded.manifest["shards"] == original["shards"]  # rebuilt from the same trained index and vectors: identical
    positions, found = search_own_vectors(loaded)
    assert all(position in row for position, row in zip(positions, found))


# --- other storage: memory:// and S3 -------------------------------------------------------------


def test_the_job_on_memory_urls(ray_session, tiny_bi_encoder, damaged_corpus, damaged_corpus_index):
    namespace = f"build-index-test-{uuid.uuid4().hex[:8]}"
    corpus, root = f"memory://{namespace}/corpus", f"memory://{namespace}/index"
    for name, data in damaged_corpus.files.items():
        storage.write_bytes_atomically(f"{corpus}/{name}", data)
    try:
        summary = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
        assert summary["version_id"] == damaged_corpus_index.summary["version_id"]  # same inputs, same version
        manifest = check_damaged_corpus_result(summary, root, corpus, damaged_corpus, "memory", f"{namespace}/corpus")
        assert_is_file_of(manifest["embeddings"]["url"], "memory", f"{namespace}/index/embeddings/{file_name(manifest['embeddings']['url'])}")
        assert "retrieval-process-local" not in json.dumps(manifest)
        positions, found = search_own_vectors(load_index(root, with_vectors=True))
        assert all(position in row for position, row in zip(positions, found))

        rerun = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
        assert (rerun["embedded"], rerun["reused_embeddings"]) == (0, 240)
    finally:
        storage.remove_tree(f"memory://{namespace}")


def test_an_unreadable_file_on_memory_storage_is_named_by_its_memory_url(ray_session, tiny_bi_encoder, damaged_corpus):
    namespace = f"build-index-test-{uuid.uuid4().hex[:8]}"
    corpus = f"memory://{namespace}/corpus"
    storage.write_bytes_atomically(f"{corpus}/a.jsonl", damaged_corpus.files["a.jsonl"])
    storage.write_bytes_atomically(f"{corpus}/z.parquet", b"PAR1 not parquet PAR1")
    try:
        with pytest.raises(CorpusError, match=f"^{corpus}/z.parquet: cannot read as Parquet"):
            build_index_job(build_index_flags(corpus, f"memory://{namespace}/index", tiny_bi_encoder))
        assert not storage.exists(f"memory://{namespace}/index/versions")
    finally:
        storage.remove_tree(f"memory://{namespace}")


def test_the_job_on_s3(ray_session, tiny_bi_encoder, damaged_corpus, damaged_corpus_index, s3_bucket):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    for name, data in damaged_corpus.files.items():
        client.put_object(Bucket=bucket, Key=f"corpus/{name}", Body=data)
    corpus, root = f"{s3_bucket}/corpus", f"{s3_bucket}/index"

    summary = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
    assert summary["version_id"] == damaged_corpus_index.summary["version_id"]
    check_damaged_corpus_result(summary, root, corpus, damaged_corpus, "s3", f"{bucket}/corpus")
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="index/")["Contents"]}
    version = summary["version_id"]
    assert {"index/CURRENT", f"index/versions/{version}/manifest.json", f"index/versions/{version}/shard-00002.faiss"} <= keys
    assert not any(".tmp-" in key for key in keys)
    positions, found = search_own_vectors(load_index(root, with_vectors=True))
    assert all(position in row for position, row in zip(positions, found))

    rerun = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
    assert (rerun["version_id"], rerun["embedded"], rerun["reused_embeddings"]) == (version, 0, 240)

    # New documents arrive (the same process runs again, as a scheduler would): only they are embedded.
    added = [{**document, "_id": f"new{number}"} for number, document in enumerate(synthetic_documents(20, seed=5))]
    client.put_object(Bucket=bucket, Key="corpus/c.jsonl", Body="\n".join(json.dumps(document) for document in added).encode())
    grown = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
    assert grown["version_id"] != version
    assert (grown["documents_read"], grown["indexed"], grown["embedded"], grown["reused_embeddings"]) == (274, 260, 20, 240)
    loaded = load_index(root)
    assert loaded.manifest["version_id"] == grown["version_id"]
    assert loaded.doc_ids["id"].to_pylist() == damaged_corpus.indexed_ids + [document["_id"] for document in added]
    assert [manifest["version_id"] for manifest in index_store.list_versions(root)] == [version, grown["version_id"]]


# --- a two-node cluster builds the same index ----------------------------------------------------


def test_a_two_node_cluster_builds_the_same_index(damaged_corpus_index, damaged_corpus, tiny_bi_encoder, tmp_path):
    root = tmp_path / "index"
    output = tmp_path / "result.json"
    flags = build_index_flags(damaged_corpus.folder, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    environment.pop("RAY_ADDRESS", None)
    process = subprocess.run(
        [sys.executable, str(REPOSITORY / "tests" / "two_node_build.py"), str(output), *flags],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["nodes"] == 2
    assert result["summary"]["version_id"] == damaged_corpus_index.summary["version_id"]

    one = load_index(str(damaged_corpus_index.root), with_vectors=True)
    two = load_index(str(root), with_vectors=True)
    assert two.doc_ids.equals(one.doc_ids)
    assert (root / "versions" / two.manifest["version_id"] / "doc_ids.parquet").exists()
    assert [(s["first_position"], s["count"]) for s in two.manifest["shards"]] == [(s["first_position"], s["count"]) for s in one.manifest["shards"]]
    assert two.manifest["counts"] == one.manifest["counts"]
    assert sorted(map(str, quarantine_rows(str(root), two.manifest))) == sorted(map(str, quarantine_rows(str(damaged_corpus_index.root), one.manifest)))
    # Vectors may differ in the last bits (other batches on other nodes): compare neighbours, not bytes.
    np.testing.assert_allclose(np.vstack([s.vectors for s in two.shards]), np.vstack([s.vectors for s in one.shards]), atol=1e-3)  # float16: may round apart
    positions, found_one = search_own_vectors(one)
    _, found_two = search_own_vectors(two)
    assert np.array_equal(found_one[:, 0], found_two[:, 0])
    assert np.mean([set(a) == set(b) for a, b in zip(found_one, found_two)]) >= 0.98


# --- the real model on SciFact (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_scifact_sample_with_the_bundled_model(ray_session, tmp_path):
    corpus_file = SCIFACT / "corpus.jsonl"
    if not corpus_file.exists():
        pytest.skip(f"SciFact is not available: {corpus_file} is missing")
    with open(corpus_file) as handle:
        lines = [next(handle) for _ in range(500)]
    corpus = tmp_path / "scifact-500.jsonl"
    corpus.write_text("".join(lines))
    root = tmp_path / "index"

    summary = build_index_job(["--corpus", str(corpus), "--index", str(root), "--embedding.model", "bundled"])
    assert (summary["documents_read"], summary["indexed"], summary["quarantined"], summary["embedded"]) == (500, 500, 0, 500)
    loaded = load_index(str(root), with_vectors=True)
    assert loaded.manifest["model"]["dimension"] == 384 and loaded.manifest["index"]["factory"] == "Flat"
    assert loaded.doc_ids["id"].to_pylist() == [json.loads(line)["_id"] for line in lines]
    positions, found = search_own_vectors(loaded)
    assert np.array_equal(found[:, 0], positions)  # exact search: every document is its own nearest neighbour

    # A document's title, embedded as a query, finds that document.
    from pipelines.embedding import EmbeddingConfig, TextEncoder

    encoder = TextEncoder(EmbeddingConfig(model="bundled"), device="cpu")
    titles = [json.loads(line)["title"] for line in lines[:100]]
    queries = encoder.encode(titles)
    scores, hits = zip(*(shard.index.search(queries, 10) for shard in loaded.shards))
    hits = np.hstack(hits)[np.arange(100)[:, None], np.argsort(-np.hstack(scores), axis=1)[:, :10]]
    assert np.mean([position in row for position, row in enumerate(hits)]) >= 0.9


def test_the_manifest_records_the_code_version_without_git(damaged_corpus_index, tmp_path):
    # ray job submit --working-dir uploads the tree without .git: the source digest names the code all the same.
    import pipelines

    manifest = load_index(str(damaged_corpus_index.root)).manifest
    assert manifest["code_version"]["package"] == pipelines.__version__
    assert manifest["code_version"]["source_digest"] == pipelines.source_digest() and len(pipelines.source_digest()) == 16
    for folder in ("pipelines", "jobs"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    copied = subprocess.run([sys.executable, "-c", "import pipelines; print(pipelines.__file__, pipelines.source_digest())"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, check=True).stdout.split()
    assert copied == [str(tmp_path / "pipelines" / "__init__.py"), pipelines.source_digest()]
    (tmp_path / "pipelines" / "storage.py").write_text((tmp_path / "pipelines" / "storage.py").read_text() + "\n# changed\n")
    changed = subprocess.run([sys.executable, "-c", "import pipelines; print(pipelines.source_digest())"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, check=True).stdout.strip()
    assert changed != pipelines.source_digest()


def test_the_version_holds_a_report_with_plots(damaged_corpus_index):
    summary = damaged_corpus_index.summary
    folder = damaged_corpus_index.root / "versions" / summary["version_id"]
    check_report(folder / "report.html", ["documents", "quarantine", "throughput", "bytes_per_vector", "shards"])
    assert summary["report"] == str(folder / "report.html")
    page = (folder / "report.html").read_text()
    assert "duplicate id" in page and f"{summary['indexed']:,}" in page  # quarantine reasons and counts in its tables


def test_a_snapshot_that_changes_nothing_exits_with_the_unchanged_status(ray_session, tiny_bi_encoder, tmp_path, capsys):
    # The nightly recipe (jobs/configs/reindex.yaml) asks for status 3 when the version is already the current one.
    from pipelines.cli import run_job

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text("\n".join(json.dumps(document) for document in synthetic_documents(30, seed=2)) + "\n")
    flags = build_index_flags(corpus, tmp_path / "index", tiny_bi_encoder, "--embedding.precision", "fp32", "--embedding.max-seq-length", "64",
                              "--config", str(REPOSITORY / "jobs" / "configs" / "reindex.yaml"))
    assert run_job(build_index_job, flags) == 0  # a new version, published
    assert run_job(build_index_job, flags) == 3  # the same snapshot: nothing built, nothing published
    assert run_job(build_index_job, [*flags, "--unchanged-status", "0"]) == 0
    with (corpus / "docs.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "late", "text": "a document that arrived today"}) + "\n")
    assert run_job(build_index_job, flags) == 0  # a changed snapshot: published
