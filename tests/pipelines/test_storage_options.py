"""--storage.options: fsspec settings per protocol that reach every filesystem a job opens, driver and Ray workers, never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPOSITORY, write_jsonl
from pipelines import storage
from pipelines.config import config_to_dict, format_config, parse_config

SECRET_KEY, SECRET = "AKIAEXAMPLEKEY7Q", "s3cr3t-value-never-printed"


@pytest.fixture
def restore_storage_options():
    yield
    storage.configure({})


def test_options_parse_from_inline_yaml_json_or_a_file(tmp_path):
    assert storage.parse_options("") == {}
    assert storage.parse_options('{"s3": {"endpoint_url": "http://127.0.0.1:9"}}') == {"s3": {"endpoint_url": "http://127.0.0.1:9"}}
    assert storage.parse_options("{s3: {anon: true}, gs: {token: anon}}") == {"s3": {"anon": True}, "gs": {"token": "anon"}}
    (tmp_path / "storage.yaml").write_text("s3:\n  profile: dev\n")
    assert storage.parse_options(str(tmp_path / "storage.yaml")) == {"s3": {"profile": "dev"}}
    with pytest.raises(ValueError, match="neither YAML/JSON nor a file"):
        storage.parse_options(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="mapping of URL protocol to options"):
        storage.parse_options("{s3: 3}")


def test_options_apply_per_protocol_and_travel_in_the_environment(restore_storage_options):
    storage.configure({"s3": {"endpoint_url": "http://127.0.0.1:9"}, "gs": {"token": "anon"}})
    assert storage.filesystem_options("s3://bucket/x") == storage.filesystem_options("s3a://bucket/x") == {"endpoint_url": "http://127.0.0.1:9"}
    assert storage.filesystem_options("gcs://bucket/x") == {"token": "anon"}
    assert storage.filesystem_options("/local/path") == {}
    assert json.loads(os.environ[storage.OPTIONS_VARIABLE])["s3"]["endpoint_url"] == "http://127.0.0.1:9"
    storage.configure({})
    assert storage.OPTIONS_VARIABLE not in os.environ and storage.filesystem_options("s3://bucket/x") == {}


def test_secrets_never_appear_in_the_printed_or_recorded_config(tmp_path, restore_storage_options):
    from pipelines.evaluation import EvaluateConfig

    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq\td\t1\n")
    (tmp_path / "run").mkdir()
    options = json.dumps({"s3": {"endpoint_url": "http://127.0.0.1:9", "key": SECRET_KEY, "secret": SECRET, "client_kwargs": {"aws_session_token": SECRET}}})
    config = parse_config(EvaluateConfig, ["--qrels", str(qrels), "--run", str(tmp_path / "run"), "--storage.options", options])
    recorded = json.dumps(config_to_dict(config)) + format_config(config)
    assert SECRET not in recorded and SECRET_KEY not in recorded
    assert config_to_dict(config)["storage"]["options"]["s3"] == {"endpoint_url": "http://127.0.0.1:9", "key": "***", "secret": "***",
                                                                   "client_kwargs": {"aws_session_token": "***"}}
    assert storage.filesystem_options("s3://b/k")["secret"] == SECRET  # in effect, only not shown


@pytest.mark.s3
def test_a_query_job_reaches_s3_through_storage_options_alone(damaged_corpus_index, s3_bucket, tmp_path):
    """The index and the output on S3, no AWS variables in the job's environment: the endpoint and keys come from
    --storage.options, on the driver and in the Ray workers that load the shards; no secret is printed or written."""
    filesystem, _ = storage.filesystem_and_path(s3_bucket)
    filesystem.put(str(damaged_corpus_index.root), f"{s3_bucket.removeprefix('s3://')}/index", recursive=True)
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"_id": f"q{n}", "text": f"topic words {n}"} for n in range(8)])
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_") and key != "RAY_ADDRESS"}
    environment["PYTHONPATH"] = str(REPOSITORY)
    options = json.dumps({"s3": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "key": SECRET_KEY, "secret": SECRET,
                                 "client_kwargs": {"region_name": "us-east-1"}}})
    flags = ["--index", f"{s3_bucket}/index", "--queries", str(queries), "--output", f"{s3_bucket}/run", "--top-k", "5", "--storage.options", options]
    process = subprocess.run([sys.executable, "-m", "jobs.retrieve_rerank", *flags], cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert SECRET not in process.stdout + process.stderr and SECRET_KEY not in process.stdout + process.stderr
    written = filesystem.find(f"{s3_bucket.removeprefix('s3://')}/run")
    assert any(path.endswith("run.json") for path in written) and any(path.endswith(".parquet") for path in written)
    for path in written:
        if path.endswith(".json"):
            text = filesystem.cat_file(path).decode()
            assert SECRET not in text and SECRET_KEY not in text, path
    # Without the options (and without AWS variables) the same job cannot reach the bucket.
    failed = subprocess.run([sys.executable, "-m", "jobs.retrieve_rerank", *flags[:-2]], cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0


@pytest.mark.s3
def test_qrels_on_s3_are_read_with_the_storage_options(s3_bucket, monkeypatch, restore_storage_options):
    from pipelines.evaluation import read_qrels

    storage.write_bytes_atomically(f"{s3_bucket}/qrels.tsv", b"query-id\tcorpus-id\tscore\nq1\td1\t2\n")
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for variable in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(variable)
    storage.configure({"s3": {"endpoint_url": endpoint, "key": SECRET_KEY, "secret": SECRET, "client_kwargs": {"region_name": "us-east-1"}}})
    assert read_qrels(f"{s3_bucket}/qrels.tsv") == {"q1": {"d1": 2}}
