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
    load_sentence_transformer,
    resolve_precision,
)


CPU_BATCH_SIZE = 32  # texts per forward pass on CPU, as bench.embed measures the CPU paths
GPU_BATCH_SIZE = 256  # ... and on a GPU, where a batch of 32 leaves it waiting on per-batch overhead


@dataclass
class EmbeddingConfig:
    """Bi-encoder and actor-pool settings."""

    model: str = field(default="bundled", metadata={"help": "bundled, a Hugging Face id or a local path"})
    normalize: bool = True
    max_seq_length: int = field(default=256, metadata={"help": "tokens per text (0 = the model's own)"})
    batch_size: int = field(default=0, metadata={"help": "texts per forward pass (0 = 32 on CPU, 256 on GPU)"})
    rows_per_batch: int = field(default=256, metadata={"help": "fewest rows per embedding part (on a small corpus, parts shrink so every actor gets work)"})
    rows_per_part: int = field(default=20_000, metadata={"help": "most rows per embedding Parquet part, committed by the actor that embedded them (unit of resume)"})
    device: str = field(default="auto", metadata={"help": "auto (GPU when the cluster has one), cpu or cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (fp16 on GPU; on CPU int8 with OpenVINO, else bf16 where native, else fp32), fp32, bf16, fp16 or int8"})
    calibration_documents: int = field(default=300, metadata={"help": "corpus documents the int8 model is calibrated on (a seeded sample)"})
    pool_size: int = field(default=0, metadata={"help": "actors (0 = from cluster resources)"})
    threads_per_actor: int = field(default=0, metadata={"help": "torch threads per CPU actor (0 = auto)"})

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"batch_size": 0, "rows_per_batch": 1, "rows_per_part": 1, "calibration_documents": 1, "max_seq_length": 0, "pool_size": 0, "threads_per_actor": 0})
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

    GPUs: one actor per GPU, with up to 4 of the CPUs left after the reserve for tokenization. CPUs: actors of ``threads`` torch threads each, claiming at most the
    CPUs minus ``reserve_cpus`` (default one, or two on machines over 8 CPUs) so read/write tasks
    always have room. ``config`` is any settings object with ``device``, ``pool_size`` and
    ``threads_per_actor`` (the reranker's too).
    """
    use_gpu = config.device in ("auto", "cuda") and cluster_gpus >= 1
    if config.device == "cuda" and cluster_gpus < 1:
        raise ValueError("embedding.device is cuda but the Ray cluster reports no GPU")
    total = max(1.0, float(cluster_cpus))
    reserve = reserve_cpus if reserve_cpus is not None else (1.0 if total <= 8 else 2.0)
    available = max(0.5, total - reserve)
    if use_gpu:
        # Each GPU actor tokenizes its own batches: up to 4 CPUs of the node's share per GPU keep a
        # MiniLM-sized model fed (the fast tokenizer runs at thousands of texts/s per core).
        size = config.pool_size or int(cluster_gpus)
        cpus_each = max(1.0, min(4.0, float(int(available / size))))
        return EmbeddingPool(size=size, num_cpus=cpus_each, num_gpus=1.0, threads=max(1, config.threads_per_actor or int(cpus_each)), device="cuda")
    threads = config.threads_per_actor or int(min(total, 4))
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
        gpu_refused = f"{quantized_url}: this index's documents were embedded by this int8 CPU model; queries must be too: run the query encoder on CPU"
        if quantized_url and device.startswith("cuda"):  # before looking for the GPU asked for
            raise ValueError(gpu_refused)
        self.device = choose_device(device)
        if quantized_url and self.device.startswith("cuda"):  # auto found one
            raise ValueError(gpu_refused)
        self.precision = resolve_precision(config.precision, self.device, int8=bool(quantized_url))
        self.config = config
        self.batch_size = config.batch_size or (GPU_BATCH_SIZE if self.device.startswith("cuda") else CPU_BATCH_SIZE)
        if self.precision == "int8":
            if not quantized_url:
                raise ValueError(f"precision int8 needs a quantized model of {config.model} (built by the indexing job)")
            from pipelines.quantization import QuantizedTextEncoder

            self.quantized = QuantizedTextEncoder(quantized_url, threads, self.batch_size)
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
        from pipelines.token_batches import run_bucketed

        if not len(texts):
            return np.zeros((0, self.dimension), dtype=np.float32)

        def forward(features: dict[str, np.ndarray]) -> np.ndarray:
            tensors = {name: torch.from_numpy(values).to(self.device) for name, values in features.items()}
            return self.model(tensors)["sentence_embedding"].float().cpu().numpy()

        with torch.inference_mode(), inference_context(self.precision, self.device):
            vectors = run_bucketed(self.model.tokenizer, texts, int(self.model.max_seq_length), self.batch_size, forward)
        if self.config.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
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

    def keys(self, threads: int = 8) -> pa.Table:
        """``id``, ``text_hash``, ``part``, ``row`` of every stored vector, one row per key (no vectors read).

        ``part`` is dictionary-encoded: an int32 index per row into one list of part URLs (``parts()``,
        sorted), so the URL is held once, not per row. A key stored twice (a rerun that embedded the same
        text again) is listed once, at its first copy in (part, row) order, the copy :func:`locate_vectors`
        uses; the table is in (part, row) order. Keys whose id now has another text hash stay: they are valid
        vectors (a later corpus may revert to that text), and the join with the documents drops them, so the
        table grows with the distinct (id, text_hash) pairs ever embedded. Parts are read ``threads`` at a
        time (object storage answers each read with a round trip).
        """
        from concurrent.futures import ThreadPoolExecutor

        urls = self.parts()
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
            tables = list(pool.map(lambda url: storage.read_parquet(url, columns=["id", "text_hash"]), urls))
        counts = np.array([table.num_rows for table in tables], dtype=np.int64)
        parts = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(urls), dtype=np.int32), counts)), pa.array(urls, pa.string()))
        rows = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        columns = {name: pa.chunked_array([chunk for table in tables for chunk in table[name].cast(pa.string()).chunks], pa.string()) for name in ("id", "text_hash")}
        keys = pa.table({**columns, "part": parts, "row": pa.array(rows)})
        return first_copies(keys)


def first_copies(keys: pa.Table) -> pa.Table:
    """``keys`` (in (part, row) order) without later copies of an (id, text_hash) pair; the same table when there are none.

    Copies of a key share their text hash, so only the rows whose text hash collides with another row's
    (by a 64-bit hash: same texts, or rare collisions) are grouped exactly: a full two-column group-by
    would hold about four times the keys' size for a while, to find nothing in the usual case.
    """
    hashes = string_prefix_hashes(keys["text_hash"])
    ordered = np.sort(hashes)
    candidates = np.flatnonzero(np.isin(hashes, ordered[1:][ordered[1:] == ordered[:-1]]))
    del ordered, hashes
    if not len(candidates):
        return keys
    subset = keys.select(["id", "text_hash"]).take(pa.array(candidates)).append_column("copy", pa.array(candidates))
    first = subset.group_by(["id", "text_hash"]).aggregate([("copy", "min")])["copy_min"].to_numpy()
    later = np.setdiff1d(candidates, first)
    if not len(later):
        return keys
    keep = np.ones(keys.num_rows, dtype=bool)
    keep[later] = False
    return keys.filter(pa.array(keep))


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def string_prefix_hashes(values: pa.ChunkedArray, width: int = 32, block_rows: int = 65_536) -> np.ndarray:
    """A uint64 per string from its byte length and first ``width`` bytes (equal strings, equal hashes), computed
    from the Arrow buffers ``block_rows`` rows at a time (no Python strings); ``width`` is a multiple of 8."""
    out = [np.zeros(0, dtype=np.uint64)]
    take = np.arange(width)
    with np.errstate(over="ignore"):
        for chunk in values.chunks:
            chunk = chunk.cast(pa.large_string())
            for start in range(0, len(chunk), block_rows):
                block = chunk.slice(start, block_rows)
                offsets = np.frombuffer(block.buffers()[1], dtype=np.int64)[block.offset : block.offset + len(block) + 1]
                data = np.frombuffer(block.buffers()[2], dtype=np.uint8) if block.buffers()[2] is not None and offsets[-1] > 0 else np.zeros(1, np.uint8)
                lengths = np.diff(offsets)
                if len(lengths) and (lengths == width).all():  # e.g. every content_hash: the bytes as they lie
                    prefix = data[offsets[0] : offsets[-1]].reshape(-1, width)
                else:
                    inside = take[None, :] < lengths[:, None]
                    prefix = np.where(inside, data[np.where(inside, offsets[:-1, None] + take[None, :], 0)], 0).astype(np.uint8)
                hashed = lengths.astype(np.uint64) * _HASH_MULTIPLIER
                for word in np.ascontiguousarray(prefix).view("<u8").T:
                    hashed = (hashed ^ word) * _HASH_MULTIPLIER
                out.append(hashed ^ (hashed >> np.uint64(29)))
    return np.concatenate(out)


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
