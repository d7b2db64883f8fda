"""The demo: index a BEIR dataset (SciFact by default), train a domain reranker, retrieve-then-rerank, evaluate.

    python -m jobs.demo [--workdir DIR] [--reranker train|none|MODEL] [--dataset DIR] [--eval-split test|dev]

The reranker learns from qrels/train.tsv and is evaluated on qrels/<eval-split>.tsv; tables, run
names and the report are labelled with the dataset folder's name.

Everything it builds lives under --workdir (default ~/.cache/retrieval-pipelines/demo) and is reused
by the next run: the index (its embeddings and finished version), the trained reranker (cached by
its inputs and config), and the query runs. It prints every stage's nDCG@10, P@3 and recall@100
(the dense and BM25 retrievers and their fused first stage for a hybrid index, or the one first
stage; reranked; fused), the lift in nDCG@10 and P@3 over the dense retriever (else the first
stage), and the rerank-depth sweep; demo_report.json holds all of it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import index_store, storage
from pipelines.cli import run_job
from pipelines.config import config_to_dict, format_config, parse_config
from pipelines.evaluation import STAGES, RunEvaluator, format_metrics_table, read_qrels, read_run, stage_label
from pipelines.indexing import BuildIndexConfig, build_index, summary_table
from pipelines.reranking import quantized_reranker_url
from pipelines.retrieval import RetrieveRerankConfig, retrieve_and_rerank
from pipelines.retrieval import summary_table as query_summary_table
from pipelines.runtime import ensure_ray, format_table
from pipelines.training import TrainingConfig, TrainRerankerConfig, cache_key, train_reranker

DEFAULT_DATASET = str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact")


@dataclass
class DemoConfig:
    """Settings of jobs.demo."""

    workdir: str = field(default="~/.cache/retrieval-pipelines/demo", metadata={"help": "where the index, reranker, runs and report live"})
    dataset: str = field(default=DEFAULT_DATASET, metadata={"help": "a BEIR folder: corpus.jsonl, queries.jsonl, qrels/train.tsv and qrels/<eval-split>.tsv"})
    eval_split: str = field(default="test", metadata={"help": "the qrels split the demo evaluates on (qrels/<split>.tsv); the reranker trains on train"})
    reranker: str = field(default="train", metadata={"help": "train (fine-tune on the train split, cached), none, or a CrossEncoder id/path"})
    rerank_depth: int = field(default=50, metadata={"help": "candidates reranked per test query (the fusion weight is fitted at this depth)"})
    top_k: int = 100
    depths: list[int] = field(default_factory=lambda: [10, 20, 30, 50], metadata={"help": "rerank depths for the quality/cost sweep"})
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"rerank_depth": 1, "top_k": 1})
        if self.rerank_depth > self.top_k:
            raise ValueError(f"--rerank-depth {self.rerank_depth} is deeper than --top-k {self.top_k}")
        if self.eval_split == "train":
            raise ValueError("--eval-split train: the reranker trains on qrels/train.tsv; evaluate on a held-out split")
        required = ["corpus.jsonl", "queries.jsonl", f"qrels/{self.eval_split}.tsv"] + (["qrels/train.tsv"] if self.reranker == "train" else [])
        missing = [name for name in required if not os.path.exists(os.path.join(self.dataset, name))]
        if missing:
            raise FileNotFoundError(f"{self.dataset}: not a BEIR dataset folder (missing {', '.join(missing)})")


def dataset_name(config: DemoConfig) -> str:
    """The dataset's own name: its folder's."""
    return os.path.basename(os.path.normpath(config.dataset))


LIFT_METRICS = ("ndcg@10", "p@3")


def _lift_percent(after: float, before: float) -> float | None:
    """The relative change in percent; None when there is nothing to compare against."""
    return 100.0 * (after - before) / before if before else None


def stage_lifts(results: dict) -> tuple[str, dict[str, dict[str, float | None]]]:
    """(baseline, {stage: {metric: lift in percent}}) for every stage after the baseline: the dense
    retriever when the run has that stage (a hybrid run), else the first stage."""
    stages = [stage for stage in STAGES if stage in results]
    baseline = "dense" if "dense" in stages else "first_stage"
    later = stages[stages.index(baseline) + 1 :]
    return baseline, {stage: {metric: _lift_percent(results[stage][metric], results[baseline][metric]) for metric in LIFT_METRICS} for stage in later}


def stage_rows(results: dict) -> list[tuple[str, str]]:
    """Summary rows: every stage's nDCG@10 / P@3 / R@100 in pipeline order, each followed by its lift
    over the baseline of :func:`stage_lifts` (named in the label)."""
    stages = [stage for stage in STAGES if stage in results]
    baseline, lifts = stage_lifts(results)
    rows = []
    for stage in stages:
        metrics, label = results[stage], stage_label(stage, stages).replace("_", " ")
        rows.append((f"{label} nDCG@10 / P@3 / R@100", f"{metrics['ndcg@10']:.4f} / {metrics['p@3']:.4f} / {metrics['recall@100']:.4f}"))
        if stage in lifts:
            values = " / ".join("n/a" if lift is None else f"{lift:+.1f}%" for lift in lifts[stage].values())
            rows.append((f"{label} lift over {stage_label(baseline, stages).replace('_', ' ')} nDCG@10 / P@3", values))
    return rows


def prepare_reranker(config: DemoConfig, workdir: str, index_url: str) -> str:
    """The reranker to use: none, a given model, or one trained here (cached by inputs and config)."""
    if config.reranker != "train":
        return config.reranker
    train_qrels = os.path.join(config.dataset, "qrels", "train.tsv")
    manifest = index_store.read_manifest(index_url)
    key = cache_key(
        {
            "index_version": manifest["version_id"],
            "train_qrels": storage.sha256_bytes(storage.read_bytes(train_qrels)),
            "queries": storage.sha256_bytes(storage.read_bytes(os.path.join(config.dataset, "queries.jsonl"))),
            "fusion_depth": config.rerank_depth,
            "training": config_to_dict(config.training),
        }
    )
    folder = os.path.join(workdir, "rerankers", key)
    if os.path.exists(os.path.join(folder, "training_report.json")):
        print(f"reusing the reranker trained earlier: {folder}/model")
        return os.path.join(folder, "model")
    print(f"training the {dataset_name(config)} reranker on the train split into {folder} (budget {config.training.budget})")
    training = TrainRerankerConfig(
        index=index_url,
        queries=os.path.join(config.dataset, "queries.jsonl"),
        qrels=train_qrels,
        output=folder,
        fusion_depth=config.rerank_depth,
        training=config.training,
    )
    report = train_reranker(training)
    return report["model"]


def run_demo(config: DemoConfig) -> dict:
    started = time.perf_counter()
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    os.makedirs(workdir, exist_ok=True)
    ensure_ray()
    index_url = os.path.join(workdir, "index")
    index_summary = build_index(BuildIndexConfig(corpus=os.path.join(config.dataset, "corpus.jsonl"), index=index_url))
    print(summary_table(index_summary))
    reranker = prepare_reranker(config, workdir, index_url)
    name = dataset_name(config)
    run_name = f"{name}-{config.eval_split}"
    test_qrels = os.path.join(config.dataset, "qrels", f"{config.eval_split}.tsv")
    query_config = RetrieveRerankConfig(index=index_url, queries=os.path.join(config.dataset, "queries.jsonl"), qrels=test_qrels)
    query_config.search.top_k = config.top_k
    query_config.rerank.model = reranker
    query_config.rerank.depth = config.rerank_depth
    version = index_store.current_version_id(index_url)
    reranker_int8 = bool(query_config.rerank.enabled and quantized_reranker_url(reranker))
    run_key = cache_key({"index": version, "reranker": reranker, "int8": reranker_int8, "depth": config.rerank_depth, "top_k": config.top_k})
    query_config.output = os.path.join(workdir, "runs", f"{run_name}-{run_key}")
    query_summary = retrieve_and_rerank(query_config)
    print(query_summary_table(query_summary))

    evaluator = RunEvaluator(read_qrels(test_qrels), depths=config.depths if query_config.rerank.enabled else ())
    results = evaluator(read_run(query_config.output))
    print(format_metrics_table({run_name: results}))
    rows = stage_rows(results)
    baseline, lifts = stage_lifts(results)
    if not query_config.rerank.enabled:
        rows.append(("reranker", "none: first stage only (--reranker train or a CrossEncoder path enables it)"))
    elif query_summary["reranker"] == "none":
        rows.append(("reranker scoring", "skipped: the first stage is served (see the notes)"))
    else:
        rows.append(("reranker scoring", "int8 (OpenVINO)" if reranker_int8 else "torch"))
    report_url = os.path.join(os.path.dirname(reranker), "training_report.json")
    training_report = storage.read_json(report_url) if config.reranker == "train" and os.path.exists(report_url) else None
    for note in query_summary.get("reranker_notes", []):
        rows.append(("reranker note", note))
    if training_report:
        rows.append(("reranker on dev", training_report["serving"]["message"]))
        rows.append(("reranker training (s, steps, pairs/s)", f"{training_report['train_seconds']:.0f} / {training_report['steps']} / {training_report['pairs_per_second']:.1f}"))
        rows.append(("reranker job, mining to int8 (s)", round(float(training_report["wall_seconds"]), 1)))
    rows.append(("demo wall time (s)", round(time.perf_counter() - started, 1)))
    print(format_table(rows, title=f"{run_name} ({results['queries']['judged']} queries)"))
    report = {
        "config": config_to_dict(config),
        "dataset": name,
        "eval_split": config.eval_split,
        "index": index_summary,
        "reranker": reranker,
        "query_job": {key: value for key, value in query_summary.items() if key != "config"},
        "metrics": results,
        "lift_baseline": baseline,
        "lift_percent": {
            stage: {metric: None if lift is None else round(lift, 2) for metric, lift in by_metric.items()} for stage, by_metric in lifts.items()
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if training_report:
        report["training"] = training_report
    report["report"] = write_demo_report(workdir, run_name, index_url, index_summary, training_report, query_summary,
                                         {"qrels": test_qrels, "runs": {run_name: results}})
    storage.write_json_atomically(os.path.join(workdir, "demo_report.json"), report)
    print(f"report: {os.path.join(workdir, 'demo_report.json')}; with plots: {report['report']}")
    return report


def write_demo_report(workdir: str, run_name: str, index_url: str, index_summary: dict, training_report: dict | None, query_summary: dict,
                      evaluation: dict) -> str:
    """One page with every job's plots: the index, the reranker's training, the query run and its quality and depth sweep."""
    from pipelines import report as run_report

    manifest = index_store.read_manifest(index_url)
    quarantine = manifest["quarantine"]["url"] if manifest.get("quarantine") else ""
    sections = [run_report.Section(f"Index: {section.heading}", section.plots, section.headers, section.rows, section.notes)
                for section in run_report.index_sections(index_summary, manifest, run_report.quarantine_reasons(quarantine) if quarantine else {})]
    if training_report:
        sections += [run_report.Section(f"Reranker training: {section.heading}", section.plots, section.headers, section.rows, section.notes)
                     for section in run_report.training_sections(training_report)]
    sections += run_report.query_sections(query_summary, evaluation)
    html_url, images_url = os.path.join(workdir, "demo_report.html"), os.path.join(workdir, "demo_report")
    for section in sections:  # one folder of PNGs for the page: names unique across the jobs
        for plot in section.plots:
            plot.name = f"{section.heading.split(':')[0].lower().replace(' ', '_')}-{plot.name}"
    run_report.write_report(html_url, images_url, f"Demo: {run_name}", sections, subtitle=f"index {index_url}, version {manifest['version_id']}")
    return html_url


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(DemoConfig, argv, description=__doc__)
    print("effective config:\n" + format_config(config), flush=True)
    return run_demo(config)


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:]))
