"""The indexing job as one function: corpus URL in, a published, validated index version out.

Stages, in order (each in its own module):
1. documents: read and validate every row in Ray tasks; find duplicate ids;
2. embedding: embed only the documents whose (id, text_hash) the embedding store lacks;
3. index_building: choose parameters, train once, fill shards in parallel (incremental_index: the trained quantizer
   and the unchanged shards of the version CURRENT names are reused unless the vectors drifted or --faiss.retrain);
   then sparse_index (BM25 shards) and document_store (the texts by position, for reranking), unchanged files reused;
4. index_store: write doc ids, quarantine, summary, then the manifest last, then move CURRENT.

The whole job runs under the index root's writer lease (pipelines.index_lease): a second writer waits up to
--lock-timeout, then fails naming the holder. CURRENT moves only if it still names the version the job started
from (compare-and-set); a build superseded meanwhile stays finished but unpublished ("superseded_by").

A rerun after a crash at any point repeats no finished work: stored embeddings, the trained index
and finished shards are found and reused, and the version id is derived from the inputs, so the
rerun resumes the same version.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import pipelines
from pipelines import index_lease, index_store, storage, versions
from pipelines.config import config_to_dict
from pipelines.document_store import STORE_FORMAT as DOCUMENT_STORE_FORMAT
from pipelines.document_store import build_document_store
from pipelines.documents import CorpusConfig, ValidatedCorpus, validate_corpus
from pipelines.embedding import (
    EmbeddingConfig,
    EmbeddingStore,
    cluster_embedding_pool,
    embed_documents,
    model_key,
    prepare_quantized_encoder,
)
from pipelines.index_building import (
    IndexConfig,
    build_shards,
    choose_index_parameters,
    hash_join,
    locate_vectors,
    sample_positions,
    shard_ranges,
    version_fingerprint,
)
from pipelines.incremental_index import plan_incremental, reuse_into
from pipelines.models import check_model_reference, resolve_precision
from pipelines.quantization import int8_available
from pipelines.sparse_index import Bm25Config, build_sparse_shards
from pipelines.sparse_index import shard_count as sparse_shard_count
from pipelines.runtime import (
    collect,
    ensure_ray,
    format_table,
    public_url,
    resolve_broadcast,
    worker_visible,
)
from pipelines.storage import StorageConfig


@dataclass
class BuildIndexConfig:
    """Settings of jobs.build_index."""

    corpus: str = field(default="", metadata={"help": "documents: Parquet or JSON-lines file, folder or glob (any fsspec URL)"})
    index: str = field(default="", metadata={"help": "index root URL (versions, embeddings and CURRENT live here)"})
    publish: bool = field(default=True, metadata={"help": "point CURRENT at the new version"})
    lock_timeout: float = field(default=index_lease.DEFAULT_TIMEOUT_S, metadata={
        "help": "seconds to wait for another writer's lease on --index before failing (0: fail at once)"})
    documents: CorpusConfig = field(default_factory=CorpusConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    faiss: IndexConfig = field(default_factory=IndexConfig)
    sparse: bool = field(default=True, metadata={"help": "also build a BM25 index (bm25s) over the same documents and shards: --sparse on|off"})
    bm25: Bm25Config = field(default_factory=Bm25Config)
    keep: int = field(default=0, metadata={"help": "after publishing, prune to the newest N finished versions (jobs.versions prune's rules: CURRENT, "
                                                   "pinned and recently superseded versions stay); 0 = keep everything"})
    keep_grace: str = field(default="1d", metadata={"help": "with --keep: the grace period of the prune (jobs.versions prune --grace)"})
    unchanged_status: int = field(default=0, metadata={"help": "exit status when the corpus gives the version CURRENT already names (nothing built or "
                                                                "published): 0, or e.g. 3 so a scheduler can tell 'nothing new' (jobs/configs/reindex.yaml)"})
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if not self.corpus:
            raise ValueError("--corpus is required")
        if not self.index:
            raise ValueError("--index is required")
        if not 0 <= self.unchanged_status <= 255:
            raise ValueError(f"--unchanged-status {self.unchanged_status}: an exit status is 0 to 255")
        if self.keep < 0:
            raise ValueError(f"--keep {self.keep}: must be 0 (keep everything) or more")
        from pipelines.versions import parse_duration

        parse_duration(self.keep_grace)
        storage.require_input(self.corpus, "corpus")
        if self.lock_timeout < 0:
            raise ValueError(f"--lock-timeout {self.lock_timeout}: must be 0 or more seconds")


def _rows_to_embed(batch: pa.Table, order_keys, columns: tuple[str, ...] = ("id", "text_hash", "content")) -> pa.Table:
    """The rows of ``batch`` whose order key is in ``order_keys`` (sorted; a binary search per row, where a hash
    set of every key would be rebuilt for every batch)."""
    keys = np.asarray(resolve_broadcast(order_keys), dtype=np.int64)
    wanted = batch["order_key"].to_numpy()
    found = np.searchsorted(keys, wanted)
    keep = keys[np.minimum(found, len(keys) - 1)] == wanted if len(keys) else np.zeros(len(wanted), dtype=bool)
    return batch.filter(pa.array(keep)).select(list(columns))


def calibration_texts(validated, documents: pa.Table, count: int, seed: int) -> list[str]:
    """The texts of a seeded sample of ``count`` valid documents, in corpus order (int8 calibration data)."""
    import ray

    positions = sample_positions(documents.num_rows, min(count, documents.num_rows), seed)
    keys = documents["order_key"].take(pa.array(positions)).combine_chunks()
    rows = collect(validated.map_batches(_rows_to_embed, fn_args=(ray.put(keys), ("order_key", "content")), batch_format="pyarrow"))
    return rows.sort_by("order_key")["content"].to_pylist() if rows is not None else []


def git_commit() -> str:
    import subprocess
    from pathlib import Path

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_index(config: BuildIndexConfig) -> dict[str, Any]:
    """Run the whole indexing job; returns the summary (also written as summary.json)."""
    check_model_reference(config.embedding.model, "--embedding.model")
    # The lease is taken on the index as named (a memory:// root is mirrored to a local folder below) and held
    # until the mirror is copied back; released on success and failure, and a killed job's lease expires.
    with (build_lease(config) as lease,
          worker_visible(config.corpus) as corpus_url, worker_visible(config.index, copy_back=True) as index_url):
        summary = _build_index(config, corpus_url, index_url, lease)
    summary["index"] = config.index
    if config.keep:
        summary["pruned"] = prune_after_build(config)
    return summary


def build_lease(config: BuildIndexConfig):
    """The index root's writer lease for the whole build; None, with a warning, on storage without atomic create
    (gs://, az:// here: no lease is implemented for them), where the build runs as before leases existed."""
    return index_lease.lease_if_supported(config.index, owner="jobs.build_index", timeout_s=config.lock_timeout,
                                          warning="building without a writer lease: run one writer at a time on this root")


def prune_after_build(config: BuildIndexConfig) -> dict[str, Any]:
    """``--keep N``: jobs.versions prune on the root itself (a process-local root is copied back by now), under the lease."""
    with versions.writer_lease(config.index, "jobs.build_index --keep"):
        plan = versions.prune(config.index, config.keep, grace=config.keep_grace)
    print(versions.prune_table(plan), flush=True)
    return {"versions": [row["version_id"] for row in plan.versions], "unfinished": len(plan.unfinished), "shared": len(plan.shared), "bytes_freed": plan.bytes_freed}


def publish_version(index_url: str, started_from: str | None, version_id: str, lease: index_lease.WriterLease | None) -> dict[str, Any]:
    """Move CURRENT to ``version_id`` if it still names ``started_from`` (compare-and-set, under the lease);
    the summary's ``published`` (and ``superseded_by`` when another version was published meanwhile)."""
    if index_lease.compare_and_publish(index_url, started_from, version_id, lease=lease):
        versions.record_publish(index_url, version_id, started_from, reason="build")  # history/: when CURRENT moved (prune's grace period)
        return {"published": True}
    current = index_lease.read_current(index_url)
    print(f"version {version_id} is finished but NOT published: CURRENT moved from {started_from or '(none)'} to {current} "
          f"during this build (superseded by {current}); CURRENT is left unchanged", flush=True)
    return {"published": False, "superseded_by": current}


@dataclass
class EmbeddingRun:
    """What the embedding stage did: the store holding every document's vector, and the work it took."""

    store: EmbeddingStore
    quantized: dict | None
    embedded: int
    reused: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "reused_embeddings": self.reused,
            "embedding_seconds": round(self.seconds, 2),
            "docs_per_second": round(self.embedded / self.seconds, 1) if self.embedded else 0.0,
        }


def embed_missing(corpus: ValidatedCorpus, documents: pa.Table, config: BuildIndexConfig, index_url: str) -> EmbeddingRun:
    """Embed the documents whose (id, text_hash) the store lacks; on CPU with OpenVINO, with the index root's int8 model."""
    import ray

    quantized = None
    pool = cluster_embedding_pool(config.embedding)
    if resolve_precision(config.embedding.precision, pool.device, int8=int8_available()) == "int8":
        quantized = prepare_quantized_encoder(
            config.embedding, index_url, lambda: calibration_texts(corpus.rows, documents, config.embedding.calibration_documents, config.faiss.seed)
        )
    store = EmbeddingStore(index_url, config.embedding, quantized)
    # Only the order keys of the missing documents (sorted int64) stay on the driver and travel to the read tasks.
    missing = hash_join(documents.select(["id", "text_hash", "order_key"]), store.keys().select(["id", "text_hash"]), ["id", "text_hash"], "left anti", ["order_key"], partition_by="text_hash")
    missing = np.sort(missing["order_key"].to_numpy())
    started = time.perf_counter()
    embedded = 0
    if len(missing):
        to_embed = corpus.rows.map_batches(_rows_to_embed, fn_args=(ray.put(missing),), batch_format="pyarrow")
        embedded, _ = embed_documents(to_embed, store, config.embedding, quantized["url"] if quantized else "", rows=len(missing))
    run = EmbeddingRun(store, quantized, embedded, documents.num_rows - len(missing), time.perf_counter() - started)
    print(f"embedded {run.embedded} documents, reused {run.reused} stored vectors")
    return run


def _build_index(config: BuildIndexConfig, corpus_url: str, index_url: str, lease: index_lease.WriterLease | None) -> dict[str, Any]:
    started = time.perf_counter()
    started_from = index_lease.read_current(index_url)  # CURRENT when the job started: publishing is a compare-and-set
    ensure_ray()

    # 1. Read and validate (documents).
    corpus = validate_corpus(corpus_url, config.documents, public_url=config.corpus)
    documents = corpus.keys.append_column("position", pa.array(np.arange(corpus.keys.num_rows, dtype=np.int64)))
    read_seconds = time.perf_counter() - started
    print(f"read {corpus.rows_read} rows from {len(corpus.files)} file(s): {documents.num_rows} valid, {corpus.quarantined} to quarantine")

    # 2. Embed what the store does not hold yet (embedding).
    embedding = embed_missing(corpus, documents, config, index_url)

    # 3. Index parameters, and the version they and the documents name (index_building).
    stored = embedding.store.keys()
    located = locate_vectors(documents.select(["position", "id", "text_hash"]), stored)
    dimension = _stored_dimension(located["part"][0].as_py())
    plan = choose_index_parameters(documents.num_rows, dimension, config.faiss)
    model_settings = {"model": config.embedding.model, "normalize": config.embedding.normalize, "max_seq_length": config.embedding.max_seq_length, "key": model_key(config.embedding, embedding.quantized)}
    if embedding.quantized:  # queries must be embedded by the same int8 model (relative: the root may be mirrored or moved)
        model_settings["quantized_model"] = embedding.quantized["path"]
    sparse_settings = config.bm25.settings() if config.sparse else None
    # The document store's format is part of what a version holds: a version built before the store (same inputs)
    # is not taken as complete, so rebuilding gives the query job a store to read.
    identity = {**model_settings, **({"sparse": sparse_settings} if sparse_settings else {}), "documents_store": DOCUMENT_STORE_FORMAT}
    version_id = version_fingerprint(documents, plan, identity)
    folder = index_store.version_url(index_url, version_id)

    def already_complete() -> dict[str, Any] | None:
        if not storage.exists(storage.join_url(folder, "manifest.json")):
            return None
        print(f"version {version_id} is already complete; nothing to rebuild")
        published = publish_version(index_url, started_from, version_id, lease) if config.publish else {"published": False}
        # summary.json describes the run that built the version; the rerun reports its own work.
        built = storage.read_json(storage.join_url(folder, "summary.json"))
        unchanged = started_from == version_id  # CURRENT already named this version: the snapshot changed nothing
        return {**built, **embedding.summary(), "read_seconds": round(read_seconds, 2), "index_seconds": 0.0, "wall_seconds": round(time.perf_counter() - started, 2),
                **published, "unchanged": unchanged, **({"exit_status": config.unchanged_status} if unchanged else {})}

    complete = already_complete()  # a version of these inputs that trained its own quantizer
    if complete is not None:
        return complete
    # What the version CURRENT named at the start can give: its trained quantizer (unless it drifted) and unchanged
    # shards (incremental_index). Reusing a quantizer makes the id name it too: the same CURRENT, the same id.
    incremental_started = time.perf_counter()
    incremental = plan_incremental(index_url, started_from, documents, located, stored, plan, dimension, model_settings["key"], config.faiss.retrain)
    incremental_seconds = time.perf_counter() - incremental_started
    del stored
    print(f"incremental: trained quantizer {'reused' if incremental.reused else 'trained'} ({incremental.reason}); "
          f"{len(incremental.shards)} unchanged shard(s) to copy")
    if incremental.identity():
        version_id = version_fingerprint(documents, plan, {**identity, **incremental.identity()})
        folder = index_store.version_url(index_url, version_id)
        complete = already_complete()
        if complete is not None:
            return complete
    print(f"building version {version_id}: {plan.factory}, {plan.shards} shard(s), nprobe {plan.nprobe}, re-scoring code {plan.rescoring_code}")

    # 4. Quarantine (rewritten whole on a rerun) and shards (finished ones reused, unchanged ones copied).
    quarantine_url = storage.join_url(folder, "quarantine")
    quarantined = corpus.write_quarantine(quarantine_url)
    index_started = time.perf_counter()
    reuse_into(incremental, index_url, folder)
    shards = build_shards(located, plan, dimension, folder, index_url)
    index_seconds = time.perf_counter() - index_started + incremental_seconds
    trained_sha256 = index_store.file_sha256(storage.join_url(folder, "trained.faiss"))
    sparse, sparse_seconds, sparse_work = None, 0.0, {"documents_tokenized": 0, "documents_reused": 0}
    if config.sparse:
        sparse_started = time.perf_counter()
        sparse, sparse_work = build_sparse_shards(corpus.rows, documents, shard_ranges(documents.num_rows, sparse_shard_count(documents.num_rows, plan.shards)),
                                                  config.bm25, index_url, folder, started_from)
        sparse_seconds = time.perf_counter() - sparse_started
    store_started = time.perf_counter()
    documents_store = build_document_store(corpus.rows, documents, index_url)  # texts by position, for reranking
    store_seconds = time.perf_counter() - store_started

    # 5. Doc ids, summary, manifest (last), CURRENT (index_store).
    summary = {
        "version_id": version_id,
        "documents_read": corpus.rows_read,
        "quarantined": quarantined,
        "duplicate_ids": corpus.duplicates.num_rows,
        "indexed": documents.num_rows,
        **embedding.summary(),
        "read_seconds": round(read_seconds, 2),
        "index_seconds": round(index_seconds, 2),
        "factory": plan.factory,
        "rescoring_code": plan.rescoring_code,
        "shards": len(shards),
        "index_bytes": sum(shard["bytes"] for shard in shards),
        "vector_bytes": sum(shard["vectors_bytes"] for shard in shards),
        "sparse": bool(sparse),
        "sparse_seconds": round(sparse_seconds, 2),
        "sparse_bytes": sum(shard["bytes"] for shard in sparse["shards"]) + sparse["statistics"]["bytes"] if sparse else 0,
        "sparse_shards_reused": sum(shard["reused"] for shard in sparse["shards"]) if sparse else 0,
        # documents of the shards built: tokenized, or counts taken from the previous version's shards (same text)
        "sparse_documents_tokenized": sparse_work["documents_tokenized"],
        "sparse_documents_reused": sparse_work["documents_reused"],
        "documents_store_seconds": round(store_seconds, 2),
        "documents_store_bytes": sum(entry["bytes"] for entry in documents_store["files"]),
        "documents_store_files_reused": sum(entry["reused"] for entry in documents_store["files"]),
        "incremental": incremental.summary(len(shards)),  # trained quantizer reused or retrained (why, drift figures), shards copied / filled
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    manifest = index_store.Manifest(
        version_id=version_id,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        code_version={"package": pipelines.__version__, "git_commit": git_commit(), "source_digest": pipelines.source_digest()},
        model={**model_settings, "dimension": dimension, "metric": "inner_product"},
        documents=config_to_dict(config.documents),
        index={"factory": plan.factory, "nprobe": plan.nprobe, "training_sample": plan.training_sample, "seed": plan.seed, "trained_file": "trained.faiss",
               "rescoring_code": plan.rescoring_code, "trained_sha256": trained_sha256,
               # the version whose build trained trained.faiss, when this one reused it (incremental_index)
               **({"trained_in_version": incremental.trained_in_version} if incremental.trained is not None else {})},
        shards=shards,
        counts={"documents_read": corpus.rows_read, "quarantined": quarantined, "indexed": documents.num_rows},
        corpus={"url": config.corpus, "files": corpus.files},
        embeddings={"url": public_url(embedding.store.url, index_url, config.index)},
        quarantine={"url": public_url(quarantine_url, index_url, config.index), "count": quarantined},
        sparse=sparse,
        documents_store=documents_store,
    )
    from pipelines import report as run_report

    run_report.write_report(*run_report.report_paths(folder), title=f"Index version {version_id}",
                            sections=run_report.index_sections(summary, {"shards": shards}, run_report.quarantine_reasons(quarantine_url)),
                            subtitle=f"corpus {config.corpus}; index {config.index}; model {config.embedding.model}")
    summary["report"] = run_report.report_paths(index_store.version_url(config.index, version_id))[0]
    if lease is not None:
        lease.check()  # a job that lost its lease (paused past its TTL) writes no manifest: another writer may own the folder
    manifest.write_version(index_url, documents, summary, publish_now=False)
    summary.update(publish_version(index_url, started_from, version_id, lease) if config.publish else {"published": False})
    return summary


def _stored_dimension(part_url: str) -> int:
    filesystem, path = storage.filesystem_and_path(part_url)
    with filesystem.open(path, "rb") as handle:
        return pq.read_schema(handle).field("embedding").type.list_size


def summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ("documents read", summary["documents_read"]),
        ("quarantined", summary["quarantined"]),
        ("indexed", summary["indexed"]),
        ("embedded now", summary["embedded"]),
        ("embeddings reused", summary["reused_embeddings"]),
        ("docs/s (embedding)", float(summary["docs_per_second"])),
        ("index", summary["factory"]),
        ("shards", summary["shards"]),
        ("index bytes", summary["index_bytes"]),
        ("BM25", f"{summary['sparse_bytes']:,} bytes, {summary['sparse_seconds']} s, {summary['sparse_shards_reused']} shard(s) reused, "
                 f"{summary.get('sparse_documents_tokenized', '-')} documents tokenized, {summary.get('sparse_documents_reused', '-')} counted already" if summary.get("sparse") else "off"),
        ("document store", (f"{summary.get('documents_store_bytes', 0):,} bytes, {summary.get('documents_store_seconds', 0.0)} s, "
                            f"{summary.get('documents_store_files_reused', 0)} file(s) reused")),
        ("incremental", incremental_cell(summary.get("incremental"))),
        ("wall time (s)", float(summary["wall_seconds"])),
    ]
    return format_table(rows, title=f"index version {summary['version_id']}")


def incremental_cell(incremental: dict[str, Any] | None) -> str:
    """The summary table's line on what the build reused of the previous version (versions built before it: -)."""
    if not incremental:
        return "-"
    drift = incremental.get("drift") or {}
    figure = f", drift {drift['ratio']}" if drift.get("ratio") is not None else ""
    return (f"quantizer {incremental['trained']}{figure}, {incremental['shards_reused']} shard(s) copied, {incremental['shards_filled']} filled "
            f"(from {incremental['previous_version'] or '-'})")
