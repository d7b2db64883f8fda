"""Build a versioned, sharded FAISS index from a corpus.

Local:      python -m jobs.build_index --corpus ../shared/datasets/scifact/corpus.jsonl --index /tmp/idx
On Ray:     ray job submit --working-dir . -- python -m jobs.build_index --corpus s3://... --index s3://...
Settings:   --config jobs/configs/build_index.yaml, any flag overrides it (see --help).
"""

from __future__ import annotations

import sys

from pipelines.cli import run_job
from pipelines.config import format_config, parse_config
from pipelines.indexing import BuildIndexConfig, build_index, summary_table


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(BuildIndexConfig, argv, description=__doc__)
    print("effective config:\n" + format_config(config), flush=True)
    summary = build_index(config)
    print(summary_table(summary), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:]))
