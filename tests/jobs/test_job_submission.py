"""Job submission end to end: a Ray head of our own, then build_index, retrieve_rerank and evaluate as submitted jobs.

The head runs on this machine (``ray start --head --block`` in a subprocess this module owns, in its own
temporary folder, on free ports), so the jobs read the tiny models and the corpus from local absolute
paths and write their outputs next to them. The head is stopped by process id (its process group),
never with ``ray stop``, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPOSITORY,
    WORDS,
    build_index_flags,
    synthetic_documents,
    write_jsonl,
)
from pipelines import storage

pytest.importorskip("aiohttp_cors", reason="job submission needs ray[default] (the dashboard's job server): pip install -e '.[cluster]'")

# 2 to 4 minutes on 2 shared CPUs (a head, then three jobs, each with its own runtime environment and driver): slow too.
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
RUNTIME_ENV = REPOSITORY / "jobs" / "configs" / "runtime_env.yaml"
HEAD_START_TIMEOUT = 120
JOB_TIMEOUT = 240


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (all held open together while they are chosen)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


# Ray >= 2.5x turns token authentication on when ~/.ray/auth_token exists (and ray.init makes one). The head and
# every client of it here get the mode and a token of their own through the environment: the test neither
# depends on nor touches ~/.ray, and this process's Ray state (the session's shared instance) is left alone.
AUTH_TOKEN = secrets.token_hex(32)


def head_environment() -> dict[str, str]:
    """The environment of the head and of the ``ray`` commands that talk to it."""
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": AUTH_TOKEN}
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_ID", "RAY_AUTH_TOKEN_PATH"):
        environment.pop(variable, None)
    # No AWS settings on the head: a submitted job reaches S3 only through what it is given (--storage.options).
    return {name: value for name, value in environment.items() if not name.startswith("AWS_")}


# Polls one job until it is terminal with the JobSubmissionClient, in a child process with head_environment();
# prints the status and the job's message as JSON.
WAIT = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
address, submission_id, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = JobSubmissionClient(address)
deadline = time.monotonic() + timeout
while not (status := client.get_job_status(submission_id)).is_terminal():
    if time.monotonic() > deadline:
        client.stop_job(submission_id)
        break
    time.sleep(1)
info = client.get_job_info(submission_id)
print(json.dumps({"status": str(status.value), "message": info.message}))
"""


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head (2 CPUs) with its own temp folder and ports; yields the dashboard address."""
    # A short folder of our own: Ray's socket paths live under it and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    # Every port the head would otherwise take by default (6379, 8265, 10001, 52365, ...): they would clash
    # with another Ray instance on this machine (the session's shared one is in-process and takes none of these).
    gcs, dashboard, client, agent_listen, agent_grpc, runtime_env_agent, metrics, object_manager, node_manager = free_ports(9)
    command = [
        *RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
        "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_listen),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent),
        "--metrics-export-port", str(metrics), "--object-manager-port", str(object_manager),
        "--node-manager-port", str(node_manager), "--object-store-memory", str(256 * 1024 * 1024),
    ]
    # Its own session (process group): at the end the group (the head's processes) is stopped by its id.
    with open(Path(temp_dir) / "ray-start.log", "w") as log:
        process = subprocess.Popen(command, cwd=temp_dir, env=head_environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            answer = subprocess.run([*RAY, "job", "list", "--address", address], env=head_environment(), capture_output=True, text=True,
                                    timeout=60, check=False)
            if answer.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the job server at {address} did not answer in {HEAD_START_TIMEOUT} s:\n{answer.stderr[-2000:]}\n"
                            f"{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(2)
        yield address
    finally:
        stop_head(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def processes_of(temp_dir: str) -> list[int]:
    """Pids whose command line names the head's temp folder (Ray puts its session folder on every process's command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def stop_head(process: subprocess.Popen, temp_dir: str) -> None:
    """What ``ray stop`` does, for this head only: SIGTERM to its processes (``ray start --block``, GCS, raylet,
    dashboard, ... share the process group it was started in; workers, which run in groups of their own, are
    found by the temp folder on their command line), then SIGKILL to whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # start_new_session: the group id is the leader's pid
    for pid in processes_of(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    deadline = time.monotonic() + 10
    while processes_of(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in processes_of(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def submit(address: str, job: str, *flags: str, runtime_env: Path = RUNTIME_ENV) -> str:
    """``ray job submit --no-wait`` of ``python -m jobs.<job> flags`` from the repository; returns the submission id."""
    submission_id = f"test-{job}-{uuid.uuid4().hex[:8]}"
    command = [
        *RAY, "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
        "--working-dir", str(REPOSITORY), "--runtime-env", str(runtime_env),
        "--", "python", "-m", f"jobs.{job}", *flags,
    ]
    result = subprocess.run(command, cwd=REPOSITORY, env=head_environment(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"ray job submit failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return submission_id


def wait_for(address: str, submission_id: str) -> str:
    """Poll the job's status until it is terminal (``submit --no-wait`` returns before that); checks SUCCEEDED, returns the logs."""
    result = subprocess.run([sys.executable, "-c", WAIT, address, submission_id, str(JOB_TIMEOUT)], env=head_environment(),
                            capture_output=True, text=True, timeout=JOB_TIMEOUT + 60, check=False)
    assert result.returncode == 0, f"polling {submission_id} failed:\n{result.stderr[-3000:]}"
    final = json.loads(result.stdout.strip().splitlines()[-1])
    logs = ray_job_logs(address, submission_id)
    assert final["status"] == "SUCCEEDED", f"{submission_id}: {final['status']} ({final['message']}):\n{logs[-5000:]}"
    return logs


def ray_job_logs(address: str, submission_id: str) -> str:
    result = subprocess.run([*RAY, "job", "logs", "--address", address, submission_id], env=head_environment(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 200-document topic corpus, 20 topic queries and qrels for 10 of them, on local absolute paths."""
    folder = tmp_path_factory.mktemp("job-submission-inputs")
    corpus = write_jsonl(folder / "corpus.jsonl", synthetic_documents(200, seed=3))
    rng = np.random.default_rng(11)
    queries = write_jsonl(folder / "queries.jsonl", [
        {"_id": f"q{number}", "text": " ".join(rng.choice(WORDS[(number % 10) * 50 : (number % 10 + 1) * 50], size=6))}
        for number in range(20)
    ])
    qrels = folder / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{n}\td{n}\t1\n" for n in range(10)))
    return {"corpus": corpus.resolve(), "queries": queries.resolve(), "qrels": qrels.resolve()}


def test_submitted_jobs_build_retrieve_and_evaluate(ray_head, inputs, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    outputs = tmp_path.resolve()
    index, run, evaluation = outputs / "index", outputs / "run", outputs / "evaluation.json"

    build = submit(ray_head, "build_index", *build_index_flags(
        inputs["corpus"], index, tiny_bi_encoder, "--embedding.max-seq-length", "64", "--faiss.factory", "Flat"))
    logs = wait_for(ray_head, build)
    assert "effective config:" in logs and "index version" in logs and "indexed" in logs, logs[-3000:]
    assert (index / "CURRENT").is_file()
    version = (index / "CURRENT").read_text().strip()
    assert f"index version {version}" in logs

    retrieve = submit(ray_head, "retrieve_rerank", "--index", str(index), "--queries", str(inputs["queries"]), "--output", str(run),
                      "--reranker", tiny_cross_encoder, "--top-k", "10", "--rerank-depth", "5")
    logs = wait_for(ray_head, retrieve)
    assert f"retrieve-rerank on index version {version}" in logs and "queries read" in logs, logs[-3000:]
    assert list(run.rglob("*.parquet")), f"no Parquet under {run}"

    evaluate = submit(ray_head, "evaluate", "--qrels", str(inputs["qrels"]), "--run", str(run), "--output", str(evaluation))
    logs = wait_for(ray_head, evaluate)
    assert f"wrote {evaluation}" in logs and "ndcg@10" in logs, logs[-3000:]
    report = json.loads(evaluation.read_text())
    assert report["runs"], report


@pytest.mark.s3
def test_submitted_jobs_read_and_write_s3_through_storage_options(ray_head, inputs, tiny_bi_encoder, s3_bucket, tmp_path):
    """The README's recipe with the data on S3 (the moto server). The head has no AWS variables: each job, its driver
    and its Ray workers, gets the endpoint from --storage.options and the keys from the runtime environment's
    env_vars (as the README advises: the command line, --storage.options included, is echoed in Ray's job logs)."""
    import yaml

    filesystem, _ = storage.filesystem_and_path(s3_bucket)
    bucket = s3_bucket.removeprefix("s3://")
    for name in ("corpus", "queries", "qrels"):
        filesystem.put(str(inputs[name]), f"{bucket}/inputs/{inputs[name].name}")
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
                               "AWS_DEFAULT_REGION": "us-east-1"}
    with_keys = tmp_path / "runtime_env.yaml"
    with_keys.write_text(yaml.safe_dump(runtime_env))
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    options = json.dumps({"s3": {"endpoint_url": endpoint}})
    corpus, queries, qrels = (f"{s3_bucket}/inputs/{inputs[name].name}" for name in ("corpus", "queries", "qrels"))
    index, run, evaluation = f"{s3_bucket}/index", f"{s3_bucket}/run", f"{s3_bucket}/evaluation.json"

    logs = wait_for(ray_head, submit(ray_head, "build_index", *build_index_flags(corpus, index, tiny_bi_encoder, "--embedding.max-seq-length", "64",
                                                                                "--faiss.factory", "Flat", "--storage.options", options), runtime_env=with_keys))
    version = filesystem.cat_file(f"{bucket}/index/CURRENT").decode().strip()
    assert f"index version {version}" in logs
    logs += wait_for(ray_head, submit(ray_head, "retrieve_rerank", "--index", index, "--queries", queries, "--output", run, "--reranker", "none",
                                      "--top-k", "10", "--storage.options", options, runtime_env=with_keys))
    assert any(path.endswith(".parquet") for path in filesystem.find(f"{bucket}/run"))
    logs += wait_for(ray_head, submit(ray_head, "evaluate", "--qrels", qrels, "--run", run, "--output", evaluation, "--storage.options", options,
                                      runtime_env=with_keys))
    assert json.loads(filesystem.cat_file(f"{bucket}/evaluation.json"))["runs"]
    assert "testing-secret-value" not in logs and f"endpoint_url: {endpoint}" in logs  # the effective config shows the options
