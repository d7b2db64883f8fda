"""Fan-out search (pipelines.fan_out_search): shards grouped in actors, searched at once, merged exactly.

Against one unsharded index: a single Flat index over every vector (dense) and one bm25s index
over every document (BM25), with duplicate vectors and documents so that ties decide the top-K.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from conftest import write_index_version

from pipelines import index_store, storage
from pipelines.fan_out_search import FanOutSearch, ShardGroupSearcher, ShardPoolPlan, plan_shard_pool, resident_bytes, start_shard_pool
from pipelines.index_store import IndexShard
from pipelines.shard_search import PADDING_POSITION, SearchConfig, ShardSearcher, merge_candidate_lists, merge_top_k
from pipelines.sparse_index import STATISTICS_FILE, Bm25Config, GlobalStatistics, TermCounts, Tokenizer, shard_file
from pipelines.sparse_search import SparseShardSearcher

TOP_K = 12
SHARDS = [(0, 67), (67, 133), (133, 200)]  # as shard_ranges(200, 3) splits, for the index written on disk
GROUPS = [(0, 1), (2,)]  # held by two actors
WORDS = "protein cell gene tumor cancer virus immune dose trial patient runner xq7 zorblat quenk".split()


def tied_vectors(count: int = 200, dimension: int = 8, seed: int = 0) -> np.ndarray:
    """Small-integer vectors (exact inner products in float32), every one repeated in another shard and many scores tied."""
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, size=(count, dimension)).astype(np.float32)
    vectors[133:173] = vectors[0:40]  # duplicates across shards: ties at the same score, decided by position
    vectors[100:110] = vectors[57:67]
    return vectors


def tied_documents(count: int = 200, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))) for _ in range(count)]
    texts[140:180] = texts[10:50]  # duplicate documents in other shards
    texts[75:80] = [texts[3]] * 5
    return texts


def queries(count: int = 30, seed: int = 2) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    vectors = rng.integers(-2, 3, size=(count, 8)).astype(np.float32)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(count)]
    texts[0], texts[1] = "nothingmatches", ""
    return vectors, texts


def expected_top_k(scores: np.ndarray, keep) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-K by score, ties to the smaller position, over the positions ``keep`` allows; padded -1 / -inf."""
    positions = np.full((len(scores), TOP_K), PADDING_POSITION, dtype=np.int64)
    values = np.full((len(scores), TOP_K), -np.inf, dtype=np.float32)
    for row, row_scores in enumerate(scores):
        allowed = np.flatnonzero(keep(row_scores))
        best = allowed[np.lexsort((allowed, -row_scores[allowed]))][:TOP_K]
        positions[row, : len(best)], values[row, : len(best)] = best, row_scores[best]
    return positions, values


@pytest.fixture(scope="module")
def dense_truth():
    vectors, (embedded, _) = tied_vectors(), queries()
    single = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    single.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    searcher = ShardSearcher.from_shard(IndexShard(number=0, index=single, first_position=0, vectors=None), SearchConfig(top_k=TOP_K))
    flat = merge_candidate_lists([searcher.search(embedded)], len(embedded), TOP_K)
    exact = expected_top_k(embedded @ vectors.T, lambda row: np.ones(len(row), bool))
    assert np.array_equal(flat[0], exact[0]) and np.array_equal(flat[1], exact[1])  # the single Flat index breaks ties by position too
    assert any(len(np.unique(row)) < TOP_K for row in exact[1])  # ties inside the top-K
    return flat


@pytest.fixture(scope="module")
def sparse_truth():
    import bm25s

    bm25 = Bm25Config()
    tokens = Tokenizer(bm25)(tied_documents())
    model = bm25s.BM25(k1=bm25.k1, b=bm25.b, method="lucene")
    model.index(tokens, show_progress=False)
    rows = []
    for terms in Tokenizer(bm25)(queries()[1]):
        known = [term for term in terms if term in model.vocab_dict]
        rows.append(model.get_scores(known) if known else np.zeros(len(tokens), np.float32))
    truth = expected_top_k(np.array(rows), lambda row: row > 0)
    assert any(len(np.unique(row[np.isfinite(row)])) < (row > 0).sum() for row in truth[1])  # ties inside the top-K
    return truth


def dense_searchers() -> list[ShardSearcher]:
    vectors = tied_vectors()
    built = []
    for number, (start, end) in enumerate(SHARDS):
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        index.add_with_ids(vectors[start:end], np.arange(start, end, dtype=np.int64))
        built.append(ShardSearcher.from_shard(IndexShard(number=number, index=index, first_position=start, vectors=None), SearchConfig(top_k=TOP_K)))
    return built


def sparse_counts() -> tuple[list[TermCounts], GlobalStatistics]:
    tokens = Tokenizer(Bm25Config())(tied_documents())
    counts = [TermCounts.from_tokens(tokens[start:end]) for start, end in SHARDS]
    return counts, GlobalStatistics.merge([(c.terms, c.document_frequencies(), c.documents, int(c.lengths.sum())) for c in counts])


def sparse_searchers() -> list[SparseShardSearcher]:
    counts, statistics = sparse_counts()
    return [SparseShardSearcher.from_counts(shard, statistics, Bm25Config(), start, SearchConfig(top_k=TOP_K)) for shard, (start, _) in zip(counts, SHARDS)]


def test_groups_of_shards_merged_equal_one_index_ties_included(dense_truth, sparse_truth):
    dense, sparse = dense_searchers(), sparse_searchers()
    embedded, texts = queries()
    terms = Tokenizer(Bm25Config())(texts)
    for groups in (GROUPS, [(2,), (1,), (0,)], [(0, 1, 2)]):  # any grouping, any order
        found = [ShardGroupSearcher.from_searchers([dense[s] for s in group], [sparse[s] for s in group], TOP_K).search(embedded, terms) for group in groups]
        merged_dense = merge_candidate_lists([lists["dense"] for lists in found], len(texts), TOP_K)
        merged_sparse = merge_candidate_lists([lists["sparse"] for lists in found], len(texts), TOP_K)
        for merged, truth in ((merged_dense, dense_truth), (merged_sparse, sparse_truth)):
            assert np.array_equal(merged[0], truth[0]), groups
            assert np.array_equal(merged[1], truth[1]), groups
    assert np.all(merged_sparse[0][:2] == PADDING_POSITION)  # queries without a known term: no BM25 candidates


def test_merging_all_lists_at_once_equals_merging_one_by_one():
    rng = np.random.default_rng(3)
    lists = [(rng.permutation(1000)[:20].reshape(2, 10).astype(np.int64), rng.integers(0, 4, size=(2, 10)).astype(np.float32)) for _ in range(4)]
    lists[1][0][0, :3] = -1  # padding
    running = (np.full((2, 7), -1, np.int64), np.full((2, 7), -np.inf, np.float32))
    for positions, scores in lists:
        running = merge_top_k(*running, positions, scores, 7)
    at_once = merge_candidate_lists(lists, 2, 7)
    assert np.array_equal(at_once[0], running[0]) and np.array_equal(at_once[1], running[1])
    empty = merge_candidate_lists([], 3, 5)
    assert empty[0].shape == (3, 5) and np.all(empty[0] == PADDING_POSITION) and np.all(np.isneginf(empty[1]))


def write_sparse_part(root, manifest: dict) -> None:
    """Add a BM25 part over ``tied_documents`` to a written index version, as build_sparse_shards lays it out."""
    counts, statistics = sparse_counts()
    shards = []
    for number, (shard, (start, end)) in enumerate(zip(counts, SHARDS)):
        data = shard.to_bytes()
        file = shard_file(f"test-shard-{number}")
        shards.append({"shard": number, "file": file, "sha256": storage.write_bytes_atomically(storage.join_url(str(root), file), data), "bytes": len(data),
                       "count": end - start, "first_position": start})
    folder = index_store.version_url(str(root), manifest["version_id"])
    data = statistics.to_bytes()
    manifest["sparse"] = {**Bm25Config().settings(), "statistics": {"file": STATISTICS_FILE, "sha256": storage.write_bytes_atomically(storage.join_url(folder, STATISTICS_FILE), data),
                                                                    "bytes": len(data)}, "shards": shards}
    storage.write_bytes_atomically(storage.join_url(folder, "manifest.json"), json.dumps(manifest).encode())


def test_the_fan_out_over_shard_actors_equals_one_index(ray_session, tmp_path, dense_truth, sparse_truth):
    manifest = write_index_version(tmp_path, "Flat", tied_vectors(), shards=3)
    assert [(entry["first_position"], entry["first_position"] + entry["count"]) for entry in manifest["shards"]] == SHARDS
    write_sparse_part(tmp_path, manifest)
    # Two replicas of two groups (three shards in two actors): consecutive batches go to different replicas.
    plan = ShardPoolPlan(groups=tuple((group, group) for group in GROUPS), replicas=2, actor_cpus=0.1, threads=1, fan_out_size=1, fan_out_cpus=0.1)
    replicas = start_shard_pool(plan, str(tmp_path), "v1", SearchConfig(top_k=TOP_K))
    embedded, texts = queries()
    for mode in ("hybrid", "dense", "sparse", "hybrid"):
        stage = FanOutSearch(replicas, mode, TOP_K, Bm25Config() if mode != "dense" else None)
        batch = stage({"query_id": np.arange(len(texts)), "query_text": np.array(texts, dtype=object), "query_embedding": embedded})
        if mode != "sparse":
            assert np.array_equal(batch["candidate_positions"], dense_truth[0]) and np.array_equal(batch["candidate_scores"], dense_truth[1]), mode
        if mode != "dense":
            assert np.array_equal(batch["sparse_positions"], sparse_truth[0]) and np.array_equal(batch["sparse_scores"], sparse_truth[1]), mode
        assert ("candidate_positions" in batch) == (mode != "sparse") and ("sparse_positions" in batch) == (mode != "dense")
    empty = stage({"query_id": np.arange(0), "query_text": np.array([], dtype=object), "query_embedding": np.zeros((0, 8), np.float32)})
    assert empty["candidate_positions"].shape == (0, TOP_K)


@pytest.mark.parametrize("cpus", [2, 16, 64])
@pytest.mark.parametrize("shards", [1, 4, 12])
def test_the_shard_pool_holds_every_shard_once_per_replica_within_its_budget(cpus, shards):
    budget = cpus - 0.75
    plan = plan_shard_pool(budget, shards, shards)
    assert plan.claimed_cpus <= budget + 1e-9
    assert sorted(shard for dense, _ in plan.groups for shard in dense) == list(range(shards))
    assert all(dense == sparse for dense, sparse in plan.groups)  # dense and BM25 shard i cover the same documents: one actor
    assert 1 <= len(plan.groups) <= shards and plan.replicas >= 1 and plan.fan_out_size == plan.replicas
    assert plan.actor_cpus >= 0.2 and plan.threads == max(1, int(plan.actor_cpus))
    if budget >= 2 * (shards + 0.1):  # CPUs for two sets of one-CPU actors (and their fan-out actors): replicas
        assert plan.replicas >= 2 and len(plan.groups) == shards
    else:
        assert plan.replicas == 1
    if cpus == 2:
        assert len(plan.groups) <= 4  # 1.25 CPUs: a few actors of a quarter CPU, several shards each


def test_the_shard_pool_is_bounded_by_memory_and_holds_uneven_shard_counts():
    assert plan_shard_pool(63.25, 4).replicas == 15
    bounded = plan_shard_pool(63.25, 4, shard_bytes=10 << 30, memory_bytes=64 << 30)
    assert bounded.replicas == 3 and bounded.threads == 5  # the CPUs go to threads instead
    assert bounded.claimed_cpus <= 63.25
    dense_only = plan_shard_pool(1.25, 3, 0)
    assert all(not sparse for _, sparse in dense_only.groups)
    uneven = plan_shard_pool(8, 2, 3)
    assert [shard for _, sparse in uneven.groups for shard in sparse] == [0, 1, 2] and [shard for dense, _ in uneven.groups for shard in dense] == [0, 1]
    with pytest.raises(ValueError, match="no shards"):
        plan_shard_pool(4, 0, 0)


def test_resident_bytes_count_the_stored_re_scoring_data():
    manifest = {"model": {"dimension": 384}, "shards": [
        {"bytes": 1_000, "count": 100, "vectors_bytes": 38_528, "vectors_dtype": "float16"},  # 100 x 768 B float16 + header
        {"bytes": 1_000, "count": 100, "vectors_bytes": 28_928, "vectors_dtype": "uint8", "vectors_code": "sq6"},  # 100 x 288 B
        {"bytes": 1_000, "count": 100},  # an entry without its size: float32 vectors, an upper bound
    ]}
    assert resident_bytes(manifest, "dense", SearchConfig()) == 3_000 + 38_528 + 28_928 + 4 * 384 * 100
    assert resident_bytes(manifest, "dense", SearchConfig(exact_rescoring=False)) == 3_000
