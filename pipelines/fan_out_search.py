"""First stage across shards: shard-holding actors searched in parallel for each query batch, merged exactly.

An index version's dense shards and BM25 shards are split into groups of consecutive shard
numbers. A :class:`ShardGroupSearcher` Ray actor loads one group once (dense shard ``i`` and BM25
shard ``i`` cover the same positions, so they share a group) and searches all of its shards for
a batch of queries, returning the group's top-K. :func:`plan_shard_pool` sizes the pool from the
CPUs it is given: one actor per group, and replicas of every group when the cluster has more
CPUs than the shards use (bounded by memory).

The Ray Data stage :class:`FanOutSearch` puts a batch's query embeddings and BM25 terms
(tokenized once per batch) in the object store once, sends the references to one replica of
every group at once, and merges the groups' lists with
:func:`~pipelines.shard_search.merge_candidate_lists`: the global top-K by score, ties to the
smaller position, whatever the grouping, so the result is the one a single index over every
document gives. One stage replaces the former chain of one operator per shard.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.shard_search import SearchConfig, ShardSearcher, merge_candidate_lists

DENSE_COLUMNS = ("candidate_positions", "candidate_scores")
SPARSE_COLUMNS = ("sparse_positions", "sparse_scores")

MIN_ACTOR_CPUS = 0.25  # a shard actor's smallest claim: several share a core on a small machine
ACTOR_CPUS = 1.0  # what one actor uses well (BM25 scoring is one Python thread); more CPUs go to replicas
FAN_OUT_CPUS = 0.1  # a FanOutSearch actor: tokenizing, waiting, merging
MEMORY_SHARE = 0.5  # replicas of every shard may take at most this share of the cluster's memory


@dataclass(frozen=True)
class ShardPoolPlan:
    """The shard actors of a query job: ``groups`` (dense shard numbers, BM25 shard numbers) each held by ``replicas`` actors."""

    groups: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    replicas: int
    actor_cpus: float
    threads: int
    fan_out_size: int
    fan_out_cpus: float

    @property
    def claimed_cpus(self) -> float:
        """CPUs the shard actors and the fan-out stage claim together."""
        return len(self.groups) * self.replicas * self.actor_cpus + self.fan_out_size * self.fan_out_cpus


def _floor(value: float, digits: int = 3) -> float:
    return math.floor(value * 10**digits) / 10**digits


def plan_shard_pool(budget_cpus: float, dense_shards: int, sparse_shards: int = 0, shard_bytes: int = 0, memory_bytes: float = 0) -> ShardPoolPlan:
    """Share ``budget_cpus`` among shard actors and fan-out actors (pure function, no Ray calls).

    Every replica set holds every shard: ``max(dense, sparse)`` shard slots split into as many
    groups as the budget allows actors of at least ``MIN_ACTOR_CPUS`` (one shard each at most).
    Replicas: one per ``ACTOR_CPUS`` per slot of the budget (each with its own fan-out actor, so
    that replicas are searched at once), at most as many as fit ``MEMORY_SHARE`` of
    ``memory_bytes`` when ``shard_bytes`` (all shards' resident size) is given. The claims never
    exceed the budget.
    """
    slots = max(dense_shards, sparse_shards)
    if slots < 1:
        raise ValueError("nothing to search: the index version has no shards")
    budget = max(float(budget_cpus), FAN_OUT_CPUS + 0.01)
    replicas = max(1, int(budget // (slots * ACTOR_CPUS + FAN_OUT_CPUS)))
    if shard_bytes > 0 and memory_bytes > 0:
        replicas = max(1, min(replicas, int(MEMORY_SHARE * memory_bytes // shard_bytes)))
    per_replica = budget / replicas - FAN_OUT_CPUS
    count = min(slots, max(1, int(per_replica // MIN_ACTOR_CPUS)))
    groups = tuple(
        (tuple(int(shard) for shard in slots_of_group if shard < dense_shards), tuple(int(shard) for shard in slots_of_group if shard < sparse_shards))
        for slots_of_group in np.array_split(np.arange(slots), count)
    )
    actor_cpus = _floor(per_replica / count)
    return ShardPoolPlan(groups, replicas, actor_cpus, max(1, int(actor_cpus)), replicas, FAN_OUT_CPUS)


def resident_bytes(manifest: dict[str, Any], mode: str, search: SearchConfig) -> int:
    """An estimate of the memory one replica of every shard takes: stored index and BM25 files, plus the re-scoring data
    when re-scoring is on: its stored size (``vectors_bytes``: float16 vectors, or sq8 / sq6 codes), float32 vectors for
    entries that do not give it (an upper bound: a Flat index loads none, memory-mapped files are shared)."""
    total = 0
    if mode != "sparse":
        dimension = int(manifest["model"]["dimension"])
        for entry in manifest["shards"]:
            rescoring = int(entry["vectors_bytes"]) if "vectors_bytes" in entry else 4 * dimension * int(entry.get("count", 0))
            total += int(entry.get("bytes", 0)) + (rescoring if search.exact_rescoring else 0)
    if mode != "dense":
        total += sum(int(entry.get("bytes", 0)) for entry in manifest["sparse"]["shards"])
    return total


class ShardGroupSearcher:
    """Ray actor: some dense and BM25 shards of one index version, loaded once, searched together for a batch of queries."""

    def __init__(self, root: str, version_id: str, dense_shards: list[int], sparse_shards: list[int], config: SearchConfig, threads: int = 1):
        from pipelines.sparse_search import SparseShardSearcher

        dense = [ShardSearcher(root, version_id, shard, config, threads) for shard in dense_shards]
        sparse = SparseShardSearcher.load_many(root, version_id, list(sparse_shards), config) if sparse_shards else []
        self._start(dense, sparse, config.top_k)

    @classmethod
    def from_searchers(cls, dense: list, sparse: list, top_k: int) -> ShardGroupSearcher:
        """A group over searchers already in memory (tests, benchmarks)."""
        group = cls.__new__(cls)
        group._start(dense, sparse, top_k)
        return group

    def _start(self, dense: list, sparse: list, top_k: int) -> None:
        self.dense = dense
        self.sparse = sparse
        self.top_k = top_k

    def search(self, query_embeddings: np.ndarray | None, query_terms: list[list[str]] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The group's top-K (positions, scores) per query: ``dense`` for the embeddings, ``sparse`` for the terms.

        A retriever is searched when its queries are given and the group holds shards of it.
        """
        found = {}
        if query_embeddings is not None and self.dense:
            found["dense"] = merge_candidate_lists([searcher.search(query_embeddings) for searcher in self.dense], len(query_embeddings), self.top_k)
        if query_terms is not None and self.sparse:
            found["sparse"] = merge_candidate_lists([searcher.search_terms(query_terms) for searcher in self.sparse], len(query_terms), self.top_k)
        return found


def start_shard_pool(plan: ShardPoolPlan, root: str, version_id: str, config: SearchConfig) -> list[list]:
    """Start the plan's actors (each loads its shards); returns one list of group actors per replica.

    Actors are spread over the nodes; they live as long as their handles (the query flow holds them).
    """
    import ray

    actor = ray.remote(ShardGroupSearcher)
    return [
        [actor.options(num_cpus=plan.actor_cpus, scheduling_strategy="SPREAD").remote(root, version_id, list(dense), list(sparse), config, plan.threads) for dense, sparse in plan.groups]
        for _ in range(plan.replicas)
    ]


class FanOutSearch:
    """Ray Data callable class: each query batch searched by one replica of every shard group at once, merged to the global top-K.

    Adds ``candidate_positions`` / ``candidate_scores`` (dense; from ``query_embedding``) and
    ``sparse_positions`` / ``sparse_scores`` (BM25; from ``query_text``) as ``mode`` asks,
    padded with -1 / -inf. Replica sets are taken in turn, from a random start per actor, so a
    pool of these actors spreads its batches over them.
    """

    def __init__(self, replicas: list[list], mode: str, top_k: int, bm25=None):
        from pipelines.sparse_index import Tokenizer

        if not replicas or not all(replicas):
            raise ValueError("FanOutSearch needs at least one replica of at least one shard group")
        if mode != "dense" and bm25 is None:
            raise ValueError(f"search mode {mode} needs the version's BM25 settings to tokenize queries")
        self.replicas = replicas
        self.dense = mode != "sparse"
        self.sparse = mode != "dense"
        self.tokenize = Tokenizer(bm25) if self.sparse else None
        self.top_k = top_k
        self.turn = random.randrange(len(replicas))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        rows = len(batch["query_text"])
        embeddings = ray.put(np.ascontiguousarray(batch["query_embedding"], dtype=np.float32)) if self.dense else None
        terms = ray.put(self.tokenize([str(text) for text in batch["query_text"]])) if self.sparse else None
        groups = self.replicas[self.turn % len(self.replicas)]
        self.turn += 1
        found = ray.get([group.search.remote(embeddings, terms) for group in groups])
        for wanted, name, columns in ((self.dense, "dense", DENSE_COLUMNS), (self.sparse, "sparse", SPARSE_COLUMNS)):
            if wanted:
                batch[columns[0]], batch[columns[1]] = merge_candidate_lists([lists[name] for lists in found if name in lists], rows, self.top_k)
        return batch
