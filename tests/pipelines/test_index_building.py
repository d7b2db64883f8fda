"""Index building (pipelines.index_building): the parameter rule, shard ranges, recall, resume.

The recall test follows faiss/contrib: seeded, structured synthetic vectors, exact neighbours by
brute force, and the index built with the pipeline's own functions (parts -> locate -> sample ->
train -> fill shards), searched shard by shard and merged.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pytest
from conftest import store_vectors, write_index_version

from pipelines import index_building, index_store, storage
from pipelines.config import parse_config
from pipelines.documents import content_hash
from pipelines.embedding import EmbeddingConfig, EmbeddingStore, embeddings_to_arrow, first_copies, string_prefix_hashes
from pipelines.index_building import (
    FINGERPRINT_BLOCK_ROWS,
    IndexConfig,
    IndexPlan,
    MemoryBudgetError,
    build_shards,
    choose_index_parameters,
    estimate_index_bytes,
    fill_shard,
    hash_join,
    ivf_list_count,
    ivf_lists,
    ivf_nprobe,
    locate_vectors,
    make_empty_index,
    memory_bytes,
    parse_bytes,
    pq_subquantizers,
    read_training_vectors,
    rescoring_bytes,
    sample_positions,
    shard_ranges,
    sources_for_range,
    train_index,
    training_sources,
    version_fingerprint,
)
from pipelines.indexing import _rows_to_embed
from pipelines.shard_search import SearchConfig, ShardSearcher

# --- the parameter rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "dimension", "factory", "nprobe", "shards", "sample"),
    [
        (1, 384, "Flat", 0, 1, 0),
        (249_999, 384, "Flat", 0, 1, 0),  # exact search under 250,000 vectors
        (250_000, 384, "IVF2048,PQ192x4fs", 269, 1, 131_072),  # 4 sqrt(n) = 2000 -> 2048 lists; 269 lists scan 32,768 vectors
        (300_000, 64, "IVF2048,PQ32x4fs", 224, 1, 131_072),  # one 4-bit fast-scan sub-quantizer per 2 dimensions
        (1_000_000, 384, "IVF4096,PQ192x4fs", 135, 1, 262_144),  # bench.index: recall@100 0.970, 20x Flat
        (2_500_001, 768, "IVF4096,PQ384x4fs", 128, 3, 262_144),  # at least 1/32 of the lists; one shard per started million; lists capped
        (10_000_000, 384, "IVF4096,PQ192x4fs", 128, 10, 262_144),  # 4,096 lists at most: the build stays linear in n
    ],
)
def test_parameters_follow_the_corpus_size(count, dimension, factory, nprobe, shards, sample):
    plan = choose_index_parameters(count, dimension, IndexConfig())
    assert plan == IndexPlan(factory=factory, nprobe=nprobe, shards=shards, training_sample=sample, seed=1234)


def test_ivf_lists_never_get_fewer_than_39_training_points_and_nprobe_scans_32k_vectors():
    for count in (2_000, 3_000, 5_000, 50_000, 250_000, 400_000, 3_000_000):
        nlist = ivf_lists(count)
        assert nlist >= 1 and count // nlist >= 39, (count, nlist)
        nprobe = ivf_nprobe(nlist, count)
        assert nlist // 32 <= nprobe <= nlist
        assert nprobe == nlist or nprobe == nlist // 32 or 32_768 <= nprobe * count / nlist < 32_768 + count / nlist
        plan = choose_index_parameters(count, 32, IndexConfig(memory_budget=str(count * 100)))  # below Flat's 136 B/vector
        assert plan.factory == f"IVF{nlist},PQ16x4fs" and plan.nprobe == nprobe, plan


def test_explicit_settings_override_the_rule():
    config = IndexConfig(factory="IVF64,Flat", shards=5, nprobe=3, training_sample=1_000, seed=7, memory_budget="1kB")
    assert choose_index_parameters(10_000, 32, config) == IndexPlan("IVF64,Flat", 3, 5, 1_000, 7)  # an explicit factory ignores the budget
    # never more shards than documents, never a larger sample than there are vectors
    assert choose_index_parameters(3, 32, IndexConfig(shards=8, training_sample=10)).shards == 3
    assert choose_index_parameters(3, 32, IndexConfig(factory="IVF1,Flat", training_sample=10)).training_sample == 3
    assert choose_index_parameters(500, 32, IndexConfig(factory="HNSW16")).nprobe == 0


@pytest.mark.parametrize(
    ("budget", "factory", "code"),
    [
        ("0", "IVF4096,PQ192x4fs", "float16"),  # no limit: float16 re-scoring vectors, as before the setting
        ("8GiB", "IVF4096,PQ192x4fs", "float16"),
        ("885MB", "IVF4096,PQ192x4fs", "float16"),  # 116.6 MB of index + 768 MB of float16 re-scoring vectors
        ("884MB", "IVF4096,PQ192x4fs", "sq8"),  # 116.6 + 384 MB: recall@100 0.966, above PQ128x4fs (0.947) or PQ48 (0.957) with float16
        ("500MB", "IVF4096,PQ192x4fs", "sq6"),  # 116.6 + 288 MB: 0.951
        ("404MB", "IVF4096,PQ128x4fs", "sq6"),  # 82.5 + 288 MB: 0.933, the last fast-scan pair
        ("370MB", "IVF4096,PQ64", "sq6"),  # 8-bit codes only when no fast-scan pair fits: 78.7 + 288 MB, 0.950
        ("360MB", "IVF4096,PQ48", "sq6"),
        ("340MB", "IVF4096,PQ32", "sq6"),  # not measured with sq6
    ],
)
def test_the_memory_budget_picks_the_best_measured_pair_that_fits(budget, factory, code):
    plan = choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget=budget))
    assert (plan.factory, plan.rescoring_code, plan.nprobe) == (factory, code, 135)
    assert parse_bytes(budget) == 0 or memory_bytes(factory, 1_000_000, 384, 1, code) <= parse_bytes(budget)


def test_the_goal_budget_of_400_bytes_per_vector_at_10m_and_explicit_codes():
    plan = choose_index_parameters(10_000_000, 384, IndexConfig(memory_budget=str(400 * 10_000_000)))
    assert (plan.factory, plan.rescoring_code, plan.shards, plan.nprobe) == ("IVF4096,PQ128x4fs", "sq6", 10, 128)
    assert memory_bytes("IVF4096,PQ128x4fs", 10_000_000, 384, 10, "sq6") == 3_705_103_360  # 370.5 B/vector
    assert memory_bytes("IVF4096,PQ192x4fs", 10_000_000, 384, 10, "sq6") > 400 * 10_000_000  # 404.6 B/vector
    # an explicit code keeps to it: float16 does not fit 400 B/vector with any index
    with pytest.raises(MemoryBudgetError, match=r"IVF4096,PQ6 with float16 re-scoring codes, needs about 7,886,846,720 B \(789 B/vector, 768 of them "
                       r"re-scoring data\); re-scoring codes considered: float16 \(768 B/vector\)"):
        choose_index_parameters(10_000_000, 384, IndexConfig(memory_budget=str(400 * 10_000_000), rescoring_code="float16"))
    assert choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget="884MB", rescoring_code="float16")).factory == "IVF4096,PQ128x4fs"
    assert choose_index_parameters(1_000_000, 384, IndexConfig(rescoring_code="sq6")).rescoring_code == "sq6"  # no budget: the rule's index, the code asked for
    # an explicit factory: the first code that fits with it, float16 when none does (an explicit factory is not refused)
    for budget, code in (("0", "float16"), ("885MB", "float16"), ("600MB", "sq8"), ("450MB", "sq6"), ("100MB", "float16")):
        assert choose_index_parameters(1_000_000, 384, IndexConfig(factory="IVF4096,PQ192x4fs", memory_budget=budget)).rescoring_code == code
    assert choose_index_parameters(1_000_000, 384, IndexConfig(factory="IVF64,Flat", rescoring_code="sq8")).rescoring_code == "float16"  # exact: nothing re-scored
    with pytest.raises(ValueError, match="--rescoring-code sq4: choose auto, float16, sq8, sq6"):
        IndexConfig(rescoring_code="sq4").validate()
    assert parse_config(IndexConfig, ["--rescoring-code", "sq8"]).rescoring_code == "sq8"  # --faiss.rescoring-code in jobs.build_index


@pytest.mark.parametrize(("factory", "rescoring"), [("IVF4096,PQ192x4fs", 2 * 384), ("IVF4096,PQ48", 2 * 384), ("IVF64,SQ8", 2 * 384), ("Flat", 0), ("IVF64,Flat", 0)])
def test_the_budget_counts_re_scoring_data_for_compressed_indexes_only(factory, rescoring):
    assert rescoring_bytes(factory, 1_000_000, 384) == 1_000_000 * rescoring
    for code, per_dimension in (("sq8", 1), ("sq6", 0.75)):
        assert rescoring_bytes(factory, 1_000_000, 384, code) == (1_000_000 * int(384 * per_dimension) if rescoring else 0)
    assert memory_bytes(factory, 1_000_000, 384, shards=2) == estimate_index_bytes(factory, 1_000_000, 384, shards=2) + 1_000_000 * rescoring
    if factory == "IVF4096,PQ192x4fs":  # the rule's choice at 1M: one byte short of index + float16 vectors, sq8 codes are chosen
        assert choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget=str(memory_bytes(factory, 1_000_000, 384)))).rescoring_code == "float16"
        plan = choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget=str(memory_bytes(factory, 1_000_000, 384) - 1)))
        assert (plan.factory, plan.rescoring_code) == (factory, "sq8")
        with pytest.raises(MemoryBudgetError):  # room for the index alone is not enough
            choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget=str(estimate_index_bytes(factory, 1_000_000, 384))))


def test_a_budget_below_flat_gives_a_compressed_index_and_one_that_nothing_fits_is_an_error():
    assert choose_index_parameters(100_000, 384, IndexConfig(memory_budget="200MB")).factory == "Flat"  # 154.4 MB
    assert choose_index_parameters(100_000, 384, IndexConfig(memory_budget="100MB")).factory == "IVF1024,PQ192x4fs"  # 11.7 + 76.8 MB
    with pytest.raises(MemoryBudgetError, match=r"memory_budget 300,000,000 B is too small for 1,000,000 384-d vectors in 1 shard\(s\): the smallest index "
                       r"considered, IVF4096,PQ6 with sq6 re-scoring codes, needs about 308,684,672 B \(309 B/vector, 288 of them re-scoring data\); "
                       r"re-scoring codes considered: float16 \(768 B/vector\), sq8 \(384 B/vector\), sq6 \(288 B/vector\)"):
        choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget="300MB"))  # 20.7 MB of index
    with pytest.raises(MemoryBudgetError, match="1,000 vectors are too few for a compressed"):
        choose_index_parameters(1_000, 384, IndexConfig(memory_budget="100kB"))
    # each shard holds its own copy of the coarse quantizer
    one, four = (estimate_index_bytes("IVF4096,PQ48", 4_000_000, 384, shards) for shards in (1, 4))
    assert four - one == 3 * (4096 * 384 * 4 + 4 * 384 * 256)


@pytest.mark.parametrize(("text", "expected"), [("0", 0), (0, 0), (12345, 12345), ("8GiB", 8 * 1024**3), ("500MB", 500_000_000), ("1.5 kib", 1536), ("2e6", 2_000_000)])
def test_memory_budgets_are_byte_counts_with_units(text, expected):
    assert parse_bytes(text) == expected
    assert parse_config(IndexConfig, ["--memory-budget", str(text)]).memory_budget == str(text)  # --faiss.memory-budget in jobs.build_index


@pytest.mark.parametrize("text", ["lots", "8 GiBs", "-1", ""])
def test_a_memory_budget_that_is_not_a_byte_count_is_refused(text):
    with pytest.raises(ValueError, match="not a byte count"):
        parse_bytes(text)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ4", "IVF16,PQ16x4fs", "IVF16,Flat"])
def test_the_size_estimate_matches_the_serialized_index(factory):
    vectors = clustered_vectors(2_000, 32, seed=4)
    index = index_store.deserialize_index(train_index(factory, vectors, seed=0))
    index.add_with_ids(vectors, np.arange(2_000, dtype=np.int64))
    actual = len(index_store.serialize_index(index))
    assert abs(estimate_index_bytes(factory, 2_000, 32) - actual) <= 0.03 * actual, actual  # fast-scan padding is an expectation


@pytest.mark.parametrize(("dimension", "expected"), [(384, 48), (768, 96), (64, 8), (32, 4), (100, 10), (30, 3), (7, 1), (8, 1)])
def test_pq_uses_a_divisor_of_the_dimension_near_one_code_per_8_dimensions(dimension, expected):
    assert pq_subquantizers(dimension) == expected
    assert dimension % pq_subquantizers(dimension) == 0


def test_shard_ranges_are_contiguous_balanced_and_cover_everything():
    for count, shards in [(10, 1), (10, 3), (7, 7), (1_000_003, 4), (5, 2)]:
        ranges = shard_ranges(count, shards)
        assert len(ranges) == shards
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(shards - 1))
        sizes = [end - start for start, end in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_flat_indexes_take_ids_and_ivf_indexes_are_not_wrapped():
    flat = make_empty_index("Flat", 8)
    assert isinstance(flat, faiss.IndexIDMap2) and flat.metric_type == faiss.METRIC_INNER_PRODUCT
    flat.add_with_ids(np.eye(8, dtype=np.float32), np.arange(100, 108))
    assert flat.search(np.eye(8, dtype=np.float32)[2:3], 1)[1][0, 0] == 102
    ivf = make_empty_index("IVF4,PQ2", 8)
    assert faiss.extract_index_ivf(ivf).nlist == 4 and ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ivf_list_count("Flat", 8) == 0


# --- synthetic data ------------------------------------------------------------------------------


def clustered_vectors(count: int, dimension: int, seed: int, clusters: int = 100, intrinsic: int = 8) -> np.ndarray:
    """Normalized vectors in clusters, each spread over its own low-dimensional subspace plus a little noise.

    Like real embeddings, the data has a low intrinsic dimension, so nearest neighbours are meaningful.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dimension)).astype(np.float32)
    bases = (rng.standard_normal((clusters, intrinsic, dimension)) / np.sqrt(intrinsic)).astype(np.float32)
    labels = rng.integers(0, clusters, count)
    spread = rng.standard_normal((count, intrinsic)).astype(np.float32)
    vectors = centers[labels] + 2.0 * np.einsum("ni,nid->nd", spread, bases[labels]) + 0.1 * rng.standard_normal((count, dimension)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def search_shards(shard_indexes: list[faiss.Index], queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k global positions over every shard (each shard searched on its own, results merged by score)."""
    scores, positions = zip(*(index.search(queries, k) for index in shard_indexes))
    scores, positions = np.hstack(scores), np.hstack(positions)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(positions, best, axis=1)


# --- recall --------------------------------------------------------------------------------------


def test_ivf_pq_index_finds_its_own_vectors(tmp_path):
    count, dimension = 20_000, 64
    vectors = clustered_vectors(count, dimension, seed=0)
    documents, store = store_vectors(tmp_path, vectors, parts=4, seed=1)
    located = locate_vectors(documents, store.keys())
    plan = choose_index_parameters(count, dimension, IndexConfig(shards=3, memory_budget="3.6MB", rescoring_code="float16"))  # Flat: 5.3 MB; PQ32x4fs + float16 vectors: 3.8 MB
    assert plan.factory == "IVF512,PQ16x4fs" and plan.nprobe == 512  # (the fast-scan code of one sub-quantizer per 3 dimensions: 21 -> 16)  # 20,000 vectors: probing every list scans fewer than 32k

    positions = sample_positions(count, plan.training_sample, plan.seed)
    assert len(positions) == plan.training_sample and np.all(np.diff(positions) > 0)
    training = read_training_vectors(located, positions)
    np.testing.assert_array_equal(training, vectors[positions])
    trained = train_index(plan.factory, training, plan.seed)

    folder = str(tmp_path / "version")
    shard_indexes = []
    for shard, (start, end) in enumerate(shard_ranges(count, plan.shards)):
        stats = fill_shard(trained, sources_for_range(located, start, end), start, end - start, dimension, folder, shard, str(tmp_path))
        assert (stats["shard"], stats["count"], stats["first_position"]) == (shard, end - start, start)
        data = storage.read_bytes(f"{folder}/{stats['file']}")
        assert storage.sha256_bytes(data) == stats["sha256"] and len(data) == stats["bytes"]
        assert storage.read_json(f"{folder}/{index_store.shard_name(shard)}.json") == stats
        stored = storage.read_bytes(f"{tmp_path}/{stats['vectors_file']}")  # under the root's vectors/, named by its content
        assert stats["vectors_file"] == f"vectors/{storage.sha256_bytes(stored)[:32]}.npy" and stats["vectors_sha256"] == storage.sha256_bytes(stored)
        assert (stats["vectors_dtype"], stats["vectors_bytes"]) == ("float16", len(stored)) and len(stored) < 2 * dimension * (end - start) + 200
        np.testing.assert_array_equal(index_store.vectors_from_bytes(stored), vectors[start:end].astype(np.float16))
        index = index_store.deserialize_index(data)
        assert index.ntotal == end - start
        faiss.extract_index_ivf(index).nprobe = plan.nprobe
        shard_indexes.append(index)

    queries = np.sort(np.random.default_rng(2).choice(count, size=1_000, replace=False))
    exact_index = faiss.IndexFlatIP(dimension)
    exact_index.add(vectors)
    _, nearest = exact_index.search(vectors[queries], 1)
    found = search_shards(shard_indexes, vectors[queries], k=10)
    recall = float(np.mean([nearest[i, 0] in found[i] for i in range(len(queries))]))
    assert recall >= 0.95, f"1-recall@10 = {recall:.3f}"


def test_a_fast_scan_index_round_trips_through_fill_shard_and_loading_and_finds_neighbours(tmp_path):
    count, dimension = 4_000, 32
    vectors = clustered_vectors(count, dimension, seed=11)
    manifest = write_index_version(tmp_path, "IVF32,PQ16x4fs", vectors, shards=2, nprobe=16)
    assert manifest["index"]["training_sample"] == count  # the rule's sample (at least 39 x 256), capped at the corpus
    queries = vectors[::20]
    exact = queries @ vectors.T
    truth = np.argsort(-exact, axis=1)[:, :10]

    def search(config: SearchConfig) -> dict:
        searchers = [ShardSearcher(str(tmp_path), "v1", shard, config) for shard in range(2)]  # checksums verified
        for searcher, entry in zip(searchers, manifest["shards"]):
            ivf = faiss.downcast_index(faiss.extract_index_ivf(searcher.shard.index))
            assert isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.nprobe == 16 and ivf.ntotal == entry["count"]
            assert searcher.rescoring == config.exact_rescoring
            if config.exact_rescoring:  # float16, memory-mapped from the root's vectors/
                assert isinstance(searcher.shard.vectors, np.memmap) and searcher.shard.vectors.dtype == np.float16
                assert searcher.shard.vectors.shape == (entry["count"], dimension)
            else:
                assert searcher.shard.vectors is None
        batch = {"query_embedding": queries}
        for searcher in searchers:
            batch = searcher(batch)
        batch["recall"] = np.mean([len(set(truth[i]) & set(batch["candidate_positions"][i])) / 10 for i in range(len(queries))])
        return batch

    rescored, approximate = search(SearchConfig(top_k=10)), search(SearchConfig(top_k=10, exact_rescoring=False))
    assert rescored["recall"] >= 0.95 > approximate["recall"], (rescored["recall"], approximate["recall"])  # 0.98 and 0.75
    # Re-scored against the stored float16 vectors: exact for them, within float16 rounding of the float32 products.
    stored = queries @ vectors.astype(np.float16).astype(np.float32).T
    np.testing.assert_allclose(rescored["candidate_scores"], np.take_along_axis(stored, rescored["candidate_positions"], axis=1), atol=1e-5)
    np.testing.assert_allclose(rescored["candidate_scores"], np.take_along_axis(exact, rescored["candidate_positions"], axis=1), atol=5e-4)
    assert faiss.extract_index_ivf(ShardSearcher(str(tmp_path), "v1", 0, SearchConfig(nprobe=3)).shard.index).nprobe == 3


def test_training_reads_the_vectors_at_the_sampled_positions(tmp_path):
    vectors = clustered_vectors(500, 16, seed=3)
    documents, store = store_vectors(tmp_path, vectors, parts=3, seed=4)
    located = locate_vectors(documents, store.keys())
    positions = np.array([0, 7, 250, 499])
    np.testing.assert_array_equal(read_training_vectors(located, positions), vectors[positions])
    sample = sample_positions(500, 100, seed=5)
    np.testing.assert_array_equal(sample, sample_positions(500, 100, seed=5))
    assert len(np.unique(sample)) == 100 and not np.array_equal(sample, sample_positions(500, 100, seed=6))
    np.testing.assert_array_equal(sample_positions(50, 100, seed=5), np.arange(50))


# --- locating stored vectors ---------------------------------------------------------------------


def test_locate_vectors_takes_the_first_stored_copy_and_names_a_missing_document(tmp_path):
    vectors = clustered_vectors(20, 8, seed=0)
    documents, store = store_vectors(tmp_path, vectors, parts=2, seed=0)
    # a second copy of doc5's vector (e.g. from a rerun that embedded it again) in a later part
    later = pa.table({"id": ["doc5"], "text_hash": ["hash5"], "embedding": embeddings_to_arrow(vectors[[5]])})
    storage.write_parquet_atomically(storage.join_url(store.url, "part-999.parquet"), later)
    located = locate_vectors(documents, store.keys())
    assert located["position"].to_pylist() == list(range(20))
    assert "part-999" not in located["part"][5].as_py()

    changed = documents.set_column(2, "text_hash", pa.array([f"hash{i}" if i != 13 else "new" for i in range(20)]))
    with pytest.raises(RuntimeError, match="1 documents have no stored embedding \\(for example id 'doc13'\\)"):
        locate_vectors(changed, store.keys())


def test_fill_shard_refuses_positions_without_vectors(tmp_path):
    vectors = clustered_vectors(30, 8, seed=0)
    documents, store = store_vectors(tmp_path, vectors, parts=1, seed=0)
    located = locate_vectors(documents, store.keys())
    trained = train_index("Flat", vectors[:1], seed=0)
    sources = [(part, rows[1:], positions[1:]) for part, rows, positions in sources_for_range(located, 10, 20)]
    with pytest.raises(RuntimeError, match="shard 1: 1 positions have no stored vector"):
        fill_shard(trained, sources, 10, 10, 8, str(tmp_path / "version"), 1, str(tmp_path))
    assert not os.path.exists(tmp_path / "version" / "shard-00001.json")
    assert not os.path.exists(tmp_path / "vectors")


def test_an_unchanged_shard_references_the_vectors_file_an_earlier_version_wrote(tmp_path):
    count, dimension = 600, 16
    vectors = clustered_vectors(count, dimension, seed=5)
    changed = vectors.copy()
    changed[450] = vectors[7]  # one document of shard 1 was edited and embedded again
    root = str(tmp_path / "index")
    trained = train_index("Flat", vectors[:1], seed=0)

    def build(version: str, data: np.ndarray) -> list[dict]:
        documents, store = store_vectors(tmp_path / f"embeddings-{version}", data, parts=2, seed=len(version))
        located = locate_vectors(documents, store.keys())
        folder = index_store.version_url(root, version)
        return [fill_shard(trained, sources_for_range(located, start, end), start, end - start, dimension, folder, shard, root)
                for shard, (start, end) in enumerate(shard_ranges(count, 2))]

    def stamp(entry: dict) -> tuple[int, int]:
        status = os.stat(os.path.join(root, entry["vectors_file"]))
        return status.st_ino, status.st_mtime_ns

    first = build("v1", vectors)
    written = [stamp(entry) for entry in first]
    second = build("v2", changed)
    assert {key: second[0][key] for key in second[0] if key.startswith("vectors")} == {key: first[0][key] for key in first[0] if key.startswith("vectors")}
    assert stamp(second[0]) == written[0]  # referenced, not written again
    assert second[1]["vectors_file"] != first[1]["vectors_file"] and stamp(first[1]) == written[1]  # the old version's file stays
    assert len(os.listdir(os.path.join(root, "vectors"))) == 3
    assert not [name for version in ("v1", "v2") for name in os.listdir(index_store.version_url(root, version)) if "vectors" in name]
    for version, entries in (("v1", first), ("v2", second)):
        manifest = {"version_id": version, "model": {"dimension": dimension}, "shards": entries}
        loaded = np.vstack([index_store.load_shard_vectors(root, manifest, shard) for shard in range(2)])
        np.testing.assert_array_equal(loaded, (vectors if version == "v1" else changed).astype(np.float16))

    # A damaged shared file is rewritten (same name, same bytes) by the next build that needs it.
    path = os.path.join(root, first[0]["vectors_file"])
    with open(path, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\xff\xff\xff")
    assert build("v3", vectors) == first
    assert stamp(first[0]) != written[0] and storage.sha256_bytes(storage.read_bytes(path)) == first[0]["vectors_sha256"]


def test_the_store_lists_each_key_once_at_its_first_copy_with_the_part_url_held_once(tmp_path):
    vectors = clustered_vectors(12, 8, seed=0)
    documents, store = store_vectors(tmp_path, vectors, parts=2, seed=0)
    first_parts = store.parts()
    # a rerun stored doc3 again, and doc4 under a new text (a valid key of its own), in a later part
    later = pa.table({"id": ["doc3", "doc4"], "text_hash": ["hash3", "changed"], "embedding": embeddings_to_arrow(vectors[[3, 4]])})
    storage.write_parquet_atomically(storage.join_url(store.url, "part-999.parquet"), later)
    keys = store.keys()
    assert keys.num_rows == 13 and keys.schema.field("part").type == pa.dictionary(pa.int32(), pa.string())
    assert keys["part"].combine_chunks().dictionary.to_pylist() == store.parts() and store.parts()[:2] == first_parts and store.parts()[2].endswith("part-999.parquet")
    pairs = list(zip(keys["id"].to_pylist(), keys["text_hash"].to_pylist()))
    assert pairs.count(("doc3", "hash3")) == 1 and ("doc4", "changed") in pairs and ("doc4", "hash4") in pairs
    for key_id, text_hash, part, row in zip(*(keys[column].to_pylist() for column in ("id", "text_hash", "part", "row"))):
        stored = storage.read_parquet(part, columns=["id", "text_hash"]).slice(row, 1)  # part decodes to the URL, row is the row in it
        assert (stored["id"][0].as_py(), stored["text_hash"][0].as_py()) == (key_id, text_hash)
        assert key_id != "doc3" or part in first_parts
    assert list(zip(keys["part"].combine_chunks().indices.to_pylist(), keys["row"].to_pylist())) == sorted(
        zip(keys["part"].combine_chunks().indices.to_pylist(), keys["row"].to_pylist())
    )
    assert EmbeddingStore(str(tmp_path / "empty"), EmbeddingConfig(model="synthetic")).keys().num_rows == 0


def test_only_exact_copies_of_a_key_are_dropped():
    # same text under two ids (equal text hashes), a copy, and text hashes longer than the hashed prefix
    long = "x" * 40
    keys = pa.table({
        "id": ["a", "b", "a", "c", "c", "d"],
        "text_hash": [content_hash("t"), content_hash("t"), content_hash("t"), long + "1", long + "2", long + "1"],
        "part": pa.DictionaryArray.from_arrays(pa.array([0, 0, 1, 1, 1, 1], pa.int32()), pa.array(["p0", "p1"])),
        "row": [0, 1, 0, 1, 2, 3],
    })
    kept = first_copies(keys)
    assert list(zip(kept["id"].to_pylist(), kept["part"].to_pylist(), kept["row"].to_pylist())) == [
        ("a", "p0", 0), ("b", "p0", 1), ("c", "p1", 1), ("c", "p1", 2), ("d", "p1", 3)
    ]
    unique = keys.slice(0, 2)
    assert first_copies(unique) is unique


def test_string_hashes_are_equal_for_equal_strings_whatever_the_chunking():
    values = ["", "a", "ab", content_hash("x"), content_hash("y"), "z" * 100, "z" * 100, "z" * 99]
    hashes = string_prefix_hashes(pa.chunked_array([pa.array(values)]))
    rechunked = string_prefix_hashes(pa.chunked_array([pa.array(values[:3]), pa.array(values[3:])]), block_rows=2)
    np.testing.assert_array_equal(hashes, rechunked)
    np.testing.assert_array_equal(string_prefix_hashes(pa.chunked_array([pa.array(values, pa.large_string())])), hashes)
    assert hashes[5] == hashes[6] and len(set(hashes[[0, 1, 2, 3, 4, 5, 7]].tolist())) == 7
    sliced = pa.chunked_array([pa.array(["pad", *values]).slice(1)])  # an array with an offset
    np.testing.assert_array_equal(string_prefix_hashes(sliced), hashes)


def test_a_join_split_by_text_hash_gives_the_same_rows(monkeypatch):
    left = pa.table({"id": [f"d{i}" for i in range(50)], "text_hash": [content_hash(str(i % 7)) for i in range(50)], "at": np.arange(50)})
    right = pa.table({"id": [f"d{i}" for i in range(0, 60, 3)], "text_hash": [content_hash(str(i % 7)) for i in range(0, 60, 3)], "stored": np.arange(20)})
    whole = [hash_join(left, right, ["id", "text_hash"], join, ["at"], out, "text_hash").sort_by("at") for join, out in (("left outer", ["stored"]), ("left anti", None))]
    monkeypatch.setattr(index_building, "JOIN_PARTITION_ROWS", 4)
    split = [hash_join(left, right, ["id", "text_hash"], join, ["at"], out, "text_hash").sort_by("at") for join, out in (("left outer", ["stored"]), ("left anti", None))]
    assert [table.to_pydict() for table in split] == [table.to_pydict() for table in whole]
    assert whole[0]["stored"].to_pylist()[:4] == [0, None, None, 1] and whole[1]["at"].to_pylist()[:3] == [1, 2, 4]


def test_locate_vectors_keeps_integers_per_position_and_the_first_of_duplicate_keys():
    urls = pa.array(["p0", "p1", "p2"])
    stored = pa.table({  # (part, row) order, as EmbeddingStore.keys(); "b" is stored in p0 and again in p2
        "id": ["a", "b", "x", "c", "b"],
        "text_hash": ["1", "2", "9", "3", "2"],
        "part": pa.DictionaryArray.from_arrays(pa.array([0, 0, 1, 1, 2], pa.int32()), urls),
        "row": [0, 1, 0, 1, 0],
    })
    documents = pa.table({"position": [2, 0, 1], "id": ["c", "b", "a"], "text_hash": ["3", "2", "1"]})
    located = locate_vectors(documents, stored)
    assert located.column_names == ["position", "part", "row"] and located.schema.field("part").type == pa.dictionary(pa.int32(), pa.string())
    assert located.to_pydict() == {"position": [0, 1, 2], "part": ["p0", "p0", "p1"], "row": [1, 0, 1]}
    plain = stored.set_column(2, "part", stored["part"].cast(pa.string()))  # URLs as strings are accepted too
    assert locate_vectors(documents, plain).to_pydict() == located.to_pydict()
    with pytest.raises(ValueError, match="positions must be 0..2"):
        locate_vectors(documents.set_column(0, "position", pa.array([0, 1, 1])), stored)


def test_sources_group_a_range_by_part_in_position_order():
    parts = pa.DictionaryArray.from_arrays(pa.array([2, 0, 2, 1, 0, 2, 1], pa.int32()), pa.array(["p0", "p1", "p2"]))
    located = pa.table({"position": np.arange(7), "part": parts, "row": [10, 11, 12, 13, 14, 15, 16]})
    sources = sources_for_range(located, 1, 6)
    assert [(url, rows.tolist(), positions.tolist()) for url, rows, positions in sources] == [
        ("p0", [11, 14], [1, 4]), ("p1", [13], [3]), ("p2", [12, 15], [2, 5])
    ]
    assert sources_for_range(located, 3, 3) == []
    sources = training_sources(located, np.array([6, 0, 1]))  # rows to read, and where they go in the sample
    assert [(url, rows.tolist(), offsets.tolist()) for url, rows, offsets in sources] == [("p0", [11], [2]), ("p1", [16], [0]), ("p2", [10], [1])]


# --- version ids ---------------------------------------------------------------------------------


def test_the_version_id_depends_on_documents_order_parameters_and_model():
    documents = pa.table({"id": ["a", "b", "c"], "text_hash": ["1", "2", "3"]})
    plan = IndexPlan("Flat", 0, 1, 0, 1234)
    model = {"model": "m", "normalize": True}
    version = version_fingerprint(documents, plan, model)
    assert version == version_fingerprint(documents, plan, dict(model))
    assert len(version) == 16
    others = [
        version_fingerprint(documents.take([1, 0, 2]), plan, model),
        version_fingerprint(documents.set_column(1, "text_hash", pa.array(["1", "2", "x"])), plan, model),
        version_fingerprint(documents.slice(0, 2), plan, model),
        version_fingerprint(documents, IndexPlan("Flat", 0, 2, 0, 1234), model),
        version_fingerprint(documents, plan, {**model, "model": "other"}),
    ]
    assert len({version, *others}) == 6


def test_the_version_id_does_not_depend_on_chunking_and_hashes_every_byte():
    count = FINGERPRINT_BLOCK_ROWS + 1_000
    documents = pa.table({"id": [f"doc{i}" for i in range(count)], "text_hash": [content_hash(str(i)) for i in range(count)]})
    plan, model = IndexPlan("Flat", 0, 1, 0, 1234), {"model": "m"}
    version = version_fingerprint(documents, plan, model)
    cuts = [0, 1, 70, FINGERPRINT_BLOCK_ROWS - 3, FINGERPRINT_BLOCK_ROWS + 500, count]
    rechunked = pa.concat_tables([documents.slice(start, end - start) for start, end in zip(cuts, cuts[1:])])
    assert rechunked["id"].num_chunks == 5 and version_fingerprint(rechunked, plan, model) == version
    large = documents.set_column(0, "id", documents["id"].cast(pa.large_string()))
    assert version_fingerprint(large, plan, model) == version
    others = [
        documents.set_column(0, "id", pa.array([f"doc{i}" for i in range(count - 1)] + ["doc"])),  # the last byte
        documents.take(np.r_[np.arange(count - 2), count - 1, count - 2]),  # the order, in the last block
        documents.set_column(1, "text_hash", pa.array([content_hash(str(i)) for i in range(count - 1)] + ["x"])),
    ]
    assert len({version, *(version_fingerprint(other, plan, model) for other in others)}) == 4
    # where one value ends and the next begins counts
    assert version_fingerprint(pa.table({"id": ["ab", "c"], "text_hash": ["1", "2"]}), plan, model) != version_fingerprint(
        pa.table({"id": ["a", "bc"], "text_hash": ["1", "2"]}), plan, model
    )
    with pytest.raises(ValueError, match="id: null values"):
        version_fingerprint(pa.table({"id": ["a", None], "text_hash": ["1", "2"]}), plan, model)


def test_rows_to_embed_keeps_the_rows_whose_order_key_is_listed():
    batch = pa.table({"order_key": [5, 1, 9, 3], "id": ["e", "a", "i", "c"], "text_hash": ["5", "1", "9", "3"], "content": ["E", "A", "I", "C"]})
    assert _rows_to_embed(batch, np.array([1, 2, 9, 10]))["id"].to_pylist() == ["a", "i"]
    assert _rows_to_embed(batch, pa.array([3, 5], pa.int64()), ("order_key", "content")).to_pydict() == {"order_key": [5, 3], "content": ["E", "C"]}
    assert _rows_to_embed(batch, np.array([], dtype=np.int64)).num_rows == 0


# --- build_shards on Ray: training once, filling in parallel, resuming ---------------------------


def file_stamps(folder) -> dict[str, int]:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def test_build_shards_resumes_only_the_unfinished_shard(ray_session, tmp_path):
    count, dimension = 3_000, 16
    vectors = clustered_vectors(count, dimension, seed=7)
    documents, store = store_vectors(tmp_path, vectors, parts=3, seed=8)
    located = locate_vectors(documents, store.keys())
    plan = IndexPlan(factory="IVF16,PQ4", nprobe=16, shards=3, training_sample=2_000, seed=9)
    folder = str(tmp_path / "version")

    stats = build_shards(located, plan, dimension, folder, str(tmp_path))
    assert [(s["shard"], s["first_position"], s["count"]) for s in stats] == [(0, 0, 1000), (1, 1000, 1000), (2, 2000, 1000)]
    built = file_stamps(folder)
    assert sorted(built) == sorted(["trained.faiss"] + [f"shard-0000{i}.{suffix}" for i in range(3) for suffix in ("faiss", "json")])
    shared = file_stamps(tmp_path / "vectors")
    assert sorted(shared) == sorted(entry["vectors_file"].removeprefix("vectors/") for entry in stats)
    indexes = []
    for entry in stats:
        index = index_store.deserialize_index(storage.read_bytes(f"{folder}/{entry['file']}"))
        faiss.extract_index_ivf(index).nprobe = plan.nprobe
        indexes.append(index)
    found = search_shards(indexes, vectors[::10], k=10)
    assert np.mean([position in row for position, row in zip(range(0, count, 10), found)]) >= 0.95

    # Complete: a rerun touches nothing.
    assert build_shards(located, plan, dimension, folder, str(tmp_path)) == stats
    assert file_stamps(folder) == built and file_stamps(tmp_path / "vectors") == shared

    # A crash while filling shard 1: its index file was written, its vectors and stats were not.
    os.remove(tmp_path / stats[1]["vectors_file"])
    os.remove(os.path.join(folder, "shard-00001.json"))
    resumed = build_shards(located, plan, dimension, folder, str(tmp_path))
    after = file_stamps(folder)
    assert resumed == stats  # same trained index, same vectors: the rebuilt shard is byte-identical
    rebuilt = {name for name in after if after[name] != built.get(name)}
    assert rebuilt == {"shard-00001.faiss", "shard-00001.json"}
    assert sorted(file_stamps(tmp_path / "vectors")) == sorted(shared)


def test_the_version_id_of_a_float16_plan_is_the_one_before_the_setting_and_other_codes_differ():
    import json

    from pipelines.index_building import documents_digest

    documents = pa.table({"id": ["a", "b"], "text_hash": ["1", "2"]})
    model = {"model": "m"}
    plan = IndexPlan("IVF16,PQ4", 16, 1, 100, 1234)
    before = documents_digest(json.dumps({"plan": {"factory": "IVF16,PQ4", "nprobe": 16, "shards": 1, "training_sample": 100, "seed": 1234}, "model": model},
                                         sort_keys=True).encode(), documents)[:16]
    assert plan.rescoring_code == "float16" and version_fingerprint(documents, plan, model) == before
    assert len({before, *(version_fingerprint(documents, IndexPlan("IVF16,PQ4", 16, 1, 100, 1234, code), model) for code in ("sq8", "sq6"))}) == 3


def test_build_shards_with_sq8_codes_trains_the_quantizer_once_and_resumes(ray_session, tmp_path):
    count, dimension = 3_000, 16
    vectors = clustered_vectors(count, dimension, seed=7)
    documents, store = store_vectors(tmp_path, vectors, parts=3, seed=8)
    located = locate_vectors(documents, store.keys())
    plan = IndexPlan(factory="IVF16,PQ4x4fs", nprobe=16, shards=2, training_sample=2_000, seed=9, rescoring_code="sq8")
    folder = index_store.version_url(str(tmp_path), "v1")

    stats = build_shards(located, plan, dimension, folder, str(tmp_path))
    quantizer = storage.read_bytes(f"{folder}/{index_store.RESCORING_QUANTIZER_FILE}")
    assert all((s["vectors_code"], s["quantizer_file"], s["quantizer_sha256"]) == ("sq8", "rescoring.faiss", storage.sha256_bytes(quantizer)) for s in stats)
    expected = index_store.train_rescoring_quantizer("sq8", vectors[sample_positions(count, plan.training_sample, plan.seed)])
    assert quantizer == expected  # trained on the index's training sample
    manifest = {"version_id": "v1", "model": {"dimension": dimension}, "index": {"nprobe": 16}, "shards": stats}
    queries = vectors[::100]
    for shard, entry in enumerate(stats):
        codes = index_store.load_shard_vectors(str(tmp_path), manifest, shard)
        assert codes.dtype == np.uint8 and codes.shape == (entry["count"], dimension)
        loaded = index_store.load_shard(str(tmp_path), manifest, shard, with_vectors=True)
        searcher = ShardSearcher.from_shard(loaded, SearchConfig(top_k=5))
        positions, scores = searcher.search(queries)
        decoded = loaded.codec.sa_decode(np.ascontiguousarray(codes))
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, decoded[positions - entry["first_position"]]), atol=1e-6)
    # a rerun reuses everything; a resumed build reuses the quantizer with the trained index
    built = file_stamps(folder)
    assert build_shards(located, plan, dimension, folder, str(tmp_path)) == stats and file_stamps(folder) == built
    os.remove(os.path.join(folder, "shard-00001.json"))
    assert build_shards(located, plan, dimension, folder, str(tmp_path)) == stats
    assert file_stamps(folder)["rescoring.faiss"] == built["rescoring.faiss"]
