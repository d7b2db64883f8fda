"""Fine-tune a domain cross-encoder on labelled queries with hard negatives mined from an index.

Local:   python -m jobs.train_reranker --index /tmp/idx --queries ../shared/datasets/scifact/queries.jsonl \
             --qrels ../shared/datasets/scifact/qrels/train.tsv --output /tmp/reranker
On Ray:  ray job submit --working-dir . -- python -m jobs.train_reranker ... (training runs in the driver process;
         put the driver on a GPU node with --entrypoint-num-gpus 1).
Writes OUTPUT/model (a CrossEncoder folder with fusion.json) and OUTPUT/training_report.json;
a killed run resumes from OUTPUT/checkpoints.
"""

from __future__ import annotations

import json
import sys

from pipelines.cli import run_job
from pipelines.config import format_config, parse_config
from pipelines.runtime import format_table
from pipelines.training import TrainRerankerConfig, train_reranker


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(TrainRerankerConfig, argv, description=__doc__)
    print("effective config:\n" + format_config(config), flush=True)
    report = train_reranker(config)
    plan = report["plan"]
    rows = [("training queries (with a judged candidate)", f"{report['train_queries']} ({report['trainable_queries']})"), ("training lists", report["training_lists"]),
            ("steps (distilling the first stage)", f"{report['steps']} ({plan['distillation_steps']})"), ("pairs/s", float(report["pairs_per_second"])),
            ("train time (s) / budget", f"{report['train_seconds']:.0f} / {plan['budget_seconds']:.0f}"), ("best step", report["best_step"]),
            ("fusion weight", str(report["fusion_weight"]))]
    for stage, metrics in report["dev"].items():
        rows.append((f"dev {stage} nDCG@10 / P@3", f"{metrics['ndcg@10']:.4f} / {metrics['p@3']:.4f}"))
    rows.append(("serving", report["serving"]["message"]))
    print(format_table(rows, title=f"reranker -> {report['model']}"), flush=True)
    print(json.dumps({"loss_curve_tail": report["loss_curve"][-3:], "dev_curve": report["dev_curve"]}), flush=True)
    return report


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:]))
