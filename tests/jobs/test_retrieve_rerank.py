"""The query job end to end with tiny models: schema, ranking invariants, quarantine, resume, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import WORDS, check_report, write_jsonl
from pipelines import storage
from pipelines.evaluation import read_run
from pipelines.index_store import IndexValidationError
from pipelines.reranking import OUTPUT_SCHEMA

TOP_K = 12
DEPTH = 5


@pytest.fixture(scope="module")
def query_files(tmp_path_factory):
    """20 valid topic queries, 3 bad rows, one duplicate; qrels judge 10 of the valid queries."""
    folder = tmp_path_factory.mktemp("queries")
    rng = np.random.default_rng(7)
    records: list[object] = []
    for number in range(20):
        topic = number % 10
        words = rng.choice(WORDS[topic * 50 : (topic + 1) * 50], size=6)
        records.append({"_id": f"q{number}", "text": " ".join(words)})
    records.insert(3, {"_id": "q-empty", "text": "   "})
    records.insert(9, {"_id": None, "text": "no id"})
    records.insert(15, "{not json")
    records.append({"_id": "q4", "text": "a duplicate of q4"})
    queries = write_jsonl(folder / "queries.jsonl", records)
    qrels = folder / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{n}\td{n}\t1\n" for n in range(10)))
    unknown = folder / "unknown-qrels.tsv"
    unknown.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq-nowhere\td2\t1\n")
    return {"queries": str(queries), "qrels": str(qrels), "unknown_qrels": str(unknown)}


def run_job(*flags: str) -> dict:
    from jobs.retrieve_rerank import main

    return main(list(flags))


@pytest.fixture(scope="module")
def reranked_run(damaged_corpus_index, tiny_cross_encoder, query_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "reranked"
    summary = run_job(
        "--index", str(damaged_corpus_index.root), "--queries", query_files["queries"], "--output", str(output),
        "--reranker", tiny_cross_encoder, "--top-k", str(TOP_K), "--rerank-depth", str(DEPTH),
    )
    return output, summary


def test_output_schema_and_counts(reranked_run, damaged_corpus):
    output, summary = reranked_run
    table = read_run(str(output))
    assert summary["queries_run"] == 20 and summary["queries_quarantined"] == 4
    raw = pa.concat_tables([storage.read_parquet(part) for part in storage.list_files(str(output), ".parquet")])
    assert raw.schema.equals(OUTPUT_SCHEMA)
    assert 20 * TOP_K <= table.num_rows <= 20 * 2 * TOP_K  # hybrid (the default): the union of the dense and BM25 top-K
    assert set(table["doc_id"].to_pylist()) <= set(damaged_corpus.indexed_ids)
    assert storage.exists(storage.join_url(str(output), "run.json"))


def test_ranking_invariants(reranked_run):
    output, _ = reranked_run
    table = read_run(str(output))
    for query_id in set(table["query_id"].to_pylist()):
        rows = sorted(table.filter(pc.equal(table["query_id"], query_id)).to_pylist(), key=lambda row: row["rank"])
        count = len(rows)  # hybrid: the union of the dense and BM25 top-K
        assert TOP_K <= count <= 2 * TOP_K
        assert [row["rank"] for row in rows] == list(range(1, count + 1))
        assert sorted(row["first_stage_rank"] for row in rows) == list(range(1, count + 1))
        head, tail = rows[:DEPTH], rows[DEPTH:]
        # The reranked head: the first-stage top-N, ordered by rerank score.
        assert sorted(row["first_stage_rank"] for row in head) == list(range(1, DEPTH + 1))
        head_scores = [row["rerank_score"] for row in head]
        assert None not in head_scores and head_scores == sorted(head_scores, reverse=True)
        # The tail: not reranked, first-stage order kept.
        assert all(row["rerank_score"] is None for row in tail)
        assert [row["first_stage_rank"] for row in tail] == list(range(DEPTH + 1, count + 1))
        first_stage = sorted(rows, key=lambda row: row["first_stage_rank"])
        scores = [row["first_stage_score"] for row in first_stage]
        assert scores == sorted(scores, reverse=True)


def test_quarantine_names_each_bad_query(reranked_run):
    output, _ = reranked_run
    quarantine = pa.concat_tables([storage.read_parquet(part) for part in storage.list_files(storage.join_url(str(output), "quarantine"), ".parquet")])
    reasons = sorted(zip(quarantine["source_row"].to_pylist(), quarantine["reason"].to_pylist()))
    assert [row for row, _ in reasons] == [3, 9, 15, 23]
    assert reasons[0][1] == "empty text" and reasons[1][1] == "null id"
    assert reasons[2][1].startswith("invalid JSON") and reasons[3][1].startswith("duplicate id")


def test_rerun_skips_finished_queries(reranked_run, damaged_corpus_index, tiny_cross_encoder, query_files, tmp_path):
    output, _ = reranked_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    parts = sorted(storage.list_files(str(copy), ".parquet"))
    summary = run_job(
        "--index", str(damaged_corpus_index.root), "--queries", query_files["queries"], "--output", str(copy),
        "--reranker", tiny_cross_encoder, "--top-k", str(TOP_K), "--rerank-depth", str(DEPTH),
    )
    assert summary["queries_run"] == 0 and summary["queries_reused"] == 20
    assert sorted(storage.list_files(str(copy), ".parquet")) == parts


def test_first_stage_only_with_qrels(damaged_corpus_index, query_files, tmp_path):
    output = tmp_path / "first-stage"
    summary = run_job(
        "--index", str(damaged_corpus_index.root), "--queries", query_files["queries"], "--output", str(output),
        "--reranker", "none", "--top-k", str(TOP_K), "--qrels", query_files["qrels"],
    )
    table = read_run(str(output))
    assert summary["queries_run"] == 10
    assert set(table["query_id"].to_pylist()) == {f"q{n}" for n in range(10)}
    assert table["rerank_score"].null_count == table.num_rows
    assert pc.all(pc.equal(table["rank"], table["first_stage_rank"])).as_py()
    check_report(output / "report.html", ["throughput", "quality"])  # with --qrels, the quality of each stage
    assert summary["report"] == str(output / "report.html")


def test_judged_queries_missing_from_the_log_are_an_error(damaged_corpus_index, query_files, tmp_path):
    with pytest.raises(ValueError, match="q-nowhere"):
        run_job("--index", str(damaged_corpus_index.root), "--queries", query_files["queries"], "--output", str(tmp_path / "x"), "--qrels", query_files["unknown_qrels"])


def test_missing_index_is_a_clear_error(query_files, tmp_path):
    with pytest.raises(IndexValidationError, match="no index here"):
        run_job("--index", str(tmp_path / "nothing"), "--queries", query_files["queries"], "--output", str(tmp_path / "x"))


def test_rerank_deeper_than_top_k_is_refused(query_files, tmp_path):
    with pytest.raises(ValueError, match="deeper than"):
        run_job("--index", str(tmp_path), "--queries", query_files["queries"], "--output", str(tmp_path / "x"), "--reranker", "m", "--top-k", "5", "--rerank-depth", "10")


def reranker_with_card(tiny_cross_encoder: str, folder, **card) -> str:
    import json

    target = folder / "reranker"
    shutil.copytree(tiny_cross_encoder, target)
    (target / "fusion.json").write_text(json.dumps({"fitted_on": "40 held-out queries of train.tsv", **card}))
    return str(target)


def test_a_reranker_that_did_not_beat_the_first_stage_on_dev_is_not_served(damaged_corpus_index, tiny_cross_encoder, query_files, tmp_path):
    from pipelines import index_store

    root = str(damaged_corpus_index.root)
    fingerprint = index_store.corpus_fingerprint(index_store.load_doc_ids(root, index_store.read_manifest(root)))
    reranker = reranker_with_card(tiny_cross_encoder, tmp_path, weight=0.0, mode="first_stage", trained_on={"corpus": "here", "corpus_fingerprint": fingerprint})
    summary = run_job("--index", root, "--queries", query_files["queries"], "--output", str(tmp_path / "run"), "--reranker", reranker,
                      "--top-k", str(TOP_K), "--rerank-depth", str(DEPTH))
    assert summary["reranker"] == "none" and summary["pairs_reranked"] == 0 and summary["fusion_weight"] is None
    assert any("first stage is served alone" in note for note in summary["reranker_notes"])
    assert not any(note.startswith("warning") for note in summary["reranker_notes"])
    run = read_run(str(tmp_path / "run"))
    assert run["rerank_score"].null_count == run.num_rows
    assert run["rank"].to_pylist() == run["first_stage_rank"].to_pylist()


@pytest.mark.parametrize("foreign_corpus", ["first_stage", "fuse"])
def test_a_reranker_from_another_corpus_warns_naming_where_it_was_fitted(damaged_corpus_index, tiny_cross_encoder, query_files, tmp_path, foreign_corpus):
    root = str(damaged_corpus_index.root)
    reranker = reranker_with_card(tiny_cross_encoder, tmp_path, weight=0.4, mode="fused", trained_on={"corpus": "s3://elsewhere/corpus.jsonl", "corpus_fingerprint": "0123456789abcdef"})
    flags = ["--rerank.foreign-corpus", foreign_corpus] if foreign_corpus != "first_stage" else []  # first_stage is the default
    summary = run_job("--index", root, "--queries", query_files["queries"], "--output", str(tmp_path / "run"), "--reranker", reranker,
                      "--top-k", str(TOP_K), "--rerank-depth", str(DEPTH), *flags)
    warnings = [note for note in summary["reranker_notes"] if note.startswith("warning")]
    assert len(warnings) == 1 and "s3://elsewhere/corpus.jsonl" in warnings[0]
    assert summary["fusion_fitted_on"] == "40 held-out queries of train.tsv"
    run = read_run(str(tmp_path / "run"))
    if foreign_corpus == "fuse":
        assert summary["reranker"] == reranker and summary["fusion_weight"] == 0.4
        assert run["fused_score"].null_count < run.num_rows
    else:
        assert summary["reranker"] == "none" and summary["fusion_weight"] is None
        assert any("first stage is served alone" in note for note in summary["reranker_notes"])
        assert run["rerank_score"].null_count == run.num_rows
