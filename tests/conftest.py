"""Shared fixtures: one Ray instance per session, tiny random-weight models, synthetic corpora.

Nothing here touches the network (HF_HUB_OFFLINE=1): the tiny models reuse the bundled
all-MiniLM-L6-v2 tokenizer and get fresh random weights from a fixed seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

from bench.tiny_models import build_tiny_bi_encoder, build_tiny_cross_encoder

REPOSITORY = Path(__file__).resolve().parents[1]
SCIFACT = REPOSITORY.parent / "shared" / "datasets" / "scifact"


@pytest.fixture(scope="session")
def tiny_bi_encoder(tmp_path_factory) -> str:
    """Path of a tiny random bi-encoder (built once per session; treat as read-only)."""
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-bi-encoder")))


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> str:
    """Path of a tiny random cross-encoder (built once per session; treat as read-only)."""
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder")))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


WORDS = [f"w{index}" for index in range(500)]


def synthetic_documents(count: int, seed: int = 0, topics: int = 10) -> list[dict]:
    """Seeded documents: each topic draws from its own slice of the vocabulary, so topics are separable."""
    rng = np.random.default_rng(seed)
    documents = []
    for number in range(count):
        topic = number % topics
        vocabulary = WORDS[topic * 50 : (topic + 1) * 50]
        words = rng.choice(vocabulary, size=int(rng.integers(8, 30)))
        documents.append({"_id": f"d{number}", "title": f"topic {topic}", "text": " ".join(words)})
    return documents


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)
    return path


# ---------------------------------------------------------------------------------------------------
# Index versions from given vectors, built with the pipeline's own steps but without Ray or a model.


def store_vectors(root, vectors: np.ndarray, parts: int, seed: int):
    """Write vectors as embedding parts in a shuffled order (as the actor pool would); returns (documents, store).

    ``documents`` has position, id, text_hash: position i is vector i.
    """
    import pyarrow as pa

    from pipelines import storage
    from pipelines.embedding import EmbeddingConfig, EmbeddingStore, embeddings_to_arrow

    count = len(vectors)
    ids = [f"doc{i}" for i in range(count)]
    hashes = [f"hash{i}" for i in range(count)]
    store = EmbeddingStore(str(root), EmbeddingConfig(model="synthetic"))
    order = np.random.default_rng(seed).permutation(count)
    for number, rows in enumerate(np.array_split(order, parts)):
        part = pa.table({"id": [ids[i] for i in rows], "text_hash": [hashes[i] for i in rows], "embedding": embeddings_to_arrow(vectors[rows])})
        storage.write_parquet_atomically(storage.join_url(store.url, f"part-{number:03d}.parquet"), part)
    documents = pa.table({"position": pa.array(np.arange(count, dtype=np.int64)), "id": ids, "text_hash": hashes})
    return documents, store


def write_index_version(root, factory: str, vectors: np.ndarray, shards: int = 1, nprobe: int = 0, version_id: str = "v1",
                        rescoring_code: str = "float16") -> dict:
    """An index version of ``vectors`` under ``root``: embedding parts, located, ``train_index`` on the rule's sample,
    ``fill_shard`` per shard, and a manifest with what loading and search read; returns the manifest.
    ``rescoring_code`` sq8 / sq6: the re-scoring quantizer is trained on the same sample and the shards store codes.
    """
    from pipelines import index_store, storage
    from pipelines.index_building import (
        IndexConfig,
        choose_index_parameters,
        fill_shard,
        locate_vectors,
        read_training_vectors,
        sample_positions,
        shard_ranges,
        sources_for_range,
        train_index,
        write_rescoring_quantizer,
    )

    count, dimension = vectors.shape
    documents, store = store_vectors(root, vectors, parts=2, seed=0)
    located = locate_vectors(documents, store.keys())
    plan = choose_index_parameters(count, dimension, IndexConfig(factory=factory, nprobe=nprobe, shards=shards, rescoring_code=rescoring_code))
    sample = read_training_vectors(located, sample_positions(count, plan.training_sample, plan.seed)) if plan.training_sample else vectors[:1]
    trained = train_index(plan.factory, sample, plan.seed)
    folder = index_store.version_url(str(root), version_id)
    rescoring = None
    if plan.rescoring_code != "float16":
        rescoring = write_rescoring_quantizer(folder, plan.rescoring_code, index_store.train_rescoring_quantizer(plan.rescoring_code, sample))
    stats = [
        fill_shard(trained, sources_for_range(located, start, end), start, end - start, dimension, folder, shard, str(root), rescoring)
        for shard, (start, end) in enumerate(shard_ranges(count, plan.shards))
    ]
    manifest = {
        "format": index_store.MANIFEST_FORMAT, "version_id": version_id, "created_at": "2026-01-01T00:00:00+00:00",
        "model": {"model": "synthetic", "dimension": dimension, "metric": "inner_product"},
        "index": {"factory": plan.factory, "nprobe": plan.nprobe, "training_sample": plan.training_sample, "seed": plan.seed},
        "shards": stats, "doc_ids": {}, "counts": {"indexed": count}, "corpus": {}, "embeddings": {},
    }
    storage.write_json_atomically(storage.join_url(folder, "manifest.json"), manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------
# S3 through a local moto server. Ray workers inherit the environment of the moment Ray starts, so the
# endpoint and test credentials are set here, when the conftest is imported (before any fixture can
# start Ray); the server itself starts only when a test asks for it. Pointing every AWS client of the
# session at 127.0.0.1 also guarantees that no test can reach a real bucket.


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


MOTO_PORT = _free_port()
S3_TEST_ENVIRONMENT = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(S3_TEST_ENVIRONMENT)
for _variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_variable, None)


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A moto S3 server on the endpoint the environment names (started once); yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    yield S3_TEST_ENVIRONMENT["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket on the moto server; yields its URL ``s3://<name>``.

    Created with boto3: s3fs's mkdir sends a location constraint that moto rejects for us-east-1.
    """
    import hashlib

    import boto3

    name = "test-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    boto3.client("s3").create_bucket(Bucket=name)
    yield f"s3://{name}"


# ---------------------------------------------------------------------------------------------------
# A small corpus with every kind of damaged row, split over a JSON-lines file and a multi-row-group
# Parquet file, together with what the indexing job must make of it.

# Flags shared by every test build of the damaged corpus: several read pieces, embedding parts and
# shards, and an IVF index (nprobe = nlist, so search stays exact) to exercise those code paths.
DAMAGED_CORPUS_BUILD_FLAGS = (
    "--documents.rows-per-read-task", "40",
    "--embedding.max-seq-length", "64",
    "--embedding.precision", "fp32",  # stored vectors are compared with a plain fp32 encode
    "--embedding.rows-per-part", "100",
    "--faiss.factory", "IVF4,Flat",
    "--faiss.nprobe", "4",
    "--faiss.shards", "3",
)


@dataclasses.dataclass
class DamagedCorpus:
    """Files of a damaged corpus and the job's expected result."""

    folder: Path
    files: dict[str, bytes]  # file name -> content, to recreate the corpus on other storage
    indexed_ids: list[str]  # valid ids in file order: position i holds indexed_ids[i]
    quarantined: list[tuple[str, int, str, str]]  # (file name, row, field, start of the reason)

    @property
    def rows_read(self) -> int:
        return len(self.indexed_ids) + len(self.quarantined)


def make_damaged_corpus(folder: Path, seed: int = 0) -> DamagedCorpus:
    """``a.jsonl`` (150 good rows, 11 bad ones, a blank line) and ``b.parquet`` (90 good, 3 bad; row groups of 20)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents = synthetic_documents(240, seed=seed)
    jsonl_lines: list[object] = list(documents[:150])
    quarantined: list[tuple[str, int, str, str]] = []
    # (0-based line in the final file, record or raw line, field, start of the reason); inserted in
    # ascending order, so each lands on its line.
    bad_jsonl = [
        (5, {"_id": None, "title": "t", "text": "null id"}, "_id", "null id"),
        (17, {"_id": "   ", "text": "blank id"}, "_id", "empty id"),
        (30, {"_id": 1.5, "text": "float id"}, "_id", "wrong type for id: float"),
        (44, {"_id": "bad-missing-text", "title": "no text"}, "text", "missing text"),
        (58, {"_id": "bad-empty-text", "text": "  \t "}, "text", "empty text"),
        (71, {"_id": "bad-null-text", "text": None}, "text", "null text"),
        (85, {"_id": "bad-text-type", "text": ["a", "list"]}, "text", "wrong type for text: list"),
        (99, {"_id": "bad-title-type", "title": 7, "text": "fine text"}, "title", "wrong type for title: int"),
        (112, '{"_id": "broken", "text": "unterminated', "row", "invalid JSON"),
        (126, "[1, 2, 3]", "row", "not a JSON object (list)"),
        (140, {"_id": "d3", "text": "a second copy of d3"}, "id", "duplicate id (first seen in "),
    ]
    for line, record, field_name, reason in sorted(bad_jsonl, key=lambda item: item[0]):
        jsonl_lines.insert(line, record)
        quarantined.append(("a.jsonl", line, field_name, reason))
    jsonl_lines.insert(150, "")  # after every bad line: skipped, but it still counts as a line

    parquet_rows = [dict(document) for document in documents[150:]]
    bad_parquet = [
        (12, {"_id": None, "title": "t", "text": "null id in parquet"}, "_id", "null id"),
        (47, {"_id": "bad-parquet-empty-text", "title": "t", "text": ""}, "text", "empty text"),
        (77, {"_id": "d10", "title": "t", "text": "a copy of d10 in another file"}, "id", "duplicate id (first seen in "),
    ]
    for row, record, field_name, reason in bad_parquet:
        parquet_rows.insert(row, record)
        quarantined.append(("b.parquet", row, field_name, reason))

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "a.jsonl", jsonl_lines)
    table = pa.Table.from_pylist(parquet_rows, schema=pa.schema([("_id", pa.string()), ("title", pa.string()), ("text", pa.string())]))
    pq.write_table(table, folder / "b.parquet", row_group_size=20)
    indexed_ids = [document["_id"] for document in documents]
    files = {name: (folder / name).read_bytes() for name in ("a.jsonl", "b.parquet")}
    return DamagedCorpus(folder=folder, files=files, indexed_ids=indexed_ids, quarantined=sorted(quarantined))


@pytest.fixture(scope="session")
def damaged_corpus(tmp_path_factory) -> DamagedCorpus:
    """The damaged corpus on local disk (read-only: copy it to change it)."""
    return make_damaged_corpus(tmp_path_factory.mktemp("damaged-corpus") / "corpus")


def build_index_flags(corpus: str, index: str, model: str, *extra: str) -> list[str]:
    """Command-line flags of jobs.build_index for a test build."""
    return ["--corpus", str(corpus), "--index", str(index), "--embedding.model", str(model), *extra]


# ---------------------------------------------------------------------------------------------------
# Jobs as subprocesses attached to the session's Ray instance (as a driver of ``ray job submit`` would be):
# killing the driver ends its workers and actors. Used by the kill -9 tests.


def start_job(ray_session, job: str, flags: list[str]) -> subprocess.Popen:
    """``python -m jobs.<job> <flags>`` in the repository, connected to the test session's Ray; stderr kept for :func:`finish`."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", f"jobs.{job}", *flags], cwd=REPOSITORY, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for a job started by :func:`start_job`; it must exit 0."""
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``process`` after ``seconds`` unless it ended before; True if it was killed."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


@dataclasses.dataclass
class BuiltIndex:
    root: Path
    summary: dict


@pytest.fixture(scope="session")
def damaged_corpus_index(ray_session, tiny_bi_encoder, damaged_corpus, tmp_path_factory) -> BuiltIndex:
    """The damaged corpus indexed once on local disk with the tiny model (read-only: copy it to change it)."""
    from jobs.build_index import main

    root = tmp_path_factory.mktemp("damaged-corpus-index") / "index"
    summary = main(build_index_flags(damaged_corpus.folder, root, tiny_bi_encoder, *DAMAGED_CORPUS_BUILD_FLAGS))
    return BuiltIndex(root=root, summary=summary)


def check_report(html_path, expected_plots) -> None:
    """A job's report: the HTML parses, embeds every plot as a PNG data URL and links its PNG file, which is a non-empty PNG."""
    import base64
    import html.parser

    html_path = Path(html_path)
    folder = html_path.parent / html_path.name.removesuffix(".html")
    images, links = [], []

    class Collector(html.parser.HTMLParser):
        def handle_starttag(self, tag, attributes):
            attributes = dict(attributes)
            if tag == "img":
                images.append(attributes["src"])
            if tag == "a":
                links.append(attributes["href"])

    Collector().feed(html_path.read_text())
    assert "<title>" in html_path.read_text() and html_path.read_text().rstrip().endswith("</html>")
    for name in expected_plots:
        png = folder / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"{folder.name}/{name}.png" in links, (name, links)
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in images, name
    assert len(images) == len(links) == len(list(folder.glob("*.png")))
