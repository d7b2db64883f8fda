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

from pipelines.config import format_config, parse_config
from pipelines.runtime import format_table
from pipelines.training import TrainRerankerConfig, train_reranker


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(TrainRerankerConfig, argv, description=__doc__)
    print("effective config:\n" + format_config(config), flush=True)
    report = train_reranker(config)
    rows = [("training tuples", report["training_tuples"]), ("steps", report["steps"]), ("pairs/s", float(report["pairs_per_second"])),
            ("train time (s)", float(report["train_seconds"])), ("fusion weight", report["fusion_weight"])]
    for stage, metrics in report["dev"].items():
        rows.append((f"dev {stage} nDCG@10 / P@3", f"{metrics['ndcg@10']:.4f} / {metrics['p@3']:.4f}"))
    print(format_table(rows, title=f"reranker -> {report['model']}"), flush=True)
    print(json.dumps({"loss_curve_tail": report["loss_curve"][-3:]}), flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
