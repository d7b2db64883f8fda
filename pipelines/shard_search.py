"""First stage: embed queries with the index's own bi-encoder, search every shard, merge to the global top-K.

A batch of queries flows through a chain of Ray Data stages, one row per query: the
:class:`QueryEncoder` adds ``query_embedding``; then one :class:`ShardSearcher` per shard searches
its shard and merges its candidates into the running top-K carried in the batch
(``candidate_positions`` / ``candidate_scores``, padded with -1 / -inf). After the last shard the
batch holds the global top-K, so memory per query is O(K) whatever the number of shards or queries.

With exact re-scoring (the default) each searcher takes more candidates than K from its
approximate (IVF-PQ) index and scores them exactly against the stored float32 vectors of its
shard, so quantization error does not reach the ranking.
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

    top_k: int = field(default=100, metadata={"help": "candidates per query from the first stage"})
    exact_rescoring: bool = field(default=True, metadata={"help": "re-score candidates against stored float32 vectors"})
    rescoring_candidates: int = field(default=0, metadata={"help": "approximate candidates per shard to re-score (0 = 5 x top-k: recall@100 0.957 at 1M vectors, bench.index)"})
    nprobe: int = field(default=0, metadata={"help": "IVF lists to visit (0 = the manifest's)"})
    queries_per_batch: int = 256


def query_embedding_config(manifest: dict, base: EmbeddingConfig | None = None) -> EmbeddingConfig:
    """The embedding settings the index was built with (model, normalization, length) from its manifest."""
    config = EmbeddingConfig() if base is None else EmbeddingConfig(**base.__dict__)
    config.model = manifest["model"]["model"]
    config.normalize = manifest["model"]["normalize"]
    config.max_seq_length = manifest["model"]["max_seq_length"]
    return config


class QueryEncoder:
    """Ray Data callable class: adds ``query_embedding`` (float32, normalized like the documents)."""

    def __init__(self, config: EmbeddingConfig, dimension: int, device: str = "auto", threads: int = 0):
        self.encoder = TextEncoder(config, device, threads)
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


def exact_scores(queries: np.ndarray, vectors: np.ndarray, local_ids: np.ndarray) -> np.ndarray:
    """Inner products of each query with its candidates' exact vectors; -inf where the id is padding."""
    valid = local_ids >= 0
    gathered = vectors[np.where(valid, local_ids, 0)]
    scores = np.einsum("qd,qkd->qk", queries, gathered, dtype=np.float32)
    return np.where(valid, scores, -np.inf).astype(np.float32)


class ShardSearcher:
    """Search one shard and merge its candidates into the running top-K of each query.

    Loads (and validates against the manifest) its shard once per actor, plus the shard's exact
    vectors when re-scoring is on.
    """

    def __init__(self, root: str, version_id: str, shard: int, config: SearchConfig, threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        manifest = index_store.read_manifest(root, version_id)
        self.shard = index_store.load_shard(root, manifest, shard, with_vectors=config.exact_rescoring)
        if config.nprobe:
            faiss.extract_index_ivf(self.shard.index).nprobe = config.nprobe
        self.config = config
        self.candidates = max(config.top_k, config.rescoring_candidates or 5 * config.top_k) if config.exact_rescoring else config.top_k

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This shard's candidates for ``queries``: (global positions, scores), best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        count = min(self.candidates, max(1, self.shard.index.ntotal))
        scores, positions = self.shard.index.search(queries, count)
        positions = positions.astype(np.int64)
        if self.config.exact_rescoring:
            local = np.where(positions >= 0, positions - self.shard.first_position, -1)
            scores = exact_scores(queries, self.shard.vectors, local)
        scores = np.where(positions < 0, -np.inf, scores).astype(np.float32)
        return positions, scores

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        queries = np.asarray(batch["query_embedding"], dtype=np.float32)
        if "candidate_positions" in batch:
            positions, scores = batch["candidate_positions"], batch["candidate_scores"]
        else:
            positions, scores = empty_candidates(len(queries), self.config.top_k)
        new_positions, new_scores = self.search(queries)
        batch["candidate_positions"], batch["candidate_scores"] = merge_top_k(positions, scores, new_positions, new_scores, self.config.top_k)
        return batch
