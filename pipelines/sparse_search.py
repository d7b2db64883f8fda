"""First stage, lexical half: search one BM25 shard for a batch of tokenized queries.

Like the dense :class:`~pipelines.shard_search.ShardSearcher`, a searcher returns its shard's
top-K (global positions, scores, padded with -1 / -inf); the shard-holding actors of
:mod:`pipelines.fan_out_search` merge all shards' lists into ``sparse_positions`` /
``sparse_scores``, so memory per query is O(K) whatever the number of shards. Queries are
tokenized once per batch by the caller (:meth:`SparseShardSearcher.search_terms`). Scores use the
version's global statistics (:mod:`pipelines.sparse_index`), so shards' scores compare directly.
A document that shares no term with the query scores 0 and is not a candidate.
"""

from __future__ import annotations

import numpy as np

from pipelines import sparse_index
from pipelines.shard_search import PADDING_POSITION, SearchConfig, empty_candidates, merge_into_batch


def _version_bm25(root: str, version_id: str) -> tuple[dict, sparse_index.Bm25Config, sparse_index.GlobalStatistics]:
    """A version's manifest, BM25 settings and global statistics (an error if it has no BM25 part)."""
    from pipelines import index_store

    manifest = index_store.read_manifest(root, version_id)
    if not manifest.get("sparse"):
        raise index_store.IndexValidationError(f"{root}: version {version_id} has no BM25 index (built with --sparse off)")
    return manifest, sparse_index.config_from_manifest(manifest["sparse"]), sparse_index.load_statistics(root, manifest)


class SparseShardSearcher:
    """BM25 candidates of one shard; as a batch function, merged into ``sparse_positions`` / ``sparse_scores``."""

    def __init__(self, root: str, version_id: str, shard: int, config: SearchConfig):
        manifest, bm25, statistics = _version_bm25(root, version_id)
        self._start(sparse_index.load_shard_counts(root, manifest, shard), statistics, bm25, manifest["sparse"]["shards"][shard]["first_position"], config)

    @classmethod
    def load_many(cls, root: str, version_id: str, shards: list[int], config: SearchConfig) -> list[SparseShardSearcher]:
        """Searchers over some shards of a version, reading its manifest and global statistics once."""
        manifest, bm25, statistics = _version_bm25(root, version_id)
        return [cls.from_counts(sparse_index.load_shard_counts(root, manifest, shard), statistics, bm25, manifest["sparse"]["shards"][shard]["first_position"], config)
                for shard in shards]

    @classmethod
    def from_counts(cls, counts: sparse_index.TermCounts, statistics: sparse_index.GlobalStatistics, bm25: sparse_index.Bm25Config,
                    first_position: int, config: SearchConfig) -> SparseShardSearcher:
        """A searcher over term counts already in memory (tests, benchmarks)."""
        searcher = cls.__new__(cls)
        searcher._start(counts, statistics, bm25, first_position, config)
        return searcher

    def _start(self, counts, statistics, bm25, first_position: int, config: SearchConfig) -> None:
        self.model = sparse_index.bm25_model(counts, statistics, bm25)
        self.tokenize = sparse_index.Tokenizer(bm25)
        self.first_position = int(first_position)
        self.documents = counts.documents
        self.config = config
        matrix = self.model.scores  # CSC: per term, its documents and their float32 scores
        self._data, self._indptr = matrix["data"], np.asarray(matrix["indptr"], dtype=np.int64)
        self._term_bounds = term_upper_bounds(self._data, self._indptr)

    def scores(self, query_terms: list[str]) -> np.ndarray:
        """BM25 scores of every document of the shard for one tokenized query (bm25s: a repeated term counts twice)."""
        ids = self.model.get_tokens_ids(query_terms)
        if not ids or not self.documents:
            return np.zeros(self.documents, dtype=np.float32)
        return np.asarray(self.model.get_scores_from_ids(ids), dtype=np.float32)

    def search(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """This shard's candidates for ``texts``: (global positions, scores), best first, padded."""
        return self.search_terms(self.tokenize(texts))

    def search_terms(self, queries: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """This shard's candidates for queries already tokenized (:class:`~pipelines.sparse_index.Tokenizer`, the version's settings)."""
        top_k = self.config.top_k
        positions, scores = empty_candidates(len(queries), top_k)
        for row, terms in enumerate(queries):
            ids = self.model.get_tokens_ids(terms) if self.documents else []
            if not ids:
                continue
            values = np.asarray(self.model.get_scores_from_ids(ids), dtype=np.float32)
            floor = self._score_floor(ids, top_k)
            matching = np.flatnonzero(values >= floor) if floor > 0 else np.flatnonzero(values > 0)
            if not len(matching):
                continue
            if len(matching) > top_k:  # keep every document tied with the K-th score: smaller positions win below
                kth = np.partition(values[matching], len(matching) - top_k)[len(matching) - top_k]
                matching = matching[values[matching] >= kth]
            order = np.lexsort((matching, -values[matching]))[:top_k]
            chosen = matching[order]
            positions[row, : len(chosen)] = chosen + self.first_position
            scores[row, : len(chosen)] = values[chosen]
        return positions, scores

    def _score_floor(self, ids: list[int], top_k: int) -> np.float32:
        """A lower bound of the query's K-th best score (0 when none is known), so that selection looks only at documents above it.

        The K-th largest score within one query term's own list: each of those K documents scores at
        least that (its other terms add scores >= 0, and float32 rounding of such a sum never falls below
        an addend), so the top-K and every document tied with the K-th score are among the documents at
        or above it. The term with the largest single score among those with K documents or more gives
        the tightest bound cheaply. Selecting over the few documents above it, not over the half of
        the shard a query touches, gave 1.5x the queries/s on a 200k-document shard (bench.scale's
        synthetic queries).
        """
        terms = np.unique(np.asarray(ids, dtype=np.int64))
        sizes = self._indptr[terms + 1] - self._indptr[terms]
        long_enough = terms[sizes >= top_k]
        if not len(long_enough):
            return np.float32(0)
        term = long_enough[np.argmax(self._term_bounds[long_enough])]
        scores = self._data[self._indptr[term]:self._indptr[term + 1]]
        return np.partition(scores, len(scores) - top_k)[len(scores) - top_k]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new_positions, new_scores = self.search([str(text) for text in batch["query_text"]])
        return merge_into_batch(batch, ("sparse_positions", "sparse_scores"), new_positions, new_scores, self.config.top_k)


def term_upper_bounds(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """The largest score of each term (CSC column) in the shard, 0 for a term without documents."""
    bounds = np.zeros(len(indptr) - 1, dtype=data.dtype)
    present = np.flatnonzero(np.diff(indptr) > 0)
    if len(present):
        bounds[present] = np.maximum.reduceat(data, indptr[present])
    return bounds


__all__ = ["PADDING_POSITION", "SparseShardSearcher", "term_upper_bounds"]
