"""A job killed at any point (SIGKILL) and rerun finishes with the uninterrupted result, redoing little.

The killed jobs run as subprocesses connected to the test session's Ray instance, as a driver of
``ray job submit`` would: killing the driver ends its workers and actors.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import (
    DAMAGED_CORPUS_BUILD_FLAGS,
    WORDS,
    build_index_flags,
    finish,
    kill_after,
    start_job,
    synthetic_documents,
    write_jsonl,
)

from pipelines import storage
from pipelines.evaluation import read_run
from pipelines.index_store import load_index
from pipelines.retrieval import OutputMismatchError

TOP_K = 12
DEPTH = 5


@pytest.fixture(scope="module")
def query_log(tmp_path_factory):
    rng = np.random.default_rng(11)
    records = [{"_id": f"q{number}", "text": " ".join(rng.choice(WORDS[(number % 10) * 50 : (number % 10 + 1) * 50], size=6))} for number in range(24)]
    records.insert(5, {"_id": "q-bad", "text": ""})
    return str(write_jsonl(tmp_path_factory.mktemp("kill-queries") / "queries.jsonl", records))


def query_flags(index, queries, output, reranker) -> list[str]:
    return ["--index", str(index), "--queries", queries, "--output", str(output), "--reranker", reranker,
            "--top-k", str(TOP_K), "--rerank-depth", str(DEPTH), "--rows-per-part", str(2 * TOP_K), "--search.queries-per-batch", "4"]


def whole_queries(table: pa.Table) -> bool:
    for query_id in set(table["query_id"].to_pylist()):
        ranks = sorted(table.filter(pc.equal(table["query_id"], query_id))["rank"].to_pylist())
        if ranks != list(range(1, len(ranks) + 1)) or not TOP_K <= len(ranks) <= 2 * TOP_K:  # hybrid: the union of two top-K lists
            return False
    return True


@pytest.mark.slow
def test_the_query_job_killed_at_random_points_resumes_to_the_uninterrupted_result(ray_session, damaged_corpus_index, tiny_cross_encoder, query_log, tmp_path):
    from jobs.retrieve_rerank import main

    reference = tmp_path / "reference"
    started = time.perf_counter()
    finish(start_job(ray_session, "retrieve_rerank", query_flags(damaged_corpus_index.root, query_log, reference, tiny_cross_encoder)))
    duration = time.perf_counter() - started
    expected = read_run(str(reference)).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert 24 * TOP_K <= expected.num_rows <= 24 * 2 * TOP_K and whole_queries(expected)

    killed = 0
    for point, fraction in enumerate(np.random.default_rng(2026).uniform(0.2, 0.95, size=5)):
        output = tmp_path / f"killed-{point}"
        flags = query_flags(damaged_corpus_index.root, query_log, output, tiny_cross_encoder)
        killed += kill_after(start_job(ray_session, "retrieve_rerank", flags), fraction * duration)
        parts = storage.list_files(str(output), ".parquet")
        if parts:  # what a kill leaves behind holds whole queries only
            assert whole_queries(pa.concat_tables([storage.read_parquet(part) for part in parts]))
        summary = main(flags)
        assert summary["queries_run"] + summary["queries_reused"] == 24
        result = read_run(str(output)).sort_by([("query_id", "ascending"), ("rank", "ascending")])
        assert result.equals(expected), f"kill point {point} ({fraction:.2f} of {duration:.1f} s)"
    assert killed >= 3


def test_a_rerun_into_an_output_of_another_configuration_fails_unless_overwrite(damaged_corpus_index, query_log, tmp_path):
    from jobs.retrieve_rerank import main

    output = tmp_path / "run"
    main(["--index", str(damaged_corpus_index.root), "--queries", query_log, "--output", str(output), "--top-k", "12"])
    with pytest.raises(OutputMismatchError, match=r"written by another configuration: search\.top_k \(12 there, 10 now\); use another --output or --overwrite"):
        main(["--index", str(damaged_corpus_index.root), "--queries", query_log, "--output", str(output), "--top-k", "10"])
    summary = main(["--index", str(damaged_corpus_index.root), "--queries", query_log, "--output", str(output), "--top-k", "10", "--overwrite"])
    assert summary["queries_run"] == 24
    table = read_run(str(output))
    per_query = table.group_by("query_id").aggregate([("rank", "max")])["rank_max"]
    assert per_query.length() == 24 and pc.min(per_query).as_py() >= 10 and pc.max(per_query).as_py() <= 20  # hybrid: the union of two top-10 lists


def test_an_output_folder_with_foreign_parts_is_not_resumed(damaged_corpus_index, query_log, tmp_path):
    from jobs.retrieve_rerank import main

    output = tmp_path / "run"
    storage.write_parquet_atomically(str(output / "part-foreign.parquet"), pa.table({"query_id": ["q1"], "rank": [1]}))
    with pytest.raises(OutputMismatchError, match="without run_identity.json"):
        main(["--index", str(damaged_corpus_index.root), "--queries", query_log, "--output", str(output)])


# --- the indexing job ---------------------------------------------------------------------------


def test_embedding_parts_are_committed_as_they_are_embedded(ray_session, tiny_bi_encoder, tmp_path):
    from jobs.build_index import main

    corpus = write_jsonl(tmp_path / "corpus.jsonl", synthetic_documents(3000, seed=4))
    root = tmp_path / "index"
    flags = build_index_flags(corpus, root, tiny_bi_encoder, "--embedding.precision", "fp32", "--embedding.rows-per-part", "100",
                              "--embedding.rows-per-batch", "100", "--embedding.batch-size", "4")
    process = start_job(ray_session, "build_index", flags)
    store = root / "embeddings"
    deadline = time.perf_counter() + 240
    while time.perf_counter() < deadline and process.poll() is None:
        if len(list(store.glob("*/part-*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the build finished before the kill: make it slower"
    process.send_signal(signal.SIGKILL)
    process.wait()
    stored = sum(storage.read_parquet(str(part), columns=["id"]).num_rows for part in store.glob("*/part-*.parquet"))
    assert 300 <= stored < 3000

    summary = main(flags)
    assert summary["embedded"] == 3000 - stored  # nothing stored is embedded again
    assert summary["reused_embeddings"] == stored and summary["indexed"] == 3000


@pytest.mark.slow
def test_the_indexing_job_killed_at_ten_points_resumes_to_the_uninterrupted_version(ray_session, damaged_corpus_index, damaged_corpus, tiny_bi_encoder, tmp_path):
    from jobs.build_index import main

    reference = load_index(str(damaged_corpus_index.root))
    timing_root = tmp_path / "timing"
    started = time.perf_counter()
    finish(start_job(ray_session, "build_index", build_index_flags(damaged_corpus.folder, timing_root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS)))
    duration = time.perf_counter() - started
    killed = 0
    for point, fraction in enumerate(np.random.default_rng(10).uniform(0.2, 0.98, size=10)):
        root = tmp_path / f"killed-{point}"
        flags = build_index_flags(damaged_corpus.folder, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS)
        killed += kill_after(start_job(ray_session, "build_index", flags), fraction * duration)
        summary = main(flags)
        assert summary["version_id"] == reference.manifest["version_id"], f"kill point {point}"
        rebuilt = load_index(str(root))
        assert rebuilt.manifest["counts"] == reference.manifest["counts"]
        assert rebuilt.doc_ids.equals(reference.doc_ids)
        assert [shard["sha256"] for shard in rebuilt.manifest["shards"]] == [shard["sha256"] for shard in reference.manifest["shards"]]
        stored = pa.concat_tables([storage.read_parquet(part, columns=["id", "text_hash"]) for part in storage.list_files(rebuilt.manifest["embeddings"]["url"], ".parquet")])
        assert len(set(zip(stored["id"].to_pylist(), stored["text_hash"].to_pylist()))) == 240
    assert killed >= 6
