"""Second stage: score the top-N (query, document) pairs with a cross-encoder, fuse, and rank.

:class:`CrossEncoderScorer` is a Ray Data callable class (one model load per actor) that adds
``rerank_scores`` (raw logits, shape (queries, N), NaN where a query has fewer candidates) to a
batch of queries carrying their first-stage candidates. :func:`rank_candidates` turns such a
batch into output rows: the reranked top-N first (by fused score when the model carries a fusion
weight, else by rerank score), then the remaining candidates in first-stage order.

Scores are raw logits: ``CrossEncoder.predict`` applies a sigmoid by default, which squashes
differences and distorts per-query standardization in fusion.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines.models import (
    check_model_reference,
    choose_device,
    clamp_length,
    inference_context,
    position_limit,
    resolve_model_reference,
    resolve_precision,
)
from pipelines.runtime import resolve_broadcast

FUSION_FILE = "fusion.json"
INT8_FOLDER = "openvino_int8"

OUTPUT_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("score", pa.float32()),
        ("first_stage_rank", pa.int32()),
        ("first_stage_score", pa.float32()),
        ("rerank_score", pa.float32()),
        ("fused_score", pa.float32()),
        ("dense_rank", pa.int32()),
        ("dense_score", pa.float32()),
        ("sparse_rank", pa.int32()),
        ("sparse_score", pa.float32()),
    ]
)
"""Output columns: ``first_stage_*`` is the first stage the reranker saw (the fused one in hybrid mode);
``dense_*`` / ``sparse_*`` each retriever's own rank and score (null where it did not return the document)."""


@dataclass
class RerankConfig:
    """Cross-encoder settings."""

    model: str = field(default="none", metadata={"help": "cross-encoder: Hugging Face id, local path, or none"})
    depth: int = field(default=30, metadata={"help": "candidates per query to rerank (N)"})
    batch_size: int = 32
    max_length: int = field(default=0, metadata={"help": "tokens per (query, document) pair (0 = the model's own)"})
    fusion: str = field(default="auto", metadata={"help": "auto (use the model's fusion weight if it has one) or off"})
    foreign_corpus: str = field(default="first_stage", metadata={"help": "when the index's corpus is not the one the reranker was trained on: first_stage (serve the first stage alone) or fuse (use the weight fitted on the other corpus)"})
    device: str = "auto"
    precision: str = field(default="auto", metadata={"help": "auto (fp16 on GPU; int8 on CPU where the model carries a calibrated int8 export, else bf16 where native, else fp32), fp32, bf16, fp16 or int8"})
    pool_size: int = field(default=0, metadata={"help": "actors (0 = from cluster resources)"})
    threads_per_actor: int = 0

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"depth": 1, "batch_size": 1, "max_length": 0, "pool_size": 0, "threads_per_actor": 0})
        for name, allowed in (("fusion", ("auto", "off")), ("foreign_corpus", ("first_stage", "fuse")), ("device", ("auto", "cpu", "cuda")), ("precision", ("auto", "fp32", "bf16", "fp16", "int8"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: use {', '.join(allowed)}")

    @property
    def enabled(self) -> bool:
        return self.model.lower() not in ("", "none", "off")


def read_serving_card(model: str) -> dict | None:
    """What jobs.train_reranker stored with the model (``fusion.json``): fusion weight, serving mode
    (``fused`` or ``first_stage``), what the weight was fitted on and which corpus the model was trained on; or None."""
    check_model_reference(model, "rerank.model")
    path = os.path.join(resolve_model_reference(model), FUSION_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        card = json.load(handle)
    weight = float(card["weight"])
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"{path}: fusion weight {weight} is outside [0, 1]")
    return {**card, "weight": weight, "mode": card.get("mode", "fused")}


def read_fusion_weight(model: str) -> float | None:
    """The fusion weight stored with a trained reranker (``fusion.json``), or None."""
    card = read_serving_card(model)
    return None if card is None else card["weight"]


def quantized_reranker_url(model: str) -> str:
    """The model's int8 export (``openvino_int8/``, written by jobs.train_reranker when dev quality holds), or ""."""
    from pipelines.quantization import int8_available, is_complete

    path = os.path.join(resolve_model_reference(model), INT8_FOLDER)
    return path if int8_available() and os.path.isdir(path) and is_complete(path) else ""


def standardize(scores: np.ndarray) -> np.ndarray:
    """z-scores along the last axis, ignoring NaN; a constant row becomes zeros."""
    mean = np.nanmean(scores, axis=-1, keepdims=True)
    deviation = np.nanstd(scores, axis=-1, keepdims=True)
    return (scores - mean) / np.where(deviation > 0, deviation, 1.0)


def fuse_scores(rerank_scores: np.ndarray, first_stage_scores: np.ndarray, weight: float) -> np.ndarray:
    """weight·z(rerank) + (1 − weight)·z(first stage), standardized within each query (row)."""
    return weight * standardize(rerank_scores) + (1.0 - weight) * standardize(first_stage_scores)


class CrossEncoderScorer:
    """Ray Data callable class: adds ``rerank_scores`` for each query's top-N candidates.

    ``texts`` has ``fetch(positions) -> list[str]``: a :class:`pipelines.document_store.DocumentStoreReader`
    (files opened lazily in the actor, texts read per batch and not kept), or for a version built
    before the store, :class:`pipelines.document_texts.DocumentTexts`.
    """

    def __init__(self, config: RerankConfig, texts, device: str = "auto", threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = choose_device(device)
        quantized = "" if self.device.startswith("cuda") else quantized_reranker_url(config.model)
        self.precision = resolve_precision(config.precision, self.device, int8=bool(quantized))
        if config.max_length:
            from transformers import AutoConfig

            limit = position_limit(AutoConfig.from_pretrained(resolve_model_reference(config.model)))
            config = dataclasses.replace(config, max_length=clamp_length(config.max_length, limit, config.model, "--rerank.max-length"))
        self.config = config
        self.texts = texts
        if self.precision == "int8":
            from pipelines.quantization import QuantizedPairScorer

            if not quantized:
                raise ValueError(f"{config.model}: precision int8 needs the int8 export ({INT8_FOLDER}/) that jobs.train_reranker writes")
            self.quantized = QuantizedPairScorer(quantized, threads, config.batch_size, config.max_length)
            return
        from sentence_transformers import (
            CrossEncoder,  # not on the int8 path: 5 s and 0.5 GB per actor
        )

        self.model = CrossEncoder(resolve_model_reference(config.model), device=self.device, max_length=config.max_length or None)
        if self.precision == "fp16":
            self.model.model.half()
        self.identity = torch.nn.Identity()

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        import torch

        if not pairs:
            return np.zeros(0, dtype=np.float32)
        if self.precision == "int8":
            return self.quantized.score(pairs)
        from pipelines.token_batches import run_bucketed

        def forward(features: dict[str, np.ndarray]) -> np.ndarray:
            tensors = {name: torch.from_numpy(values).to(self.device) for name, values in features.items()}
            return self.model(tensors)["scores"].float().reshape(len(features["input_ids"]), -1)[:, 0].cpu().numpy()

        with torch.inference_mode(), inference_context(self.precision, self.device):
            scores = run_bucketed(self.model.tokenizer, pairs, int(self.model.max_length), self.config.batch_size, forward)
        return scores

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        positions = np.asarray(batch["candidate_positions"])[:, : self.config.depth]
        query_rows, columns = np.nonzero(positions >= 0)
        texts = self.texts.fetch(positions[query_rows, columns])
        pairs = [(str(batch["query_text"][row]), text) for row, text in zip(query_rows, texts)]
        scores = np.full(positions.shape, np.nan, dtype=np.float32)
        scores[query_rows, columns] = self.score_pairs(pairs)
        batch["rerank_scores"] = scores
        return batch


def rank_candidates(batch: dict[str, np.ndarray], doc_ids: pa.Array, fusion_weight: float | None) -> pa.Table:
    """One output row per (query, candidate): final rank, both stages' scores and ranks."""
    doc_ids = resolve_broadcast(doc_ids)
    positions = np.asarray(batch["candidate_positions"])
    first_scores = np.asarray(batch["candidate_scores"], dtype=np.float32)
    rerank = batch.get("rerank_scores")
    retrievers = {name: np.asarray(batch[f"candidate_{name}s"]) for name in ("dense_rank", "dense_score", "sparse_rank", "sparse_score") if f"candidate_{name}s" in batch}
    columns: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    for row, query_id in enumerate(batch["query_id"]):
        valid = positions[row] >= 0
        count = int(valid.sum())
        first_rank = np.arange(1, count + 1)
        row_first = first_scores[row, :count]
        rerank_row = np.full(count, np.nan, dtype=np.float32)
        fused_row = np.full(count, np.nan, dtype=np.float32)
        order = np.arange(count)
        if rerank is not None:
            depth = min(count, rerank.shape[1])
            rerank_row[:depth] = rerank[row, :depth]
            key = rerank_row[:depth]
            if fusion_weight is not None and depth:
                fused_row[:depth] = fuse_scores(rerank_row[:depth], row_first[:depth], fusion_weight)
                key = fused_row[:depth]
            head = np.lexsort((first_rank[:depth], -key))
            order = np.concatenate([head, np.arange(depth, count)])
        final_key = np.where(np.isnan(fused_row), np.where(np.isnan(rerank_row), row_first, rerank_row), fused_row)
        columns["query_id"].extend([str(query_id)] * count)
        columns["rank"].extend(range(1, count + 1))
        columns["doc_id"].extend(doc_ids.take(pa.array(positions[row, :count][order])).to_pylist())
        columns["score"].extend(final_key[order].tolist())
        columns["first_stage_rank"].extend(first_rank[order].tolist())
        columns["first_stage_score"].extend(row_first[order].tolist())
        columns["rerank_score"].extend(rerank_row[order].tolist())
        columns["fused_score"].extend(fused_row[order].tolist())
        for name in ("dense_rank", "dense_score", "sparse_rank", "sparse_score"):
            values = retrievers[name][row, :count][order] if name in retrievers else np.zeros(count)
            if name.endswith("_rank"):
                columns[name].extend([int(value) if value > 0 else None for value in values])
            else:
                columns[name].extend(values.tolist() if name in retrievers else [np.nan] * count)
    arrays = [
        pa.array(np.asarray(columns[column.name], dtype=np.float32), column.type, from_pandas=True)  # NaN -> null: not reranked/fused
        if column.type == pa.float32() else pa.array(columns[column.name], column.type)
        for column in OUTPUT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)
