"""First-stage fusion of the dense and BM25 candidate lists (pipelines.hybrid_fusion), without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.hybrid_fusion import CANDIDATE_COLUMNS, candidate_width, first_stage, fuse_lists, minmax, resolve_search_mode
from pipelines.index_store import IndexValidationError
from pipelines.shard_search import SearchConfig


def lists(positions, scores):
    return np.asarray(positions, dtype=np.int64), np.asarray(scores, dtype=np.float32)


# dense: positions 5, 3, 8 (best first); BM25: 3, 7, 9; padded with -1 / -inf as the searchers leave them
DENSE = lists([5, 3, 8, -1], [0.9, 0.5, 0.1, -np.inf])
SPARSE = lists([3, 7, 9, -1], [12.0, 6.0, 3.0, -np.inf])


def test_a_document_only_one_retriever_found_is_in_the_union_with_rank_0_and_nan_for_the_other():
    fused = fuse_lists(*lists([4], [0.8]), *lists([11], [7.5]))
    assert sorted(fused["positions"].tolist()) == [4, 11]
    by_position = {int(p): i for i, p in enumerate(fused["positions"])}
    dense_only, sparse_only = by_position[4], by_position[11]
    assert fused["dense_ranks"][dense_only] == 1 and fused["sparse_ranks"][dense_only] == 0
    assert fused["dense_scores"][dense_only] == np.float32(0.8) and np.isnan(fused["sparse_scores"][dense_only])
    assert fused["sparse_ranks"][sparse_only] == 1 and fused["dense_ranks"][sparse_only] == 0
    assert fused["sparse_scores"][sparse_only] == np.float32(7.5) and np.isnan(fused["dense_scores"][sparse_only])


def test_the_union_keeps_every_candidate_of_both_lists_once_with_both_ranks():
    fused = fuse_lists(*DENSE, *SPARSE)
    assert sorted(fused["positions"].tolist()) == [3, 5, 7, 8, 9]  # padding left out, 3 once
    rows = {int(p): (int(d), int(s)) for p, d, s in zip(fused["positions"], fused["dense_ranks"], fused["sparse_ranks"])}
    assert rows == {5: (1, 0), 3: (2, 1), 8: (3, 0), 7: (0, 2), 9: (0, 3)}
    both = int(np.flatnonzero(fused["positions"] == 3)[0])
    assert (fused["dense_scores"][both], fused["sparse_scores"][both]) == (np.float32(0.5), np.float32(12.0))
    for key in ("positions", "dense_ranks", "sparse_ranks"):
        assert fused[key].dtype.kind == "i"
    for key in ("scores", "dense_scores", "sparse_scores"):
        assert fused[key].dtype == np.float32


def test_weighted_fusion_on_a_hand_computed_example():
    # dense min-max: 5 -> 1, 3 -> 0.5, 8 -> 0; BM25: 3 -> 1, 7 -> 1/3, 9 -> 0; w = 0.5
    fused = fuse_lists(*DENSE, *SPARSE, method="weighted", dense_weight=0.5)
    assert fused["positions"].tolist() == [3, 5, 7, 8, 9]  # 8 and 9 tie at 0: the smaller position first
    np.testing.assert_allclose(fused["scores"], [0.75, 0.5, 1 / 6, 0.0, 0.0], rtol=1e-6)


def test_weighted_fusion_with_dense_weight_1_is_the_dense_order():
    rng = np.random.default_rng(3)
    for _ in range(20):
        dense_positions = rng.choice(100, size=15, replace=False)
        dense_scores = np.sort(rng.random(15).astype(np.float32))[::-1]
        sparse_positions = rng.choice(100, size=15, replace=False)
        sparse_scores = np.sort(rng.random(15).astype(np.float32) * 20)[::-1]
        fused = fuse_lists(dense_positions, dense_scores, sparse_positions, sparse_scores, dense_weight=1.0)
        from_dense = fused["positions"][fused["dense_ranks"] > 0]
        assert np.array_equal(from_dense, dense_positions)
        assert np.array_equal(fused["dense_ranks"][fused["dense_ranks"] > 0], np.arange(1, 16))
        # BM25 counts nothing: its documents score 0 (as the worst dense document does).
        assert np.all(fused["scores"][fused["dense_ranks"] == 0] == 0)
        # And weight 0 is the BM25 order.
        fused = fuse_lists(dense_positions, dense_scores, sparse_positions, sparse_scores, dense_weight=0.0)
        assert np.array_equal(fused["positions"][fused["sparse_ranks"] > 0], sparse_positions)


def test_rrf_on_a_hand_computed_example():
    fused = fuse_lists(*DENSE, *SPARSE, method="rrf", rrf_k=60)
    # 3: 1/62 + 1/61; 5: 1/61; 7: 1/62; 8: 1/63; 9: 1/63 (a tie: the smaller position first)
    assert fused["positions"].tolist() == [3, 5, 7, 8, 9]
    np.testing.assert_array_equal(fused["scores"], np.array([1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63, 1 / 63], dtype=np.float32))

    # k = 1: dense 1, 2, 3; BM25 3, 4, 5 -> 3: 1/4 + 1/2; 1: 1/2; 2 and 4: 1/3; 5: 1/4
    fused = fuse_lists(*lists([1, 2, 3], [3.0, 2.0, 1.0]), *lists([3, 4, 5], [9.0, 8.0, 7.0]), method="rrf", rrf_k=1)
    assert fused["positions"].tolist() == [3, 1, 2, 4, 5]
    np.testing.assert_array_equal(fused["scores"], np.array([0.75, 0.5, 1 / 3, 1 / 3, 0.25], dtype=np.float32))


@pytest.mark.parametrize("method", ["weighted", "rrf"])
def test_ties_go_to_the_smaller_position_whatever_the_input_order(method):
    # Each list has one document; both rank 1 with equal normalized scores: a tie.
    one = fuse_lists(*lists([40], [0.3]), *lists([7], [5.0]), method=method)
    two = fuse_lists(*lists([7], [0.3]), *lists([40], [5.0]), method=method)
    assert one["positions"].tolist() == two["positions"].tolist() == [7, 40]
    assert one["scores"][0] == one["scores"][1]
    # Swapping the retrievers (weight 0.5) gives the same fused list.
    swapped = fuse_lists(*SPARSE, *DENSE, method=method)
    straight = fuse_lists(*DENSE, *SPARSE, method=method)
    assert np.array_equal(swapped["positions"], straight["positions"]) and np.array_equal(swapped["scores"], straight["scores"])


def test_empty_lists_and_unknown_methods():
    empty = fuse_lists(*lists([-1, -1], [-np.inf, -np.inf]), *lists([], []))
    assert all(len(values) == 0 for values in empty.values())
    with pytest.raises(ValueError, match="unknown fusion method 'max'"):
        fuse_lists(*DENSE, *SPARSE, method="max")
    assert minmax(np.array([2.0, 2.0])).tolist() == [1.0, 1.0]


# --- first_stage: the Ray Data batch function ------------------------------------------------------

TOP_K = 4


def batch_of_two_queries() -> dict[str, np.ndarray]:
    """Two queries: the first with DENSE / SPARSE, the second with a full dense list and one BM25 hit."""
    return {
        "query_id": np.array(["a", "b"], dtype=object),
        "query_text": np.array(["text a", "text b"], dtype=object),
        "query_embedding": np.zeros((2, 8), dtype=np.float32),
        "candidate_positions": np.stack([DENSE[0], np.array([20, 21, 22, 23])]),
        "candidate_scores": np.stack([DENSE[1], np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32)]),
        "sparse_positions": np.stack([SPARSE[0], np.array([30, -1, -1, -1])]),
        "sparse_scores": np.stack([SPARSE[1], np.array([2.0, -np.inf, -np.inf, -np.inf], dtype=np.float32)]),
    }


def test_first_stage_hybrid_pads_the_union_to_twice_top_k_with_both_ranks():
    batch = first_stage(batch_of_two_queries(), "hybrid", TOP_K, "rrf")
    assert candidate_width("hybrid", TOP_K) == 2 * TOP_K
    for column in CANDIDATE_COLUMNS:
        assert batch[column].shape == (2, 2 * TOP_K), column
    assert not {"sparse_positions", "sparse_scores", "query_embedding"} & set(batch)  # transient columns dropped
    positions = batch["candidate_positions"]
    assert positions[0].tolist() == [3, 5, 7, 8, 9, -1, -1, -1]
    assert batch["candidate_dense_ranks"][0].tolist() == [2, 1, 0, 3, 0, 0, 0, 0]
    assert batch["candidate_sparse_ranks"][0].tolist() == [1, 0, 2, 0, 3, 0, 0, 0]
    assert np.isneginf(batch["candidate_scores"][0, 5:]).all()
    assert np.isnan(batch["candidate_dense_scores"][0, [2, 4, 5, 6, 7]]).all()
    assert np.isnan(batch["candidate_sparse_scores"][0, [1, 3, 5, 6, 7]]).all()
    # Query b: 20 and 30 both rank 1 in their list (tie at 1/61), 20 first by position.
    assert positions[1].tolist() == [20, 30, 21, 22, 23, -1, -1, -1]
    assert batch["candidate_sparse_ranks"][1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert batch["candidate_sparse_scores"][1, 1] == np.float32(2.0)
    assert np.all(np.diff(batch["candidate_scores"][1, :5]) <= 0)


def test_first_stage_dense_keeps_the_dense_list_at_top_k():
    batch = first_stage(batch_of_two_queries(), "dense", TOP_K)
    for column in CANDIDATE_COLUMNS:
        assert batch[column].shape == (2, TOP_K), column
    assert batch["candidate_positions"].tolist() == [[5, 3, 8, -1], [20, 21, 22, 23]]
    np.testing.assert_array_equal(batch["candidate_scores"][0, :3], DENSE[1][:3])
    assert np.isneginf(batch["candidate_scores"][0, 3])
    assert batch["candidate_dense_ranks"].tolist() == [[1, 2, 3, 0], [1, 2, 3, 4]]
    assert (batch["candidate_sparse_ranks"] == 0).all() and np.isnan(batch["candidate_sparse_scores"]).all()


def test_first_stage_sparse_keeps_the_bm25_list_at_top_k():
    batch = first_stage(batch_of_two_queries(), "sparse", TOP_K)
    for column in CANDIDATE_COLUMNS:
        assert batch[column].shape == (2, TOP_K), column
    assert batch["candidate_positions"].tolist() == [[3, 7, 9, -1], [30, -1, -1, -1]]
    np.testing.assert_array_equal(batch["candidate_scores"][0, :3], SPARSE[1][:3])
    assert batch["candidate_sparse_ranks"].tolist() == [[1, 2, 3, 0], [1, 0, 0, 0]]
    assert (batch["candidate_dense_ranks"] == 0).all() and np.isnan(batch["candidate_dense_scores"]).all()


def test_first_stage_sparse_without_dense_columns():
    batch = batch_of_two_queries()
    for name in ("candidate_positions", "candidate_scores", "query_embedding"):
        del batch[name]  # sparse mode runs no encoder and no dense searcher
    batch = first_stage(batch, "sparse", TOP_K)
    assert batch["candidate_positions"].tolist() == [[3, 7, 9, -1], [30, -1, -1, -1]]


def test_first_stage_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="unknown search mode"):
        first_stage(batch_of_two_queries(), "auto", TOP_K)


# --- the search mode ---------------------------------------------------------------------------------

WITH_SPARSE = {"version_id": "v1", "sparse": {"shards": [], "statistics": {}}}
WITHOUT_SPARSE = {"version_id": "v2", "sparse": None}


def test_auto_is_hybrid_with_a_bm25_part_and_dense_without():
    assert resolve_search_mode("auto", WITH_SPARSE) == "hybrid"
    assert resolve_search_mode("auto", WITHOUT_SPARSE) == "dense"
    assert resolve_search_mode("auto", {"version_id": "old"}) == "dense"  # a manifest from before BM25
    for mode in ("dense", "sparse", "hybrid"):
        assert resolve_search_mode(mode, WITH_SPARSE) == mode
    assert resolve_search_mode("dense", WITHOUT_SPARSE) == "dense"


@pytest.mark.parametrize("mode", ["sparse", "hybrid"])
def test_bm25_modes_on_an_index_without_a_bm25_part_are_an_error(mode):
    with pytest.raises(IndexValidationError, match=f"--search.mode {mode}: index version v2 has no BM25 part.*use --search.mode dense"):
        resolve_search_mode(mode, WITHOUT_SPARSE)


@pytest.mark.parametrize("settings, message", [
    ({"mode": "lexical"}, "--search.mode lexical"),
    ({"hybrid_fusion": "max"}, "--search.hybrid-fusion max"),
    ({"dense_weight": 1.5}, "--search.dense-weight 1.5"),
    ({"rrf_k": 0}, "rrf"),
])
def test_search_config_rejects_bad_hybrid_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**settings).validate()
