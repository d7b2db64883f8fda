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

from pipelines import index_store, storage
from pipelines.config import parse_config
from pipelines.embedding import embeddings_to_arrow
from pipelines.index_building import (
    IndexConfig,
    IndexPlan,
    MemoryBudgetError,
    build_shards,
    choose_index_parameters,
    estimate_index_bytes,
    fill_shard,
    ivf_list_count,
    ivf_lists,
    ivf_nprobe,
    locate_vectors,
    make_empty_index,
    parse_bytes,
    pq_subquantizers,
    read_training_vectors,
    sample_positions,
    shard_ranges,
    sources_for_range,
    train_index,
    version_fingerprint,
)
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
        (2_500_001, 768, "IVF8192,PQ384x4fs", 256, 3, 500_000),  # at least 1/32 of the lists; one shard per started million; sample capped
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
    ("budget", "factory"),
    [
        ("0", "IVF4096,PQ192x4fs"),  # no limit
        ("8GiB", "IVF4096,PQ192x4fs"),
        ("117MB", "IVF4096,PQ192x4fs"),  # 116.6 MB
        ("100MB", "IVF4096,PQ48"),  # 8-bit PQ48 (62.7 MB): recall@100 0.957 against 0.897 for PQ96x4fs of the same size
        ("50MB", "IVF4096,PQ32"),
        ("30MB", "IVF4096,PQ12"),
    ],
)
def test_the_memory_budget_picks_the_largest_code_that_fits(budget, factory):
    plan = choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget=budget))
    assert plan.factory == factory and plan.nprobe == 135
    assert parse_bytes(budget) == 0 or estimate_index_bytes(factory, 1_000_000, 384) <= parse_bytes(budget)


def test_a_budget_below_flat_gives_a_compressed_index_and_one_that_nothing_fits_is_an_error():
    assert choose_index_parameters(100_000, 384, IndexConfig(memory_budget="200MB")).factory == "Flat"  # 154.4 MB
    assert choose_index_parameters(100_000, 384, IndexConfig(memory_budget="100MB")).factory == "IVF1024,PQ192x4fs"
    with pytest.raises(MemoryBudgetError, match=r"memory_budget 20,000,000 B is too small for 1,000,000 384-d vectors in 1 shard\(s\): "
                       r"the smallest index considered, IVF4096,PQ6, needs about 20,684,672 B \(21 B/vector\)"):
        choose_index_parameters(1_000_000, 384, IndexConfig(memory_budget="20MB"))
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
    plan = choose_index_parameters(count, dimension, IndexConfig(shards=3, memory_budget="1MB"))  # Flat would need 5.3 MB
    assert plan.factory == "IVF512,PQ8" and plan.nprobe == 512  # 20,000 vectors: probing every list scans fewer than 32k

    positions = sample_positions(count, plan.training_sample, plan.seed)
    assert len(positions) == plan.training_sample and np.all(np.diff(positions) > 0)
    training = read_training_vectors(located, positions)
    np.testing.assert_array_equal(training, vectors[positions])
    trained = train_index(plan.factory, training, plan.seed)

    folder = str(tmp_path / "version")
    shard_indexes = []
    for shard, (start, end) in enumerate(shard_ranges(count, plan.shards)):
        stats = fill_shard(trained, sources_for_range(located, start, end), start, end - start, dimension, folder, shard)
        assert (stats["shard"], stats["count"], stats["first_position"]) == (shard, end - start, start)
        data = storage.read_bytes(f"{folder}/{stats['file']}")
        assert storage.sha256_bytes(data) == stats["sha256"] and len(data) == stats["bytes"]
        assert storage.read_json(f"{folder}/{index_store.shard_name(shard)}.json") == stats
        exact = index_store.vectors_from_bytes(storage.read_bytes(f"{folder}/{stats['vectors_file']}"))
        np.testing.assert_array_equal(exact, vectors[start:end])
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
            assert searcher.shard.vectors is None if not config.exact_rescoring else searcher.shard.vectors.shape == (entry["count"], dimension)
        batch = {"query_embedding": queries}
        for searcher in searchers:
            batch = searcher(batch)
        batch["recall"] = np.mean([len(set(truth[i]) & set(batch["candidate_positions"][i])) / 10 for i in range(len(queries))])
        return batch

    rescored, approximate = search(SearchConfig(top_k=10)), search(SearchConfig(top_k=10, exact_rescoring=False))
    assert rescored["recall"] >= 0.95 > approximate["recall"], (rescored["recall"], approximate["recall"])  # 0.98 and 0.75
    np.testing.assert_allclose(rescored["candidate_scores"], np.take_along_axis(exact, rescored["candidate_positions"], axis=1), atol=1e-5)
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
        fill_shard(trained, sources, 10, 10, 8, str(tmp_path / "version"), 1)
    assert not os.path.exists(tmp_path / "version" / "shard-00001.json")


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

    stats = build_shards(located, plan, dimension, folder)
    assert [(s["shard"], s["first_position"], s["count"]) for s in stats] == [(0, 0, 1000), (1, 1000, 1000), (2, 2000, 1000)]
    built = file_stamps(folder)
    assert sorted(built) == sorted(["trained.faiss"] + [f"shard-0000{i}.{suffix}" for i in range(3) for suffix in ("faiss", "json", "vectors.npy")])
    indexes = []
    for entry in stats:
        index = index_store.deserialize_index(storage.read_bytes(f"{folder}/{entry['file']}"))
        faiss.extract_index_ivf(index).nprobe = plan.nprobe
        indexes.append(index)
    found = search_shards(indexes, vectors[::10], k=10)
    assert np.mean([position in row for position, row in zip(range(0, count, 10), found)]) >= 0.95

    # Complete: a rerun touches nothing.
    assert build_shards(located, plan, dimension, folder) == stats
    assert file_stamps(folder) == built

    # A crash while filling shard 1: its index file was written, its vectors and stats were not.
    os.remove(os.path.join(folder, "shard-00001.vectors.npy"))
    os.remove(os.path.join(folder, "shard-00001.json"))
    resumed = build_shards(located, plan, dimension, folder)
    after = file_stamps(folder)
    assert resumed == stats  # same trained index, same vectors: the rebuilt shard is byte-identical
    rebuilt = {name for name in after if after[name] != built.get(name)}
    assert rebuilt == {"shard-00001.faiss", "shard-00001.vectors.npy", "shard-00001.json"}
