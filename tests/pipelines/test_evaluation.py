"""Evaluation: metrics against values worked out by hand, stage orders, the depth sweep, errors, the job end to end.

The toy qrels and run used throughout (all judgments binary):

    qrels   q1: d1, d3, d8 relevant (d8 is never retrieved)   q2: d5 relevant   q3: d9 relevant (q3 not in the run)
    run     q1 first stage: d2 d1 d4 d3   rerank scores d2 .1, d1 .9, d4 .5, d3 .7  -> reranked d1 d3 d4 d2
            q2 first stage: d6 d7 d5      rerank scores d6 .2, d7 .3, d5 .8         -> reranked d5 d7 d6
            q4 (not judged): ignored

A hybrid run (dense + BM25, fused first stage; ranks per retriever, None = that retriever missed it):

    qrels   h1: s9 relevant (only BM25 found it)   h2: e3 relevant
    run     h1 fused: d2 d1 s9 d3   dense d1 d2 d3   sparse s9 d2 d1   rerank d2 .2, d1 .1, s9 .9 (depth 3)
            h2 fused: e2 e1 e3      dense e3 e1      sparse e2 e3      rerank e2 .5, e1 .6, e3 .1
"""

from __future__ import annotations

import json
from math import log2

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import check_report
from pipelines import evaluation
from pipelines.evaluation import DepthError, QrelsError, RunError, RunEvaluator

QRELS = {"q1": {"d1": 1, "d3": 1, "d8": 1}, "q2": {"d5": 1}, "q3": {"d9": 1}}
TOY = {
    "q1": [("d2", 0.1), ("d1", 0.9), ("d4", 0.5), ("d3", 0.7)],
    "q2": [("d6", 0.2), ("d7", 0.3), ("d5", 0.8)],
    "q4": [("d1", 0.4), ("d2", 0.6)],
}

# Ideal DCG of q1 (three relevant documents): 1 + 1/log2(3) + 1/log2(4) = 1 + 0.6309 + 0.5 = 2.1309.
IDEAL_Q1 = 1 + 1 / log2(3) + 1 / log2(4)

# First stage. q1 = d2 d1 d4 d3: relevant at 2 and 4.
#   nDCG@10 = (1/log2(3) + 1/log2(5)) / 2.1309 = (0.6309 + 0.4307) / 2.1309 = 0.4982
#   RR@10 = 1/2; P@3 = 1/3 (d1); recall = 2/3 (d8 missing)
# q2 = d6 d7 d5: relevant at 3. nDCG@10 = (1/log2(4)) / 1 = 0.5; RR@10 = 1/3; P@3 = 1/3; recall = 1
# q3: no results, 0 everywhere. Means over the 3 judged queries:
FIRST_STAGE = {
    "ndcg@10": ((1 / log2(3) + 1 / log2(5)) / IDEAL_Q1 + 0.5) / 3,  # 0.3327
    "mrr@10": (1 / 2 + 1 / 3) / 3,  # 0.2778
    "recall@10": (2 / 3 + 1) / 3,  # 0.5556
    "recall@20": (2 / 3 + 1) / 3,
    "recall@100": (2 / 3 + 1) / 3,
    "p@3": (1 / 3 + 1 / 3) / 3,  # 0.2222
}
# Reranked. q1 = d1 d3 d4 d2: relevant at 1 and 2. nDCG@10 = (1 + 1/log2(3)) / 2.1309 = 0.7654; RR 1; P@3 2/3; recall 2/3
# q2 = d5 d7 d6: relevant at 1. nDCG@10 = 1; RR 1; P@3 1/3; recall 1
RERANKED = {
    "ndcg@10": ((1 + 1 / log2(3)) / IDEAL_Q1 + 1) / 3,  # 0.5885
    "mrr@10": (1 + 1) / 3,  # 0.6667
    "recall@10": (2 / 3 + 1) / 3,
    "recall@20": (2 / 3 + 1) / 3,
    "recall@100": (2 / 3 + 1) / 3,
    "p@3": (2 / 3 + 1 / 3) / 3,  # 0.3333
}
# Reranked to depth 2 only. q1: d2 .1, d1 .9 rescored -> d1 d2, then d4 d3: relevant at 1 and 4.
#   nDCG@10 = (1 + 1/log2(5)) / 2.1309 = 0.6714; P@3 = 1/3
# q2: d6 .2, d7 .3 rescored -> d7 d6, then d5: relevant at 3. nDCG@10 = 0.5; P@3 = 1/3
DEPTH_2 = {"ndcg@10": ((1 + 1 / log2(5)) / IDEAL_Q1 + 0.5) / 3, "p@3": (1 / 3 + 1 / 3) / 3}  # 0.3905, 0.2222


def make_run(candidates: dict[str, list[tuple]], fused: dict[str, list[float | None]] | None = None) -> pa.Table:
    """A run table from {query: [(doc_id, rerank_score or None), ...] in first-stage order}.

    rank and score repeat the first stage: the evaluation rebuilds each stage from its own columns.
    """
    columns: dict[str, list] = {name: [] for name in ("query_id", "rank", "doc_id", "score", "first_stage_rank", "first_stage_score", "rerank_score")}
    fused_scores = []
    for query_id, docs in candidates.items():
        for position, (doc_id, rerank_score) in enumerate(docs, start=1):
            columns["query_id"].append(query_id)
            columns["rank"].append(position)
            columns["doc_id"].append(doc_id)
            columns["score"].append(1.0 / position)
            columns["first_stage_rank"].append(position)
            columns["first_stage_score"].append(1.0 / position)
            columns["rerank_score"].append(rerank_score)
        if fused is not None:
            fused_scores.extend(fused.get(query_id, [None] * len(docs)))
    table = pa.table({**columns, "rerank_score": pa.array(columns["rerank_score"], pa.float64())})
    if fused is not None:
        table = table.append_column("fused_score", pa.array(fused_scores, pa.float64()))
    return table


HYBRID_QRELS = {"h1": {"s9": 1}, "h2": {"e3": 1}}
# {query: [(doc_id, dense_rank, sparse_rank, rerank_score), ...] in fused first-stage order}
HYBRID = {
    "h1": [("d2", 2, 2, 0.2), ("d1", 1, 3, 0.1), ("s9", None, 1, 0.9), ("d3", 3, None, None)],
    "h2": [("e2", None, 1, 0.5), ("e1", 2, None, 0.6), ("e3", 1, 2, 0.1)],
}
# nDCG@10 with one relevant document at position p is 1/log2(p + 1), averaged over h1 and h2.
# dense: s9 never retrieved (0), e3 at 1. sparse: s9 at 1, e3 at 2. first stage: s9 at 3, e3 at 3.
# reranked: h1 s9 d2 d1 d3 (s9 at 1); h2 e1 e2 e3 (e3 at 3).
HYBRID_NDCG = {"dense": (0 + 1) / 2, "sparse": (1 + 1 / log2(3)) / 2, "first_stage": 0.5, "reranked": (1 + 0.5) / 2}


def make_hybrid_run(candidates: dict[str, list[tuple]], sparse: bool = True, dense: bool = True) -> pa.Table:
    """A run table with per-retriever columns from :data:`HYBRID`-style rows; a retriever switched off is all null."""
    run = make_run({query_id: [(doc_id, rerank) for doc_id, _, _, rerank in rows] for query_id, rows in candidates.items()})
    for name, position, enabled in (("dense", 1, dense), ("sparse", 2, sparse)):
        ranks = [row[position] if enabled else None for rows in candidates.values() for row in rows]
        run = run.append_column(f"{name}_rank", pa.array(ranks, pa.int32()))
        run = run.append_column(f"{name}_score", pa.array([None if rank is None else 10.0 - rank for rank in ranks], pa.float32()))
    return run


def write_qrels(path, lines: list[str]) -> str:
    path.write_text("\n".join(["query-id\tcorpus-id\tscore", *lines]) + "\n")
    return str(path)


def qrels_lines(qrels: dict[str, dict[str, int]]) -> list[str]:
    return [f"{query_id}\t{doc_id}\t{score}" for query_id, docs in qrels.items() for doc_id, score in docs.items()]


def test_metrics_match_hand_computed_values():
    results = RunEvaluator(QRELS)(make_run(TOY))
    assert results["primary_metric"] == "ndcg@10"
    assert set(results) >= {"first_stage", "reranked"} and "fused" not in results
    assert results["first_stage"] == pytest.approx(FIRST_STAGE)
    assert results["reranked"] == pytest.approx(RERANKED)
    assert results["queries"] == {"judged": 3, "with_results": 2, "without_results": 1}
    assert results["rerank_depth"] == 4  # every candidate reranked: the deepest first-stage rank


def test_judged_query_missing_from_run_counts_zero():
    run = make_run(TOY)
    with_missing = RunEvaluator(QRELS)(run)
    only_present = RunEvaluator({query_id: QRELS[query_id] for query_id in ("q1", "q2")})(run)
    # Same two scored queries; q3 adds a 0 to the mean, so every metric is 2/3 of the two-query mean.
    for metric, value in only_present["reranked"].items():
        assert with_missing["reranked"][metric] == pytest.approx(value * 2 / 3)
    nothing = RunEvaluator({"q3": {"d9": 1}})(run)
    assert nothing["first_stage"] == pytest.approx(dict.fromkeys(evaluation.METRICS, 0.0))
    assert nothing["queries"] == {"judged": 1, "with_results": 0, "without_results": 1}


def test_stage_orders():
    fused = {"q1": [0.5, 0.4, None, 0.6], "q2": [None, None, None]}
    rankings = evaluation.stage_rankings(make_run(TOY, fused=fused))
    assert list(rankings) == ["first_stage", "reranked", "fused"]
    assert rankings["first_stage"]["q1"] == ["d2", "d1", "d4", "d3"]
    assert rankings["reranked"]["q1"] == ["d1", "d3", "d4", "d2"]
    assert rankings["reranked"]["q2"] == ["d5", "d7", "d6"]
    # Fused: d3 .6, d2 .5, d1 .4, then d4 (no fused score) in first-stage order; q2 has none: first-stage order.
    assert rankings["fused"]["q1"] == ["d3", "d2", "d1", "d4"]
    assert rankings["fused"]["q2"] == ["d6", "d7", "d5"]


def test_partly_reranked_run_keeps_first_stage_order_after_reranked_candidates():
    partial = make_run({"q1": [("d2", 0.1), ("d1", 0.9), ("d4", None), ("d3", None)], "q2": [("d6", 0.2), ("d7", 0.3), ("d5", 0.8)]})
    assert evaluation.stage_ranking(partial, "reranked")["q1"] == ["d1", "d2", "d4", "d3"]
    assert evaluation.rerank_depth(partial) == 2
    with pytest.raises(DepthError, match="depth 3.*first_stage_rank 2"):
        evaluation.rerank_at_depth(partial, 3)
    sweep = RunEvaluator(QRELS, depths=(1, 2, 3))(partial)["depth_sweep"]["reranked"]
    assert sweep[3] is None  # deeper than the run was reranked: not available, not an error
    assert sweep[2]["ndcg@10"] == pytest.approx(DEPTH_2["ndcg@10"])


def test_first_stage_only_run_has_one_stage_and_no_sweep():
    run = make_run({query_id: [(doc_id, None) for doc_id, _ in docs] for query_id, docs in TOY.items()})
    results = RunEvaluator(QRELS, depths=(10,))(run)
    assert "reranked" not in results and results["first_stage"] == pytest.approx(FIRST_STAGE)
    assert results["rerank_depth"] is None and results["depth_sweep"] == {}
    with pytest.raises(DepthError, match="no rerank"):
        evaluation.rerank_at_depth(run, 10)


def test_depth_sweep():
    run = make_run(TOY)
    # Depth 1: only the top candidate is rescored, which cannot move it: exactly the first-stage order.
    assert evaluation.stage_ranking(evaluation.rerank_at_depth(run, 1), "reranked") == evaluation.stage_ranking(run, "first_stage")
    assert evaluation.stage_ranking(evaluation.rerank_at_depth(run, 2), "reranked")["q1"] == ["d1", "d2", "d4", "d3"]
    results = RunEvaluator(QRELS, depths=(50, 1, 2, 4))(run)
    sweep = results["depth_sweep"]["reranked"]
    assert list(sweep) == [1, 2, 4, 50]
    assert sweep[1]["ndcg@10"] == pytest.approx(FIRST_STAGE["ndcg@10"])
    assert sweep[1]["p@3"] == pytest.approx(FIRST_STAGE["p@3"])
    assert sweep[2]["ndcg@10"] == pytest.approx(DEPTH_2["ndcg@10"])
    assert sweep[2]["p@3"] == pytest.approx(DEPTH_2["p@3"])
    # Depth 4 reranks everything (q2 has only 3 candidates); 50 is no different.
    for depth in (4, 50):
        assert {metric: sweep[depth][metric] for metric in evaluation.METRICS} == pytest.approx(RERANKED)
    # Cost: pairs reranked per judged query with results (q1 has 4 candidates, q2 has 3).
    assert [sweep[depth]["pairs_per_query"] for depth in (1, 2, 4, 50)] == pytest.approx([1.0, 2.0, 3.5, 3.5])

    table = evaluation.format_metrics_table({"toy": results})
    assert "ndcg@10" in table and "reranked" in table and "rerank depth sweep" in table


def test_read_qrels_and_malformed_lines(tmp_path):
    path = write_qrels(tmp_path / "qrels.tsv", qrels_lines(QRELS) + [""])
    assert evaluation.read_qrels(path) == QRELS

    bad_fields = write_qrels(tmp_path / "fields.tsv", ["q1\td1\t1", "q1\td2"])
    with pytest.raises(QrelsError, match=r"fields\.tsv, line 3: expected 3 tab-separated fields"):
        evaluation.read_qrels(bad_fields)
    bad_score = write_qrels(tmp_path / "score.tsv", ["q1\td1\t1", "q1\td2\t1", "q2\td5\thigh"])
    with pytest.raises(QrelsError, match=r"score\.tsv, line 4: field 'score' = 'high'"):
        evaluation.read_qrels(bad_score)
    conflicting = write_qrels(tmp_path / "conflict.tsv", ["q1\td1\t1", "q1\td1\t2"])
    with pytest.raises(QrelsError, match=r"conflict\.tsv, line 3: .*judged 2 here but 1 on line 2"):
        evaluation.read_qrels(conflicting)
    with pytest.raises(QrelsError, match="no such file"):
        evaluation.read_qrels(str(tmp_path / "absent.tsv"))


def test_read_qrels_from_fsspec_url():
    import fsspec

    with fsspec.open("memory://evaluation-test/qrels.tsv", "wt") as handle:
        handle.write("query-id\tcorpus-id\tscore\nq1\td1\t2\n")
    assert evaluation.read_qrels("memory://evaluation-test/qrels.tsv") == {"q1": {"d1": 2}}


def test_read_run_errors_name_file_row_and_field(tmp_path):
    run = make_run(TOY)
    pq.write_table(run.drop_columns(["rerank_score"]), tmp_path / "no-column.parquet")
    with pytest.raises(RunError, match=r"no-column\.parquet: missing column 'rerank_score'"):
        evaluation.read_run(str(tmp_path / "no-column.parquet"))

    empty_doc = run.set_column(2, "doc_id", pa.array(["d2", None] + run["doc_id"].to_pylist()[2:]))
    pq.write_table(empty_doc, tmp_path / "empty.parquet")
    with pytest.raises(RunError, match=r"empty\.parquet, row 1: field 'doc_id' is empty"):
        evaluation.read_run(str(tmp_path / "empty.parquet"))

    folder = tmp_path / "duplicated"
    folder.mkdir()
    pq.write_table(run.slice(0, 4), folder / "part-0.parquet")
    pq.write_table(run.slice(0, 1), folder / "part-1.parquet")  # q1/d2 again
    with pytest.raises(RunError, match=r"part-1\.parquet, row 0: field 'doc_id' = 'd2' appears twice .*part-0\.parquet, row 0"):
        evaluation.read_run(str(folder))


def test_job_end_to_end(tmp_path, capsys):
    from jobs.evaluate import main

    qrels = write_qrels(tmp_path / "test.tsv", qrels_lines(QRELS))
    reranked_run = tmp_path / "reranked"
    reranked_run.mkdir()
    run = make_run(TOY)
    pq.write_table(run.slice(0, 4), reranked_run / "part-00000.parquet")  # q1
    pq.write_table(run.slice(4), reranked_run / "part-00001.parquet")  # q2, q4
    first_stage_run = tmp_path / "first-stage.parquet"
    pq.write_table(make_run({query_id: [(doc_id, None) for doc_id, _ in docs] for query_id, docs in TOY.items()}), first_stage_run)
    output = tmp_path / "out" / "evaluation.json"

    report = main(["--qrels", qrels, "--run", str(reranked_run), "--run", str(first_stage_run), "--depths", "1,2,50", "--output", str(output)])

    written = json.loads(output.read_text())
    assert written["primary_metric"] == "ndcg@10" and written["metrics"] == list(evaluation.METRICS)
    assert written["config"]["depths"] == [1, 2, 50]
    reranked = written["runs"][str(reranked_run)]
    assert reranked["reranked"] == pytest.approx(RERANKED)
    assert reranked["first_stage"] == pytest.approx(FIRST_STAGE)
    assert reranked["depth_sweep"]["reranked"]["2"]["ndcg@10"] == pytest.approx(DEPTH_2["ndcg@10"])
    first_stage = written["runs"][str(first_stage_run)]
    assert first_stage["first_stage"] == pytest.approx(FIRST_STAGE) and "reranked" not in first_stage
    assert report["runs"][str(reranked_run)]["depth_sweep"]["reranked"][2]["p@3"] == pytest.approx(DEPTH_2["p@3"])
    printed = capsys.readouterr().out
    assert "effective config:" in printed and "rerank depth sweep" in printed and "1 of 3 judged queries have no results" in printed
    check_report(tmp_path / "out" / "evaluation.report.html", ["quality", "depth_sweep"])
    assert written["report"] == str(tmp_path / "out" / "evaluation.report.html")


def test_hybrid_run_has_dense_and_sparse_stages_by_their_own_ranks():
    run = make_hybrid_run(HYBRID)
    assert evaluation.available_stages(run) == ["dense", "sparse", "first_stage", "reranked"]
    rankings = evaluation.stage_rankings(run)
    assert rankings["dense"] == {"h1": ["d1", "d2", "d3"], "h2": ["e3", "e1"]}
    assert rankings["sparse"] == {"h1": ["s9", "d2", "d1"], "h2": ["e2", "e3"]}
    assert rankings["first_stage"]["h1"] == ["d2", "d1", "s9", "d3"]
    # s9 only BM25 found, e1 only the dense retriever: each in its retriever's stage and every fused one.
    assert "s9" not in rankings["dense"]["h1"] and "e1" not in rankings["sparse"]["h2"]
    assert "s9" in rankings["reranked"]["h1"] and "e1" in rankings["first_stage"]["h2"]

    results = RunEvaluator(HYBRID_QRELS, depths=(1, 2))(run)
    assert {stage: results[stage]["ndcg@10"] for stage in HYBRID_NDCG} == pytest.approx(HYBRID_NDCG)
    assert results["sparse"]["recall@100"] == 1.0 and results["dense"]["recall@100"] == 0.5
    # The depth sweep varies the reranked stage only; a shallower rerank leaves dense and sparse as they were.
    assert list(results["depth_sweep"]) == ["reranked"]
    shallower = evaluation.stage_rankings(evaluation.rerank_at_depth(run, 1))
    assert shallower["dense"] == rankings["dense"] and shallower["sparse"] == rankings["sparse"]
    table = evaluation.format_metrics_table({"hybrid": results})
    assert all(label in table for label in ("dense", "sparse", "first_stage (hybrid)", "reranked"))


def test_single_retriever_and_old_runs_keep_one_first_stage():
    dense_only = make_hybrid_run(HYBRID, sparse=False)
    sparse_only = make_hybrid_run(HYBRID, dense=False)
    for run in (dense_only, sparse_only):
        assert evaluation.available_stages(run) == ["first_stage", "reranked"]
    # Columns present but all null, or absent altogether (old runs): the same results as before.
    toy = make_run(TOY)
    all_null = toy
    for name, kind in (("dense_rank", pa.int32()), ("dense_score", pa.float32()), ("sparse_rank", pa.int32()), ("sparse_score", pa.float32())):
        all_null = all_null.append_column(name, pa.nulls(toy.num_rows, kind))
    old, new = RunEvaluator(QRELS, depths=(2,))(toy), RunEvaluator(QRELS, depths=(2,))(all_null)
    assert new == old and old["first_stage"] == pytest.approx(FIRST_STAGE)
    assert "first_stage (hybrid)" not in evaluation.format_metrics_table({"toy": new})


def test_read_run_with_retriever_columns(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(make_hybrid_run({"h1": HYBRID["h1"]}), folder / "part-0.parquet")
    pq.write_table(make_run({"q1": TOY["q1"]}), folder / "part-1.parquet")  # an old part without the columns
    run = evaluation.read_run(str(folder))
    assert run["dense_rank"].to_pylist() == [2, 1, None, 3, None, None, None, None]
    assert evaluation.stage_ranking(run, "sparse") == {"h1": ["s9", "d2", "d1"]}


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("dense_rank", 1, 0, "field 'dense_rank' = 0; ranks start at 1"),
        ("sparse_rank", 2, -3, "field 'sparse_rank' = -3; ranks start at 1"),
        ("dense_score", 3, float("nan"), "field 'dense_score' is NaN"),
        ("sparse_rank", 2, 2, "field 'sparse_rank' = 2 appears twice for query_id 'h1'"),
    ],
)
def test_invalid_retriever_columns_name_file_row_and_field(tmp_path, column, row, value, message):
    run = make_hybrid_run(HYBRID)
    values = run[column].to_pylist()
    values[row] = value
    path = tmp_path / "bad.parquet"
    pq.write_table(run.set_column(run.column_names.index(column), column, pa.array(values, run[column].type)), path)
    with pytest.raises(RunError, match=rf"bad\.parquet, row {row}: {message}"):
        evaluation.read_run(str(path))


def test_demo_summary_shows_every_stage_with_lifts_over_dense():
    from jobs.demo import stage_lifts, stage_rows

    results = RunEvaluator(HYBRID_QRELS)(make_hybrid_run(HYBRID))
    baseline, lifts = stage_lifts(results)
    assert baseline == "dense" and list(lifts) == ["sparse", "first_stage", "reranked"]
    assert lifts["sparse"]["ndcg@10"] == pytest.approx(100 * (HYBRID_NDCG["sparse"] / HYBRID_NDCG["dense"] - 1))  # +63.1%
    assert lifts["reranked"]["ndcg@10"] == pytest.approx(50.0) and lifts["first_stage"]["ndcg@10"] == pytest.approx(0.0)
    labels = [label for label, _ in stage_rows(results)]
    assert labels[:3] == ["dense nDCG@10 / P@3 / R@100", "sparse nDCG@10 / P@3 / R@100", "sparse lift over dense nDCG@10 / P@3"]
    assert "first stage (hybrid) nDCG@10 / P@3 / R@100" in labels and "reranked lift over dense nDCG@10 / P@3" in labels

    toy = RunEvaluator(QRELS)(make_run(TOY))
    baseline, lifts = stage_lifts(toy)
    assert baseline == "first_stage" and lifts["reranked"]["ndcg@10"] == pytest.approx(100 * (RERANKED["ndcg@10"] / FIRST_STAGE["ndcg@10"] - 1))
    assert [label for label, _ in stage_rows(toy)][:2] == ["first stage nDCG@10 / P@3 / R@100", "reranked nDCG@10 / P@3 / R@100"]
