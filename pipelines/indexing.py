"""The indexing job as one function: corpus URL in, a published, validated index version out.

Stages, in order (each in its own module):
1. documents: read and validate every row in Ray tasks; find duplicate ids;
2. embedding: embed only the documents whose (id, text_hash) the embedding store lacks;
3. index_building: choose parameters, train once, fill shards in parallel;
4. index_store: write doc ids, quarantine, summary, then the manifest last, then move CURRENT.

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
import pyarrow.compute as pc
import pyarrow.parquet as pq

import pipelines
from pipelines import index_store, storage
from pipelines.config import config_to_dict
from pipelines.documents import (
    CorpusConfig,
    CorpusError,
    find_duplicate_ids,
    quarantined_rows,
    read_corpus,
)
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
    locate_vectors,
    sample_positions,
    version_fingerprint,
)
from pipelines.models import resolve_precision
from pipelines.quantization import int8_available
from pipelines.runtime import (
    ensure_ray,
    format_table,
    resolve_broadcast,
    worker_visible,
)


@dataclass
class BuildIndexConfig:
    """Settings of jobs.build_index."""

    corpus: str = field(default="", metadata={"help": "documents: Parquet or JSON-lines file, folder or glob (any fsspec URL)"})
    index: str = field(default="", metadata={"help": "index root URL (versions, embeddings and CURRENT live here)"})
    publish: bool = field(default=True, metadata={"help": "point CURRENT at the new version"})
    documents: CorpusConfig = field(default_factory=CorpusConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    faiss: IndexConfig = field(default_factory=IndexConfig)

    def validate(self) -> None:
        if not self.corpus:
            raise ValueError("--corpus is required")
        if not self.index:
            raise ValueError("--index is required")


def _valid_keys(batch: pa.Table) -> pa.Table:
    valid = batch.filter(pc.is_null(batch["reason"]))
    return valid.select(["id", "text_hash", "order_key", "source_file", "source_row"])


def _quarantined_rows(batch: pa.Table, duplicates: pa.Table, corpus_url: str, public_corpus: str) -> pa.Table:
    rows = quarantined_rows(batch, duplicates)
    if corpus_url == public_corpus:
        return rows
    for column in ("source_file", "reason"):  # a duplicate's reason names the file of the kept copy
        names = [_public_url(value, corpus_url, public_corpus) for value in rows[column].to_pylist()]
        rows = rows.set_column(rows.schema.get_field_index(column), column, pa.array(names, pa.string()))
    return rows


def _rows_to_embed(batch: pa.Table, order_keys: pa.Array, columns: tuple[str, ...] = ("id", "text_hash", "content")) -> pa.Table:
    return batch.filter(pc.is_in(batch["order_key"], value_set=resolve_broadcast(order_keys))).select(list(columns))


def calibration_texts(validated, documents: pa.Table, count: int, seed: int) -> list[str]:
    """The texts of a seeded sample of ``count`` valid documents, in corpus order (int8 calibration data)."""
    import ray

    positions = sample_positions(documents.num_rows, min(count, documents.num_rows), seed)
    keys = documents["order_key"].take(pa.array(positions)).combine_chunks()
    rows = collect(validated.map_batches(_rows_to_embed, fn_args=(ray.put(keys), ("order_key", "content")), batch_format="pyarrow"))
    return rows.sort_by("order_key")["content"].to_pylist() if rows is not None else []


def collect(dataset) -> pa.Table:
    """A (small) Ray Dataset's rows on the driver as one table."""
    import ray

    tables = [table for table in ray.get(dataset.to_arrow_refs()) if table.num_rows]
    return pa.concat_tables(tables) if tables else None


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
    with worker_visible(config.corpus) as corpus_url, worker_visible(config.index, copy_back=True) as index_url:
        summary = _build_index(config, corpus_url, index_url)
    summary["index"] = config.index
    return summary


def _build_index(config: BuildIndexConfig, corpus_url: str, index_url: str) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    ensure_ray()

    # 1. Read and validate.
    try:
        validated, files = read_corpus(corpus_url, config.documents)
    except CorpusError as error:  # name the user's file, not the temporary mirror of a memory:// corpus
        public = _public_url(str(error), corpus_url, config.corpus)
        if public == str(error):
            raise
        raise CorpusError(public) from error
    validated = validated.materialize()
    rows_read = validated.count()
    keys = collect(validated.map_batches(_valid_keys, batch_format="pyarrow"))
    if keys is None or keys.num_rows == 0:
        raise ValueError(f"{config.corpus}: no valid documents among {rows_read} rows")
    duplicates = find_duplicate_ids(keys)
    documents = keys.filter(pc.invert(pc.is_in(keys["order_key"], value_set=duplicates["order_key"]))).sort_by("order_key")
    documents = documents.append_column("position", pa.array(np.arange(documents.num_rows, dtype=np.int64)))
    read_seconds = time.perf_counter() - started
    print(f"read {rows_read} rows from {len(files)} file(s): {documents.num_rows} valid, {rows_read - documents.num_rows} to quarantine")

    # 2. Embed what the store does not hold yet; on CPU with OpenVINO, with the index root's int8 model.
    quantized = None
    pool = cluster_embedding_pool(config.embedding)
    if resolve_precision(config.embedding.precision, pool.device, int8=int8_available()) == "int8":
        quantized = prepare_quantized_encoder(
            config.embedding, index_url, lambda: calibration_texts(validated, documents, config.embedding.calibration_documents, config.faiss.seed)
        )
    store = EmbeddingStore(index_url, config.embedding, quantized)
    stored = store.keys()
    stored_keys = stored.select(["id", "text_hash"]).group_by(["id", "text_hash"]).aggregate([])
    missing = documents.join(stored_keys, ["id", "text_hash"], join_type="left anti", use_threads=False)
    embed_started = time.perf_counter()
    embedded_rows = 0
    if missing.num_rows:
        to_embed = validated.map_batches(_rows_to_embed, fn_args=(ray.put(missing["order_key"].combine_chunks()),), batch_format="pyarrow")
        embedded_rows, _ = embed_documents(to_embed, store, config.embedding, quantized["url"] if quantized else "")
    embed_seconds = time.perf_counter() - embed_started
    print(f"embedded {embedded_rows} documents, reused {documents.num_rows - missing.num_rows} stored vectors")

    # 3. Index parameters and version.
    located = locate_vectors(documents.select(["position", "id", "text_hash"]), store.keys())
    dimension = _stored_dimension(located["part"][0].as_py())
    plan = choose_index_parameters(documents.num_rows, dimension, config.faiss)
    model_settings = {"model": config.embedding.model, "normalize": config.embedding.normalize, "max_seq_length": config.embedding.max_seq_length, "key": model_key(config.embedding, quantized)}
    if quantized:  # queries must be embedded by the same int8 model (relative: the root may be mirrored or moved)
        model_settings["quantized_model"] = quantized["path"]
    version_id = version_fingerprint(documents, plan, model_settings)
    folder = index_store.version_url(index_url, version_id)
    manifest_url = storage.join_url(folder, "manifest.json")
    if storage.exists(manifest_url):
        print(f"version {version_id} is already complete; nothing to rebuild")
        if config.publish:
            index_store.publish(index_url, version_id)
        built = storage.read_json(storage.join_url(folder, "summary.json"))
        # summary.json describes the run that built the version; the rerun reports its own work.
        return {
            **built,
            "embedded": embedded_rows,
            "reused_embeddings": documents.num_rows - missing.num_rows,
            "embedding_seconds": round(embed_seconds, 2),
            "docs_per_second": round(embedded_rows / embed_seconds, 1) if embedded_rows else 0.0,
            "read_seconds": round(read_seconds, 2),
            "index_seconds": 0.0,
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
    print(f"building version {version_id}: {plan.factory}, {plan.shards} shard(s), nprobe {plan.nprobe}")

    # 4. Quarantine (rewritten whole on a rerun), shards, ids, summary, manifest, pointer.
    quarantine_url = storage.join_url(folder, "quarantine")
    storage.remove_tree(quarantine_url)
    quarantined, _ = storage.write_parquet_parts(
        validated.map_batches(_quarantined_rows, fn_args=(ray.put(duplicates), corpus_url, config.corpus), batch_format="pyarrow"),
        quarantine_url,
        100_000,
    )
    index_started = time.perf_counter()
    shards = build_shards(located, plan, dimension, folder)
    index_seconds = time.perf_counter() - index_started
    doc_ids_sha = storage.write_parquet_atomically(storage.join_url(folder, "doc_ids.parquet"), documents.select(["position", "id", "text_hash"]))
    wall = time.perf_counter() - started
    summary = {
        "version_id": version_id,
        "documents_read": rows_read,
        "quarantined": quarantined,
        "duplicate_ids": duplicates.num_rows,
        "indexed": documents.num_rows,
        "embedded": embedded_rows,
        "reused_embeddings": documents.num_rows - missing.num_rows,
        "embedding_seconds": round(embed_seconds, 2),
        "docs_per_second": round(embedded_rows / embed_seconds, 1) if embedded_rows else 0.0,
        "read_seconds": round(read_seconds, 2),
        "index_seconds": round(index_seconds, 2),
        "factory": plan.factory,
        "shards": len(shards),
        "index_bytes": sum(shard["bytes"] for shard in shards),
        "vector_bytes": sum(shard["vectors_bytes"] for shard in shards),
        "wall_seconds": round(wall, 2),
    }
    storage.write_json_atomically(storage.join_url(folder, "summary.json"), summary)
    manifest = {
        "format": index_store.MANIFEST_FORMAT,
        "version_id": version_id,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "code_version": {"package": pipelines.__version__, "git_commit": git_commit()},
        "model": {**model_settings, "dimension": dimension, "metric": "inner_product"},
        "documents": config_to_dict(config.documents),
        "index": {"factory": plan.factory, "nprobe": plan.nprobe, "training_sample": plan.training_sample, "seed": plan.seed, "trained_file": "trained.faiss"},
        "shards": shards,
        "doc_ids": {"file": "doc_ids.parquet", "sha256": doc_ids_sha, "count": documents.num_rows},
        "counts": {"documents_read": rows_read, "quarantined": quarantined, "indexed": documents.num_rows},
        "corpus": {"url": config.corpus, "files": [_public_url(f, corpus_url, config.corpus) for f in files]},
        "embeddings": {"url": _public_url(store.url, index_url, config.index)},
        "quarantine": {"url": _public_url(quarantine_url, index_url, config.index), "count": quarantined},
    }
    storage.write_json_atomically(manifest_url, manifest)
    if config.publish:
        index_store.publish(index_url, version_id)
    return summary


def _public_url(text: str, effective_root: str, public_root: str) -> str:
    """Name files under the root the user gave, not under the temporary mirror of process-local storage.

    ``text`` is a URL or a message naming URLs; the mirror (a uniquely named local folder) may be
    spelt as a path or as a ``file://`` URL, as listings return it.
    """
    if effective_root == public_root:
        return text
    filesystem, path = storage.filesystem_and_path(effective_root)
    for mirror in (storage.to_url(filesystem, path.rstrip("/")), effective_root.rstrip("/")):
        text = text.replace(mirror, public_root.rstrip("/"))
    return text


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
        ("wall time (s)", float(summary["wall_seconds"])),
    ]
    return format_table(rows, title=f"index version {summary['version_id']}")
