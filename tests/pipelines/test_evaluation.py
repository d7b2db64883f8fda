"""Evaluation: metrics against values worked out by hand, stage orders, the depth sweep, errors, the job end to end.

The toy qrels and run used throughout (all judgments binary):

    qrels   q1: d1, d3, d8 relevant (d8 is never retrieved)   q2: d5 relevant   q3: d9 relevant (q3 not in the run)
    run     q1 first stage: d2 d1 d4 d3   rerank scores d2 .1, d1 .9, d4 .5, d3 .7  -> reranked d1 d3 d4 d2
            q2 first stage: d6 d7 d5      rerank scores d6 .2, d7 .3, d5 .8         -> reranked d5 d7 d6
            q4 (not judged): ignored
"""

from __future__ import annotations

import json
from math import log2

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
