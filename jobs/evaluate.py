"""Evaluate runs against BEIR qrels: every stage of each run (dense and sparse for a hybrid run, first stage, reranked, fused), and a rerank-depth sweep.

Local:      python -m jobs.evaluate --qrels ../shared/datasets/scifact/qrels/test.tsv --run /tmp/run --depths 10,20,30,50 --output /tmp/evaluation.json
On Ray:     ray job submit --working-dir . -- python -m jobs.evaluate --qrels s3://.../test.tsv --run s3://.../run --output s3://.../evaluation.json
Settings:   --config FILE.yaml, any flag overrides it (see --help). --run is repeatable or comma-separated.
Output:     the tables are always printed; the JSON report is written (atomically) only where --output says.
It needs no Ray: under ``ray job submit`` it simply runs in the driver process.
"""

from __future__ import annotations

import sys

from pipelines.cli import run_job
from pipelines.config import format_config, parse_config
from pipelines.evaluation import EvaluateConfig, evaluate, format_metrics_table


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(EvaluateConfig, argv, description=__doc__)
    print("effective config:\n" + format_config(config), flush=True)
    report = evaluate(config)
    for url, results in report["runs"].items():
        queries = results["queries"]
        if queries["without_results"]:
            print(
                f"warning: {url}: {queries['without_results']} of {queries['judged']} judged queries have no results "
                "and score 0" + (" (no judged query at all: do the query ids match the qrels?)" if not queries["with_results"] else ""),
                flush=True,
            )
    print(format_metrics_table(report["runs"]), flush=True)
    if config.output:
        print(f"wrote {config.output}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:]))
