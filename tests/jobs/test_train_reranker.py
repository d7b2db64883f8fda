"""jobs.train_reranker end to end with tiny models: mining, a planned run, the serving card, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import WORDS, check_report, write_jsonl
from pipelines import index_store


@pytest.fixture(scope="module")
def judged_queries(tmp_path_factory):
    """60 topic queries; each judges three of its topic's documents (grades 2, 1, 1)."""
    folder = tmp_path_factory.mktemp("judged-queries")
    rng = np.random.default_rng(4)
    records, lines = [], ["query-id\tcorpus-id\tscore"]
    for number in range(60):
        topic = number % 10
        records.append({"_id": f"q{number}", "text": " ".join(rng.choice(WORDS[topic * 50 : (topic + 1) * 50], size=5))})
        for rank, doc in enumerate(rng.choice(range(topic, 240, 10), size=3, replace=False)):
            lines.append(f"q{number}\td{doc}\t{2 if rank == 0 else 1}")
    queries = write_jsonl(folder / "queries.jsonl", records)
    qrels = folder / "train.tsv"
    qrels.write_text("\n".join(lines) + "\n")
    return str(queries), str(qrels)


def train(index: str, queries: str, qrels: str, output: str, tiny_cross_encoder: str) -> dict:
    from jobs.train_reranker import main

    return main([
        "--index", index, "--queries", queries, "--qrels", qrels, "--output", output, "--int8", "false", "--fusion-depth", "10",
        "--training.base-model", tiny_cross_encoder, "--training.max-steps", "12", "--training.dev-queries", "10", "--training.dev-depth", "10",
        "--training.max-length", "32", "--training.precision", "fp32", "--training.evaluations", "3", "--training.checkpoints", "3",
        "--training.mining.candidate-depth", "40",
    ])


def test_training_job_plans_trains_and_writes_a_serving_card(damaged_corpus_index, judged_queries, tiny_cross_encoder, tmp_path):
    root = str(damaged_corpus_index.root)
    queries, qrels = judged_queries
    output = tmp_path / "reranker"
    report = train(root, queries, qrels, str(output), tiny_cross_encoder)
    plan = report["plan"]
    assert report["steps"] == plan["total_steps"] == 12 and plan["distillation_steps"] == 3
    assert plan["evaluation_steps"] == [3, 7, 12]
    assert [point["step"] for point in report["dev_curve"]] == [3, 7, 12]
    assert report["best_step"] in (3, 7, 12)
    assert report["train_queries"] == 50 and report["dev_queries"] == 10 and 0 < report["trainable_queries"] <= 50
    assert report["training_lists"] == 12 * 4
    dev = report["dev"]
    assert dev["fused"]["ndcg@10"] >= dev["first_stage"]["ndcg@10"]  # the gate: a = 0 is always a candidate
    card = json.loads((output / "model" / "fusion.json").read_text())
    assert card["weight"] == report["fusion_weight"] and card["mode"] in ("fused", "first_stage")
    assert card["message"] == report["serving"]["message"] and "\n" not in card["message"]
    assert card["fitted_on"].startswith(f"10 training queries of {qrels}")
    manifest = index_store.read_manifest(root)
    assert card["trained_on"]["corpus_fingerprint"] == index_store.corpus_fingerprint(index_store.load_doc_ids(root, manifest))
    assert json.loads((output / "plan.json").read_text())["total_steps"] == 12
    check_report(output / "report.html", ["loss", "dev_ndcg", "fusion_weight"])
    assert [point["weight"] for point in report["fusion_curve"]][:3] == [0.0, 0.05, 0.1] and report["report"] == str(output / "report.html")
    # A rerun finds the finished run: same plan, no step trained again.
    again = train(root, queries, qrels, str(output), tiny_cross_encoder)
    assert again["plan_reused"] and again["resumed"] and again["steps"] == 12 and again["fusion_weight"] == report["fusion_weight"]


def test_demo_names_runs_after_the_dataset_folder_and_checks_the_split(tmp_path):
    from jobs.demo import DemoConfig, dataset_name

    folder = tmp_path / "nfcorpus"
    (folder / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv"):
        (folder / name).write_text("")
    config = DemoConfig(dataset=str(folder) + "/", eval_split="dev")
    config.validate()
    assert dataset_name(config) == "nfcorpus"
    with pytest.raises(FileNotFoundError, match="qrels/test.tsv"):
        DemoConfig(dataset=str(folder), eval_split="test").validate()
    with pytest.raises(ValueError, match="held-out split"):
        DemoConfig(dataset=str(folder), eval_split="train").validate()
