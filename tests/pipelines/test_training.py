"""Reranker training: judgment-aware mining, uniform query sampling, the budget planner, fusion and
the ship gate, real training steps on a tiny model, resume."""

from __future__ import annotations

import collections
import json
import os
import random

import numpy as np
import pytest

from pipelines.evaluation import RunEvaluator
from pipelines.mining import (
    NEGATIVE_TARGET,
    MiningConfig,
    QueryCandidates,
    distillation_lists,
    labelled_lists,
    negative_pool,
    sample_query_steps,
    trainable_queries,
)
from pipelines.reranking import fuse_scores
from pipelines.training import (
    DevSet,
    TrainingConfig,
    dev_evaluator,
    fit_fusion_weight,
    lists_dataset,
    rank_by,
    serving_decision,
    split_dev_queries,
    train_cross_encoder,
)
from pipelines.training_plan import TrainingPlan, parse_duration, plan_training


def graded_candidates(seed: int = 0, queries: int = 40, documents: int = 300, depth: int = 60) -> dict[str, QueryCandidates]:
    """Queries with grade 0, 1 and 2 judgments spread over their candidates, some with dense judgments."""
    rng = np.random.default_rng(seed)
    result = {}
    for number in range(queries):
        doc_ids = [f"d{i}" for i in rng.choice(documents, size=depth, replace=False)]
        scores = np.sort(rng.uniform(0.2, 0.9, size=depth))[::-1].astype(np.float32)
        judged_count = 2 if number % 2 else 25  # half sparse, half dense
        judged = rng.choice(depth, size=judged_count, replace=False)
        grades = {doc_ids[i]: int(rng.integers(0, 3)) for i in judged}
        grades[doc_ids[int(judged[0])]] = 2  # at least one positive
        grades[f"d{documents + number}"] = 1  # judged, outside the candidates
        result[f"q{number}"] = QueryCandidates(doc_ids, scores, grades)
    return result


def test_mining_never_returns_a_judged_positive_of_any_grade():
    queries = graded_candidates()
    config = MiningConfig(hard_negatives=5, random_negatives=3, pool_size=20)
    random_pool = sorted({doc for q in queries.values() for doc in q.doc_ids} | {d for q in queries.values() for d in q.grades})
    steps = sample_query_steps(sorted(queries), 60, 4, random.Random(1))
    lists = labelled_lists(queries, steps, config, random_pool, seed=2)
    assert len(lists) == 240
    seen_grades = collections.Counter()
    for item in lists:
        query = queries[item["query_id"]]
        positive, negatives = item["doc_ids"][0], item["doc_ids"][1:]
        seen_grades[query.grades[positive]] += 1
        assert query.grades[positive] > 0 and positive in query.doc_ids
        assert not query.judged_positives & set(negatives)
        assert item["targets"][0] == 0.0 and item["targets"][1:] == [NEGATIVE_TARGET] * len(negatives)
        assert len(negatives) == 8
    assert seen_grades[2] > seen_grades[1] > 0  # gain-weighted: grade 2 (gain 3) is drawn more than grade 1 (gain 1)


def test_dense_judgments_skip_the_top_ranks_and_negatives_too_close_to_the_best_positive():
    doc_ids = [f"d{i}" for i in range(40)]
    scores = np.linspace(0.9, 0.1, 40).astype(np.float32)
    config = MiningConfig(pool_size=30, dense_judgments=4, skipped_top_ranks=10, relative_margin=0.05)
    dense = QueryCandidates(doc_ids, scores, {"d2": 1, "d5": 1, "d20": 2, "d30": 1})
    pool = negative_pool(dense, config)
    assert pool == [f"d{i}" for i in range(10, 40) if i not in (20, 30)]  # below the top 10, judged ones out
    # The best judged document is at rank 15: candidates within 5% of its score (and above it) are skipped.
    deep = QueryCandidates(doc_ids, scores, {"d15": 1, "d25": 1, "d30": 1, "d35": 1})
    ceiling = float(scores[15]) * 0.95
    pool = negative_pool(deep, config)
    assert pool and all(float(scores[doc_ids.index(doc)]) <= ceiling for doc in pool)
    assert "d10" not in pool and "d16" not in pool and "d17" in pool  # d16 is within 5% of d15's score
    sparse = QueryCandidates(doc_ids, scores, {"d20": 1})
    assert negative_pool(sparse, config)[:3] == ["d0", "d1", "d2"]  # sparse judgments: the hardest candidates
    assert len(negative_pool(sparse, config)) == 30


def test_queries_without_a_positive_among_their_candidates_are_not_trained_on():
    scores = np.array([0.9, 0.8], dtype=np.float32)
    queries = {
        "kept": QueryCandidates(["a", "b"], scores, {"a": 1}),
        "positive_outside": QueryCandidates(["a", "b"], scores, {"z": 1}),
        "no_negative": QueryCandidates(["a", "b"], scores, {"a": 1, "b": 2}),
    }
    assert trainable_queries(queries, MiningConfig()) == ["kept"]


def test_sampling_is_uniform_over_queries_with_distinct_queries_in_each_step():
    ids = [f"q{i}" for i in range(37)]
    steps = sample_query_steps(ids, 500, 4, random.Random(3))
    assert len(steps) == 500 and all(len(step) == 4 and len(set(step)) == 4 for step in steps)
    counts = collections.Counter(query for step in steps for query in step)
    assert set(counts) == set(ids)
    assert max(counts.values()) - min(counts.values()) <= 2
    assert steps == sample_query_steps(list(reversed(ids)), 500, 4, random.Random(3))
    with pytest.raises(ValueError, match="queries per step"):
        sample_query_steps(ids[:3], 1, 4, random.Random(0))


def test_distillation_targets_are_the_scaled_first_stage_scores():
    queries = graded_candidates(queries=4)
    lists = distillation_lists(queries, [["q0", "q1"]], documents_per_list=8, depth=30, teacher_scale=20.0, seed=0)
    for item in lists:
        query = queries[item["query_id"]]
        assert len(item["doc_ids"]) == 8
        for doc, target in zip(item["doc_ids"], item["targets"]):
            assert query.doc_ids.index(doc) < 30
            assert target == pytest.approx(20.0 * float(query.scores[query.doc_ids.index(doc)]))


@pytest.mark.parametrize(
    ("text", "seconds"), [("20m", 1200.0), ("90s", 90.0), ("1.5h", 5400.0), ("600", 600.0), (" 2 min ", 120.0)]
)
def test_budget_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "20 minutes", "-5m", "0s", "m"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="budget"):
        parse_duration(text)


def test_the_budget_planner_spends_the_budget_on_steps_and_evaluations():
    plan = plan_training(1200.0, seconds_per_step=1.5, seconds_per_evaluation=30.0, evaluations=4, distillation_fraction=0.25, warmup_fraction=0.1, checkpoints=8)
    assert plan.total_steps == int((1200 - 4 * 30) // 1.5) == 720
    assert plan.distillation_steps == 180 and plan.label_steps == 540
    assert plan.evaluation_steps == (180, 360, 540, 720)  # right after distillation, then evenly to the end
    assert plan.warmup_steps == 72 and plan.checkpoint_every == 90
    assert plan.total_steps * plan.seconds_per_step + len(plan.evaluation_steps) * plan.seconds_per_evaluation <= 1200
    # Twice as slow a machine: half the steps in the same budget, the same shape.
    slow = plan_training(1200.0, 3.0, 30.0, 4, 0.25, 0.1, 8)
    assert slow.total_steps == 360 and slow.evaluation_steps == (90, 180, 270, 360)
    assert TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    fixed = plan_training(1200.0, 1.5, 30.0, 2, 0.5, 0.0, 4, fixed_steps=10)
    assert fixed.total_steps == 10 and fixed.evaluation_steps == (5, 10) and fixed.warmup_steps == 0
    with pytest.raises(ValueError, match="raise --training.budget"):
        plan_training(60.0, 1.5, 30.0, 4, 0.25, 0.1, 8)


def test_dev_split_is_seeded_and_disjoint():
    ids = [f"q{i}" for i in range(50)]
    train, dev = split_dev_queries(ids, 10, seed=3)
    assert len(dev) == 10 and not set(train) & set(dev) and set(train) | set(dev) == set(ids)
    assert split_dev_queries(list(reversed(ids)), 10, seed=3) == (train, dev)


def planted_dev(planted_weight: float, queries: int = 150, depth: int = 30, seed: int = 11):
    """Candidates whose graded relevance follows a planted fusion of two score lists."""
    rng = np.random.default_rng(seed)
    candidates, first, rerank, qrels = {}, {}, {}, {}
    for number in range(queries):
        query = f"q{number}"
        docs = [f"{query}d{i}" for i in range(depth)]
        first_scores = np.sort(rng.normal(size=depth))[::-1]
        rerank_scores = rng.normal(size=depth)
        truth = fuse_scores(rerank_scores, first_scores, planted_weight)
        best = np.argsort(-truth)
        qrels[query] = {docs[best[0]]: 2, docs[best[1]]: 1, docs[best[2]]: 1}
        candidates[query], first[query], rerank[query] = docs, first_scores.astype(np.float32), rerank_scores.astype(np.float32)
    return candidates, first, rerank, qrels


@pytest.mark.parametrize("planted", [0.3, 0.7])
def test_fusion_weight_recovers_a_planted_weight_with_the_evaluation_ndcg(planted):
    candidates, first, rerank, qrels = planted_dev(planted)
    evaluator = RunEvaluator(qrels)
    weight, ndcg = fit_fusion_weight(candidates, first, rerank, evaluator, depth=30)
    assert abs(weight - planted) <= 0.1
    fused = {q: fuse_scores(rerank[q], first[q], weight) for q in candidates}
    assert ndcg == pytest.approx(evaluator.evaluate_ranking(rank_by(candidates, fused, 30))["ndcg@10"])  # the same nDCG as jobs.evaluate
    assert ndcg > 0.9


def test_the_gate_never_ships_a_reranker_that_lowers_dev_ndcg():
    # A planted dev set where the reranker's scores carry nothing: relevance follows the first stage alone.
    candidates, first, rerank, qrels = planted_dev(0.0)
    dev = DevSet({q: q for q in candidates}, {}, candidates, first, qrels)
    weight, stages = dev.stages(rerank, depth=30)
    assert weight == 0.0
    assert stages["fused"]["ndcg@10"] == stages["first_stage"]["ndcg@10"] > stages["reranked"]["ndcg@10"]
    decision = serving_decision(stages, weight)
    assert decision["mode"] == "first_stage" and "keeps the first stage alone" in decision["message"]
    # A weak but useful reranker: worse alone, better fused; served fused and said so in one line.
    candidates, first, rerank, qrels = planted_dev(0.3)
    dev = DevSet({q: q for q in candidates}, {}, candidates, first, qrels)
    first_only = {q: np.zeros(30, dtype=np.float32) for q in candidates}
    weight, stages = dev.stages({q: 0.3 * rerank[q] + 0.7 * first[q] + 0.0 * first_only[q] for q in candidates}, depth=30)
    assert stages["fused"]["ndcg@10"] >= stages["first_stage"]["ndcg@10"]
    weak_weight, weak = dev.stages({q: rerank[q] for q in candidates}, depth=30)
    assert weak["reranked"]["ndcg@10"] < weak["first_stage"]["ndcg@10"] < weak["fused"]["ndcg@10"]
    decision = serving_decision(weak, weak_weight)
    assert decision["mode"] == "fused" and "alone is not better than the first stage" in decision["message"] and "\n" not in decision["message"]


# --- real training steps on a tiny model ---------------------------------------------------------


def toy_lists(steps: int, seed: int = 5, count: int = 24):
    """Queries whose positive shares their words; negatives are from other topics."""
    rng = np.random.default_rng(seed)
    queries, texts = {}, {}
    for number in range(count):
        topic_words = [f"t{number}w{k}" for k in range(6)]
        queries[f"q{number}"] = " ".join(topic_words[:3])
        texts[f"p{number}"] = " ".join(rng.permutation(topic_words))
        texts[f"n{number}"] = " ".join(f"x{number}y{k}" for k in range(6))
    sampled = sample_query_steps(sorted(queries), steps, 4, random.Random(seed))
    lists = []
    for step in sampled:
        for query in step:
            number = int(query[1:])
            negatives = [f"n{int(other)}" for other in rng.choice([i for i in range(count) if i != number], size=3, replace=False)]
            lists.append({"query_id": query, "doc_ids": [f"p{number}", *negatives], "targets": [0.0] + [NEGATIVE_TARGET] * 3})
    candidates = {f"q{n}": [f"n{n}", f"n{(n + 1) % count}", f"p{n}", f"n{(n + 2) % count}"] for n in range(8)}
    dev = DevSet({q: queries[q] for q in candidates}, texts, candidates, {q: np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32) for q in candidates},
                 {q: {f"p{q[1:]}": 1} for q in candidates})
    return lists, queries, texts, dev


def tiny_training_config(tiny_cross_encoder: str, **overrides) -> TrainingConfig:
    settings = dict(base_model=tiny_cross_encoder, queries_per_step=4, max_length=32, precision="fp32", seed=1)
    settings.update(overrides)
    return TrainingConfig(**settings)


def mean_loss(model_folder: str, lists, queries, texts) -> float:
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_folder, max_length=32)
    losses = []
    for item in lists:
        pairs = [(queries[item["query_id"]], texts[doc]) for doc in item["doc_ids"]]
        logits = torch.tensor(model.predict(pairs, activation_fn=torch.nn.Identity()))
        losses.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([0]))))
    return float(np.mean(losses))


def fixed_plan(steps: int, evaluations: tuple[int, ...], checkpoint_every: int) -> TrainingPlan:
    return TrainingPlan(total_steps=steps, distillation_steps=0, warmup_steps=0, evaluation_steps=evaluations, checkpoint_every=checkpoint_every,
                        budget_seconds=0.0, seconds_per_step=1.0, seconds_per_evaluation=0.0)


STEPS = 400


def test_the_loss_falls_on_a_learnable_toy_task_at_the_default_learning_rates(tiny_cross_encoder, tmp_path):
    from pipelines.training import build_cross_encoder

    lists, queries, texts, dev = toy_lists(steps=STEPS)
    config = tiny_training_config(tiny_cross_encoder)
    defaults = TrainingConfig()
    assert (config.encoder_learning_rate, config.head_learning_rate, config.warmup_ratio, config.dropout) == (defaults.encoder_learning_rate, defaults.head_learning_rate, defaults.warmup_ratio, defaults.dropout)
    before = mean_loss(tiny_cross_encoder, lists[:24], queries, texts)
    plan = plan_training(0.0, 1.0, 0.0, 2, 0.0, config.warmup_ratio, 3, fixed_steps=STEPS)
    model = build_cross_encoder(tiny_cross_encoder, 32, config.dropout)
    result = train_cross_encoder(model, lists_dataset(lists, queries, texts), dev_evaluator(dev, 4, "fp32"), plan, config, str(tmp_path))
    after = mean_loss(result["model_folder"], lists[:24], queries, texts)
    assert result["steps"] == STEPS
    assert after < before - 0.1
    assert [point["step"] for point in result["dev_curve"]] == list(plan.evaluation_steps)
    assert {"reranked_ndcg@10", "fused_ndcg@10", "fusion_weight"} <= set(result["dev_curve"][0])
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["value"] == max(point["fused_ndcg@10"] for point in result["dev_curve"])


def test_the_dropout_setting_reaches_every_dropout_layer(tiny_cross_encoder):
    import torch

    from pipelines.training import build_cross_encoder

    kept = build_cross_encoder(tiny_cross_encoder, 32)
    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    model = build_cross_encoder(tiny_cross_encoder, 32, 0.0)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert layers and {m.p for m in layers} == {0.0}
    model.model.train()
    features = model.tokenizer(["a query"], ["a document about the query"], return_tensors="pt").to(model.device)
    with torch.no_grad():
        assert torch.equal(model.model(**features).logits, model.model(**features).logits)


def test_training_resumes_from_its_last_checkpoint(tiny_cross_encoder, tmp_path):
    from pipelines.training import build_cross_encoder

    lists, queries, texts, dev = toy_lists(steps=8)
    dataset = lists_dataset(lists, queries, texts)
    config = tiny_training_config(tiny_cross_encoder)
    first = train_cross_encoder(build_cross_encoder(tiny_cross_encoder, 32), dataset.select(range(16)), dev_evaluator(dev, 4, "fp32"), fixed_plan(4, (4,), 2), config, str(tmp_path))
    assert first["steps"] == 4 and not first["resumed"]
    assert any(name.startswith("checkpoint-4") for name in os.listdir(tmp_path / "checkpoints"))
    second = train_cross_encoder(build_cross_encoder(tiny_cross_encoder, 32), dataset, dev_evaluator(dev, 4, "fp32"), fixed_plan(8, (4, 8), 2), config, str(tmp_path))
    assert second["resumed"] and second["steps"] == 8
    logged_steps = [entry["step"] for entry in second["loss_curve"]]
    assert logged_steps and min(logged_steps) >= 1 and max(logged_steps) == 8
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
