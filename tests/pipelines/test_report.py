"""pipelines.report: plots and a self-contained page per job run (each job's own report is checked in its tests)."""

from __future__ import annotations

import pytest
from conftest import check_report

from pipelines import report
from pipelines.evaluation import stage_label


def test_a_page_embeds_its_plots_and_escapes_text(tmp_path):
    pyplot = report._pyplot()
    figure, axes = pyplot.subplots()
    axes.plot([1, 2, 3], [3, 1, 2], label="line")
    axes.set(title="t", xlabel="x (units)", ylabel="y (units)")
    axes.legend()
    section = report.Section("A <section> & more", [report.Plot("line", "a caption <b>", report.render(figure))], ["name", "value"], [["a<b", 1.5], ["c", 12345]])
    written = report.write_report(str(tmp_path / "out" / "report.html"), str(tmp_path / "out" / "report"), "Title & <script>", [section])
    check_report(tmp_path / "out" / "report.html", ["line"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Title &amp; &lt;script&gt;" in page and "<script>" not in page and "a&lt;b" in page and "12,345" in page
    assert written["images"] == [str(tmp_path / "out" / "report" / "line.png")]


@pytest.mark.parametrize("summary, expected", [("/out/evaluation.json", ("/out/evaluation.report.html", "/out/evaluation.report")),
                                               ("s3://b/run", ("s3://b/run/report.html", "s3://b/run/report"))])
def test_report_paths_sit_next_to_the_summary(summary, expected):
    assert report.report_paths(summary) == expected


def test_evaluation_sections_plot_quality_and_the_depth_sweep_with_the_depth_used(tmp_path):
    metrics = {"ndcg@10": 0.5, "p@3": 0.3, "mrr@10": 0.45, "recall@100": 0.9}
    sweep = {str(depth): {**metrics, "ndcg@10": 0.5 + depth / 1000, "pairs_per_query": float(depth)} for depth in (10, 20, 30)}
    results = {"queries": {"judged": 3, "with_results": 3, "without_results": 0}, "rerank_depth": 20, "first_stage": metrics,
               "reranked": metrics, "fused": metrics, "depth_sweep": {"reranked": sweep, "fused": {**sweep, "50": None}}}
    sections = report.evaluation_sections({"qrels": "q.tsv", "runs": {"run-a": results}})
    assert [plot.name for section in sections for plot in section.plots] == ["quality", "depth_sweep"]
    assert [row[1] for row in sections[0].rows] == [stage_label(stage, list(results)) for stage in ("first_stage", "reranked", "fused")]
    no_sweep = report.evaluation_sections({"qrels": "q.tsv", "runs": {"run-a": {key: value for key, value in results.items() if key != "depth_sweep"}}})
    assert [plot.name for section in no_sweep for plot in section.plots] == ["quality"]


def test_quarantine_reasons_drop_the_row_specific_detail():
    assert report._reason_kind("duplicate id (first seen in a.jsonl row 3)") == "duplicate id"
    assert report._reason_kind("invalid JSON: Expecting value") == "invalid JSON"
    assert report._reason_kind("missing id; empty text") == "missing id; empty text"
