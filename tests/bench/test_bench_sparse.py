"""bench.sparse on a tiny synthetic BEIR folder: no model, no SciFact, no JVM (seconds)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from conftest import WORDS, synthetic_documents, write_jsonl

from bench import sparse


def tiny_beir(folder, documents: int = 120, queries: int = 12):
    """corpus.jsonl (synthetic topics), queries.jsonl (three words of a topic each), qrels/test.tsv (the topic's documents)."""
    corpus = synthetic_documents(documents, seed=3)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{number}", "text": " ".join(WORDS[(number % 10) * 50 + number // 10 :][:3])} for number in range(queries)])
    lines = ["query-id\tcorpus-id\tscore"]
    for number in range(queries):
        lines += [f"q{number}\t{document['_id']}\t1" for document in corpus if document["title"] == f"topic {number % 10}"][:5]
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_main_bm25_only_writes_checks_quality_and_a_skipped_pyserini(tmp_path):
    dataset = tiny_beir(tmp_path / "tiny")
    output = tmp_path / "sparse.json"
    no_pyserini = tmp_path / "no-pyserini"
    no_pyserini.mkdir()
    payload = sparse.main(["--dataset", str(dataset), "--no-dense", "--repeats", "1", "--shards", "3", "--top-k", "10",
                           "--pyserini", str(no_pyserini), "--output", str(output)])

    stored = json.loads(output.read_text())
    assert stored["dataset"]["documents"] == 120 and stored["dataset"]["queries"] == 12
    sharded = stored["checks"]["bm25_3_shards_top_10_equals_1_shard"]
    assert sharded["equal_apart_from_ties_at_cutoff"] and sharded["queries_differing_beyond_ties"] == 0 and sharded["max_score_difference"] == 0.0
    assert stored["checks"]["bm25_equals_plain_bm25s"]["scores_equal"]
    rows = {row["index"].split(",")[0]: row for row in stored["rows"]}
    assert rows["BM25"]["ndcg@10"] > 0.5 and rows["BM25"]["build_docs_per_s"] > 0 and rows["BM25"]["queries_per_s"] > 0
    assert rows["BM25"]["bytes_per_doc"] > 0
    assert [step["build"] for step in stored["build_steps"]] == ["1 shard", "3 shards"]
    (skipped,) = stored["pyserini"]
    assert "pyserini is not installed under" in skipped["error"]
    assert "skipped: pyserini is not installed" in payload["table"]


def test_dense_and_hybrid_search_on_synthetic_vectors():
    rng = np.random.default_rng(0)
    documents = rng.standard_normal((300, 16)).astype(np.float32)
    documents /= np.linalg.norm(documents, axis=1, keepdims=True)
    queries = documents[:20] + 0.01 * rng.standard_normal((20, 16)).astype(np.float32)
    index = sparse.build_flat(documents)
    searcher = sparse.dense_searcher(index, threads=1, top_k=10)
    positions, scores = sparse.dense_search(searcher, queries, batch=7)
    assert positions.shape == (20, 10) and np.array_equal(positions[:, 0], np.arange(20))
    assert np.all(np.diff(scores, axis=1) <= 0)

    texts = [f"w{number} w{number + 1}" for number in range(300)]
    built = sparse.build_sparse(texts, _bm25_config(), shards=2, top_k=10)
    query_texts = [texts[number] for number in range(20)]
    fused = sparse.hybrid_search(searcher, built.searchers, queries, query_texts, dense_weight=0.5, batch=7)
    assert len(fused) == 20
    sparse_positions, _ = sparse.sparse_search(built.searchers, query_texts, batch=7, top_k=10)
    for row in range(20):
        expected = set(positions[row][positions[row] >= 0]) | set(sparse_positions[row][sparse_positions[row] >= 0])
        assert set(fused[row].tolist()) == expected and fused[row][0] == row  # found by both, best in both


def _bm25_config():
    from pipelines.sparse_index import Bm25Config

    return Bm25Config()


def test_compare_top_k_tells_ties_at_the_cutoff_from_real_differences():
    positions = np.array([[4, 7, 9], [1, 2, 3]])
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    tie = np.array([[4, 7, 8], [1, 2, 3]])  # another document with the lowest score made the cut
    assert sparse.compare_top_k(positions, scores, tie, scores) | {"max_score_difference": 0} == {
        "equal": False, "equal_apart_from_ties_at_cutoff": True, "queries": 2, "queries_differing": 1, "queries_differing_beyond_ties": 0, "max_score_difference": 0}
    swapped = np.array([[7, 4, 9], [1, 2, 3]])
    result = sparse.compare_top_k(positions, scores, swapped, scores)
    assert not result["equal_apart_from_ties_at_cutoff"] and result["queries_differing_beyond_ties"] == 1
    assert sparse.compare_top_k(positions, scores, positions, scores)["equal"]


def test_quality_counts_a_query_without_results_as_zero():
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}}
    assert sparse.quality(qrels, ["a", "b"], [["d1", "d3"], []]) == pytest.approx({"ndcg@10": 0.5, "recall@100": 0.5})


def test_document_vectors_cache_is_keyed(tmp_path):
    path = tmp_path / "vectors.npy"
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    key = {"encoder": "fp32", "texts": "abc", "documents": 3}
    sparse.save_document_vectors(path, vectors, {"key": key, "embed_s": 1.0, "embed_cpu_s": 2.0})
    loaded, record = sparse.cached_document_vectors(path, key, 3)
    assert np.array_equal(loaded, vectors) and record["embed_s"] == 1.0
    assert np.load(path).shape == (3, 4)  # a plain .npy
    assert sparse.cached_document_vectors(path, {**key, "texts": "other"}, 3)[0] is None
    assert sparse.cached_document_vectors(tmp_path / "missing.npy", key, 3)[0] is None


def test_pyserini_helpers(tmp_path):
    with pytest.raises(sparse.PyseriniUnavailable, match="no folder"):
        sparse.locate_pyserini(str(tmp_path / "absent"))
    jar = tmp_path / "anserini-0.0.1-fatjar.jar"
    with zipfile.ZipFile(jar, "w") as archive:
        archive.writestr("io/anserini/index/IndexCollection.class", bytes([0xCA, 0xFE, 0xBA, 0xBE, 0, 0, 0, 55]) + b"rest")
    assert sparse.jar_java_release(jar) == 11
    log = ("2026-12-03 06:01:16,903 INFO  [main] index.IndexCollection (IndexCollection.java:522) - Starting to index...\n"
           "2026-12-03 06:01:17,904 INFO  [main] index.IndexCollection (IndexCollection.java:587) - Total 5,183 documents indexed in 00:00:01\n")
    assert sparse.lucene_indexing_seconds(log) == pytest.approx(1.001)
    assert sparse.lucene_indexing_seconds("no log") is None
    assert sparse.java_error("Traceback ...\njnius.JavaException: JVM exception occurred: java.lang.UnsupportedClassVersionError: x (class file version 65.0)\nmore") \
        .startswith("jnius.JavaException: JVM exception occurred: java.lang.UnsupportedClassVersionError")
    assert sparse.java_major("1.8.0_392") == 8 and sparse.java_major("17.0.15") == 17 and sparse.java_major("25") == 25
