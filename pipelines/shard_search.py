"""First stage: embed queries with the index's own bi-encoder, search every shard, merge to the global top-K.

The :class:`QueryEncoder` stage adds ``query_embedding``; a :class:`ShardSearcher` searches one
shard for a batch of queries and returns its candidates (global positions, scores). In the query
job, shard-holding actors (:mod:`pipelines.fan_out_search`) run the searchers of all shards in
parallel and merge their lists with :func:`merge_top_k` into ``candidate_positions`` /
``candidate_scores`` (padded with -1 / -inf), so memory per query is O(K) whatever the number of
shards or queries, and the result does not depend on how shards are grouped or visited.

With exact re-scoring (the default) each searcher takes more candidates than K from its
approximate (IVF-PQ) index and scores them exactly against the stored float16 vectors of its
shard (or, when the index was built with ``--faiss.rescoring-code sq8`` / ``sq6`` for a tight memory
budget, against their decoded scalar-quantizer codes: :func:`code_scores`), so the index's coarser
quantization error does not reach the ranking. A shard whose index already scores
exactly (Flat, IVF-Flat) is searched for K candidates directly, without loading its vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines import index_store
from pipelines.embedding import EmbeddingConfig, TextEncoder

PADDING_POSITION = -1


@dataclass
class SearchConfig:
    """First-stage settings."""

    top_k: int = field(default=100, metadata={"help": "candidates per query from each retriever (hybrid: the union of both top-K lists)"})
    mode: str = field(default="auto", metadata={"help": "dense, sparse (BM25), hybrid (both, fused), or auto: hybrid when the index has a BM25 part"})
    hybrid_fusion: str = field(default="weighted", metadata={"help": "weighted (min-max normalized scores) or rrf (reciprocal ranks)"})
    dense_weight: float = field(default=-1.0, metadata={"help": "weighted fusion: the dense retriever's weight, BM25 gets 1 - it; -1 = the weight jobs.train_reranker "
                                                                  "fitted on dev (the reranker's fusion.json, on its own corpus), else 0.5"})
    rrf_k: int = 60
    exact_rescoring: bool = field(default=True, metadata={"help": "re-score candidates against the stored float16 vectors (their sq8 / sq6 codes when built so; float32 in older versions; not needed, so skipped, for exact indexes such as Flat)"})
    rescoring_candidates: int = field(default=0, metadata={"help": "approximate candidates per shard to re-score (0 = 5 x top-k: recall@100 0.970 at 1M vectors with IVF4096,PQ192x4fs, bench.index)"})
    nprobe: int = field(default=0, metadata={"help": "IVF lists to visit (0 = the manifest's; ignored for indexes without IVF lists)"})
    queries_per_batch: int = 256

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"top_k": 1, "rescoring_candidates": 0, "nprobe": 0, "queries_per_batch": 1, "rrf_k": 1})
        if self.mode not in ("auto", "dense", "sparse", "hybrid"):
            raise ValueError(f"--search.mode {self.mode}: choose dense, sparse, hybrid or auto")
        if self.hybrid_fusion not in ("weighted", "rrf"):
            raise ValueError(f"--search.hybrid-fusion {self.hybrid_fusion}: choose weighted or rrf")
        if not (0.0 <= self.dense_weight <= 1.0 or self.dense_weight == -1.0):
            raise ValueError(f"--search.dense-weight {self.dense_weight}: must be in [0, 1] (or -1: fitted with the reranker, else 0.5)")
        if self.rescoring_candidates and self.rescoring_candidates < self.top_k:
            raise ValueError(f"--rescoring-candidates {self.rescoring_candidates}: must be at least --top-k {self.top_k} (or 0)")


def query_embedding_config(manifest: dict, base: EmbeddingConfig | None = None) -> EmbeddingConfig:
    """The embedding settings the index was built with (model, normalization, length) from its manifest."""
    config = EmbeddingConfig() if base is None else EmbeddingConfig(**base.__dict__)
    config.model = manifest["model"]["model"]
    config.normalize = manifest["model"]["normalize"]
    config.max_seq_length = manifest["model"]["max_seq_length"]
    return config


def quantized_encoder_url(index_root: str, manifest: dict) -> str:
    """The int8 bi-encoder the index's documents were embedded with ("" for a float index): queries use it too."""
    from pipelines.index_store import quantized_model_url

    return quantized_model_url(index_root, manifest)


class QueryEncoder:
    """Ray Data callable class: adds ``query_embedding`` (float32, normalized like the documents)."""

    def __init__(self, config: EmbeddingConfig, dimension: int, device: str = "auto", threads: int = 0, quantized_url: str = ""):
        self.encoder = TextEncoder(config, device, threads, quantized_url)
        if self.encoder.dimension != dimension:
            raise ValueError(f"model {config.model} embeds to {self.encoder.dimension} dimensions but the index has {dimension}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["query_embedding"] = self.encoder.encode([str(text) for text in batch["query_text"]])
        return batch


def merge_top_k(
    positions: np.ndarray, scores: np.ndarray, new_positions: np.ndarray, new_scores: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two candidate lists per query (rows) into the best ``top_k`` by score (pure function).

    Ties are broken by position so the result does not depend on the order shards are visited.
    """
    all_positions = np.concatenate([positions, new_positions], axis=1)
    all_scores = np.concatenate([scores, new_scores], axis=1).astype(np.float32)
    all_scores = np.where(all_positions < 0, -np.inf, all_scores)
    tie_break = np.where(all_positions < 0, np.iinfo(np.int64).max, all_positions)
    order = np.lexsort((tie_break, -all_scores), axis=1)[:, :top_k]
    merged_positions = np.take_along_axis(all_positions, order, axis=1)
    merged_scores = np.take_along_axis(all_scores, order, axis=1)
    if merged_positions.shape[1] < top_k:
        pad = top_k - merged_positions.shape[1]
        merged_positions = np.pad(merged_positions, ((0, 0), (0, pad)), constant_values=PADDING_POSITION)
        merged_scores = np.pad(merged_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    merged_positions = np.where(np.isneginf(merged_scores), PADDING_POSITION, merged_positions)
    return merged_positions, merged_scores


def empty_candidates(rows: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, top_k), PADDING_POSITION, dtype=np.int64), np.full((rows, top_k), -np.inf, dtype=np.float32)


def merge_candidate_lists(lists: list[tuple[np.ndarray, np.ndarray]], rows: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Any number of (positions, scores) lists per query merged into the best ``top_k`` in one step.

    The order is :func:`merge_top_k`'s (score, then smaller position), a total order on candidates:
    the top-K of the union equals the top-K of the union of any groups' top-Ks, so shards can be
    merged in groups, in any order, and give the same result.
    """
    positions, scores = empty_candidates(rows, 0)
    if lists:
        return merge_top_k(positions, scores, np.concatenate([found for found, _ in lists], axis=1), np.concatenate([values for _, values in lists], axis=1), top_k)
    return empty_candidates(rows, top_k)


def merge_into_batch(batch: dict[str, np.ndarray], columns: tuple[str, str], new_positions: np.ndarray, new_scores: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Merge one shard's candidates into the batch's running top-K (``columns``: positions, scores; made by the first shard).

    One searcher as a batch function (benchmarks search one shard so); the query job merges all shards at once.
    """
    if columns[0] in batch:
        positions, scores = batch[columns[0]], batch[columns[1]]
    else:
        positions, scores = empty_candidates(len(new_positions), top_k)
    batch[columns[0]], batch[columns[1]] = merge_top_k(positions, scores, new_positions, new_scores, top_k)
    return batch


def exact_scores(queries: np.ndarray, vectors: np.ndarray, local_ids: np.ndarray) -> np.ndarray:
    """Inner products of each query with its candidates' stored vectors; -inf where the id is padding (< 0).

    ``queries`` (n, d), ``vectors`` (rows, d): float16 (the re-scoring vectors an index stores, possibly
    memory-mapped) or float32 (versions before float16); ``local_ids`` (n, k) rows of ``vectors``.

    float32: faiss's gather-and-dot kernel (``fvec_inner_products_by_idx``) reads each candidate's row
    in place: 5x faster than an einsum over a gathered (n, k, d) array (256 queries x 500 candidates of
    384-d: 8 against 40 ms on 2 cores), and no such array in memory. float16: :func:`_half_scores`
    gathers the candidates of a few queries at a time (about 2 MiB as float32), widens them exactly
    and runs the same kernel on them, never an (n, k, d) float32 array; about 2x the float32 kernel's
    time (the gather, not the arithmetic, dominates). Scores are exact for the stored values: float16
    rounding moves a unit vector's inner products by about 5e-5 (recall: ``index_store.write_shard_vectors``).

    Example:
        >>> exact_scores(np.eye(2, dtype=np.float32), np.array([[1, 2], [3, 4]], dtype=np.float32), np.array([[1, -1], [0, 1]]))
        array([[  3., -inf],
               [  2.,   4.]], dtype=float32)
        >>> exact_scores(np.eye(2, dtype=np.float32), np.array([[1, 2], [3, 4]], dtype=np.float16), np.array([[1, -1], [0, 1]]))
        array([[  3., -inf],
               [  2.,   4.]], dtype=float32)
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    half = isinstance(vectors, np.ndarray) and vectors.dtype == np.float16
    vectors = np.ascontiguousarray(vectors, dtype=np.float16 if half else np.float32)  # no copy of stored float16 or float32 vectors
    local_ids = np.asarray(local_ids)
    if queries.ndim != 2 or vectors.ndim != 2 or local_ids.shape[:1] != queries.shape[:1] or local_ids.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise ValueError(f"shapes do not match: queries {queries.shape}, vectors {vectors.shape}, ids {local_ids.shape}")
    valid, ids = _candidate_rows(local_ids, len(vectors), "vectors")
    scores = np.empty(ids.shape, dtype=np.float32)
    if ids.size and half:
        _half_scores(scores, queries, vectors, ids)
    elif ids.size:
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores), faiss.swig_ptr(queries), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), queries.shape[1], ids.shape[0], ids.shape[1]
        )
    return np.where(valid, scores, -np.inf).astype(np.float32)


def _candidate_rows(local_ids: np.ndarray, rows: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, int64 row ids with padding as 0) of candidate ids, checked to lie within the shard's ``rows``."""
    valid = local_ids >= 0
    ids = np.ascontiguousarray(np.where(valid, local_ids, 0), dtype=np.int64)
    if ids.size and (not rows or ids.max() >= rows):
        raise ValueError(f"candidate id {int(ids.max())} is outside the shard's {rows} {what}")
    return valid, ids


HALF_CHUNK_VALUES = 1 << 19  # float16 re-scoring: candidate values widened to float32 at a time (2 MiB)


def code_scores(queries: np.ndarray, codes: np.ndarray, codec, local_ids: np.ndarray) -> np.ndarray:
    """:func:`exact_scores` for uint8 scalar-quantizer codes (sq8 / sq6, ``index_store.write_shard_vectors``): inner products
    of each query with its candidates' decoded codes; -inf where the id is padding (< 0).

    ``codes`` (rows, code size), possibly memory-mapped; ``codec`` the trained ``faiss.IndexScalarQuantizer`` that wrote
    them. Only the candidates' codes are gathered and decoded (``sa_decode``, into float32), a few queries at a time
    (about 2 MiB of float32 values), then faiss's gather-and-dot kernel runs on them as for float16. Scores are exact
    for the stored code: equal to the inner products with ``codec.sa_decode`` of the same codes.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    local_ids = np.asarray(local_ids)
    code_size = int(codec.sa_code_size())
    if queries.ndim != 2 or codes.ndim != 2 or local_ids.ndim != 2 or local_ids.shape[0] != queries.shape[0] or queries.shape[1] != codec.d or codes.shape[1] != code_size:
        raise ValueError(f"shapes do not match: queries {queries.shape}, codes {codes.shape} (codec: {codec.d}-d, {code_size} B), ids {local_ids.shape}")
    valid, ids = _candidate_rows(local_ids, len(codes), "codes")
    scores = np.empty(ids.shape, dtype=np.float32)
    if ids.size:
        count, candidates = ids.shape
        dimension = queries.shape[1]
        per_chunk = max(1, HALF_CHUNK_VALUES // (candidates * dimension))
        records = codes.view(np.dtype((np.void, code_size))).reshape(len(codes))  # one row = one item: a memcpy per candidate
        gathered = np.empty((min(per_chunk, count) * candidates, code_size), dtype=np.uint8)
        decoded = np.empty((len(gathered), dimension), dtype=np.float32)
        local = np.arange(len(gathered), dtype=np.int64)
        for start in range(0, count, per_chunk):
            chunk = min(per_chunk, count - start)
            size = chunk * candidates
            np.take(records, ids[start : start + chunk].ravel(), out=gathered[:size].view(records.dtype).reshape(size))
            codec.sa_decode_c(size, faiss.swig_ptr(gathered), faiss.swig_ptr(decoded))
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(scores[start : start + chunk]), faiss.swig_ptr(queries[start : start + chunk]), faiss.swig_ptr(decoded), faiss.swig_ptr(local),
                dimension, chunk, candidates,
            )
    return np.where(valid, scores, -np.inf).astype(np.float32)


def _half_scores(scores: np.ndarray, queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> None:
    """:func:`exact_scores` for float16 ``vectors`` (C-contiguous), into ``scores``, a few queries at a time."""
    import faiss

    rows, dimension = vectors.shape
    count, candidates = ids.shape
    per_chunk = max(1, HALF_CHUNK_VALUES // (candidates * dimension))
    records = vectors.view(np.dtype((np.void, 2 * dimension))).reshape(rows)  # one row = one item: a memcpy per candidate
    gathered = np.empty((min(per_chunk, count) * candidates, dimension), dtype=np.float16)
    widened = np.empty(gathered.shape, dtype=np.float32)
    local = np.arange(len(gathered), dtype=np.int64)
    for start in range(0, count, per_chunk):
        chunk = min(per_chunk, count - start)
        size = chunk * candidates
        np.take(records, ids[start : start + chunk].ravel(), out=gathered[:size].view(records.dtype).reshape(size))
        half_to_float(gathered[:size], widened[:size])
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores[start : start + chunk]), faiss.swig_ptr(queries[start : start + chunk]), faiss.swig_ptr(widened), faiss.swig_ptr(local),
            dimension, chunk, candidates,
        )


_HALF_MAGNITUDE_SIGN = np.int32(-0x70002000)  # 0x8FFFE000: sign bit, then the 15 magnitude bits of a float16 moved up by 13
_HALF_TO_FLOAT_SCALE = np.float32(2.0**112)  # 2^(127 - 15): float32's exponent bias over float16's


def half_to_float(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 ``values`` widened into float32 ``out`` (same shape), exactly for every finite value, subnormals included.

    numpy's own float16 cast is scalar code (about 1.3 ns a value here, 40x a float32 copy); these four
    vectorized integer and float passes are not. The float16 bits, sign-extended and shifted left by 13,
    put its exponent and mantissa where float32 has them; as a float32 that is the value times 2^-112,
    which one multiplication undoes (exactly: a power of two).

    Example:
        >>> half = np.array([0.0, -0.0, 1.0, -2.5, 6e-8, 65504.0], dtype=np.float16)
        >>> np.array_equal(half_to_float(half, np.empty(6, dtype=np.float32)), half.astype(np.float32))
        True
    """
    bits = out.view(np.int32)
    np.copyto(bits, values.view(np.int16), casting="unsafe")
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _HALF_MAGNITUDE_SIGN, out=bits)
    np.multiply(out, _HALF_TO_FLOAT_SCALE, out=out)
    return out


def has_exact_scores(index) -> bool:
    """Whether ``index`` returns exact inner products (uncompressed vectors: Flat, IVF-Flat, HNSW-Flat).

    Re-scoring the candidates of such an index against the same float32 vectors changes nothing.
    """
    import faiss

    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return False
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat))


BLAS_QUERY_THRESHOLD = 20


class ShardSearcher:
    """Search one shard for a batch of queries (held by a :class:`~pipelines.fan_out_search.ShardGroupSearcher` actor in the query job).

    Loads (and validates against the manifest) its shard once per actor, plus the shard's exact
    vectors when re-scoring is on and the index does not already score exactly.

    The constructor sets faiss's process-wide ``distance_compute_blas_threshold`` to 20 (the searcher
    runs in its own Ray actor process): faiss 1.15 raised the default to 128,000 query x dimension
    values, below which it computes query-vector distances with its sequential kernel; a batch of
    256 384-d queries (98,304 values) stayed there, and Flat search ran 7.6x slower on 2 cores than
    with BLAS (bench.index, 1M vectors: 35 against 264 queries/s). IVF's coarse quantizer is a Flat
    index too.
    """

    def __init__(self, root: str, version_id: str, shard: int, config: SearchConfig, threads: int = 1):
        manifest = index_store.read_manifest(root, version_id)
        loaded = index_store.load_shard(root, manifest, shard, with_vectors=False)
        if config.exact_rescoring and not has_exact_scores(loaded.index):
            loaded.vectors = index_store.load_shard_vectors(root, manifest, shard)
            loaded.codec = index_store.load_rescoring_codec(root, manifest, shard)
        self._start(loaded, config, threads)

    @classmethod
    def from_shard(cls, shard: index_store.IndexShard, config: SearchConfig, threads: int = 1) -> ShardSearcher:
        """A searcher over a shard already in memory (its ``vectors`` are needed only for re-scoring an approximate index)."""
        searcher = cls.__new__(cls)
        searcher._start(shard, config, threads)
        return searcher

    def _start(self, shard: index_store.IndexShard, config: SearchConfig, threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        faiss.cvar.distance_compute_blas_threshold = BLAS_QUERY_THRESHOLD
        if config.nprobe:
            try:
                ivf = faiss.extract_index_ivf(shard.index)
            except RuntimeError:
                ivf = None  # no IVF lists (Flat): nothing to probe
            if ivf is not None:
                ivf.nprobe = config.nprobe
        self.shard = shard
        self.config = config
        self.rescoring = config.exact_rescoring and not has_exact_scores(shard.index)
        if self.rescoring and shard.vectors is None:
            raise ValueError(f"shard {shard.number}: exact re-scoring needs the shard's vectors")
        if self.rescoring and (shard.vectors.dtype == np.uint8) != (shard.codec is not None):
            raise ValueError(f"shard {shard.number}: uint8 re-scoring codes need their quantizer (codec), and only they")
        self.candidates = max(config.top_k, config.rescoring_candidates or 5 * config.top_k) if self.rescoring else config.top_k

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This shard's candidates for ``queries``: (global positions, scores), best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        count = min(self.candidates, max(1, self.shard.index.ntotal))
        if not self.rescoring:
            return self._search_ties_included(queries, count)
        scores, positions = self.shard.index.search(queries, count)
        positions = positions.astype(np.int64)
        if self.rescoring:
            local = np.where(positions >= 0, positions - self.shard.first_position, -1)
            if self.shard.codec is not None:
                scores = code_scores(queries, self.shard.vectors, self.shard.codec, local)
            else:
                scores = exact_scores(queries, self.shard.vectors, local)
        scores = np.where(positions < 0, -np.inf, scores).astype(np.float32)
        return positions, scores

    def _search_ties_included(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``count`` by the index's scores, ties to the smaller position: what one index over every shard gives.

        faiss's k-selection keeps an arbitrary member of a group of equal scores at the k-th place
        (duplicate documents score the same), which would make the global top-K depend on how the
        documents are sharded. Rows whose k-th score is tied past it are searched again, deeper,
        until the group ends; then every tied candidate is ranked by position.
        """
        index = self.shard.index
        total = max(1, index.ntotal)
        width = min(count + 1, total)
        scores, positions = index.search(queries, width)
        while width < total:
            open_rows = np.flatnonzero((positions[:, -1] >= 0) & (scores[:, -1] == scores[:, count - 1]))
            if not len(open_rows):
                break
            width = min(2 * width, total)
            deeper_scores, deeper_positions = index.search(queries[open_rows], width)
            scores = np.pad(scores, ((0, 0), (0, width - scores.shape[1])), constant_values=-np.inf)
            positions = np.pad(positions, ((0, 0), (0, width - positions.shape[1])), constant_values=PADDING_POSITION)
            scores[open_rows], positions[open_rows] = deeper_scores, deeper_positions
        positions = positions.astype(np.int64)
        scores = np.where(positions < 0, -np.inf, scores).astype(np.float32)
        return merge_candidate_lists([(positions, scores)], len(queries), count)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new_positions, new_scores = self.search(np.asarray(batch["query_embedding"], dtype=np.float32))
        return merge_into_batch(batch, ("candidate_positions", "candidate_scores"), new_positions, new_scores, self.config.top_k)
