"""Domain reranker training: judged positives against mined negatives, within a time budget, never shipping harm.

Stages (:func:`train_reranker`):
1. mining: the query job's first stage runs the training queries against the index; each query keeps
   its top candidates with their scores (:mod:`pipelines.mining` turns them into training lists);
2. planning: one probe measures a training step and a dev evaluation on this machine, and
   :mod:`pipelines.training_plan` turns ``--training.budget`` into steps, schedule, evaluations and
   checkpoints. Queries are sampled uniformly, so the cost does not grow with the judgments;
3. training: a sentence-transformers CrossEncoder (from the bundled bi-encoder by default: a fresh
   head on its encoder) with its trainer and ``ListNetLoss``. The first ``distillation_fraction`` of
   the steps distil the first stage's scores into the new head, so label learning starts from a
   model that ranks like the bi-encoder instead of a random one; the rest is a softmax over each
   positive and its negatives. The fresh head learns faster than the pretrained encoder;
4. selection and the ship gate: every planned dev evaluation (the first one right after the
   distillation phase) scores the dev queries' candidates, ranks them reranked and fused, and
   measures nDCG@10 with ir_measures (graded gains, as ``jobs.evaluate``); the best checkpoint on
   fused dev nDCG@10 is kept. The fusion weight ``a`` in a·z(rerank) + (1−a)·z(first stage) is fitted
   on dev over a grid that includes 0 (the first stage alone), so serving never lowers dev nDCG@10.
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

from pipelines.mining import MiningConfig, QueryCandidates, distillation_lists, labelled_lists, sample_query_steps, trainable_queries
from pipelines.reranking import FUSION_FILE, fuse_scores
from pipelines.training_plan import TrainingPlan, parse_duration, plan_training
from pipelines.storage import StorageConfig

PRIMARY_DEV_METRIC = "eval_dev_fused_ndcg@10"


# Training stops when it runs this much longer than its budget (a machine busier than when the plan was
# measured): the best checkpoint so far is kept, and the job stays within 30 minutes at the 24m default.
OVERRUN_LIMIT = 1.2

@dataclass
class TrainingConfig:
    """Reranker training settings: one set of defaults for every domain (SciFact and NFCorpus measured)."""

    base_model: str = field(default="bundled", metadata={"help": "bundled, a Hugging Face id or a local path"})
    budget: str = field(default="24m", metadata={"help": "training time (steps and dev evaluations) on this machine: 24m, 90s, 1h; a run that falls behind (a busy machine) stops at 1.2x"})
    max_steps: int = field(default=0, metadata={"help": "a fixed step count instead of the budget's (0 = from the budget); for smoke tests"})
    dev_queries: int = field(default=100, metadata={"help": "training queries held out for model selection and fusion"})
    dev_depth: int = field(default=20, metadata={"help": "candidates reranked per dev query at each evaluation during training"})
    evaluations: int = field(default=4, metadata={"help": "dev evaluations: after the distillation phase, then evenly to the end"})
    checkpoints: int = field(default=8, metadata={"help": "checkpoints over the run (units of resume)"})
    distillation_fraction: float = field(default=0.25, metadata={"help": "share of the steps spent distilling first-stage scores before learning from judgments"})
    teacher_scale: float = field(default=20.0, metadata={"help": "first-stage score multiplier for distillation targets (the bi-encoder's softmax scale)"})
    queries_per_step: int = 4
    encoder_learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    max_length: int = 160
    dropout: float = field(default=0.0, metadata={"help": "dropout in the trained cross-encoder; off: a few hundred steps of budget-limited training are underfitted, not overfitted, and steps run 1.4x faster on CPU"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the CPU/GPU supports it), bf16 or fp32"})
    seed: int = 12
    mining: MiningConfig = field(default_factory=MiningConfig)

    def validate(self) -> None:
        from pipelines.config import require_at_least
        from pipelines.training_plan import parse_duration

        require_at_least(self, {"max_steps": 0, "dev_queries": 1, "dev_depth": 1, "evaluations": 1, "checkpoints": 1, "queries_per_step": 1, "max_length": 8, "teacher_scale": 0.0})
        if not self.max_steps:
            try:
                parse_duration(self.budget)
            except ValueError as error:
                raise ValueError(f"--budget {self.budget}: {error}") from None
        for name in ("distillation_fraction", "warmup_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be in [0, 1)")
        if self.encoder_learning_rate <= 0 or self.head_learning_rate <= 0:
            raise ValueError("--encoder-learning-rate and --head-learning-rate must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout {self.dropout}: must be in [0, 1)")


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


def rank_by(candidates: dict[str, list[str]], scores: dict[str, np.ndarray], depth: int) -> dict[str, list[str]]:
    """Top-``depth`` reordered by ``scores`` (ties: first-stage order), the rest in first-stage order."""
    ranking = {}
    for query_id, docs in candidates.items():
        head = docs[:depth]
        order = np.lexsort((np.arange(len(head)), -scores[query_id][: len(head)]))
        ranking[query_id] = [head[i] for i in order] + docs[depth:]
    return ranking


def fit_fusion_weight(
    candidates: dict[str, list[str]],
    first_stage_scores: dict[str, np.ndarray],
    rerank_scores: dict[str, np.ndarray],
    evaluator,
    depth: int,
    grid: int = 21,
    curve: list[dict[str, float]] | None = None,
) -> tuple[float, float]:
    """The weight a in [0, 1] whose fused ranking has the best dev nDCG@10; returns (a, nDCG@10).

    ``evaluator`` is a :class:`pipelines.evaluation.RunEvaluator` (ir_measures, graded gains: the
    nDCG that ``jobs.evaluate`` reports). a = 0 is the first stage alone, so the fitted fusion is
    never worse on dev than the first stage. Ties go to the smaller weight (deterministic, cautious).
    ``curve``, when given, receives {weight, ndcg@10} of every weight tried.
    """
    best = (0.0, -1.0)
    for weight in np.linspace(0.0, 1.0, grid):
        fused = {q: fuse_scores(rerank_scores[q][:depth], first_stage_scores[q][:depth], weight) for q in candidates}
        value = evaluator.evaluate_ranking(rank_by(candidates, fused, depth))["ndcg@10"]
        if curve is not None:  # every weight tried, for the report's plot
            curve.append({"weight": float(round(weight, 4)), "ndcg@10": round(float(value), 4)})
        if value > best[1] + 1e-12:
            best = (float(round(weight, 4)), float(value))
    return best


def cache_key(values: dict[str, Any]) -> str:
    """A short stable key for caching a trained model by its inputs and config."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_cross_encoder(base_model: str, max_length: int, dropout: float | None = None, device: str = "auto"):
    """A CrossEncoder with one output from ``base_model`` (a bi-encoder gets a fresh head).

    ``dropout`` (when given) replaces the probability of every dropout layer, whatever the architecture
    names its dropout settings; ``None`` keeps the checkpoint's."""
    import torch
    from sentence_transformers import CrossEncoder

    from pipelines.models import choose_device, resolve_model_reference

    model = CrossEncoder(resolve_model_reference(base_model), num_labels=1, max_length=max_length, device=choose_device(device))
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    return model


def candidate_pairs(queries: dict[str, str], candidates: dict[str, list[str]], texts: dict[str, str], depth: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(query text, document text) pairs of each query's top-``depth`` candidates, and the query id of each."""
    pairs, owners = [], []
    for query_id, docs in candidates.items():
        for doc in docs[:depth]:
            pairs.append((queries[query_id], texts[doc]))
            owners.append(query_id)
    return pairs, owners


def score_candidates(model, queries: dict[str, str], candidates: dict[str, list[str]], texts: dict[str, str], depth: int, precision: str, batch_size: int = 32, progress: bool = True) -> dict[str, np.ndarray]:
    """Raw cross-encoder logits for each query's top-``depth`` candidates (``model``: a CrossEncoder, or an
    object with ``score(pairs)`` such as :class:`pipelines.quantization.QuantizedPairScorer`)."""
    import torch

    from pipelines.models import inference_context

    pairs, owners = candidate_pairs(queries, candidates, texts, depth)
    if hasattr(model, "score"):
        logits = model.score(pairs)
    else:
        with torch.inference_mode(), inference_context(precision, str(model.device)):
            logits = np.asarray(model.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(), show_progress_bar=progress, convert_to_numpy=True), dtype=np.float32).reshape(-1)
    scores: dict[str, list[float]] = {}
    for owner, logit in zip(owners, logits):
        scores.setdefault(owner, []).append(float(logit))
    return {query_id: np.asarray(values, dtype=np.float32) for query_id, values in scores.items()}


@dataclass
class DevSet:
    """Held-out training queries with their first-stage candidates: what model selection and fusion see."""

    queries: dict[str, str]
    texts: dict[str, str]
    candidates: dict[str, list[str]]
    first_stage_scores: dict[str, np.ndarray]
    qrels: dict[str, dict[str, int]]

    def __post_init__(self):
        from pipelines.evaluation import RunEvaluator

        self.evaluator = RunEvaluator(self.qrels)

    def metrics(self, ranking: dict[str, list[str]]) -> dict[str, float]:
        values = self.evaluator.evaluate_ranking(ranking)
        return {name: round(float(values[name]), 4) for name in ("ndcg@10", "p@3", "mrr@10", "recall@100")}

    def stages(self, rerank_scores: dict[str, np.ndarray], depth: int, curve: list | None = None) -> tuple[float, dict[str, dict[str, float]]]:
        """(fitted fusion weight, {first_stage, reranked, fused: metrics}) for rerank scores of the top ``depth``."""
        weight, _ = fit_fusion_weight(self.candidates, self.first_stage_scores, rerank_scores, self.evaluator, depth, curve=curve)
        fused = {q: fuse_scores(rerank_scores[q][:depth], self.first_stage_scores[q][:depth], weight) for q in self.candidates}
        return weight, {
            "first_stage": self.metrics(self.candidates),
            "reranked": self.metrics(rank_by(self.candidates, rerank_scores, depth)),
            "fused": self.metrics(rank_by(self.candidates, fused, depth)),
        }


def dev_evaluator(dev: DevSet, depth: int, precision: str):
    """A sentence-transformers evaluator: dev nDCG@10 (ir_measures) of the reranked and the fused ranking."""
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

    class DevRerankingEvaluator(BaseEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = "fused_ndcg@10"

        def __call__(self, model, output_path=None, epoch=-1, steps=-1) -> dict[str, float]:
            scores = score_candidates(model, dev.queries, dev.candidates, dev.texts, depth, precision, progress=False)
            weight, stages = dev.stages(scores, depth)
            metrics = {
                "first_stage_ndcg@10": stages["first_stage"]["ndcg@10"],
                "reranked_ndcg@10": stages["reranked"]["ndcg@10"],
                "fused_ndcg@10": stages["fused"]["ndcg@10"],
                "fusion_weight": weight,
            }
            print(f"dev at step {steps}: first stage {metrics['first_stage_ndcg@10']:.4f}, reranked {metrics['reranked_ndcg@10']:.4f}, "
                  f"fused {metrics['fused_ndcg@10']:.4f} (a={weight})", flush=True)
            return self.prefix_name_to_metrics(metrics, "dev")

    return DevRerankingEvaluator()


def lists_dataset(lists: list[dict[str, Any]], queries: dict[str, str], texts: dict[str, str]):
    """A ``datasets.Dataset`` for ListNetLoss: query, docs, labels (target log-weights), in the given order."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "query": [queries[item["query_id"]] for item in lists],
            "docs": [[texts[doc] for doc in item["doc_ids"]] for item in lists],
            "labels": [[float(t) for t in item["targets"]] for item in lists],
        }
    )


def measure_speed(model, dataset, config: TrainingConfig, precision: str, dev_pairs: int, scratch_folder: str) -> tuple[float, float]:
    """(seconds per training step, seconds per dev evaluation) on this machine, from a short probe.

    The probe runs the real trainer (optimizer, autocast, data collation) on a copy of ``model`` over
    ``dataset`` (a few steps of training lists); the first step warms up and is not counted. A dev
    evaluation is timed as ``dev_pairs`` pairs at the rate of 64 scored pairs.
    """
    import copy
    import shutil

    import torch
    from transformers import TrainerCallback

    from pipelines.models import inference_context

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter() - self.began)

    probe_model = copy.deepcopy(model)
    timer = StepTimer()
    steps = len(dataset) // config.queries_per_step
    trainer = _make_trainer(probe_model, dataset, None, config, scratch_folder, steps, 0, 0, [timer], precision, disable_tqdm=True)
    trainer.train()
    shutil.rmtree(scratch_folder, ignore_errors=True)
    pairs = [(query, doc) for query, docs in zip(dataset["query"], dataset["docs"]) for doc in docs]
    pairs = (pairs * (1 + 64 // max(1, len(pairs))))[:64]
    started = time.perf_counter()
    with torch.inference_mode(), inference_context(precision, str(probe_model.device)):
        probe_model.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=False)
    per_pair = (time.perf_counter() - started) / len(pairs)
    del probe_model, trainer
    return float(np.median(timer.ends[1:] or timer.ends)), per_pair * dev_pairs


def load_or_plan(output_folder: str, make_plan) -> tuple[TrainingPlan, bool]:
    """The saved plan of an earlier (killed) run in ``output_folder``, or a new one saved there; (plan, reused)."""
    from pipelines import storage

    path = os.path.join(output_folder, "plan.json")
    if os.path.exists(path):
        return TrainingPlan.from_dict(storage.read_json(path)), True
    plan = make_plan()
    storage.write_json_atomically(path, plan.to_dict())
    return plan, False


def sequential_batch_sampler(dataset, batch_size: int, drop_last: bool, **kwargs):
    """Batches in dataset order: the lists are already sampled per step (distinct queries in each)."""
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import SequentialSampler

    return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last)


def train_cross_encoder(model, dataset, evaluator, plan: TrainingPlan, config: TrainingConfig, output_folder: str) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` (rows in step order) as ``plan`` says; resumes from checkpoints in ``output_folder``.

    Returns the loss curve and dev metrics from the trainer's log; the best model on dev (the
    evaluation after the distillation phase included) is saved to ``output_folder/model``.
    """
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(config.seed)
    precision = training_precision(config.precision)
    checkpoints = os.path.join(output_folder, "checkpoints")
    best_folder = os.path.join(output_folder, "best")
    callbacks = [_planned_evaluations(plan), _keep_best_callback(best_folder, PRIMARY_DEV_METRIC)]
    trainer = _make_trainer(model, dataset, evaluator, config, checkpoints, plan.total_steps, plan.warmup_steps, plan.checkpoint_every, callbacks, precision)
    resume = os.path.isdir(checkpoints) and any(name.startswith("checkpoint-") for name in os.listdir(checkpoints))
    if resume:
        print(f"resuming from the last checkpoint in {checkpoints}")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume or None)
    seconds = time.perf_counter() - started
    if not os.path.exists(os.path.join(best_folder, "best.json")):
        _keep_best(best_folder, PRIMARY_DEV_METRIC, trainer.evaluate(), trainer.model, trainer.state.global_step)
    from pipelines import storage

    best = storage.read_json(os.path.join(best_folder, "best.json"))
    model = CrossEncoder(os.path.join(best_folder, best["folder"]), max_length=config.max_length)
    model_folder = os.path.join(output_folder, "model")
    storage.replace_local_folder(model_folder, model.save)
    history = trainer.state.log_history
    pairs_per_row = float(np.mean([len(labels) for labels in dataset["labels"]])) if len(dataset) else 0.0
    return {
        "precision": precision,
        "steps": trainer.state.global_step,
        "resumed": resume,
        "train_seconds": round(seconds, 1),
        "pairs_per_second": round(result.metrics.get("train_samples_per_second", 0.0) * pairs_per_row, 2),
        "best_step": best["step"],
        "best_dev_fused_ndcg@10": best["value"],
        "loss_curve": [{"step": entry["step"], "loss": entry["loss"]} for entry in history if "loss" in entry],
        "dev_curve": [
            {"step": entry["step"], **{key.removeprefix("eval_dev_"): entry[key] for key in entry if key.startswith("eval_dev_")}}
            for entry in history
            if PRIMARY_DEV_METRIC in entry
        ],
        "model_folder": model_folder,
    }


def _make_trainer(model, dataset, evaluator, config: TrainingConfig, output_dir: str, steps: int, warmup_steps: int, save_every: int,
                  callbacks: list, precision: str, disable_tqdm: bool = False):
    """The CrossEncoderTrainer for ListNet lists in dataset order, with the two learning rates."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    arguments = CrossEncoderTrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=config.queries_per_step,
        learning_rate=config.encoder_learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="no",  # the planned evaluations are triggered by a callback
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        save_total_limit=1,
        logging_steps=max(1, min(save_every or 10, 10)),
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=sequential_batch_sampler,
        dataloader_drop_last=True,
        report_to="none",
        disable_tqdm=disable_tqdm,
    )
    return _TwoRateTrainer(
        head_learning_rate=config.head_learning_rate,
        model=model,
        args=arguments,
        train_dataset=dataset,
        loss=ListNetLoss(model, activation_fn=torch.nn.Identity(), mini_batch_size=-1),  # every pair of the step in one forward pass
        evaluator=evaluator,
        callbacks=callbacks,
    )


def _planned_evaluations(plan: TrainingPlan):
    """A trainer callback that evaluates at the plan's steps, and stops a run that overruns its budget by half."""
    from transformers import TrainerCallback

    class PlannedEvaluations(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in plan.evaluation_steps:
                control.should_evaluate = True
            remaining = plan.total_steps - self.first_step
            if remaining > 0 and plan.budget_seconds and time.perf_counter() - self.started > OVERRUN_LIMIT * plan.budget_seconds * remaining / plan.total_steps:
                print(f"training overran its budget ({plan.budget_seconds:.0f} s) by {OVERRUN_LIMIT - 1:.0%} at step {state.global_step}: stopping early", flush=True)
                control.should_training_stop = True
                control.should_evaluate = True
            return control

    return PlannedEvaluations()


def _keep_best(folder: str, metric: str, metrics: dict, model, step: int) -> None:
    """Save ``model`` as ``folder/model-<step>`` if ``metrics[metric]`` beats the best so far.

    ``best.json``, written last, names the folder: a kill while saving leaves the previous best intact.
    """
    import shutil

    from pipelines import storage

    if metric not in metrics:
        return
    record = os.path.join(folder, "best.json")
    best = storage.read_json(record) if os.path.exists(record) else None
    if best is not None and metrics[metric] <= best["value"]:
        return
    name = f"model-{int(step)}"
    storage.replace_local_folder(os.path.join(folder, name), model.save)
    storage.write_json_atomically(record, {"metric": metric, "value": float(metrics[metric]), "step": int(step), "folder": name})
    for entry in os.listdir(folder):
        if entry.startswith("model") and entry != name:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


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


def serving_decision(stages: dict[str, dict[str, float]], weight: float) -> dict[str, Any]:
    """What the query job does with the trained reranker, from its dev results; ``message`` says it in one line.

    ``weight`` was fitted on dev over a grid that includes 0, so the fused ranking is never below
    the first stage on dev; weight 0 means the reranker cannot help and is not used at all.
    """
    first, reranked, fused = (stages[stage]["ndcg@10"] for stage in ("first_stage", "reranked", "fused"))
    if weight <= 0.0:
        return {"mode": "first_stage", "message": f"the trained reranker does not raise dev nDCG@10 above the first stage ({first:.4f}) at any fusion weight: the query job keeps the first stage alone"}
    if reranked <= first:
        return {"mode": "fused", "message": f"the trained reranker alone is not better than the first stage on dev (nDCG@10 {reranked:.4f} vs {first:.4f}): the query job fuses it with the first stage (a = {weight}, dev nDCG@10 {fused:.4f})"}
    return {"mode": "fused", "message": f"the trained reranker beats the first stage on dev (nDCG@10 {reranked:.4f} vs {first:.4f}); fused with a = {weight}: {fused:.4f}"}


def write_serving_card(model_folder: str, card: dict[str, Any]) -> None:
    """``fusion.json`` next to the model: the fusion weight, the serving mode and what they were fitted on."""
    from pipelines import storage

    storage.write_json_atomically(os.path.join(model_folder, FUSION_FILE), {**card, "formula": "a*z(rerank_logit) + (1-a)*z(first_stage_score), z within each query"})


@dataclass
class TrainRerankerConfig:
    """Settings of jobs.train_reranker."""

    index: str = field(default="", metadata={"help": "index root URL to mine hard negatives from"})
    queries: str = field(default="", metadata={"help": "queries (Parquet or BEIR queries.jsonl)"})
    qrels: str = field(default="", metadata={"help": "BEIR qrels TSV of the training queries"})
    output: str = field(default="", metadata={"help": "output folder URL: model/, training_report.json"})
    fusion_depth: int = field(default=30, metadata={"help": "rerank depth the fusion weight is fitted at (use the query job's)"})
    search_mode: str = field(default="auto", metadata={"help": "first stage the candidates are mined from: auto (hybrid when the index has a BM25 part: "
                                                              "both retrievers' top-K), dense, sparse or hybrid; serve with the same"})
    int8: bool = field(default=True, metadata={"help": "also write an int8 (OpenVINO) export for CPU serving, kept only if dev quality holds"})
    int8_tolerance: float = field(default=0.005, metadata={"help": "largest dev fused nDCG@10 loss the int8 export may have"})
    calibration_pairs: int = field(default=300, metadata={"help": "training (query, candidate) pairs the int8 export is calibrated on"})
    device: str = field(default="auto", metadata={"help": "where the driver trains: auto (a GPU when this process sees one), cuda or cpu; on a Ray "
                                                            "cluster submit with --entrypoint-num-gpus 1 for a GPU"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        from pipelines import storage
        from pipelines.config import require_at_least

        for name in ("index", "queries", "qrels", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        for name in ("queries", "qrels"):
            storage.require_input(getattr(self, name), name)
        require_at_least(self, {"fusion_depth": 1, "calibration_pairs": 1, "int8_tolerance": 0.0})
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device {self.device}: choose auto, cuda (or cuda:N) or cpu")
        if self.search_mode not in ("auto", "dense", "sparse", "hybrid"):
            raise ValueError(f"--search-mode {self.search_mode}: choose auto, dense, sparse or hybrid")


def fit_hybrid_first_stage(mining_url: str, dev_qrels: dict[str, dict[str, int]]) -> dict[str, Any] | None:
    """For a hybrid index: the dense weight of the first stage's fusion fitted on the dev queries, and every
    mined query's candidates fused again with it (what training, dev evaluation and serving then see).

    None when the mining run is not hybrid (an index without a BM25 part, or --search.mode dense).
    """
    import pyarrow as pa

    from pipelines import storage
    from pipelines.evaluation import RunEvaluator
    from pipelines.hybrid_fusion import fit_dense_weight, refuse, retriever_lists

    run = pa.concat_tables([storage.read_parquet(part) for part in storage.list_files(mining_url, ".parquet")], promote_options="default")
    if "sparse_rank" not in run.column_names or run["sparse_rank"].null_count == run.num_rows or run["dense_rank"].null_count == run.num_rows:
        return None
    lists = retriever_lists(run)
    evaluator = RunEvaluator(dev_qrels)
    dev_lists = {q: lists[q] for q in dev_qrels if q in lists}
    weight, dev_ndcg = fit_dense_weight(dev_lists, lambda ranking: evaluator.evaluate_ranking(ranking)["ndcg@10"])
    candidates, scores = refuse(lists, weight)
    print(f"hybrid first stage: dense weight {weight} fitted on {len(dev_lists)} dev queries (nDCG@10 {dev_ndcg:.4f})", flush=True)
    return {"dense_weight": weight, "dev_ndcg@10": dev_ndcg, "dev_queries": len(dev_lists), "candidates": candidates, "first_stage_scores": scores}


def _first_stage(run) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    table = run.sort_by([("query_id", "ascending"), ("first_stage_rank", "ascending")])
    candidates: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for query_id, doc_id, score in zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), table["first_stage_score"].to_pylist()):
        candidates.setdefault(query_id, []).append(doc_id)
        scores.setdefault(query_id, []).append(score)
    return candidates, {query_id: np.asarray(values, dtype=np.float32) for query_id, values in scores.items()}


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


def _plan_from_probe(model, lists_for_probe, queries, texts, training: TrainingConfig, precision: str, dev_pairs: int, scratch_folder: str) -> TrainingPlan:
    """Measure a step and a dev evaluation on this machine, then plan the budget."""
    rows = lists_dataset(lists_for_probe, queries, texts)
    seconds_per_step, seconds_per_evaluation = measure_speed(model, rows, training, precision, dev_pairs, scratch_folder)
    plan = plan_training(
        parse_duration(training.budget),
        seconds_per_step,
        seconds_per_evaluation,
        training.evaluations,
        training.distillation_fraction,
        training.warmup_ratio,
        training.checkpoints,
        fixed_steps=training.max_steps,
    )
    print(f"training plan: {plan.total_steps} steps ({plan.distillation_steps} distilling the first stage), {seconds_per_step:.2f} s/step, "
          f"dev evaluations at steps {list(plan.evaluation_steps)} ({seconds_per_evaluation:.0f} s each), budget {training.budget}", flush=True)
    return plan


def train_reranker(config: TrainRerankerConfig) -> dict[str, Any]:
    """Mine, plan, train, select, fit fusion and decide how to serve; returns the training report (also saved as JSON)."""
    from pipelines.models import check_model_reference, choose_device

    check_model_reference(config.training.base_model, "--training.base-model")
    device = choose_device(config.device)  # a GPU asked for and not there fails here, before any mining
    from pipelines import index_store, storage
    from pipelines.document_texts import texts_by_id
    from pipelines.documents import CorpusConfig
    from pipelines.evaluation import read_qrels, read_run
    from pipelines.hybrid_fusion import DEFAULT_DENSE_WEIGHT
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
        depth = max(training.mining.candidate_depth, training.dev_depth, config.fusion_depth)
        mining = RetrieveRerankConfig(index=config.index, queries=config.queries, output=mining_url, qrels=config.qrels)
        mining.search.top_k = depth
        mining.search.mode = config.search_mode
        mining.search.dense_weight = DEFAULT_DENSE_WEIGHT  # mined with the default, then fused again with the weight fitted on dev
        retrieve_and_rerank(mining)
        candidates, first_scores = _first_stage(read_run(mining_url))
        train_ids, dev_ids = split_dev_queries(sorted(candidates), training.dev_queries, training.seed)
        hybrid = fit_hybrid_first_stage(mining_url, {q: qrels[q] for q in dev_ids})
        if hybrid:
            candidates, first_scores = hybrid.pop("candidates"), hybrid.pop("first_stage_scores")
        # 2. Texts of every candidate and query involved (read from the corpus and the query log).
        needed = sorted({doc for q in candidates for doc in candidates[q]})
        with worker_visible(manifest["corpus"]["url"]) as corpus_url:
            texts = texts_by_id(corpus_url, CorpusConfig(**manifest["documents"]), needed)
        with worker_visible(config.queries) as queries_url:
            queries = texts_by_id(queries_url, mining.query_log, sorted(candidates))
        pools = {q: QueryCandidates(candidates[q][: training.mining.candidate_depth], first_scores[q][: training.mining.candidate_depth], qrels.get(q, {})) for q in train_ids}
        trainable = trainable_queries(pools, training.mining)
        if len(trainable) < training.queries_per_step:
            raise ValueError(f"{config.qrels}: only {len(trainable)} training queries have a judged document among their top {training.mining.candidate_depth} candidates")
        random_pool = sorted({doc for q in train_ids for doc in candidates[q]})
        dev = DevSet({q: queries[q] for q in dev_ids}, texts, {q: candidates[q] for q in dev_ids}, {q: first_scores[q] for q in dev_ids}, {q: qrels[q] for q in dev_ids})
        dense = sum(len(pools[q].judged_positives) >= training.mining.dense_judgments for q in trainable)
        print(f"{len(trainable)} of {len(train_ids)} training queries have a judged document among their candidates ({dense} with dense judgments); {len(dev_ids)} dev queries")

        # 3. Plan the budget on this machine (kept for a resume), sample the lists, train.
        precision = training_precision(training.precision)
        model = build_cross_encoder(training.base_model, training.max_length, training.dropout, device)
        per_list = 1 + training.mining.hard_negatives + training.mining.random_negatives

        def make_plan() -> TrainingPlan:
            probe_steps = sample_query_steps(trainable, 6, training.queries_per_step, random.Random(training.seed + 1))
            probe = labelled_lists(pools, probe_steps, training.mining, random_pool, training.seed + 1)
            return _plan_from_probe(model, probe, queries, texts, training, precision, len(dev_ids) * training.dev_depth, os.path.join(output_folder, "probe"))

        plan, plan_reused = load_or_plan(output_folder, make_plan)
        steps = sample_query_steps(trainable, plan.total_steps, training.queries_per_step, random.Random(training.seed))
        lists = distillation_lists(pools, steps[: plan.distillation_steps], per_list, training.mining.pool_size, training.teacher_scale, training.seed)
        lists += labelled_lists(pools, steps[plan.distillation_steps :], training.mining, random_pool, training.seed)
        evaluator = dev_evaluator(dev, training.dev_depth, precision)
        trained = train_cross_encoder(model, lists_dataset(lists, queries, texts), evaluator, plan, training, output_folder)

        # 4. Score dev at the serving depth, fit the fusion weight (0 = first stage alone), decide how to serve.
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(trained["model_folder"], max_length=training.max_length)
        dev_scores = score_candidates(model, queries, dev.candidates, texts, config.fusion_depth, trained["precision"])
        fusion_curve: list[dict[str, float]] = []
        weight, dev_metrics = dev.stages(dev_scores, config.fusion_depth, fusion_curve)
        decision = serving_decision(dev_metrics, weight)
        print(decision["message"], flush=True)
        trained_on = {
            "index": config.index,
            "index_version": manifest["version_id"],
            "corpus": manifest["corpus"]["url"],
            "corpus_fingerprint": index_store.corpus_fingerprint(index_store.load_doc_ids(config.index, manifest)),
        }
        fitted_on = f"{len(dev_ids)} training queries of {config.qrels} held out from training (seed {training.seed}), reranked to depth {config.fusion_depth}"
        hybrid_fitted_on = f"{len(dev_ids)} training queries of {config.qrels} held out from training (seed {training.seed}), nDCG@10 of the fused first stage"
        first_stage = {"mode": "hybrid", **hybrid, "fitted_on": hybrid_fitted_on} if hybrid else {"mode": config.search_mode if config.search_mode != "auto" else "dense"}
        write_serving_card(trained["model_folder"], {"weight": weight, "mode": decision["mode"], "message": decision["message"], "fitted_on": fitted_on,
                                                     "dev": dev_metrics, "trained_on": trained_on, "dev_ndcg@10": dev_metrics["fused"]["ndcg@10"],
                                                     "first_stage": first_stage})

        # 5. int8 export for CPU serving, calibrated on training pairs, kept only if dev quality holds.
        int8: dict[str, Any] = {"kept": False, "reason": "disabled (--int8 false)"}
        if decision["mode"] == "first_stage":
            int8 = {"kept": False, "reason": "the reranker is not served"}
        elif config.int8:
            train_candidates = {q: pools[q].doc_ids for q in trainable}
            train_pairs, _ = candidate_pairs(queries, train_candidates, texts, training.mining.pool_size)
            chosen = np.sort(np.random.default_rng(training.seed).choice(len(train_pairs), size=min(config.calibration_pairs, len(train_pairs)), replace=False))

            def dev_fused_ndcg(scorer) -> float:
                scores = score_candidates(scorer, queries, dev.candidates, texts, config.fusion_depth, "int8")
                fused = {q: fuse_scores(scores[q], dev.first_stage_scores[q][: config.fusion_depth], weight) for q in dev_ids}
                return dev.metrics(rank_by(dev.candidates, fused, config.fusion_depth))["ndcg@10"]

            int8 = export_int8_reranker(model, trained["model_folder"], [train_pairs[i] for i in chosen], dev_fused_ndcg,
                                        dev_metrics["fused"]["ndcg@10"], config.int8_tolerance)
        from pipelines.config import config_to_dict

        report = {
            "config": {key: value for key, value in config_to_dict(config).items()},
            "index_version": manifest["version_id"],
            "train_queries": len(train_ids),
            "trainable_queries": len(trainable),
            "dense_judgment_queries": dense,
            "dev_queries": len(dev_ids),
            "plan": plan.to_dict(),
            "plan_reused": plan_reused,
            "training_lists": len(lists),
            "fusion_weight": weight,
            "fusion_curve": fusion_curve,
            "first_stage": first_stage,
            "serving": decision,
            "fitted_on": fitted_on,
            "trained_on": trained_on,
            "dev": dev_metrics,
            "int8": int8,
            **{key: value for key, value in trained.items() if key != "model_folder"},
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        from pipelines import report as run_report

        run_report.write_report(*run_report.report_paths(output_folder), title=f"Reranker training: {config.output}", sections=run_report.training_sections(report),
                                subtitle=f"index version {manifest['version_id']}, {len(train_ids)} training queries")
        report["report"] = run_report.report_paths(config.output)[0]
        storage.write_json_atomically(os.path.join(output_folder, "training_report.json"), report)
    report["model"] = storage.join_url(config.output, "model")
    return report
