"""Domain reranker training: hard negatives mined from the index, a listwise cross-encoder loss, fusion.

Stages:
1. mining: the query job's first stage runs the training queries against the index; for each
   (query, judged positive) the negatives are first-stage candidates that are not judged positive
   (:func:`mine_examples`; a judged positive is never a negative);
2. training: a sentence-transformers CrossEncoder (from the bundled bi-encoder weights by default:
   sentence-transformers turns it into a cross-encoder with a fresh head) with its trainer and
   :class:`MultipleNegativesRankingLoss` on raw logits: per query a softmax over the positive, the
   hard negatives and in-batch (random) negatives. The new head learns faster than the pretrained
   encoder (two learning rates). Checkpoints every half epoch; a killed run resumes from the last;
   the best checkpoint on dev nDCG@10 is kept;
3. fusion: :func:`fit_fusion_weight` picks ``a`` in final = a·z(rerank) + (1−a)·z(first stage) on
   the dev split and stores it with the model (``fusion.json``), where the query job finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.reranking import FUSION_FILE, fuse_scores


@dataclass
class TrainingConfig:
    """Reranker training settings (defaults: what worked on SciFact on 2 CPU cores)."""

    base_model: str = field(default="bundled", metadata={"help": "bundled, a Hugging Face id or a local path"})
    dev_queries: int = field(default=100, metadata={"help": "training queries held out for model selection and fusion"})
    mining_depth: int = field(default=30, metadata={"help": "first-stage candidates to draw hard negatives from"})
    hard_negatives: int = 5
    random_negatives: int = field(default=2, metadata={"help": "in-batch negatives per query"})
    epochs: float = 2.0
    queries_per_step: int = 4
    encoder_learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    max_length: int = 160
    evaluations_per_epoch: int = field(default=1, metadata={"help": "dev evaluations (model selection) per epoch"})
    checkpoints_per_epoch: int = field(default=4, metadata={"help": "checkpoints per epoch (units of resume)"})
    dev_depth: int = field(default=20, metadata={"help": "candidates reranked per dev query during training"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the CPU/GPU supports it), bf16 or fp32"})
    seed: int = 12
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0 = epochs decide); for smoke tests"})


def training_precision(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from pipelines.models import cpu_supports_bf16

    return "bf16" if cpu_supports_bf16() else "fp32"


def split_dev_queries(query_ids: list[str], dev_count: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the training queries into (train, dev)."""
    ordered = sorted(query_ids)
    random.Random(seed).shuffle(ordered)
    dev = sorted(ordered[:dev_count])
    train = sorted(ordered[dev_count:])
    return train, dev


def mine_examples(
    candidates: dict[str, list[str]],
    qrels: dict[str, dict[str, int]],
    query_ids: list[str],
    hard_negatives: int,
    rounds: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Training tuples (query id, positive id, hard negative ids) from first-stage candidates.

    Negatives are candidates that are not judged relevant (score > 0) for the query; each round
    (epoch) draws a fresh sample of them. Queries with fewer candidates than ``hard_negatives``
    reuse some; queries with no judged positive are skipped.
    """
    rng = random.Random(seed)
    examples = []
    for round_number in range(rounds):
        for query_id in query_ids:
            positives = sorted(doc for doc, grade in qrels.get(query_id, {}).items() if grade > 0)
            pool = [doc for doc in candidates.get(query_id, []) if doc not in qrels.get(query_id, {}) or qrels[query_id][doc] <= 0]
            if not positives or not pool:
                continue
            for positive in positives:
                chosen = rng.sample(pool, hard_negatives) if len(pool) >= hard_negatives else [rng.choice(pool) for _ in range(hard_negatives)]
                examples.append({"round": round_number, "query_id": query_id, "positive": positive, "negatives": chosen})
    return examples


def fit_fusion_weight(
    rerank_scores: list[np.ndarray],
    first_stage_scores: list[np.ndarray],
    relevance: list[np.ndarray],
    grid: int = 21,
) -> tuple[float, float]:
    """The weight a in [0, 1] maximizing mean nDCG@10 of the fused ranking; returns (a, nDCG@10).

    Each list holds one array per query (candidates in any order). Ties are resolved toward the
    smaller weight so the choice is deterministic.
    """
    best = (0.0, -1.0)
    for weight in np.linspace(0.0, 1.0, grid):
        scores = [ndcg_at_10(fuse_scores(r, f, weight), rel) for r, f, rel in zip(rerank_scores, first_stage_scores, relevance)]
        value = float(np.mean(scores)) if scores else 0.0
        if value > best[1] + 1e-12:
            best = (float(round(weight, 4)), value)
    return best


def ndcg_at_10(scores: np.ndarray, relevance: np.ndarray) -> float:
    """nDCG@10 of one query's candidates ranked by ``scores`` (used inside the fusion grid search).

    Uses the candidates' own relevance for the ideal ranking (relevant documents outside the
    candidate list cannot be recovered by reranking, so they do not change which weight is best).
    """
    order = np.lexsort((np.arange(len(scores)), -scores))[:10]
    gains = relevance[order]
    discounts = 1.0 / np.log2(np.arange(2, len(order) + 2))
    ideal = np.sort(relevance)[::-1][:10]
    ideal_dcg = float(((2.0**ideal - 1) * discounts[: len(ideal)]).sum())
    return float(((2.0**gains - 1) * discounts).sum()) / ideal_dcg if ideal_dcg > 0 else 0.0


def write_fusion_weight(model_folder: str, weight: float, dev_ndcg: float) -> None:
    with open(os.path.join(model_folder, FUSION_FILE), "w") as handle:
        json.dump({"weight": weight, "dev_ndcg@10": dev_ndcg, "formula": "a*z(rerank_logit) + (1-a)*z(first_stage_score), z within each query"}, handle, indent=2)


def cache_key(values: dict[str, Any]) -> str:
    """A short stable key for caching a trained model by its inputs and config."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_cross_encoder(base_model: str, max_length: int):
    """A CrossEncoder with one output from ``base_model`` (a bi-encoder gets a fresh head)."""
    from sentence_transformers import CrossEncoder

    from pipelines.models import resolve_model_reference

    return CrossEncoder(resolve_model_reference(base_model), num_labels=1, max_length=max_length, device="cpu" if not _cuda() else "cuda")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def candidate_pairs(queries: dict[str, str], candidates: dict[str, list[str]], texts: dict[str, str], depth: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(query text, document text) pairs of each query's top-``depth`` candidates, and the query id of each."""
    pairs, owners = [], []
    for query_id, docs in candidates.items():
        for doc in docs[:depth]:
            pairs.append((queries[query_id], texts[doc]))
            owners.append(query_id)
    return pairs, owners


def score_candidates(model, queries: dict[str, str], candidates: dict[str, list[str]], texts: dict[str, str], depth: int, precision: str, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Raw cross-encoder logits for each query's top-``depth`` candidates (``model``: a CrossEncoder, or an
    object with ``score(pairs)`` such as :class:`pipelines.quantization.QuantizedPairScorer`)."""
    import torch

    from pipelines.models import inference_context

    pairs, owners = candidate_pairs(queries, candidates, texts, depth)
    if hasattr(model, "score"):
        logits = model.score(pairs)
    else:
        with torch.inference_mode(), inference_context(precision, str(model.device)):
            logits = np.asarray(model.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(), show_progress_bar=True, convert_to_numpy=True), dtype=np.float32).reshape(-1)
    scores: dict[str, list[float]] = {}
    for owner, logit in zip(owners, logits):
        scores.setdefault(owner, []).append(float(logit))
    return {query_id: np.asarray(values, dtype=np.float32) for query_id, values in scores.items()}


def autocast_reranking_evaluator(samples: list[dict[str, Any]], precision: str):
    """sentence-transformers' CrossEncoderRerankingEvaluator (dev nDCG@10), scoring in the training precision."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    from pipelines.models import inference_context

    class AutocastRerankingEvaluator(CrossEncoderRerankingEvaluator):
        def __call__(self, model, *args, **kwargs):
            import torch

            with torch.inference_mode(), inference_context(precision, str(model.device)):
                return super().__call__(model, *args, **kwargs)

    return AutocastRerankingEvaluator(samples, at_k=10, always_rerank_positives=False, name="dev", batch_size=32, write_csv=False)


def train_cross_encoder(
    examples: list[dict[str, Any]],
    queries: dict[str, str],
    texts: dict[str, str],
    dev_samples: list[dict[str, Any]],
    config: TrainingConfig,
    output_folder: str,
) -> dict[str, Any]:
    """Train with the sentence-transformers CrossEncoderTrainer; resumes from checkpoints in ``output_folder``.

    Returns the loss curve and dev metrics from the trainer's log; the best model is saved to
    ``output_folder/model``.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

    torch.manual_seed(config.seed)
    precision = training_precision(config.precision)
    model = build_cross_encoder(config.base_model, config.max_length)
    columns: dict[str, list[str]] = {"query": [], "positive": []}
    for number in range(config.hard_negatives):
        columns[f"negative_{number + 1}"] = []
    for example in sorted(examples, key=lambda e: e["round"]):
        columns["query"].append(queries[example["query_id"]])
        columns["positive"].append(texts[example["positive"]])
        for number, negative in enumerate(example["negatives"]):
            columns[f"negative_{number + 1}"].append(texts[negative])
    dataset = Dataset.from_dict(columns)
    steps_per_round = max(1, len(dataset) // max(1, examples[-1]["round"] + 1) // config.queries_per_step)
    evaluation_steps = max(1, steps_per_round // max(1, config.evaluations_per_epoch))
    evaluator = autocast_reranking_evaluator(dev_samples, precision)
    loss = MultipleNegativesRankingLoss(model, num_negatives=config.random_negatives, scale=1.0, activation_fn=torch.nn.Identity())
    checkpoint_steps = max(1, steps_per_round // max(1, config.checkpoints_per_epoch))
    arguments = CrossEncoderTrainingArguments(
        output_dir=os.path.join(output_folder, "checkpoints"),
        num_train_epochs=1,  # the dataset already holds one round of fresh negatives per epoch
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.queries_per_step,
        learning_rate=config.encoder_learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps (transformers 5)
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps",
        eval_steps=evaluation_steps,
        save_strategy="steps",
        save_steps=checkpoint_steps,
        save_total_limit=1,
        logging_steps=max(1, min(checkpoint_steps, 10)),
        seed=config.seed,
        data_seed=config.seed,
        dataloader_drop_last=True,
        report_to="none",
        disable_tqdm=False,
    )
    best_folder = os.path.join(output_folder, "best")
    trainer = _TwoRateTrainer(
        head_learning_rate=config.head_learning_rate,
        model=model,
        args=arguments,
        train_dataset=dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=[_keep_best_callback(best_folder, "eval_dev_ndcg@10")],
    )
    checkpoints = os.path.join(output_folder, "checkpoints")
    resume = os.path.isdir(checkpoints) and any(name.startswith("checkpoint-") for name in os.listdir(checkpoints))
    if resume:
        print(f"resuming from the last checkpoint in {checkpoints}")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume or None)
    seconds = time.perf_counter() - started
    if trainer.state.global_step % evaluation_steps:  # the last step was not evaluated yet
        _keep_best(best_folder, "eval_dev_ndcg@10", trainer.evaluate(), trainer.model, trainer.state.global_step)
    best = json.loads(open(os.path.join(best_folder, "best.json")).read())
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(os.path.join(best_folder, "model"), max_length=config.max_length)
    model_folder = os.path.join(output_folder, "model")
    model.save(model_folder)
    history = trainer.state.log_history
    return {
        "precision": precision,
        "steps": trainer.state.global_step,
        "resumed": resume,
        "train_seconds": round(seconds, 1),
        "pairs_per_second": round(result.metrics.get("train_samples_per_second", 0.0) * (1 + config.hard_negatives + config.random_negatives), 2),
        "best_step": best["step"],
        "best_dev_ndcg@10": best["value"],
        "loss_curve": [{"step": entry["step"], "loss": entry["loss"]} for entry in history if "loss" in entry],
        "dev_curve": [{"step": entry["step"], "ndcg@10": entry["eval_dev_ndcg@10"]} for entry in history if "eval_dev_ndcg@10" in entry],
        "model_folder": model_folder,
    }


def _keep_best(folder: str, metric: str, metrics: dict, model, step: int) -> None:
    """Save ``model`` to ``folder/model`` if ``metrics[metric]`` beats the best so far (kept in best.json)."""
    if metric not in metrics:
        return
    record = os.path.join(folder, "best.json")
    best = json.loads(open(record).read()) if os.path.exists(record) else None
    if best is not None and metrics[metric] <= best["value"]:
        return
    model.save(os.path.join(folder, "model"))
    with open(record + ".tmp", "w") as handle:
        json.dump({"metric": metric, "value": float(metrics[metric]), "step": int(step)}, handle)
    os.replace(record + ".tmp", record)


def _keep_best_callback(folder: str, metric: str):
    """A trainer callback that keeps the best model on dev; its record survives a resume."""
    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            if model is not None and metrics:
                _keep_best(folder, metric, metrics, model, state.global_step)

    return KeepBest()


def _head_parameter(name: str) -> bool:
    return "classifier" in name or "pooler" in name


def _make_two_rate_trainer():
    from sentence_transformers.cross_encoder import CrossEncoderTrainer

    class TwoRateTrainer(CrossEncoderTrainer):
        """CrossEncoderTrainer whose freshly initialized head learns faster than the pretrained encoder."""

        def __init__(self, *args, head_learning_rate: float, **kwargs):
            self.head_learning_rate = head_learning_rate
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            import torch

            if self.optimizer is None:
                target = model if model is not None else self.model
                head = [p for n, p in target.named_parameters() if p.requires_grad and _head_parameter(n)]
                encoder = [p for n, p in target.named_parameters() if p.requires_grad and not _head_parameter(n)]
                self.optimizer = torch.optim.AdamW(
                    [
                        {"params": encoder, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay},
                        {"params": head, "lr": self.head_learning_rate, "weight_decay": 0.0},
                    ]
                )
            return self.optimizer

    return TwoRateTrainer


def _TwoRateTrainer(**kwargs):
    return _make_two_rate_trainer()(**kwargs)


@dataclass
class TrainRerankerConfig:
    """Settings of jobs.train_reranker."""

    index: str = field(default="", metadata={"help": "index root URL to mine hard negatives from"})
    queries: str = field(default="", metadata={"help": "queries (Parquet or BEIR queries.jsonl)"})
    qrels: str = field(default="", metadata={"help": "BEIR qrels TSV of the training queries"})
    output: str = field(default="", metadata={"help": "output folder URL: model/, training_report.json"})
    fusion_depth: int = field(default=30, metadata={"help": "rerank depth the fusion weight is fitted at (use the query job's)"})
    int8: bool = field(default=True, metadata={"help": "also write an int8 (OpenVINO) export for CPU serving, kept only if dev quality holds"})
    int8_tolerance: float = field(default=0.005, metadata={"help": "largest dev fused nDCG@10 loss the int8 export may have"})
    calibration_pairs: int = field(default=300, metadata={"help": "training (query, candidate) pairs the int8 export is calibrated on"})
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> None:
        for name in ("index", "queries", "qrels", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")


def _first_stage(run) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    table = run.sort_by([("query_id", "ascending"), ("first_stage_rank", "ascending")])
    candidates: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for query_id, doc_id, score in zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), table["first_stage_score"].to_pylist()):
        candidates.setdefault(query_id, []).append(doc_id)
        scores.setdefault(query_id, []).append(score)
    return candidates, {query_id: np.asarray(values, dtype=np.float32) for query_id, values in scores.items()}


def _ranking_metrics(evaluator, ranking: dict[str, list[str]]) -> dict[str, float]:
    metrics = evaluator.evaluate_ranking(ranking)
    return {name: round(float(metrics[name]), 4) for name in ("ndcg@10", "p@3", "mrr@10")}


def _rank_by(candidates: dict[str, list[str]], scores: dict[str, np.ndarray], depth: int) -> dict[str, list[str]]:
    """Top-``depth`` reordered by ``scores`` (ties: first-stage order), the rest in first-stage order."""
    ranking = {}
    for query_id, docs in candidates.items():
        head = docs[:depth]
        order = np.lexsort((np.arange(len(head)), -scores[query_id][: len(head)]))
        ranking[query_id] = [head[i] for i in order] + docs[depth:]
    return ranking


def export_int8_reranker(model, model_folder: str, calibration: list[tuple[str, str]], dev_ndcg, reference: float, tolerance: float) -> dict[str, Any]:
    """Quantize the trained reranker to int8 (OpenVINO, NNCF) into ``model_folder/openvino_int8``, for CPU serving.

    ``dev_ndcg(scorer)`` measures the export on the dev split; the export is kept only if that is
    within ``tolerance`` of ``reference`` (the trained model's), so ``precision auto`` never trades
    ranking quality for speed.
    """
    import shutil

    import torch

    from pipelines.quantization import QuantizedPairScorer, int8_available, is_complete, quantize_model
    from pipelines.reranking import INT8_FOLDER

    if not int8_available():
        return {"kept": False, "reason": "openvino or nncf is not installed"}
    started = time.perf_counter()
    folder = os.path.join(model_folder, INT8_FOLDER)
    if not is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"quantizing the reranker to int8 on {len(calibration)} training pairs")
        quantize_model(model, "cross-encoder", calibration, int(model.max_length), folder, model_folder)
    value = float(dev_ndcg(QuantizedPairScorer(folder, threads=torch.get_num_threads())))
    kept = value >= reference - tolerance
    if not kept:
        shutil.rmtree(folder)
    print(f"int8 reranker: dev fused nDCG@10 {value:.4f} against {reference:.4f}: {'kept' if kept else 'dropped'}")
    return {"kept": kept, "dev_fused_ndcg@10": round(value, 4), "reference_dev_fused_ndcg@10": round(reference, 4), "tolerance": tolerance,
            "calibration_pairs": len(calibration), "seconds": round(time.perf_counter() - started, 1)}


def train_reranker(config: TrainRerankerConfig) -> dict[str, Any]:
    """Mine, train, fit fusion, evaluate on dev; returns the training report (also saved as JSON)."""
    from pipelines import index_store, storage
    from pipelines.document_texts import texts_by_id
    from pipelines.documents import CorpusConfig
    from pipelines.evaluation import RunEvaluator, read_qrels, read_run
    from pipelines.retrieval import RetrieveRerankConfig, retrieve_and_rerank
    from pipelines.runtime import ensure_ray, worker_visible

    started = time.perf_counter()
    ensure_ray()
    training = config.training
    qrels = read_qrels(config.qrels)
    manifest = index_store.read_manifest(config.index)
    with worker_visible(config.output, copy_back=True, local_only=True) as output_folder:
        os.makedirs(output_folder, exist_ok=True)
        # 1. Mine: first-stage candidates for every judged training query (resumable query job).
        mining_url = os.path.join(output_folder, "mining")
        depth = max(training.mining_depth, training.dev_depth, config.fusion_depth)
        mining = RetrieveRerankConfig(index=config.index, queries=config.queries, output=mining_url, qrels=config.qrels)
        mining.search.top_k = depth
        retrieve_and_rerank(mining)
        candidates, first_scores = _first_stage(read_run(mining_url))
        train_ids, dev_ids = split_dev_queries(sorted(candidates), training.dev_queries, training.seed)
        rounds = max(1, int(np.ceil(training.epochs)))
        pools = {q: candidates[q][: training.mining_depth] for q in train_ids}
        examples = mine_examples(pools, qrels, train_ids, training.hard_negatives, rounds, training.seed)
        # 2. Texts of every document and query involved (read from the corpus and the query log).
        needed = {doc for q in candidates for doc in candidates[q]} | {doc for q in candidates for doc in qrels.get(q, {})}
        with worker_visible(manifest["corpus"]["url"]) as corpus_url:
            texts = texts_by_id(corpus_url, CorpusConfig(**manifest["documents"]), sorted(needed))
        with worker_visible(config.queries) as queries_url:
            queries = texts_by_id(queries_url, mining.query_log, sorted(candidates))
        examples = [e for e in examples if e["positive"] in texts]
        if not examples:
            raise ValueError(f"{config.qrels}: no training example has a judged positive in the index corpus")
        dev_samples = [
            {
                "query": queries[q],
                "positive": [texts[d] for d, grade in qrels[q].items() if grade > 0 and d in texts],
                "documents": [texts[d] for d in candidates[q][: training.dev_depth]],
            }
            for q in dev_ids
        ]
        print(f"mined {len(examples)} training tuples from {len(train_ids)} queries; {len(dev_ids)} dev queries")
        # 3. Train (resumes from checkpoints), then score dev at the fusion depth and fit the fusion weight.
        trained = train_cross_encoder(examples, queries, texts, dev_samples, training, output_folder)
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(trained["model_folder"], max_length=training.max_length)
        dev_candidates = {q: candidates[q] for q in dev_ids}
        dev_scores = score_candidates(model, queries, dev_candidates, texts, config.fusion_depth, trained["precision"])
        relevance = {q: np.array([qrels[q].get(d, 0) for d in candidates[q][: config.fusion_depth]], dtype=np.float64) for q in dev_ids}
        weight, _ = fit_fusion_weight(
            [dev_scores[q] for q in dev_ids],
            [first_scores[q][: config.fusion_depth] for q in dev_ids],
            [relevance[q] for q in dev_ids],
        )
        fused = {q: fuse_scores(dev_scores[q], first_scores[q][: config.fusion_depth], weight) for q in dev_ids}
        evaluator = RunEvaluator({q: qrels[q] for q in dev_ids})
        dev_metrics = {
            "first_stage": _ranking_metrics(evaluator, dev_candidates),
            "reranked": _ranking_metrics(evaluator, _rank_by(dev_candidates, dev_scores, config.fusion_depth)),
            "fused": _ranking_metrics(evaluator, _rank_by(dev_candidates, fused, config.fusion_depth)),
        }
        write_fusion_weight(trained["model_folder"], weight, dev_metrics["fused"]["ndcg@10"])

        # 4. int8 export for CPU serving, calibrated on training pairs, kept only if dev quality holds.
        int8 = {"kept": False, "reason": "disabled (--int8 false)"}
        if config.int8:
            train_pairs, _ = candidate_pairs(queries, pools, texts, training.mining_depth)
            chosen = np.sort(np.random.default_rng(training.seed).choice(len(train_pairs), size=min(config.calibration_pairs, len(train_pairs)), replace=False))

            def dev_fused_ndcg(scorer) -> float:
                scores = score_candidates(scorer, queries, dev_candidates, texts, config.fusion_depth, "int8")
                fused_int8 = {q: fuse_scores(scores[q], first_scores[q][: config.fusion_depth], weight) for q in dev_ids}
                return _ranking_metrics(evaluator, _rank_by(dev_candidates, fused_int8, config.fusion_depth))["ndcg@10"]

            int8 = export_int8_reranker(model, trained["model_folder"], [train_pairs[i] for i in chosen], dev_fused_ndcg,
                                        dev_metrics["fused"]["ndcg@10"], config.int8_tolerance)
        report = {
            "config": {"index": config.index, "queries": config.queries, "qrels": config.qrels, "fusion_depth": config.fusion_depth, "training": training.__dict__},
            "index_version": manifest["version_id"],
            "train_queries": len(train_ids),
            "dev_queries": len(dev_ids),
            "training_tuples": len(examples),
            "fusion_weight": weight,
            "dev": dev_metrics,
            "int8": int8,
            **{key: value for key, value in trained.items() if key != "model_folder"},
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        storage.write_json_atomically(os.path.join(output_folder, "training_report.json"), report)
    report["model"] = storage.join_url(config.output, "model")
    return report
