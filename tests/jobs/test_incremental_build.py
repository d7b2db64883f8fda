"""Incremental rebuilds (pipelines.incremental_index): the trained quantizer and the unchanged shards of the version
CURRENT names are reused; --faiss.retrain and drift train anew; a rebuild interrupted mid-fill resumes the same version.

A 1,000-document synthetic corpus (tiny random model, 32-d) is indexed once per module in 4 shards of 250 positions
with IVF8,Flat at nprobe 8 = nlist, so search is exact whatever the trained centroids: an incremental version and a
full retrained build of the same documents must return the same top-10. Tests that change an index work on a copy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build_index_flags, synthetic_documents, write_jsonl

from jobs.build_index import main as build_index_job
from pipelines import incremental_index, index_store, storage
from pipelines.index_store import load_index

FLAGS = (
    "--embedding.precision", "fp32",
    "--embedding.max-seq-length", "64",
    "--embedding.rows-per-part", "250",
    "--faiss.factory", "IVF8,Flat",
    "--faiss.nprobe", "8",
    "--faiss.shards", "4",
    "--sparse", "off",
)
COUNT = 1000
RANGES = [(0, 250), (250, 500), (500, 750), (750, 1000)]
BASE = synthetic_documents(COUNT, seed=0)

# Words of another vocabulary than conftest.WORDS ("w0".."w499"): documents made of them embed elsewhere.
OTHER_WORDS = [
    "protein", "cell", "gene", "tumor", "cancer", "patient", "clinical", "trial", "dose", "blood", "brain", "heart", "liver", "kidney", "immune",
    "virus", "infection", "vaccine", "antibody", "receptor", "enzyme", "membrane", "mutation", "therapy", "drug", "molecule", "tissue", "muscle",
    "bone", "skin", "lung",
]


def churn(documents: list[dict], candidates: range, seed: int, changed: int = 50, removed: int = 50, added: int = 50) -> tuple[list[dict], set[str]]:
    """``documents`` with ``changed`` texts replaced and ``removed`` documents dropped, both among the positions
    ``candidates``, and ``added`` new documents at the end; returns them and the ids whose (id, text) is new."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(np.array(candidates), size=changed + removed, replace=False)
    replaced, dropped = set(picked[:changed].tolist()), set(picked[changed:].tolist())
    texts = iter(document["text"] for document in synthetic_documents(changed, seed=seed + 100))
    result = []
    for position, document in enumerate(documents):
        if position in dropped:
            continue
        result.append({**document, "text": next(texts) + " changed"} if position in replaced else document)
    new = [{**document, "_id": f"new{seed}-{number}"} for number, document in enumerate(synthetic_documents(added, seed=seed + 200))]
    return result + new, {documents[position]["_id"] for position in replaced} | {document["_id"] for document in new}


def unchanged_shards(before: list[dict], after: list[dict]) -> list[int]:
    key = lambda document: (document["_id"], document["title"], document["text"])
    return [shard for shard, (start, end) in enumerate(RANGES) if len(after) == len(before) and list(map(key, before[start:end])) == list(map(key, after[start:end]))]


def stored_ids(root: Path) -> list[str]:
    return [identifier for part in sorted(root.glob("embeddings/*/part-*.parquet")) for identifier in storage.read_parquet(str(part), columns=["id"])["id"].to_pylist()]


def store_vectors(root: Path, doc_ids) -> np.ndarray:
    """The float32 vector of each document of ``doc_ids`` (position order), read from the embedding store."""
    import pyarrow as pa

    from pipelines.embedding import arrow_to_embeddings

    table = pa.concat_tables([storage.read_parquet(str(part)) for part in sorted(root.glob("embeddings/*/part-*.parquet"))])
    rows: dict[tuple[str, str], int] = {}
    for row, key in enumerate(zip(table["id"].to_pylist(), table["text_hash"].to_pylist())):
        rows.setdefault(key, row)
    vectors = arrow_to_embeddings(table["embedding"])
    return vectors[[rows[key] for key in zip(doc_ids["id"].to_pylist(), doc_ids["text_hash"].to_pylist())]].astype(np.float32)


def version_file(root: Path, version: str, name: str) -> bytes:
    return (root / "versions" / version / name).read_bytes()


def top_k(loaded, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the top ``k`` over every shard, merged."""
    scores, found = zip(*(shard.index.search(queries, k) for shard in loaded.shards))
    scores, found = np.hstack(scores), np.hstack(found)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(found, best, axis=1)


def seeded_queries(loaded, count: int = 64, seed: int = 3) -> np.ndarray:
    """Random unit vectors and the stored vectors of random documents."""
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((count, loaded.dimension)).astype(np.float32)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    stored = np.vstack([shard.vectors for shard in loaded.shards]).astype(np.float32)
    return np.vstack([random, stored[rng.choice(len(stored), size=count, replace=False)]])


@pytest.fixture(scope="module")
def base_index(ray_session, tiny_bi_encoder, tmp_path_factory):
    """The 1,000-document corpus indexed once (read-only: copy it to change it); (root, summary)."""
    folder = tmp_path_factory.mktemp("incremental-base")
    corpus = write_jsonl(folder / "corpus.jsonl", BASE)
    summary = build_index_job(build_index_flags(corpus, folder / "index", tiny_bi_encoder, *FLAGS))
    assert summary["incremental"]["trained"] == "retrained" and summary["incremental"]["previous_version"] is None
    return folder / "index", summary


def copy_of(base_index, tmp_path: Path) -> Path:
    root = tmp_path / "index"
    shutil.copytree(base_index[0], root)
    return root


ORDERED = churn(BASE, range(500, COUNT), seed=1)  # changes in positions 500.. only: shards 0 and 1 stay as they were


@pytest.fixture(scope="module")
def incremental_build(base_index, tiny_bi_encoder, tmp_path_factory):
    """The ordered churn rebuilt on a copy of the base index; (root, corpus, summary)."""
    folder = tmp_path_factory.mktemp("incremental-ordered")
    root = copy_of(base_index, folder)
    corpus = write_jsonl(folder / "corpus.jsonl", ORDERED[0])
    summary = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS))
    return root, corpus, summary


def test_a_rebuild_embeds_the_changed_documents_and_reuses_the_quantizer_and_unchanged_shards(base_index, incremental_build, tiny_bi_encoder):
    base_root, base = base_index
    root, corpus, summary = incremental_build
    documents, changed = ORDERED
    assert len(documents) == COUNT and len(changed) == 100 and unchanged_shards(BASE, documents) == [0, 1]

    # Embeddings: exactly the changed and the new documents.
    assert (summary["embedded"], summary["reused_embeddings"], summary["indexed"]) == (100, 900, COUNT)
    assert sorted(stored_ids(root)) == sorted(stored_ids(base_root) + list(changed))

    # The trained quantizer: the previous version's, byte for byte, after a drift check it passed.
    previous, version = base["version_id"], summary["version_id"]
    incremental = summary["incremental"]
    assert (incremental["previous_version"], incremental["trained"], incremental["trained_in_version"]) == (previous, "reused", previous)
    drift = incremental["drift"]
    assert drift["sample"] == COUNT and drift["threshold"] == incremental_index.DRIFT_THRESHOLD
    assert drift["ratio"] == pytest.approx(drift["new_mean_squared_distance"] / drift["previous_mean_squared_distance"], abs=2e-4)
    assert drift["ratio"] <= incremental_index.DRIFT_THRESHOLD
    assert version_file(root, version, "trained.faiss") == version_file(root, previous, "trained.faiss")

    # Shards 0 and 1 copied (same bytes, same manifest entries), 2 and 3 filled.
    assert (incremental["shards_reused"], incremental["shards_filled"]) == (2, 2)
    new, old = load_index(str(root), version, with_vectors=True), load_index(str(root), previous)
    assert new.manifest["shards"][:2] == old.manifest["shards"][:2]
    assert new.manifest["shards"][2:] != old.manifest["shards"][2:]
    for shard in (0, 1):
        assert version_file(root, version, f"shard-0000{shard}.faiss") == version_file(root, previous, f"shard-0000{shard}.faiss")
    assert new.manifest["index"]["trained_in_version"] == previous
    assert new.manifest["index"]["trained_sha256"] == storage.sha256_bytes(version_file(root, version, "trained.faiss"))
    assert new.doc_ids["id"].to_pylist() == [document["_id"] for document in documents]
    assert index_store.current_version_id(str(root)) == version

    # A rerun finds the finished version: nothing written but CURRENT.
    rerun = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS))
    assert (rerun["version_id"], rerun["embedded"]) == (version, 0)


def test_the_incremental_version_searches_like_a_full_retrained_build(incremental_build, tiny_bi_encoder, tmp_path):
    source, corpus, summary = incremental_build
    root = tmp_path / "index"
    shutil.copytree(source, root)
    full = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS, "--faiss.retrain"))
    assert full["version_id"] != summary["version_id"]  # the same documents; its own quantizer: another version
    assert full["embedded"] == 0
    assert (full["incremental"]["trained"], full["incremental"]["reason"]) == ("retrained", "--faiss.retrain")
    assert (full["incremental"]["shards_reused"], full["incremental"]["shards_filled"], full["incremental"]["drift"]) == (0, 4, None)
    assert version_file(root, full["version_id"], "trained.faiss") != version_file(root, summary["version_id"], "trained.faiss")  # trained anew

    incremental, retrained = load_index(str(root), summary["version_id"], with_vectors=True), load_index(str(root), full["version_id"])
    assert incremental.doc_ids.equals(retrained.doc_ids)
    queries = seeded_queries(incremental)
    scores, found = top_k(incremental, queries)
    expected_scores, expected = top_k(retrained, queries)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert np.array_equal(found, expected)
    # ... and both are exact: brute force over the documents' float32 vectors in the embedding store gives the same.
    exact = queries @ store_vectors(root, incremental.doc_ids).T
    brute = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(np.take_along_axis(exact, brute, axis=1), scores, atol=1e-5)
    assert np.mean(np.all(brute == found, axis=1)) >= 0.95  # another summation order: a near-tie may swap


def test_random_churn_with_sq8_codes_reuses_both_quantizers_and_only_unchanged_shards(base_index, tiny_bi_encoder, tmp_path):
    root = copy_of(base_index, tmp_path)
    flags = (*FLAGS, "--faiss.factory", "IVF8,PQ8x4fs", "--faiss.rescoring-code", "sq8")
    first = build_index_job(build_index_flags(write_jsonl(tmp_path / "a.jsonl", BASE), root, tiny_bi_encoder, *flags))
    assert first["embedded"] == 0
    assert first["incremental"]["trained"] == "retrained" and first["incremental"]["reason"].startswith("index factory differs ('IVF8,Flat' in ")

    documents, changed = churn(BASE, range(COUNT), seed=2, changed=4, removed=0, added=0)  # 4 random texts changed, no removals: some shards keep theirs
    summary = build_index_job(build_index_flags(write_jsonl(tmp_path / "b.jsonl", documents), root, tiny_bi_encoder, *flags))
    assert (summary["embedded"], summary["reused_embeddings"]) == (len(changed), COUNT - len(changed))
    incremental = summary["incremental"]
    assert incremental["trained"] == "reused" and incremental["drift"]["ratio"] <= incremental_index.DRIFT_THRESHOLD
    unchanged = unchanged_shards(BASE, documents)
    assert 0 < len(unchanged) < 4
    assert (incremental["shards_reused"], incremental["shards_filled"]) == (len(unchanged), 4 - len(unchanged))
    previous, version = first["version_id"], summary["version_id"]
    for name in ("trained.faiss", "rescoring.faiss"):
        assert version_file(root, version, name) == version_file(root, previous, name)
    loaded, old = load_index(str(root), version, with_vectors=True), load_index(str(root), previous)  # checks every checksum, the sq8 quantizer's too
    assert [shard for shard in range(4) if loaded.manifest["shards"][shard] == old.manifest["shards"][shard]] == unchanged
    assert all(shard.codec is not None and shard.vectors.dtype == np.uint8 for shard in loaded.shards)

    # Random churn everywhere, with removals and additions: the quantizer still fits, no shard keeps its documents.
    documents, changed = churn(documents, range(COUNT), seed=3)
    again = build_index_job(build_index_flags(write_jsonl(tmp_path / "c.jsonl", documents), root, tiny_bi_encoder, *flags))
    assert again["embedded"] == len(changed) == 100
    assert (again["incremental"]["trained"], again["incremental"]["trained_in_version"]) == ("reused", previous)
    assert (again["incremental"]["shards_reused"], again["incremental"]["shards_filled"]) == (0, 4)
    assert version_file(root, again["version_id"], "trained.faiss") == version_file(root, previous, "trained.faiss")


def test_vectors_that_drifted_from_the_centroids_retrain(base_index, tiny_bi_encoder, tmp_path):
    root = copy_of(base_index, tmp_path)
    rng = np.random.default_rng(4)
    # Half the documents get texts of another vocabulary: far from every centroid trained on the first one.
    documents = [{**document, "text": " ".join(rng.choice(OTHER_WORDS, size=int(rng.integers(8, 30))))} if position % 2 else document
                 for position, document in enumerate(BASE)]
    summary = build_index_job(build_index_flags(write_jsonl(tmp_path / "shifted.jsonl", documents), root, tiny_bi_encoder, *FLAGS))
    incremental = summary["incremental"]
    drift = incremental["drift"]
    assert drift["ratio"] > incremental_index.DRIFT_THRESHOLD, drift
    assert drift["new_mean_squared_distance"] > drift["previous_mean_squared_distance"]
    assert (incremental["trained"], incremental["reason"]) == ("retrained", f"drift: ratio {drift['ratio']} > {incremental_index.DRIFT_THRESHOLD}")
    assert (incremental["shards_reused"], incremental["shards_filled"]) == (0, 4)
    previous = base_index[1]["version_id"]
    assert version_file(root, summary["version_id"], "trained.faiss") != version_file(root, previous, "trained.faiss")
    manifest = load_index(str(root)).manifest
    assert manifest["version_id"] == summary["version_id"] and "trained_in_version" not in manifest["index"]
    written = json.loads((root / "versions" / summary["version_id"] / "summary.json").read_text())
    assert written["incremental"]["drift"] == drift


def test_an_incremental_build_interrupted_mid_fill_resumes_the_same_version(base_index, incremental_build, tiny_bi_encoder, tmp_path, monkeypatch):
    import pipelines.indexing
    from pipelines.index_building import fill_shard, shard_ranges, sources_for_range

    root = copy_of(base_index, tmp_path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ORDERED[0])

    def killed_after_shard_2(located, plan, dimension, folder, index_root):
        """What a kill leaves after the unchanged shards were copied and shard 2 was filled, before shard 3 was."""
        trained = storage.read_bytes(storage.join_url(folder, "trained.faiss"))
        start, end = shard_ranges(located.num_rows, plan.shards)[2]
        fill_shard(trained, sources_for_range(located, start, end), start, end - start, dimension, folder, 2, index_root)
        raise RuntimeError("killed while filling shard 3")

    with monkeypatch.context() as patch:
        patch.setattr(pipelines.indexing, "build_shards", killed_after_shard_2)
        with pytest.raises(RuntimeError, match="killed while filling shard 3"):
            build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS))
    unfinished = [folder for folder in (root / "versions").iterdir() if not (folder / "manifest.json").exists()]
    assert len(unfinished) == 1
    left = {name: (unfinished[0] / name).stat().st_mtime_ns for name in ("trained.faiss", "shard-00000.json", "shard-00001.json", "shard-00002.json")}
    assert not (unfinished[0] / "shard-00003.json").exists()

    summary = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS))
    expected = incremental_build[2]
    assert summary["version_id"] == unfinished[0].name == expected["version_id"]  # the uninterrupted build's version
    assert summary["embedded"] == 0  # embedded by the interrupted run
    assert (summary["incremental"]["trained"], summary["incremental"]["shards_reused"], summary["incremental"]["shards_filled"]) == ("reused", 2, 2)
    assert {name: (unfinished[0] / name).stat().st_mtime_ns for name in left} == left  # what the first run finished is kept
    resumed, uninterrupted = load_index(str(root)), load_index(str(incremental_build[0]), expected["version_id"])
    assert resumed.manifest["shards"] == uninterrupted.manifest["shards"]
    assert resumed.doc_ids.equals(uninterrupted.doc_ids)


def test_the_mean_squared_centroid_distance_is_the_distance_to_the_assigned_centroid():
    import faiss

    from pipelines.index_building import train_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = index_store.deserialize_index(train_index("IVF8,Flat", vectors, 1))
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    nearest = np.argmax(vectors @ centroids.T, axis=1)  # the inner-product quantizer's choice
    expected = np.mean(np.sum((vectors - centroids[nearest]) ** 2, axis=1))
    assert incremental_index.mean_squared_centroid_distance(index, vectors, block=64) == pytest.approx(expected, rel=1e-5)
    shifted = vectors + 0.5 * rng.standard_normal(16).astype(np.float32)
    assert incremental_index.mean_squared_centroid_distance(index, shifted) > 1.1 * expected


def test_a_previous_version_of_other_settings_or_layout_gives_the_reason_to_train():
    import dataclasses

    from pipelines.index_building import IndexPlan

    plan = IndexPlan(factory="IVF8,Flat", nprobe=8, shards=4, training_sample=COUNT, seed=1234)
    previous = {"version_id": "v0", "model": {"key": "tiny-0123", "dimension": 32}, "index": {"factory": "IVF8,Flat"},
                "shards": [{"first_position": start, "count": end - start} for start, end in RANGES], "counts": {"indexed": COUNT}}
    assert incremental_index.incompatibility(previous, plan, 32, "tiny-0123") == ""
    assert incremental_index.incompatibility(previous, plan, 32, "other-4567") == "model key differs ('tiny-0123' in v0, 'other-4567' now)"
    assert incremental_index.incompatibility(previous, plan, 64, "tiny-0123").startswith("dimension differs (32 in v0, 64 now)")
    assert incremental_index.incompatibility(previous, dataclasses.replace(plan, factory="IVF16,Flat"), 32, "tiny-0123").startswith("index factory differs")
    assert incremental_index.incompatibility(previous, dataclasses.replace(plan, rescoring_code="sq8"), 32, "tiny-0123").startswith(
        "re-scoring code differs ('float16' in v0, 'sq8' now)")
    assert incremental_index.incompatibility(previous, dataclasses.replace(plan, shards=5), 32, "tiny-0123").startswith("shard count differs (4 in v0, 5 now)")
    uneven = {**previous, "shards": [{"first_position": 0, "count": 100}, {"first_position": 100, "count": 400}, *previous["shards"][2:]]}
    assert incremental_index.incompatibility(uneven, plan, 32, "tiny-0123") == "the shards of v0 are not laid out by the current shard ranges rule"


# --- kill -9 and object storage ------------------------------------------------------------------


def assert_same_version(root: str, summary: dict, expected: dict, base_version: str) -> None:
    """The build at ``root`` finished the uninterrupted incremental build's version: same id, shards, ids, CURRENT, quantizer reused."""
    assert summary["version_id"] == expected["version_id"]
    assert (summary["incremental"]["trained"], summary["incremental"]["trained_in_version"]) == ("reused", base_version)
    assert index_store.current_version_id(root) == expected["version_id"]
    rebuilt = load_index(root)  # CURRENT's version: its manifest is written, every checksum checks
    assert rebuilt.manifest["version_id"] == expected["version_id"] and rebuilt.manifest["index"]["trained_in_version"] == base_version
    reference = load_index(str(expected["root"]), expected["version_id"])
    assert [shard["sha256"] for shard in rebuilt.manifest["shards"]] == [shard["sha256"] for shard in reference.manifest["shards"]]
    assert rebuilt.manifest["index"]["trained_sha256"] == reference.manifest["index"]["trained_sha256"]
    assert rebuilt.doc_ids.equals(reference.doc_ids)


def upload_base_index(base_index, url: str) -> None:
    """The base index root (local) copied under ``url`` on S3: the version an incremental build on S3 starts from."""
    filesystem, path = storage.filesystem_and_path(url)
    filesystem.put(str(base_index[0]), path, recursive=True)


@pytest.fixture(scope="module")
def expected_incremental(incremental_build) -> dict:
    root, _, summary = incremental_build
    return {**summary, "root": root}


@pytest.mark.slow
def test_an_incremental_build_killed_at_random_points_resumes_to_the_uninterrupted_version(ray_session, base_index, expected_incremental, tiny_bi_encoder, tmp_path):
    from conftest import finish, kill_after, start_job

    corpus = write_jsonl(tmp_path / "corpus.jsonl", ORDERED[0])
    timing = copy_of(base_index, tmp_path / "timing")
    started = time.perf_counter()
    finish(start_job(ray_session, "build_index", build_index_flags(corpus, timing, tiny_bi_encoder, *FLAGS)))
    duration = time.perf_counter() - started
    assert index_store.current_version_id(str(timing)) == expected_incremental["version_id"]
    killed = left_work = 0
    for point, fraction in enumerate(np.random.default_rng(11).uniform(0.3, 0.98, size=4)):
        root = copy_of(base_index, tmp_path / f"killed-{point}")
        flags = build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS)
        killed += kill_after(start_job(ray_session, "build_index", flags), fraction * duration)
        left_work += len(stored_ids(root)) > COUNT or len(list((root / "versions").iterdir())) > 1  # embedded parts or a version folder
        summary = build_index_job(flags)
        assert_same_version(str(root), summary, expected_incremental, base_index[1]["version_id"])
        assert sorted(stored_ids(root)) == sorted(stored_ids(base_index[0]) + list(ORDERED[1])), f"kill point {point} ({fraction:.2f} of {duration:.1f} s)"
    assert killed >= 2 and left_work >= 1  # some kills landed after the run had written something


@pytest.mark.s3
def test_an_incremental_build_on_s3_reuses_the_quantizer_and_shards_and_searches_like_the_local_one(base_index, expected_incremental, tiny_bi_encoder, s3_bucket, tmp_path):
    root = f"{s3_bucket}/index"
    upload_base_index(base_index, root)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ORDERED[0])
    summary = build_index_job(build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS))
    assert (summary["embedded"], summary["reused_embeddings"]) == (100, 900)
    assert (summary["incremental"]["shards_reused"], summary["incremental"]["shards_filled"]) == (2, 2)
    assert_same_version(root, summary, expected_incremental, base_index[1]["version_id"])
    on_s3, local = load_index(root, with_vectors=True), load_index(str(expected_incremental["root"]), expected_incremental["version_id"])
    queries = seeded_queries(on_s3, count=16, seed=5)
    scores, found = top_k(on_s3, queries)
    expected_scores, expected = top_k(local, queries)
    assert np.array_equal(found, expected)
    np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.slow
@pytest.mark.s3
def test_an_incremental_build_on_s3_killed_and_rerun_gives_the_uninterrupted_version(ray_session, base_index, expected_incremental, tiny_bi_encoder, s3_bucket, tmp_path):
    from conftest import finish, kill_after, start_job

    corpus = write_jsonl(tmp_path / "corpus.jsonl", ORDERED[0])
    timing = f"{s3_bucket}/timing"
    upload_base_index(base_index, timing)
    started = time.perf_counter()
    finish(start_job(ray_session, "build_index", build_index_flags(corpus, timing, tiny_bi_encoder, *FLAGS)))
    duration = time.perf_counter() - started
    assert index_store.current_version_id(timing) == expected_incremental["version_id"]
    killed = 0
    for point, fraction in enumerate(np.random.default_rng(12).uniform(0.4, 0.9, size=2)):
        root = f"{s3_bucket}/killed-{point}"
        upload_base_index(base_index, root)
        flags = build_index_flags(corpus, root, tiny_bi_encoder, *FLAGS)
        killed += kill_after(start_job(ray_session, "build_index", flags), fraction * duration)
        summary = build_index_job(flags)
        assert_same_version(root, summary, expected_incremental, base_index[1]["version_id"])
    assert killed >= 1
