"""Reranker training: hard-negative mining, fusion fitting, a few real training steps, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipelines.reranking import fuse_scores
from pipelines.training import TrainingConfig, fit_fusion_weight, mine_examples, split_dev_queries, train_cross_encoder


def test_mining_never_returns_a_judged_positive():
    rng = np.random.default_rng(0)
    documents = [f"d{i}" for i in range(60)]
    candidates = {f"q{i}": list(rng.choice(documents, size=30, replace=False)) for i in range(40)}
    qrels = {query: {str(doc): 1 for doc in rng.choice(candidates[query], size=3, replace=False)} for query in candidates}
    qrels["q0"]["d59"] = 0  # judged non-relevant: a fine negative
    candidates["q0"].append("d59")
    examples = mine_examples(candidates, qrels, sorted(candidates), hard_negatives=5, rounds=3, seed=1)
    assert len(examples) == 40 * 3 * 3
    for example in examples:
        positives = {doc for doc, grade in qrels[example["query_id"]].items() if grade > 0}
        assert example["positive"] in positives
        assert len(example["negatives"]) == 5
        assert not positives & set(example["negatives"])
        assert set(example["negatives"]) <= set(candidates[example["query_id"]])
    rounds = {example["round"] for example in examples}
    assert rounds == {0, 1, 2}
    # Fresh negatives each round.
    first = [tuple(e["negatives"]) for e in examples if e["round"] == 0]
    second = [tuple(e["negatives"]) for e in examples if e["round"] == 1]
    assert first != second


def test_mining_skips_queries_without_positives_or_candidates():
    examples = mine_examples({"a": ["d1"], "b": []}, {"a": {"d1": 1}, "b": {"d2": 1}}, ["a", "b", "c"], 2, 1, 0)
    assert examples == []


def test_dev_split_is_seeded_and_disjoint():
    ids = [f"q{i}" for i in range(50)]
    train, dev = split_dev_queries(ids, 10, seed=3)
    assert len(dev) == 10 and not set(train) & set(dev) and set(train) | set(dev) == set(ids)
    assert split_dev_queries(list(reversed(ids)), 10, seed=3) == (train, dev)


@pytest.mark.parametrize("planted", [0.3, 0.7])
def test_fusion_weight_recovers_a_planted_weight(planted):
    rng = np.random.default_rng(11)
    reranks, firsts, relevances = [], [], []
    for _ in range(300):
        rerank = rng.normal(size=30)
        first = rng.normal(size=30)
        truth = fuse_scores(rerank, first, planted)
        relevance = np.zeros(30)
        relevance[np.argsort(-truth)[:3]] = [2, 1, 1]
        reranks.append(rerank)
        firsts.append(first)
        relevances.append(relevance)
    weight, ndcg = fit_fusion_weight(reranks, firsts, relevances)
    assert 0.0 <= weight <= 1.0
    assert abs(weight - planted) <= 0.1
    assert ndcg > 0.9


def toy_training_data(count: int = 24, rounds: int = 2):
    """Queries whose positive shares their words; negatives are from other topics."""
    rng = np.random.default_rng(5)
    queries, texts, examples = {}, {}, []
    for number in range(count):
        topic_words = [f"t{number}w{k}" for k in range(6)]
        queries[f"q{number}"] = " ".join(topic_words[:3])
        texts[f"p{number}"] = " ".join(rng.permutation(topic_words))
        texts[f"n{number}"] = " ".join(f"x{number}y{k}" for k in range(6))
    for round_number in range(rounds):
        for number in range(count):
            negatives = [f"n{int(other)}" for other in rng.choice([i for i in range(count) if i != number], size=2, replace=False)]
            examples.append({"round": round_number, "query_id": f"q{number}", "positive": f"p{number}", "negatives": negatives})
    dev = [{"query": queries[f"q{n}"], "positive": [texts[f"p{n}"]], "documents": [texts[f"n{n}"], texts[f"p{n}"], texts[f"n{(n + 1) % count}"]]} for n in range(4)]
    return examples, queries, texts, dev


def tiny_training_config(tiny_cross_encoder: str, **overrides) -> TrainingConfig:
    settings = dict(
        base_model=tiny_cross_encoder, hard_negatives=2, random_negatives=1, queries_per_step=4, encoder_learning_rate=3e-3,
        head_learning_rate=1e-2, warmup_ratio=0.0, max_length=32, precision="fp32", checkpoints_per_epoch=3, evaluations_per_epoch=1, seed=1,
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


def mean_loss(model_folder: str, examples, queries, texts) -> float:
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_folder, max_length=32)
    losses = []
    for example in examples:
        pairs = [(queries[example["query_id"]], texts[doc]) for doc in [example["positive"], *example["negatives"]]]
        logits = torch.tensor(model.predict(pairs, activation_fn=torch.nn.Identity()))
        losses.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([0]))))
    return float(np.mean(losses))


def test_a_few_training_steps_lower_the_loss(tiny_cross_encoder, tmp_path):
    examples, queries, texts, dev = toy_training_data(rounds=8)
    before = mean_loss(tiny_cross_encoder, examples[:24], queries, texts)
    config = tiny_training_config(tiny_cross_encoder, encoder_learning_rate=1e-2, head_learning_rate=3e-2)
    result = train_cross_encoder(examples, queries, texts, dev, config, str(tmp_path))
    after = mean_loss(result["model_folder"], examples[:24], queries, texts)
    assert result["steps"] == 48
    assert after < before - 0.1
    assert result["loss_curve"] and os.path.exists(os.path.join(tmp_path, "best", "best.json"))


def test_training_resumes_from_its_last_checkpoint(tiny_cross_encoder, tmp_path):
    examples, queries, texts, dev = toy_training_data()
    first = train_cross_encoder(examples, queries, texts, dev, tiny_training_config(tiny_cross_encoder, max_steps=4, checkpoints_per_epoch=6), str(tmp_path))
    assert first["steps"] == 4 and not first["resumed"]
    assert any(name.startswith("checkpoint-4") for name in os.listdir(tmp_path / "checkpoints"))
    second = train_cross_encoder(examples, queries, texts, dev, tiny_training_config(tiny_cross_encoder, max_steps=8, checkpoints_per_epoch=6), str(tmp_path))
    assert second["resumed"] and second["steps"] == 8
    logged_steps = [entry["step"] for entry in second["loss_curve"]]
    assert logged_steps and min(logged_steps) >= 1 and max(logged_steps) == 8
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
