"""Bi-encoder embedding in a Ray Data actor pool, and the embedding store that lets later runs reuse it.

:class:`DocumentEmbedder` loads the SentenceTransformer once per actor and turns batches of
``(id, text_hash, content)`` into normalized float32 vectors. The pool is sized from the resources
Ray reports (:func:`plan_embedding_pool`): one actor per GPU where GPUs exist, else CPU actors that
leave room for the read and write tasks (a pool that claims every CPU starves them and hangs).

:class:`EmbeddingStore` keeps vectors as Parquet parts (``id``, ``text_hash``, ``embedding`` as a
fixed-size list of float32) under ``<index root>/embeddings/<model key>/``. Each part is written
atomically, so a killed job leaves only whole parts, and a rerun embeds only the (id, text_hash)
pairs that no part holds yet.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.models import (
    choose_device,
    inference_context,
    length_bucket_groups,
    load_sentence_transformer,
    resolve_precision,
)


@dataclass
class EmbeddingConfig:
    """Bi-encoder and actor-pool settings."""

    model: str = field(default="bundled", metadata={"help": "bundled, a Hugging Face id or a local path"})
    normalize: bool = True
    max_seq_length: int = field(default=256, metadata={"help": "tokens per text (0 = the model's own)"})
    batch_size: int = field(default=32, metadata={"help": "texts per forward pass"})
    rows_per_batch: int = field(default=256, metadata={"help": "fewest rows per embedding part (on a small corpus, parts shrink so every actor gets work)"})
    rows_per_part: int = field(default=20_000, metadata={"help": "most rows per embedding Parquet part, committed by the actor that embedded them (unit of resume)"})
    device: str = field(default="auto", metadata={"help": "auto (GPU when the cluster has one), cpu or cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (fp16 on GPU; on CPU int8 with OpenVINO, else bf16 where native, else fp32), fp32, bf16, fp16 or int8"})
    calibration_documents: int = field(default=300, metadata={"help": "corpus documents the int8 model is calibrated on (a seeded sample)"})
    pool_size: int = field(default=0, metadata={"help": "actors (0 = from cluster resources)"})
    threads_per_actor: int = field(default=0, metadata={"help": "torch threads per CPU actor (0 = auto)"})

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"batch_size": 1, "rows_per_batch": 1, "rows_per_part": 1, "calibration_documents": 1, "max_seq_length": 0, "pool_size": 0, "threads_per_actor": 0})
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device}: use auto, cpu or cuda")
        if self.precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"--precision {self.precision}: use auto, fp32, bf16, fp16 or int8")


@dataclass(frozen=True)
class EmbeddingPool:
    """How many embedding actors to run and what each one claims from Ray."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int
    device: str


def plan_embedding_pool(config: EmbeddingConfig, cluster_cpus: float, cluster_gpus: float, reserve_cpus: float | None = None) -> EmbeddingPool:
    """Size the actor pool from cluster resources (pure function, no Ray calls).

    GPUs: one actor per GPU. CPUs: actors of ``threads`` torch threads each, claiming at most the
    CPUs minus ``reserve_cpus`` (default one, or two on machines over 8 CPUs) so read/write tasks
    always have room. ``config`` is any settings object with ``device``, ``pool_size`` and
    ``threads_per_actor`` (the reranker's too).
    """
    use_gpu = config.device in ("auto", "cuda") and cluster_gpus >= 1
    if config.device == "cuda" and cluster_gpus < 1:
        raise ValueError("embedding.device is cuda but the Ray cluster reports no GPU")
    if use_gpu:
        size = config.pool_size or int(cluster_gpus)
        return EmbeddingPool(size=size, num_cpus=1.0, num_gpus=1.0, threads=max(1, config.threads_per_actor or 2), device="cuda")
    total = max(1.0, float(cluster_cpus))
    threads = config.threads_per_actor or int(min(total, 4))
    reserve = reserve_cpus if reserve_cpus is not None else (1.0 if total <= 8 else 2.0)
    available = max(0.5, total - reserve)
    size = config.pool_size or max(1, int(available // threads))
    num_cpus = max(0.25, min(float(threads), available / size))
    return EmbeddingPool(size=size, num_cpus=round(num_cpus, 2), num_gpus=0.0, threads=threads, device="cpu")


def model_key(config: EmbeddingConfig, quantized: dict | None = None) -> str:
    """Folder name for a model's vectors: vectors from different settings never mix.

    Float paths (fp32, bf16, fp16) agree to a cosine of 0.99998 and share vectors; an int8 model's
    vectors (cosine 0.997 with fp32) are kept apart, named by its calibration.
    """
    identity = {"model": config.model, "normalize": config.normalize, "max_seq_length": config.max_seq_length}
    if quantized:
        identity["int8"] = quantized["calibration_digest"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", config.model.rstrip("/").rsplit("/", 1)[-1]).strip("-")[:40] or "model"
    suffix = "-int8" if quantized else ""
    return f"{slug}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]}{suffix}"


def quantized_model_path(config: EmbeddingConfig) -> str:
    """Where (relative to the index root) an index keeps its int8 bi-encoder: one per model and settings,
    reused by every later build, so that incremental reindexing keeps its vectors."""
    return f"models/{model_key(config)}-int8"


def prepare_quantized_encoder(config: EmbeddingConfig, index_root: str, calibration_texts) -> dict:
    """The int8 bi-encoder of ``index_root`` (its ``quantization.json`` settings plus ``url``), quantized now if absent.

    ``calibration_texts`` is called only when the model must be made; quantization runs in a Ray task
    (one CPU) so that a cluster's driver needs neither the model nor its memory.
    """
    import ray

    from pipelines import quantization

    url = storage.join_url(index_root, quantized_model_path(config))
    if not quantization.is_complete(url):
        texts = list(calibration_texts())
        print(f"quantizing {config.model} to int8 (OpenVINO, NNCF) on {len(texts)} corpus documents")
        ray.get(ray.remote(num_cpus=1)(_quantize_bi_encoder).remote(config, texts, url))
    return {**quantization.read_settings(url), "url": url, "path": quantized_model_path(config)}


def _quantize_bi_encoder(config: EmbeddingConfig, texts: list[str], url: str) -> dict:
    from pipelines import quantization

    model = load_sentence_transformer(config.model, "cpu", config.max_seq_length or None)
    return quantization.quantize_model(model, "bi-encoder", texts, int(model.max_seq_length), url, config.model)


def embeddings_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def arrow_to_embeddings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Fixed-size-list column → (rows, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


class TextEncoder:
    """The bi-encoder with the precision and thread settings applied; used by every embedding path.

    ``quantized_url`` names an int8 model (see :func:`prepare_quantized_encoder`); with it, ``auto``
    precision on CPU runs that model in OpenVINO, otherwise the SentenceTransformer runs in torch.
    """

    def __init__(self, config: EmbeddingConfig, device: str = "auto", threads: int = 0, quantized_url: str = ""):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = choose_device(device)
        if quantized_url and self.device.startswith("cuda"):
            raise ValueError(f"{quantized_url}: this index's documents were embedded by this int8 CPU model; queries must be too: run the query encoder on CPU")
        self.precision = resolve_precision(config.precision, self.device, int8=bool(quantized_url))
        self.config = config
        if self.precision == "int8":
            if not quantized_url:
                raise ValueError(f"precision int8 needs a quantized model of {config.model} (built by the indexing job)")
            from pipelines.quantization import QuantizedTextEncoder

            self.quantized = QuantizedTextEncoder(quantized_url, threads, config.batch_size)
            return
        self.model = load_sentence_transformer(config.model, self.device, config.max_seq_length or None)
        if self.precision == "fp16":
            self.model.half()

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self.precision == "int8":
            vectors = self.quantized.encode(texts)  # the model's own Normalize module, if it has one, is in the graph
            if self.config.normalize and len(vectors):
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return vectors
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        with torch.inference_mode(), inference_context(self.precision, self.device):
            for rows in length_bucket_groups(self.model.tokenizer, texts, int(self.model.max_seq_length)):
                vectors[rows] = self.model.encode(
                    [texts[row] for row in rows],
                    batch_size=self.config.batch_size,
                    normalize_embeddings=self.config.normalize,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return vectors

    @property
    def dimension(self) -> int:
        if self.precision == "int8":
            return self.quantized.dimension
        return int(self.model.get_embedding_dimension())


class DocumentEmbedder:
    """Ray Data callable class: embeds a batch of ``(id, text_hash, content)`` and commits it as one store part.

    Writing in the actor, batch by batch, makes every embedded batch durable as soon as it is
    done: a killed job loses at most the batches in flight, whatever the corpus size. (Handing the
    vectors to a later write stage let Ray Data merge an actor's outputs into one block per input
    block, and a corpus smaller than one read task reached storage only at the end.)
    Returns ``(part, rows)``.
    """

    def __init__(self, config: EmbeddingConfig, store_url: str, device: str = "auto", threads: int = 0, quantized_url: str = ""):
        self.encoder = TextEncoder(config, device, threads, quantized_url)
        self.store_url = store_url

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encoder.encode(batch["content"].to_pylist())
        embedded = pa.table({"id": batch["id"], "text_hash": batch["text_hash"], "embedding": embeddings_to_arrow(vectors)})
        return storage.write_parquet_part(embedded, self.store_url)


class EmbeddingStore:
    """Vectors of one model, keyed by (id, text_hash), as atomically written Parquet parts."""

    def __init__(self, index_root: str, config: EmbeddingConfig, quantized: dict | None = None):
        self.url = storage.join_url(index_root, "embeddings", model_key(config, quantized))

    def parts(self) -> list[str]:
        return storage.list_files(self.url, ".parquet")

    def keys(self) -> pa.Table:
        """``part``, ``row``, ``id``, ``text_hash`` of every stored vector (small: no vectors read)."""
        tables = []
        for part in self.parts():
            keys = storage.read_parquet(part, columns=["id", "text_hash"])
            tables.append(
                keys.append_column("part", pa.array([part] * keys.num_rows, pa.string())).append_column(
                    "row", pa.array(np.arange(keys.num_rows, dtype=np.int64))
                )
            )
        if not tables:
            return pa.table({"id": pa.array([], pa.string()), "text_hash": pa.array([], pa.string()), "part": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
        return pa.concat_tables(tables)



def read_vectors(part_url: str, rows: np.ndarray) -> np.ndarray:
    """The vectors at ``rows`` of one part."""
    filesystem, path = storage.filesystem_and_path(part_url)
    with filesystem.open(path, "rb") as handle:
        column = pq.read_table(handle, columns=["embedding"])["embedding"]
    return arrow_to_embeddings(column)[rows]


def cluster_embedding_pool(config: EmbeddingConfig) -> EmbeddingPool:
    """The embedding pool for the running Ray cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    return plan_embedding_pool(config, resources.get("CPU", 1), resources.get("GPU", 0))


def rows_per_embedded_part(rows: int, pool_size: int, config: EmbeddingConfig) -> int:
    """Rows each actor call embeds and commits: ``rows_per_part``, but small enough that every actor of the pool
    gets work on a small corpus (and never below ``rows_per_batch``)."""
    spread = -(-rows // max(1, pool_size))
    return max(1, min(config.rows_per_part, max(config.rows_per_batch, spread)))


def embed_documents(documents, store: EmbeddingStore, config: EmbeddingConfig, quantized_url: str = "", rows: int = 0) -> tuple[int, int]:
    """Embed a Ray Dataset of ``(id, text_hash, content)`` (``rows`` of them, when known) into ``store``;
    returns (rows, parts written). Each part is committed as soon as it is embedded (unit of resume)."""
    import ray

    pool = cluster_embedding_pool(config)
    precision = resolve_precision(config.precision, pool.device, int8=bool(quantized_url))
    part_rows = rows_per_embedded_part(rows, pool.size, config) if rows else config.rows_per_part
    print(f"embedding pool: {pool.size} actor(s) on {pool.device} ({precision}), {pool.num_cpus} CPU / {pool.num_gpus} GPU each, {pool.threads} threads; parts of {part_rows} rows")
    written = documents.map_batches(
        DocumentEmbedder,
        fn_constructor_args=(config, store.url, pool.device, pool.threads, quantized_url),
        batch_size=part_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )
    return storage.count_written(written, with_parts=True)
