"""A text's vector or score is a function of the text alone: not of its batch neighbours, the batch size or padding."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_documents
from pipelines.token_batches import bucketed_batches, padded_length

SHORT = [f"w{number} w{number + 1}" for number in range(40)]
LONG = [" ".join(document["text"].split() * 3) for document in synthetic_documents(40, seed=5)]
PROBE = "w3 w17 w44 w120 w5 w9 w11"


def test_length_buckets_are_multiples_of_16_within_the_limit():
    assert [padded_length(n, 64) for n in (1, 15, 16, 17, 33, 63, 64)] == [16, 16, 16, 32, 48, 64, 64]
    assert padded_length(60, 60) == 60 and padded_length(50, 60) == 60 and padded_length(47, 60) == 48


def test_batches_hold_one_bucket_each_and_cover_every_row_once():
    encodings = {"input_ids": [[1] * n for n in (3, 20, 17, 5, 40, 16, 33)], "attention_mask": [[1] * n for n in (3, 20, 17, 5, 40, 16, 33)]}
    seen = []
    for rows, features in bucketed_batches(encodings, 2, 64, 0, ["input_ids", "attention_mask"]):
        lengths = [len(encodings["input_ids"][row]) for row in rows]
        assert len(rows) <= 2 and {padded_length(n, 64) for n in lengths} == {features["input_ids"].shape[1]}
        assert features["attention_mask"].sum(axis=1).tolist() == lengths
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(7))


def _alone_and_in_batches(encode, probe: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    alone = encode([probe])[0]
    among_short = encode(SHORT[:13] + [probe] + SHORT[13:])[13]
    among_long = encode(LONG[:21] + [probe] + LONG[21:])[21]
    return alone, among_short, among_long


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_query_and_a_document_embed_the_same_alone_and_in_any_batch(tiny_bi_encoder, tmp_path, precision):
    from pipelines.embedding import EmbeddingConfig, TextEncoder

    config = EmbeddingConfig(model=tiny_bi_encoder, precision=precision, batch_size=8, max_seq_length=64)
    quantized = ""
    if precision == "int8":
        from pipelines.quantization import int8_available

        if not int8_available():
            pytest.skip("OpenVINO/NNCF not installed")
        quantized = _quantize(config, tmp_path)
    encoder = TextEncoder(config, device="cpu", threads=1, quantized_url=quantized)
    for probe in (PROBE, LONG[3]):
        alone, among_short, among_long = _alone_and_in_batches(encoder.encode, probe)
        assert np.array_equal(alone, among_short) and np.array_equal(alone, among_long)


def _quantize(config, folder) -> str:
    from pipelines import quantization
    from pipelines.models import load_sentence_transformer

    model = load_sentence_transformer(config.model, "cpu", config.max_seq_length)
    url = str(folder / "int8")
    quantization.quantize_model(model, "bi-encoder", SHORT + LONG, config.max_seq_length, url, config.model)
    return url


def test_a_pair_scores_the_same_alone_and_in_any_batch(tiny_cross_encoder):
    from pipelines.reranking import CrossEncoderScorer, RerankConfig

    scorer = CrossEncoderScorer(RerankConfig(model=tiny_cross_encoder, precision="fp32", batch_size=4), texts=None, device="cpu", threads=1)

    def score(documents: list[str]) -> np.ndarray:
        return scorer.score_pairs([("a query w3 w9", document) for document in documents])

    alone, among_short, among_long = _alone_and_in_batches(score, PROBE)
    assert alone == among_short == among_long


# --- the query encoder of an int8-built index ----------------------------------------------------


def test_queries_of_an_int8_index_are_embedded_by_its_int8_model_even_on_a_gpu_cluster():
    from pipelines.reranking import RerankConfig
    from pipelines.retrieval import plan_query_pools

    assert plan_query_pools(16, 1, 2, RerankConfig(), int8_index=False).encoder_gpus > 0
    assert plan_query_pools(16, 1, 2, RerankConfig(), int8_index=True).encoder_gpus == 0


def test_a_gpu_text_encoder_refuses_an_int8_model(tiny_bi_encoder):
    from pipelines.embedding import EmbeddingConfig, TextEncoder

    with pytest.raises(ValueError, match="queries must be too: run the query encoder on CPU"):
        TextEncoder(EmbeddingConfig(model=tiny_bi_encoder), device="cuda", quantized_url="/somewhere/int8")


# --- reproducible index training -------------------------------------------------------------------


def test_ivf_training_is_seeded_and_a_missing_seed_parameter_is_an_error(monkeypatch):
    import faiss

    from pipelines import index_building

    index = index_building.make_empty_index("IVF4,PQ2x4", 8)
    index_building.seed_clustering(index, 99)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert ivf.cp.seed == 99 and ivf.pq.cp.seed == 99
    vectors = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    assert index_building.train_index("IVF4,PQ2x4", vectors, 5) == index_building.train_index("IVF4,PQ2x4", vectors, 5)

    class WithoutSeed:
        pass

    monkeypatch.setattr(faiss, "try_extract_index_ivf", lambda index: WithoutSeed())
    monkeypatch.setattr(faiss, "downcast_index", lambda index: index)
    with pytest.raises(RuntimeError, match="no longer exposes the clustering seed"):
        index_building.seed_clustering(object(), 1)
