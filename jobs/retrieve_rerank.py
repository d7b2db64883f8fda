"""Retrieve-then-rerank a query log against an index; ranked results as Parquet.

Local:   python -m jobs.retrieve_rerank --index /tmp/idx --queries ../shared/datasets/scifact/queries.jsonl \
             --qrels ../shared/datasets/scifact/qrels/test.tsv --output /tmp/run --reranker none
On Ray:  ray job submit --working-dir . -- python -m jobs.retrieve_rerank --index s3://... --queries s3://... --output s3://...
Output columns: query_id, rank, doc_id, score, first_stage_rank, first_stage_score, rerank_score, fused_score.
"""

from __future__ import annotations

import sys

from pipelines.cli import run_job
from pipelines.config import format_config, parse_config
from pipelines.retrieval import RetrieveRerankConfig, retrieve_and_rerank, summary_table


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(RetrieveRerankConfig, argv, description=__doc__)
    print("effective config:\n" + format_config(config), flush=True)
    summary = retrieve_and_rerank(config)
    print(summary_table(summary), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:]))
