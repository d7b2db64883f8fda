"""Training lists for the reranker: judged positives against hard negatives mined from the first stage.

Why not sentence-transformers' ``mine_hard_negatives``: it embeds the corpus again with an fp32
``SentenceTransformer`` and knows one positive set per query. Our candidates already come from the
product's own first stage (the index's model, the same ranking the reranker sees at serving time),
with their scores, and the rules need the judgments' grades. The rules are the same as its options:

- a rank range (``range_min``): when a query has many judged positives its unjudged top
  candidates are likely relevant too, so its top ``skipped_top_ranks`` are never negatives;
- a relative margin (``relative_margin``): for such a query, a candidate scoring above
  ``(1 - relative_margin)`` times its best judged document's score is likely a false negative and is
  skipped. The margin is taken from the query's best positive rather than from each sampled one (as
  ``mine_hard_negatives`` does): measured on NFCorpus, most judged documents sit in the top 10, so a
  per-positive ceiling left only candidates the first stage already ranks below the positive, and
  the reranker learnt nothing the first stage did not know (dev: reranked -6%, fused +1%);
- the hardest remaining candidates (``sampling_strategy="top"`` with ``range_max``) form the pool;
- a document judged relevant for the query, at any grade, is never its negative (in-batch style
  random negatives included); a document judged 0 is an ordinary negative.

Sampling (:func:`sample_query_steps`) is uniform over queries and each step's queries are distinct,
so a query with 100 judged documents costs what a query with one does; its positive is drawn per
step, weighted by gain (``2**grade - 1``), so a higher grade is the positive more often.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A target log-weight low enough that softmax gives the document exactly zero target mass.
NEGATIVE_TARGET = -1.0e4


@dataclass
class MiningConfig:
    """Which first-stage candidates may be a query's negatives (defaults: the same on every domain)."""

    candidate_depth: int = field(default=50, metadata={"help": "first-stage candidates per training query: positives and negatives are drawn from these (what the reranker reorders)"})
    pool_size: int = field(default=30, metadata={"help": "hardest eligible negatives per (query, positive) to sample from"})
    hard_negatives: int = 5
    random_negatives: int = field(default=2, metadata={"help": "negatives drawn from every training query's candidates (never judged relevant for the query)"})
    dense_judgments: int = field(default=4, metadata={"help": "a query with at least this many judged positives has dense judgments: its unjudged top candidates are likely relevant"})
    skipped_top_ranks: int = field(default=10, metadata={"help": "top ranks never used as negatives for a query with dense judgments"})
    relative_margin: float = field(default=0.05, metadata={"help": "dense judgments: skip negatives scoring above (1 - margin) x the query's best judged document's score"})

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"candidate_depth": 1, "pool_size": 1, "hard_negatives": 0, "random_negatives": 0, "dense_judgments": 1, "skipped_top_ranks": 0, "relative_margin": 0.0})
        if self.hard_negatives + self.random_negatives < 1:
            raise ValueError("--hard-negatives plus --random-negatives must be at least 1")


@dataclass(frozen=True)
class QueryCandidates:
    """One training query's first-stage candidates (best first) with their scores and judgments."""

    doc_ids: list[str]
    scores: np.ndarray
    grades: dict[str, int]

    @property
    def judged_positives(self) -> set[str]:
        return {doc for doc, grade in self.grades.items() if grade > 0}

    def positives_in_candidates(self) -> list[str]:
        judged = self.judged_positives
        return [doc for doc in self.doc_ids if doc in judged]


def negative_pool(query: QueryCandidates, config: MiningConfig) -> list[str]:
    """The hardest eligible negatives of ``query`` (at most ``pool_size``, best first)."""
    judged = query.judged_positives
    dense = len(judged) >= config.dense_judgments
    first_rank = config.skipped_top_ranks if dense else 0
    ceiling = np.inf
    judged_scores = [float(score) for doc, score in zip(query.doc_ids, query.scores) if doc in judged]
    if dense and judged_scores:
        ceiling = max(judged_scores) * (1.0 - config.relative_margin)
    pool = []
    for rank, (doc, score) in enumerate(zip(query.doc_ids, query.scores)):
        if rank < first_rank or doc in judged or score > ceiling:
            continue
        pool.append(doc)
        if len(pool) == config.pool_size:
            break
    return pool


def sample_query_steps(query_ids: list[str], steps: int, per_step: int, rng: random.Random) -> list[list[str]]:
    """``steps`` lists of ``per_step`` distinct queries, going through seeded permutations of all queries.

    Every query comes up once per pass, so counts differ by at most one pass boundary's worth;
    a query that would repeat within a step is deferred to the next place free for it.
    """
    if per_step > len(query_ids):
        raise ValueError(f"{per_step} queries per step but only {len(query_ids)} training queries")
    order: list[str] = []
    result = []
    for _ in range(steps):
        step: list[str] = []
        deferred: list[str] = []
        while len(step) < per_step:
            if not order:
                order = sorted(query_ids)
                rng.shuffle(order)
            query = order.pop()
            (deferred if query in step else step).append(query)
        order.extend(deferred)
        result.append(step)
    return result


def _draw_positive(query: QueryCandidates, rng: random.Random) -> str:
    positives = query.positives_in_candidates()
    gains = [2.0 ** query.grades[doc] - 1.0 for doc in positives]
    return rng.choices(positives, weights=gains)[0]


def _draw_negatives(pool: list[str], count: int, rng: random.Random) -> list[str]:
    if not pool or count <= 0:
        return []
    return rng.sample(pool, count) if len(pool) >= count else [*pool, *(rng.choice(pool) for _ in range(count - len(pool)))]


def _draw_random_negatives(pool: list[str], count: int, excluded: set[str], rng: random.Random) -> list[str]:
    """``count`` distinct documents of ``pool`` outside ``excluded`` (fewer only if the pool runs out)."""
    chosen: list[str] = []
    for _ in range(20 * count):
        if len(chosen) == count or not pool:
            break
        doc = rng.choice(pool)
        if doc not in excluded and doc not in chosen:
            chosen.append(doc)
    return chosen


def labelled_lists(
    queries: dict[str, QueryCandidates], steps: list[list[str]], config: MiningConfig, random_pool: list[str], seed: int
) -> list[dict[str, Any]]:
    """One training list per (step, query): the positive first, then its negatives; targets are log-weights.

    The target puts all its mass on the positive (softmax of ``[0, NEGATIVE_TARGET, ...]``), so
    ListNet on these lists is the softmax cross-entropy of a positive against its negatives.
    """
    rng = random.Random(seed)
    lists = []
    for step_number, step in enumerate(steps):
        for query_id in step:
            query = queries[query_id]
            positive = _draw_positive(query, rng)
            hard = _draw_negatives(negative_pool(query, config), config.hard_negatives, rng)
            excluded = query.judged_positives | set(hard) | {positive}
            negatives = hard + _draw_random_negatives(random_pool, config.hard_negatives + config.random_negatives - len(hard), excluded, rng)
            lists.append({"step": step_number, "query_id": query_id, "doc_ids": [positive, *negatives], "targets": [0.0] + [NEGATIVE_TARGET] * len(negatives)})
    return lists


def distillation_lists(
    queries: dict[str, QueryCandidates], steps: list[list[str]], documents_per_list: int, depth: int, teacher_scale: float, seed: int
) -> list[dict[str, Any]]:
    """Unlabelled lists for warming up the reranker on the first stage: candidates with target log-weights
    ``teacher_scale * first-stage score`` (the bi-encoder's own softmax temperature), so the cross-encoder
    starts out ranking like the first stage before it learns from judgments."""
    rng = random.Random(seed)
    lists = []
    for step_number, step in enumerate(steps):
        for query_id in step:
            query = queries[query_id]
            chosen = sorted(rng.sample(range(min(depth, len(query.doc_ids))), min(documents_per_list, depth, len(query.doc_ids))))
            lists.append(
                {
                    "step": step_number,
                    "query_id": query_id,
                    "doc_ids": [query.doc_ids[i] for i in chosen],
                    "targets": [float(teacher_scale * query.scores[i]) for i in chosen],
                }
            )
    return lists


def trainable_queries(queries: dict[str, QueryCandidates], config: MiningConfig) -> list[str]:
    """Queries with a judged positive among their candidates and at least one eligible negative."""
    chosen = []
    for query_id, query in sorted(queries.items()):
        if query.positives_in_candidates() and negative_pool(query, config):
            chosen.append(query_id)
    return chosen
