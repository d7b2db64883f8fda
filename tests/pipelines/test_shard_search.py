"""First-stage search: merging across shards, exact re-scoring, fusion and final ranking (no Ray)."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pytest
from conftest import write_index_version

from pipelines.index_building import make_empty_index, shard_ranges, train_index
from pipelines.index_store import IndexShard, IndexValidationError, deserialize_index
from pipelines.reranking import fuse_scores, rank_candidates, standardize
from pipelines.shard_search import (
    BLAS_QUERY_THRESHOLD,
    SearchConfig,
    ShardSearcher,
    code_scores,
    empty_candidates,
    exact_scores,
    half_to_float,
    has_exact_scores,
    merge_top_k,
)


def clustered_vectors(count: int, dimension: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dimension)).astype(np.float32)
    vectors = centers[rng.integers(0, clusters, size=count)] + 0.4 * rng.normal(size=(count, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_searcher(index: faiss.Index, vectors: np.ndarray, first_position: int, config: SearchConfig) -> ShardSearcher:
    """A ShardSearcher over an in-memory shard (the constructor normally loads one from storage)."""
    return ShardSearcher.from_shard(IndexShard(number=0, index=index, first_position=first_position, vectors=vectors), config)


def build_shards(vectors: np.ndarray, factory: str, shards: int, nprobe: int) -> list[tuple[faiss.Index, np.ndarray, int]]:
    trained = train_index(factory, vectors, seed=1234)
    built = []
    for start, end in shard_ranges(len(vectors), shards):
        index = deserialize_index(trained)
        index.add_with_ids(vectors[start:end], np.arange(start, end, dtype=np.int64))
        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:
            pass
        built.append((index, vectors[start:end], start))
    return built


def search_all(shards, queries: np.ndarray, config: SearchConfig, order=None) -> tuple[np.ndarray, np.ndarray]:
    batch = {"query_embedding": queries}
    for number in order or range(len(shards)):
        index, vectors, first = shards[number]
        batch = make_searcher(index, vectors, first, config)(batch)
    return batch["candidate_positions"], batch["candidate_scores"]


def test_merge_keeps_best_scores_and_pads():
    positions, scores = empty_candidates(1, 3)
    positions, scores = merge_top_k(positions, scores, np.array([[5, 7]]), np.array([[0.9, 0.1]], dtype=np.float32), 3)
    assert positions.tolist() == [[5, 7, -1]]
    positions, scores = merge_top_k(positions, scores, np.array([[2, 9]]), np.array([[0.5, 0.95]], dtype=np.float32), 3)
    assert positions.tolist() == [[9, 5, 2]]
    assert scores[0].tolist() == pytest.approx([0.95, 0.9, 0.5])


def test_merge_breaks_ties_by_position_whatever_the_order():
    a = (np.array([[4]]), np.array([[0.5]], dtype=np.float32))
    b = (np.array([[3]]), np.array([[0.5]], dtype=np.float32))
    first = merge_top_k(*a, *b, 2)[0]
    second = merge_top_k(*b, *a, 2)[0]
    assert first.tolist() == second.tolist() == [[3, 4]]


def test_flat_shards_merged_equal_one_flat_search():
    vectors = clustered_vectors(3000, 32, 20, seed=1)
    queries = clustered_vectors(50, 32, 20, seed=2)
    config = SearchConfig(top_k=20, exact_rescoring=False)
    single = search_all(build_shards(vectors, "Flat", 1, 0), queries, config)
    sharded = build_shards(vectors, "Flat", 4, 0)
    merged = search_all(sharded, queries, config)
    reversed_order = search_all(sharded, queries, config, order=[3, 2, 1, 0])
    assert np.array_equal(merged[0], single[0])
    assert np.allclose(merged[1], single[1], atol=1e-5)
    assert np.array_equal(reversed_order[0], merged[0])


def test_ties_at_the_top_k_boundary_go_to_the_smaller_positions():
    # 1,000 copies of one vector among others: faiss alone keeps arbitrary copies at the k-th place.
    rng = np.random.default_rng(12)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32) * 0.01
    vectors[1000:2000] = 1.0
    index = make_empty_index("Flat", 8)
    index.add_with_ids(vectors, np.arange(3000, dtype=np.int64))
    searcher = make_searcher(index, None, 0, SearchConfig(top_k=5, exact_rescoring=False))
    positions, scores = searcher.search(np.ones((3, 8), dtype=np.float32))
    assert positions.tolist() == [[1000, 1001, 1002, 1003, 1004]] * 3 and np.all(scores == 8.0)
    raw = index.search(np.ones((1, 8), dtype=np.float32), 5)[1]
    assert raw.tolist() != [[1000, 1001, 1002, 1003, 1004]]  # what the widening corrects


def test_ivf_shards_merged_equal_single_shard_ivf_search():
    vectors = clustered_vectors(4000, 32, 20, seed=3)
    queries = clustered_vectors(40, 32, 20, seed=4)
    config = SearchConfig(top_k=10, exact_rescoring=False)
    single = search_all(build_shards(vectors, "IVF16,PQ8", 1, 4), queries, config)
    merged = search_all(build_shards(vectors, "IVF16,PQ8", 3, 4), queries, config)
    # Shards share the trained quantizer and codebooks, so a vector's approximate score does not depend on
    # its shard: the merge of per-shard top-10s is the single index's top-10.
    assert np.array_equal(merged[0], single[0])
    assert np.allclose(merged[1], single[1], atol=1e-5)


def test_exact_rescoring_recovers_the_flat_ranking():
    vectors = clustered_vectors(6000, 64, 30, seed=5)
    queries = clustered_vectors(100, 64, 30, seed=6)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    shards = build_shards(vectors, "IVF32,PQ16", 2, 32)
    approximate = search_all(shards, queries, SearchConfig(top_k=10, exact_rescoring=False))[0]
    rescored, scores = search_all(shards, queries, SearchConfig(top_k=10, exact_rescoring=True, rescoring_candidates=100))
    exact_recall = np.mean([len(set(truth[i]) & set(rescored[i])) / 10 for i in range(len(queries))])
    approximate_recall = np.mean([len(set(truth[i]) & set(approximate[i])) / 10 for i in range(len(queries))])
    assert exact_recall >= 0.99
    assert exact_recall > approximate_recall
    expected = np.take_along_axis(queries @ vectors.T, rescored, axis=1)
    assert np.allclose(scores, expected, atol=1e-5)


def test_exact_scores_pads_missing_ids():
    vectors = np.eye(3, dtype=np.float32)
    scores = exact_scores(np.array([[1, 0, 0]], dtype=np.float32), vectors, np.array([[0, -1, 2]]))
    assert scores[0, 0] == pytest.approx(1.0) and np.isneginf(scores[0, 1]) and scores[0, 2] == pytest.approx(0.0)


def test_exact_scores_equal_numpy_inner_products_with_padding():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(7, 24)).astype(np.float32)
    vectors = rng.normal(size=(50, 24)).astype(np.float32)
    ids = rng.integers(0, 50, size=(7, 30))
    ids[rng.random(ids.shape) < 0.2] = -1
    ids[3] = -1  # a query without candidates
    scores = exact_scores(queries, vectors, ids)
    expected = np.where(ids >= 0, np.einsum("qd,qkd->qk", queries, vectors[np.maximum(ids, 0)]), -np.inf)
    assert scores.dtype == np.float32 and scores.shape == (7, 30)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isneginf(scores), ids < 0)
    assert exact_scores(queries, vectors, np.zeros((7, 0), dtype=np.int64)).shape == (7, 0)
    with pytest.raises(ValueError, match="candidate id 50 is outside the shard's 50 vectors"):
        exact_scores(queries, vectors, np.full((7, 1), 50))


@pytest.mark.parametrize("code", ["sq8", "sq6"])
def test_scalar_quantizer_codes_score_as_the_inner_products_of_their_decoded_vectors(code):
    from pipelines import index_store

    rng = np.random.default_rng(3)
    vectors = clustered_vectors(2_000, 40, 10, seed=3)
    codec = deserialize_index(index_store.train_rescoring_quantizer(code, vectors[:500]))
    codes = codec.sa_encode(vectors)
    assert codes.shape == (2_000, index_store.rescoring_code_size(code, 40))
    queries = clustered_vectors(9, 40, 10, seed=4)
    ids = rng.integers(0, 2_000, size=(9, 700))  # 700 x 40 values per query: more than one chunk of HALF_CHUNK_VALUES over all queries
    ids[rng.random(ids.shape) < 0.1] = -1
    ids[4] = -1
    scores = code_scores(queries, codes, codec, ids)
    decoded = codec.sa_decode(codes[np.maximum(ids, 0).ravel()]).reshape(9, 700, 40)
    expected = np.where(ids >= 0, np.einsum("qd,qkd->qk", queries, decoded), -np.inf)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert scores.dtype == np.float32 and np.array_equal(np.isneginf(scores), ids < 0)
    valid = ids >= 0
    assert np.abs(scores[valid] - np.einsum("qd,qkd->qk", queries, vectors[np.maximum(ids, 0)])[valid]).max() < 0.05  # near the float vectors' products
    assert code_scores(queries, codes, codec, np.zeros((9, 0), dtype=np.int64)).shape == (9, 0)
    with pytest.raises(ValueError, match="candidate id 2000 is outside the shard's 2000 codes"):
        code_scores(queries, codes, codec, np.full((9, 1), 2_000))
    # a searcher needs the codec with uint8 codes, and refuses one with float vectors
    index = make_empty_index("IVF4,PQ4x4fs", 40)
    index.train(vectors)
    with pytest.raises(ValueError, match="uint8 re-scoring codes need their quantizer"):
        make_searcher(index, codes, 0, SearchConfig(top_k=5))
    with pytest.raises(ValueError, match="uint8 re-scoring codes need their quantizer"):
        ShardSearcher.from_shard(IndexShard(number=0, index=index, first_position=0, vectors=vectors, codec=codec), SearchConfig(top_k=5))


def test_float16_vectors_score_like_float32_and_rank_the_same_apart_from_near_ties():
    rng = np.random.default_rng(12)
    vectors = clustered_vectors(5000, 384, 40, seed=12)
    queries = clustered_vectors(300, 384, 40, seed=13)
    ids = np.stack([rng.choice(5000, size=200, replace=False) for _ in range(300)])
    ids[rng.random(ids.shape) < 0.05] = -1
    half = vectors.astype(np.float16)
    wide, narrow = exact_scores(queries, vectors, ids), exact_scores(queries, half, ids)
    assert narrow.dtype == np.float32 and np.array_equal(np.isneginf(narrow), ids < 0)
    valid = ids >= 0
    # The half kernel is exact for the float16 values; float16 rounding moves unit-vector products by < 1e-4.
    np.testing.assert_allclose(narrow[valid], np.einsum("qd,qkd->qk", queries, half[np.maximum(ids, 0)].astype(np.float32))[valid], atol=2e-6)
    assert np.abs(narrow[valid] - wide[valid]).max() < 1e-4
    # Top-10 of the 200 candidates: the same documents in the same order, except where float32 scores are
    # within float16's error of each other (a near tie whose order float16 may flip).
    order_wide = np.argsort(-wide, axis=1, kind="stable")[:, :10]
    order_narrow = np.argsort(-narrow, axis=1, kind="stable")[:, :10]
    differ = np.flatnonzero((order_wide != order_narrow).any(axis=1))
    for row in differ:
        rank = np.flatnonzero(order_wide[row] != order_narrow[row])[0]
        first, second = order_wide[row, rank], order_narrow[row, rank]
        assert abs(wide[row, first] - wide[row, second]) < 2e-4, (row, rank, wide[row, first], wide[row, second])
    assert len(differ) <= 0.05 * len(queries), len(differ)


def test_half_to_float_is_exact_for_every_finite_float16():
    half = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = half[np.isfinite(half)]
    assert np.array_equal(half_to_float(finite, np.empty(finite.shape, np.float32)).view(np.uint32), finite.astype(np.float32).view(np.uint32))


def test_only_indexes_with_approximate_scores_are_re_scored():
    vectors = clustered_vectors(2000, 16, 10, seed=8)
    exact = {factory: deserialize_index(train_index(factory, vectors, seed=0)) for factory in ("Flat", "IVF8,Flat")}
    approximate = {factory: deserialize_index(train_index(factory, vectors, seed=0)) for factory in ("IVF8,PQ4", "IVF8,PQ8x4fs")}
    assert all(has_exact_scores(index) for index in exact.values())
    assert not any(has_exact_scores(index) for index in approximate.values())
    assert not has_exact_scores(faiss.IndexFlatL2(16))  # distances, not inner products
    config = SearchConfig(top_k=10, rescoring_candidates=40)
    searcher = make_searcher(exact["Flat"], None, 0, config)  # no vectors needed
    assert not searcher.rescoring and searcher.candidates == 10
    searcher = make_searcher(approximate["IVF8,PQ4"], vectors, 0, config)
    assert searcher.rescoring and searcher.candidates == 40
    with pytest.raises(ValueError, match="exact re-scoring needs the shard's vectors"):
        make_searcher(approximate["IVF8,PQ4"], None, 0, config)


def test_flat_shards_are_searched_without_reading_their_vectors(tmp_path):
    vectors = clustered_vectors(600, 16, 10, seed=9)
    queries = clustered_vectors(20, 16, 10, seed=10)
    manifest = write_index_version(tmp_path / "flat", "Flat", vectors, shards=2)
    for entry in manifest["shards"]:  # a Flat searcher never opens them
        os.remove(tmp_path / "flat" / entry["vectors_file"])
    batch = {"query_embedding": queries}
    for shard in range(2):
        searcher = ShardSearcher(str(tmp_path / "flat"), "v1", shard, SearchConfig(top_k=10, nprobe=4))  # nprobe: no lists to probe
        assert searcher.shard.vectors is None and not searcher.rescoring and searcher.candidates == 10
        batch = searcher(batch)
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_QUERY_THRESHOLD  # query batches go to BLAS
    exact = queries @ vectors.T
    assert np.array_equal(batch["candidate_positions"], np.argsort(-exact, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(batch["candidate_scores"], np.sort(exact, axis=1)[:, ::-1][:, :10], atol=1e-5)

    manifest = write_index_version(tmp_path / "pq", "IVF4,PQ8x4fs", vectors, shards=1)
    os.remove(tmp_path / "pq" / manifest["shards"][0]["vectors_file"])
    with pytest.raises(IndexValidationError, match="listed in the manifest but missing"):
        ShardSearcher(str(tmp_path / "pq"), "v1", 0, SearchConfig(top_k=10))  # an approximate index needs them to re-score
    assert ShardSearcher(str(tmp_path / "pq"), "v1", 0, SearchConfig(top_k=10, exact_rescoring=False)).shard.vectors is None


def test_fusion_standardizes_within_each_query():
    rerank = np.array([[10.0, 0.0, 5.0]])
    first = np.array([[0.1, 0.3, 0.2]])
    assert np.allclose(standardize(rerank).mean(), 0.0)
    assert np.allclose(fuse_scores(rerank, first, 1.0), standardize(rerank))
    assert np.allclose(fuse_scores(rerank, first, 0.0), standardize(first))


def test_rank_candidates_reranks_the_head_and_keeps_the_tail_in_first_stage_order():
    doc_ids = pa.array([f"doc{i}" for i in range(10)])
    batch = {
        "query_id": np.array(["q1", "q2"]),
        "candidate_positions": np.array([[3, 1, 4, 5, 9], [2, 7, -1, -1, -1]]),
        "candidate_scores": np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.4, 0.3, -np.inf, -np.inf, -np.inf]], dtype=np.float32),
        "rerank_scores": np.array([[0.0, 2.0, 1.0], [1.0, 5.0, np.nan]], dtype=np.float32),
    }
    table = rank_candidates(batch, doc_ids, fusion_weight=None)
    q1 = table.filter(pa.compute.equal(table["query_id"], "q1")).to_pylist()
    assert [row["doc_id"] for row in q1] == ["doc1", "doc4", "doc3", "doc5", "doc9"]
    assert [row["rank"] for row in q1] == [1, 2, 3, 4, 5]
    assert [row["first_stage_rank"] for row in q1] == [2, 3, 1, 4, 5]
    assert [row["rerank_score"] for row in q1[3:]] == [None, None]
    assert q1[0]["score"] == pytest.approx(2.0) and q1[3]["score"] == pytest.approx(0.6)
    q2 = table.filter(pa.compute.equal(table["query_id"], "q2")).to_pylist()
    assert [row["doc_id"] for row in q2] == ["doc7", "doc2"]
    assert all(row["fused_score"] is None for row in q1 + q2)


def test_rank_candidates_with_fusion_orders_by_fused_score():
    doc_ids = pa.array(["a", "b", "c"])
    batch = {
        "query_id": np.array(["q"]),
        "candidate_positions": np.array([[0, 1, 2]]),
        "candidate_scores": np.array([[0.9, 0.5, 0.1]], dtype=np.float32),
        "rerank_scores": np.array([[0.0, 1.0, 0.9]], dtype=np.float32),
    }
    rows = rank_candidates(batch, doc_ids, fusion_weight=0.5).to_pylist()
    fused = fuse_scores(np.array([0.0, 1.0, 0.9]), np.array([0.9, 0.5, 0.1]), 0.5)
    expected = [["a", "b", "c"][i] for i in np.argsort(-fused)]
    assert [row["doc_id"] for row in rows] == expected
    assert all(row["fused_score"] is not None for row in rows)
    assert rows[0]["score"] == pytest.approx(float(np.max(fused)), abs=1e-5)


def test_make_empty_index_wraps_flat_indexes_for_ids():
    index = make_empty_index("Flat", 8)
    index.add_with_ids(np.eye(8, dtype=np.float32), np.arange(100, 108, dtype=np.int64))
    _, ids = index.search(np.eye(8, dtype=np.float32)[:1], 1)
    assert ids[0, 0] == 100
