"""bench.nightly: the churned snapshot (fast) and one small end-to-end run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest
from conftest import REPOSITORY

from bench import nightly, scale


def read_corpus(corpus) -> pa.Table:
    tables = [pq.read_table(path) if path.suffix == ".parquet" else pj.read_json(path) for path in sorted(corpus.iterdir())]
    return pa.concat_tables([table.select(["_id", "title", "text"]) for table in tables])


def test_the_churned_snapshot_changes_removes_and_adds_the_churn_fraction(tmp_path):
    base = scale.generate_corpus(tmp_path, 1_000, seed=2, parquet_files=2)
    churned = nightly.generate_churned_corpus(tmp_path, base, 0.05, seed=2)
    assert sorted(path.name for path in churned.iterdir()) == sorted(path.name for path in base.iterdir())  # the same layout
    spec = json.loads((churned.parent / "spec.json").read_text())
    assert (spec["changed"], spec["removed"], spec["new"]) == (50, 50, 50)
    before, after = read_corpus(base), read_corpus(churned)
    old = {row["_id"]: (row["title"], row["text"]) for row in before.to_pylist()}
    new = {row["_id"]: (row["title"], row["text"]) for row in after.to_pylist()}
    assert after.num_rows == len(new) == 1_000  # 50 removed, 50 added, ids unique
    assert sorted(set(new) - set(old)) == sorted(f"d{number}" for number in range(1_000, 1_050))
    assert len(set(old) - set(new)) == 50
    changed = [key for key in set(old) & set(new) if old[key] != new[key]]
    assert len(changed) == 50 and all(old[key][1] != new[key][1] for key in changed)
    kept = [row["_id"] for row in after.to_pylist() if row["_id"] in old]
    assert kept == [identifier for identifier in before["_id"].to_pylist() if identifier in new]  # survivors keep their order
    assert max(int(key[1:]) for key in changed) > 500 and min(int(key[1:]) for key in changed) < 500  # drawn through the whole corpus
    stamp = (churned.parent / "spec.json").stat().st_mtime_ns
    assert nightly.generate_churned_corpus(tmp_path, base, 0.05, seed=2) == churned  # cached
    assert (churned.parent / "spec.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_bench_nightly_small_run(tmp_path):
    """3,000 documents with an IVF index: the nightly embeds the changed and new documents and reuses the quantizer."""
    output = tmp_path / "nightly.json"
    command = [sys.executable, "-m", "bench.nightly", "--docs", "3000", "--factory", "IVF16,Flat", "--recall-queries", "100",
               "--workdir", str(tmp_path / "work"), "--output", str(output)]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=1800, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    payload = json.loads(output.read_text())
    churn = payload["churn"]
    assert (churn["changed"], churn["removed"], churn["new"]) == (150, 150, 150)
    full, night, retrain = (payload["stages"][name] for name in ("full_build", "nightly_build", "retrain_build"))
    assert (full["embedded"], full["incremental"]["trained"]) == (3000, "retrained")
    assert (night["embedded"], night["reused_embeddings"], night["indexed"]) == (300, 2700, 3000)  # exactly the changed and the new documents
    assert night["incremental"]["trained"] == "reused" and night["incremental"]["previous_version"] == full["version_id"]
    assert night["incremental"]["drift"]["ratio"] <= night["incremental"]["drift"]["threshold"]
    assert (retrain["embedded"], retrain["incremental"]["trained"], retrain["incremental"]["reason"]) == (0, "retrained", "--faiss.retrain")
    assert len({full["version_id"], night["version_id"], retrain["version_id"]}) == 3
    for stage in (full, night, retrain):
        assert stage["wall_s"] > 0 and stage["summary_seconds"]["wall_seconds"] > 0
    assert payload["full_s"] > 0 and payload["nightly_s"] > 0 and payload["retrain_s"] > 0
    assert payload["nightly_over_full"] == pytest.approx(payload["nightly_s"] / payload["full_s"])
    recalls = [payload["recall"][name]["recall_at_100"] for name in ("nightly_build", "retrain_build")]
    assert all(0 <= value <= 1 for value in recalls)
    assert payload["recall_difference"] == pytest.approx(recalls[0] - recalls[1])
    assert set(payload["verdicts"].values()) <= {"pass", "fail"}
    assert "issue 11's bars" in payload["table"]
