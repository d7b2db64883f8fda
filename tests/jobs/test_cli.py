"""Errors reach the user as one line, fast: bad settings exit 2 before Ray, torch or faiss load; expected failures exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPOSITORY
from pipelines import index_store, storage
from pipelines.config import ConfigError, parse_config

HEAVY_MODULES = ("ray", "torch", "faiss", "sentence_transformers", "transformers", "openvino")

PROBE = """
import sys
from pipelines.cli import run_job
from jobs.{job} import main
status = run_job(main, sys.argv[1:])
loaded = [name for name in {heavy!r} if name in sys.modules]
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(status)
"""


def run_cli(job: str, *flags: str, timeout: float = 60) -> tuple[int, str, float, list[str]]:
    """(exit status, stderr without the probe line, seconds, heavy modules loaded) of ``python -m jobs.<job> flags``."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    environment.pop("PIPELINES_DEBUG", None)
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", PROBE.format(job=job, heavy=HEAVY_MODULES), *flags], cwd=REPOSITORY, env=environment,
                             capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    lines = process.stderr.strip().splitlines()
    loaded = [line for line in lines if line.startswith("LOADED=")]
    heavy = loaded[-1].removeprefix("LOADED=").split(",") if loaded and loaded[-1] != "LOADED=" else []
    return process.returncode, "\n".join(line for line in lines if not line.startswith("LOADED=")), seconds, heavy


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "some text"}) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "a query"}) + "\n")
    (folder / "bad.yaml").write_text("embedding:\n  batch_size: [unclosed\n")
    (folder / "typo.yaml").write_text("embedding:\n  batch_sise: 8\n")
    return folder


@pytest.mark.parametrize(
    "job, flags, expected",
    [
        ("build_index", ["--corpus", "{inputs}/corpus.jsonl", "--index", "{inputs}/idx", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
        ("build_index", ["--corpus", "{inputs}/missing.jsonl", "--index", "{inputs}/idx"], "--corpus {inputs}/missing.jsonl: no such file or folder"),
        ("build_index", ["--corpus", "{inputs}/corpus.jsonl", "--index", "{inputs}/idx", "--config", "{inputs}/bad.yaml"], "{inputs}/bad.yaml: line 3 not valid YAML"),
        ("build_index", ["--corpus", "{inputs}/corpus.jsonl", "--index", "{inputs}/idx", "--config", "{inputs}/typo.yaml"], "unknown setting 'embedding.batch_sise'"),
        ("build_index", ["--corpus", "{inputs}/corpus.jsonl", "--index", "{inputs}/idx", "--embedding.batch-size", "-1"], "--embedding.batch-size -1: must be at least 0"),
        ("build_index", ["--corpus", "{inputs}/corpus.jsonl", "--index", "{inputs}/idx", "--faiss.memory-budget", "lots"], "--faiss.memory-budget lots: "),
        ("retrieve_rerank", ["--index", "{inputs}/idx", "--queries", "{inputs}/queries.jsonl", "--output", "{inputs}/run", "--top-k", "0"], "--search.top-k 0: must be at least 1"),
        ("retrieve_rerank", ["--index", "{inputs}/idx", "--queries", "{inputs}/queries.jsonl", "--output", "{inputs}/run", "--version", "../../etc"], "is not a plain name"),
        ("train_reranker", ["--index", "{inputs}/idx", "--queries", "{inputs}/queries.jsonl", "--qrels", "{inputs}/q.tsv", "--output", "{inputs}/r"], "--qrels {inputs}/q.tsv: no such file or folder"),
        ("train_reranker", ["--index", "i", "--queries", "{inputs}/queries.jsonl", "--qrels", "{inputs}/queries.jsonl", "--output", "o", "--training.budget", "soon"], "--training.budget soon: training budget 'soon'"),
        ("evaluate", ["--qrels", "{inputs}/missing.tsv", "--run", "{inputs}/run"], "--qrels {inputs}/missing.tsv: no such file or folder"),
    ],
)
def test_a_bad_setting_or_missing_input_is_one_line_and_status_2_before_heavy_imports(inputs, job, flags, expected):
    status, stderr, seconds, heavy = run_cli(job, *[flag.format(inputs=inputs) for flag in flags])
    assert status == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ")
    assert expected.format(inputs=inputs) in stderr
    assert heavy == []
    assert seconds < 10  # measured well under 3 s on a quiet 2-core machine; generous for a loaded CI host


def test_an_expected_failure_is_one_line_and_status_1_and_debug_shows_the_traceback(inputs):
    flags = ["--index", str(inputs / "no-index"), "--queries", str(inputs / "queries.jsonl"), "--output", str(inputs / "run")]
    status, stderr, _, _ = run_cli("retrieve_rerank", *flags)
    assert status == 1
    assert stderr == f"error: {inputs / 'no-index'}: no index here (no CURRENT pointer); build one with jobs.build_index"
    status, stderr, _, _ = run_cli("retrieve_rerank", *flags, "--debug")
    assert status == 1 and "Traceback" in stderr and "IndexValidationError" in stderr


def test_a_missing_reranker_fails_before_any_ray_work(inputs, monkeypatch):
    import pipelines.retrieval as retrieval
    from pipelines.models import ModelNotFoundError
    from pipelines.retrieval import RetrieveRerankConfig

    monkeypatch.setattr(retrieval, "ensure_ray", lambda: pytest.fail("Ray was started"))
    config = parse_config(RetrieveRerankConfig, ["--index", str(inputs / "idx"), "--queries", str(inputs / "queries.jsonl"), "--output", str(inputs / "run"),
                                                 "--reranker", str(inputs / "no-such-model")])
    with pytest.raises(ModelNotFoundError, match="no-such-model does not exist"):
        retrieval.retrieve_and_rerank(config)
    from pipelines.reranking import read_serving_card

    with pytest.raises(ModelNotFoundError):
        read_serving_card(str(inputs / "no-such-model"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible here")
def test_training_on_a_gpu_that_is_not_there_fails_at_once_in_one_line(inputs, tiny_cross_encoder):
    qrels = inputs / "judged.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    flags = ["--index", str(inputs / "no-index"), "--queries", str(inputs / "queries.jsonl"), "--qrels", str(qrels), "--output", str(inputs / "trained"),
             "--training.base-model", tiny_cross_encoder, "--device", "cuda"]
    status, stderr, _, _ = run_cli("train_reranker", *flags)
    assert status == 1 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: device cuda: no GPU is visible to this process") and "--entrypoint-num-gpus 1" in stderr
    assert not (inputs / "trained").exists()  # nothing mined or written
    status, stderr, _, _ = run_cli("train_reranker", *flags[:-1], "tpu")
    assert status == 2 and "--device tpu: choose auto, cuda (or cuda:N) or cpu" in stderr


def test_help_keeps_the_examples_on_their_own_lines_and_shows_each_default_once():
    from jobs.build_index import __doc__ as description
    from pipelines.config import build_argument_parser
    from pipelines.indexing import BuildIndexConfig

    text = build_argument_parser(BuildIndexConfig, description).format_help()
    assert "\nLocal:      python -m jobs.build_index" in text
    assert "(default:" not in text and text.count("[default: 256]") >= 1


def test_nested_settings_are_validated():
    from pipelines.retrieval import RetrieveRerankConfig

    with pytest.raises(ConfigError, match="--rerank.depth 0: must be at least 1"):
        parse_config(RetrieveRerankConfig, ["--index", "i", "--queries", __file__, "--output", "o", "--reranker", "x", "--rerank-depth", "0"])
    with pytest.raises(ConfigError, match="--rerank.fusion maybe: use auto, off"):
        parse_config(RetrieveRerankConfig, ["--index", "i", "--queries", __file__, "--output", "o", "--fusion", "maybe"])


# --- paths from storage stay inside the index -----------------------------------------------------


def test_version_ids_and_current_must_be_plain_names(tmp_path):
    root = str(tmp_path / "index")
    for bad in ("../outside", "a/b", "s3:bucket", ".."):
        with pytest.raises(index_store.IndexValidationError, match="not a plain name"):
            index_store.read_manifest(root, bad)
    storage.write_bytes_atomically(storage.join_url(root, "CURRENT"), b"../../elsewhere\n")
    with pytest.raises(index_store.IndexValidationError, match="CURRENT's version id '../../elsewhere' is not a plain name"):
        index_store.current_version_id(root)


@pytest.mark.parametrize(
    "change",
    [
        lambda manifest: manifest["shards"][0].update(file="../../../etc/passwd"),
        lambda manifest: manifest["shards"][0].update(vectors_file="s3://bucket/vectors.npy"),
        lambda manifest: manifest["doc_ids"].update(file="sub/doc_ids.parquet"),
        lambda manifest: manifest["model"].update(quantized_model="models/../../model"),
        lambda manifest: manifest["model"].update(quantized_model="/abs/model"),
    ],
)
def test_manifest_file_entries_must_stay_inside_the_version(tmp_path, change):
    root = str(tmp_path / "index")
    manifest = {
        "format": index_store.MANIFEST_FORMAT, "version_id": "v1", "created_at": "2026-01-01T00:00:00+00:00",
        "model": {"model": "m", "dimension": 4, "quantized_model": "models/m-int8"},
        "index": {}, "shards": [{"file": "shard-00000.faiss", "vectors_file": "shard-00000.vectors.npy"}],
        "doc_ids": {"file": "doc_ids.parquet"}, "counts": {}, "corpus": {}, "embeddings": {},
    }
    storage.write_json_atomically(storage.join_url(index_store.version_url(root, "v1"), "manifest.json"), manifest)
    assert index_store.read_manifest(root, "v1")["version_id"] == "v1"
    change(manifest)
    storage.write_json_atomically(storage.join_url(index_store.version_url(root, "v1"), "manifest.json"), manifest)
    with pytest.raises(index_store.IndexValidationError, match="manifest.json: .* is not"):
        index_store.read_manifest(root, "v1")
