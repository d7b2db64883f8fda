"""Int8 CPU inference (pipelines.quantization): export, calibration, inference, and its use as the CPU default.

The tiny random models are quantized once per module (a few seconds each); the end-to-end test
builds an index with the default precision, which is int8 wherever OpenVINO is installed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import build_index_flags, synthetic_documents, write_jsonl
from pipelines import quantization
from pipelines.models import resolve_precision

pytestmark = pytest.mark.skipif(not quantization.int8_available(), reason="openvino and nncf are not installed")

TEXTS = [document["text"] for document in synthetic_documents(80, seed=3)]
PAIRS = [(f"topic {number % 10} {text.split()[0]}", text) for number, text in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def quantized_bi_encoder(tiny_bi_encoder, tmp_path_factory) -> str:
    from sentence_transformers import SentenceTransformer

    folder = str(tmp_path_factory.mktemp("int8-bi-encoder") / "model")
    quantization.quantize_model(SentenceTransformer(tiny_bi_encoder, device="cpu"), "bi-encoder", TEXTS[:40], 64, folder, tiny_bi_encoder)
    return folder


@pytest.fixture(scope="module")
def quantized_cross_encoder(tiny_cross_encoder, tmp_path_factory) -> str:
    from sentence_transformers import CrossEncoder

    folder = str(tmp_path_factory.mktemp("int8-cross-encoder") / "model")
    quantization.quantize_model(CrossEncoder(tiny_cross_encoder, device="cpu", max_length=64), "cross-encoder", PAIRS[:40], 64, folder, tiny_cross_encoder)
    return folder


def test_precision_rules():
    assert resolve_precision("auto", "cpu", int8=True) == "int8"
    assert resolve_precision("auto", "cpu", int8=False) in ("bf16", "fp32")
    assert resolve_precision("auto", "cuda", int8=True) == "fp16"
    assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="int8 is the CPU path"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int4", "cpu")


def test_quantized_folder_records_what_it_holds(quantized_bi_encoder, tiny_bi_encoder):
    settings = quantization.read_settings(quantized_bi_encoder)
    assert settings["kind"] == "bi-encoder" and settings["precision"] == "int8" and settings["source"] == tiny_bi_encoder
    assert settings["dimension"] == 32 and settings["max_length"] == 64 and settings["calibration_items"] == 40
    assert settings["calibration_digest"] == quantization.calibration_digest(TEXTS[:40])
    assert all(os.path.exists(os.path.join(quantized_bi_encoder, name)) for name in settings["files"])
    assert quantization.MODEL_FILE in settings["files"] and "tokenizer.json" in settings["files"]
    with pytest.raises(ValueError, match="not a cross-encoder"):
        quantization.QuantizedPairScorer(quantized_bi_encoder)


def test_quantized_bi_encoder_follows_the_float_model(quantized_bi_encoder, tiny_bi_encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(tiny_bi_encoder, device="cpu").encode(TEXTS, normalize_embeddings=True)
    encoder = quantization.QuantizedTextEncoder(quantized_bi_encoder, threads=1, batch_size=16)
    vectors = encoder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    cosine = (vectors * reference).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # the Normalize module is in the graph
    # Rows come back in input order whatever batch (and padding) each text landed in.
    np.testing.assert_allclose(encoder.encode(TEXTS[::-1]), vectors[::-1], atol=1e-3)
    np.testing.assert_allclose(encoder.encode([TEXTS[5]])[0], vectors[5], atol=1e-3)
    assert encoder.encode([]).shape == (0, 32)


def test_quantized_pair_scorer_gives_raw_logits_in_order(quantized_cross_encoder, tiny_cross_encoder):
    import torch
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(tiny_cross_encoder, device="cpu", max_length=64).predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    scorer = quantization.QuantizedPairScorer(quantized_cross_encoder, threads=1, batch_size=16)
    scores = scorer.score(PAIRS)
    assert scores.shape == (len(PAIRS),)
    # A random model's logits differ only in the 5th decimal, below int8 resolution, so its ranking
    # cannot be compared (the trained SciFact reranker keeps a Spearman of 0.986: bench.rerank);
    # the values must still be the model's logits, not a sigmoid or another output.
    assert np.abs(scores - reference).max() < 0.1 * np.abs(reference).mean()
    np.testing.assert_allclose(scorer.score(PAIRS[::-1]), scores[::-1], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(scorer.score([PAIRS[7]]), scores[7:8], rtol=1e-3, atol=1e-5)


def test_cross_encoder_scorer_uses_the_int8_export(quantized_cross_encoder, tiny_cross_encoder, tmp_path):
    import shutil

    from pipelines.reranking import INT8_FOLDER, CrossEncoderScorer, RerankConfig, quantized_reranker_url

    model = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder, model)
    assert quantized_reranker_url(str(model)) == ""
    assert CrossEncoderScorer(RerankConfig(model=str(model)), texts=None, device="cpu").precision in ("bf16", "fp32")
    with pytest.raises(ValueError, match="int8 export"):
        CrossEncoderScorer(RerankConfig(model=str(model), precision="int8"), texts=None, device="cpu")
    shutil.copytree(quantized_cross_encoder, model / INT8_FOLDER)
    scorer = CrossEncoderScorer(RerankConfig(model=str(model)), texts=None, device="cpu")
    assert scorer.precision == "int8"
    expected = quantization.QuantizedPairScorer(quantized_cross_encoder).score(PAIRS[:10])
    np.testing.assert_allclose(scorer.score_pairs(PAIRS[:10]), expected, rtol=1e-4, atol=1e-6)
    assert CrossEncoderScorer(RerankConfig(model=str(model), precision="fp32"), texts=None, device="cpu").precision == "fp32"


def test_int8_export_of_a_trained_reranker_is_kept_only_if_dev_quality_holds(tiny_cross_encoder, tmp_path):
    import shutil

    from sentence_transformers import CrossEncoder

    from pipelines.reranking import INT8_FOLDER, quantized_reranker_url
    from pipelines.training import export_int8_reranker

    model_folder = tmp_path / "model"
    shutil.copytree(tiny_cross_encoder, model_folder)
    model = CrossEncoder(str(model_folder), device="cpu", max_length=64)
    measured = []

    def dev_ndcg(value):
        def measure(scorer) -> float:
            measured.append(scorer.score(PAIRS[:4]))
            return value
        return measure

    dropped = export_int8_reranker(model, str(model_folder), PAIRS[:20], dev_ndcg(0.60), reference=0.61, tolerance=0.005)
    assert not dropped["kept"] and not (model_folder / INT8_FOLDER).exists() and len(measured) == 1
    kept = export_int8_reranker(model, str(model_folder), PAIRS[:20], dev_ndcg(0.607), reference=0.61, tolerance=0.005)
    assert kept["kept"] and kept["calibration_pairs"] == 20 and quantized_reranker_url(str(model_folder)) == str(model_folder / INT8_FOLDER)
    np.testing.assert_allclose(measured[0], measured[1], rtol=1e-4)  # the same calibration gives the same model


def test_default_index_build_embeds_and_searches_with_int8(ray_session, tiny_bi_encoder, tmp_path):
    """On CPU the default precision quantizes the bi-encoder once per index root; queries use the same model."""
    from jobs.build_index import main as build_index_job
    from jobs.retrieve_rerank import main as retrieve_rerank_job
    from pipelines.evaluation import read_run
    from pipelines.index_store import load_index

    documents = [{"_id": document["_id"], "text": document["text"]} for document in synthetic_documents(60, seed=5)]
    corpus = write_jsonl(tmp_path / "corpus" / "docs.jsonl", documents)
    root = tmp_path / "index"
    flags = build_index_flags(corpus.parent, root, tiny_bi_encoder, "--embedding.max-seq-length", "64", "--embedding.calibration-documents", "30")
    summary = build_index_job(flags)
    assert summary["embedded"] == 60
    manifest = load_index(str(root)).manifest
    folder = root / manifest["model"]["quantized_model"]
    settings = json.loads((folder / quantization.QUANTIZATION_FILE).read_text())
    assert manifest["model"]["key"].endswith("-int8") and settings["calibration_items"] == 30
    assert (root / "embeddings" / manifest["model"]["key"]).is_dir()
    stamp = os.stat(folder / quantization.QUANTIZATION_FILE).st_mtime_ns

    # A changed corpus: only the new documents are embedded, with the same int8 model (not re-calibrated).
    write_jsonl(tmp_path / "corpus" / "more.jsonl", [{"_id": f"new{n}", "text": text} for n, text in enumerate(TEXTS[:5])])
    summary = build_index_job(flags)
    assert (summary["embedded"], summary["reused_embeddings"], summary["indexed"]) == (5, 60, 65)
    assert os.stat(folder / quantization.QUANTIZATION_FILE).st_mtime_ns == stamp

    # A document's own text as a query finds that document first: queries are embedded by the same model.
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"_id": f"q-{d['_id']}", "text": d["text"]} for d in documents[:20]])
    output = tmp_path / "run"
    retrieve_rerank_job(["--index", str(root), "--queries", str(queries), "--output", str(output), "--top-k", "5"])
    run = read_run(str(output)).to_pylist()
    first = {row["query_id"]: row["doc_id"] for row in run if row["rank"] == 1}
    assert sum(first[f"q-{d['_id']}"] == d["_id"] for d in documents[:20]) >= 19


def test_a_length_past_the_models_positions_is_clamped_for_calibration_and_inference(tiny_bi_encoder, tmp_path, capsys):
    """The tiny model has 128 positions: asking for 512 tokens uses 128 (with a notice) instead of crashing OpenVINO's shape inference."""
    from pipelines.models import load_sentence_transformer

    model = load_sentence_transformer(tiny_bi_encoder, "cpu", 512)
    assert model.max_seq_length == 128
    assert "--embedding.max-seq-length 512" in capsys.readouterr().out
    long_texts = [" ".join([text] * 20) for text in TEXTS[:12]]  # well past 128 tokens
    folder = str(tmp_path / "model")
    quantization.quantize_model(model, "bi-encoder", long_texts, int(model.max_seq_length), folder, tiny_bi_encoder)
    vectors = quantization.QuantizedTextEncoder(folder).encode(long_texts[:3])
    assert vectors.shape == (3, model.get_sentence_embedding_dimension()) and np.isfinite(vectors).all()
    assert load_sentence_transformer(tiny_bi_encoder, "cpu", 64).max_seq_length == 64


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_rerank_length_past_the_models_positions_is_clamped(tiny_cross_encoder, quantized_cross_encoder, monkeypatch, precision, capsys):
    from pipelines import reranking

    monkeypatch.setattr(reranking, "quantized_reranker_url", lambda model: quantized_cross_encoder if precision == "int8" else "")
    scorer = reranking.CrossEncoderScorer(reranking.RerankConfig(model=tiny_cross_encoder, precision=precision, max_length=512), texts=None, device="cpu")
    assert scorer.config.max_length == 128 and "--rerank.max-length 512" in capsys.readouterr().out
    long_pairs = [(query, " ".join([text] * 20)) for query, text in PAIRS[:4]]
    assert np.isfinite(scorer.score_pairs(long_pairs)).all()


def test_a_128_position_model_builds_an_int8_index_under_the_default_settings(ray_session, tiny_bi_encoder, tmp_path):
    """--embedding.max-seq-length is 256 by default: the tiny model's 128 positions are used (with a notice), and
    int8 calibration and embedding run (they crashed in OpenVINO's shape inference before the clamp)."""
    from jobs.build_index import main as build_index_job

    documents = [{"_id": document["_id"], "text": " ".join([document["text"]] * 30)} for document in synthetic_documents(40, seed=9)]  # past 128 tokens
    corpus = write_jsonl(tmp_path / "corpus" / "docs.jsonl", documents)
    summary = build_index_job(build_index_flags(corpus.parent, tmp_path / "index", tiny_bi_encoder, "--embedding.calibration-documents", "20"))
    assert summary["embedded"] == 40 and summary["indexed"] == 40
    from pipelines.index_store import load_index

    manifest = load_index(str(tmp_path / "index")).manifest
    settings = json.loads((tmp_path / "index" / manifest["model"]["quantized_model"] / quantization.QUANTIZATION_FILE).read_text())
    assert manifest["model"]["max_seq_length"] == 256 and settings["max_length"] == 128  # calibrated at the model's 128 positions
