"""Bi-encoder embedding on CPU: docs/s, CPU time, memory and SciFact nDCG@10 per backend.

Variants (each in its own process, all with the same number of threads):

- ``plain-fp32``: ``SentenceTransformer.encode`` in one process, fp32: what a user would write;
- ``ray-fp32`` / ``ray-bf16`` / ``ray-int8``: our pipeline, ``pipelines.embedding.embed_documents`` (Ray
  Data actor pool sized by ``plan_embedding_pool``) into an ``EmbeddingStore`` on a temporary folder,
  timed end to end (planning, actor start and model load, embedding, Parquet write), on a local Ray
  instance; ``ray-int8`` is the CPU default: ``quantized_url`` = the ``openvino-int8`` model below;
- ``torch-bf16``: ``pipelines.embedding.TextEncoder`` with ``precision="bf16"`` (CPU autocast);
- ``openvino-int8``: the pipeline's int8 model called directly: ``pipelines.quantization.quantize_model``
  (NNCF static quantization, calibrated on 300 seeded corpus documents + 100 train queries), run by
  ``QuantizedTextEncoder``;
- ``openvino-fp32`` / ``onnx-fp32`` / ``onnx-int8``: baselines (:mod:`bench.backends`).

Each Ray variant is compared with the direct variant of the same backend ("Ray / direct": ``ray-int8``
with ``openvino-int8``), with and without a job's fixed cost, measured on 8 documents each round.

Throughput: the first ``--docs`` SciFact documents (title + " " + text, max length 256) are split into
``--rounds`` slices; in each round every variant embeds the same slice, in rotated order, so that
background load falls on all of them; ratios to ``plain-fp32`` are per round (median) and overall.
Quality: each backend embeds ``--quality-docs`` documents (all 5,183 by default) and the 300 test
queries; exact inner-product top-10; nDCG@10 with ir_measures. Vectors are cached per backend under
``~/.cache/retrieval-pipelines/bench/embeddings/`` (the throughput documents go into the cache too),
so a rerun only embeds what is missing.

    python -m bench.embed --quick                         # smoke run, a few minutes
    python -m bench.embed                                 # 2,000 docs x 7 variants + full-corpus nDCG
    python -m bench.embed --variants ray-int8 --quality-docs 0
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import backends
from bench.common import (
    RESULTS,
    GemmProbe,
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
    ndcg_at_10,
    prepare_environment,
    resolve_variants,
    rotated,
    write_results,
)

DEFAULT_VARIANTS = ("plain-fp32", "ray-fp32", "torch-bf16", "onnx-int8", "openvino-int8", "ray-int8")
VARIANTS = {
    # name: (backend whose vectors it produces, what it is)
    "plain-fp32": ("torch-fp32", "SentenceTransformer.encode, fp32, one process"),
    "ray-fp32": ("torch-fp32", "pipelines.embedding.embed_documents (Ray Data actor pool), fp32"),
    "torch-bf16": ("torch-bf16", "pipelines.embedding.TextEncoder, precision=bf16 (autocast)"),
    "ray-bf16": ("torch-bf16", "pipelines.embedding.embed_documents, precision=bf16"),
    "torch-fp16": ("torch-fp16", "pipelines.embedding.TextEncoder, precision=fp16 (GPU: --device cuda)"),
    "ray-fp16": ("torch-fp16", "pipelines.embedding.embed_documents, precision=fp16, one GPU actor per GPU (--device cuda)"),
    "openvino-int8": ("openvino-int8", "pipelines.quantization.QuantizedTextEncoder: OpenVINO static int8 (NNCF, 300 corpus docs + 100 train queries)"),
    "ray-int8": ("openvino-int8", "pipelines.embedding.embed_documents, precision=int8 on the openvino-int8 model (the CPU default)"),
    "onnx-fp32": ("onnx-fp32", "ONNX Runtime, fused graph, fp32"),
    "onnx-int8": ("onnx-int8", "ONNX Runtime, fused graph, dynamic int8 (per-channel weights)"),
    "openvino-fp32": ("openvino-fp32", "OpenVINO fp32 (the int8 model's export without NNCF), QuantizedTextEncoder"),
}
BASELINE = "plain-fp32"


def direct_variant(name: str) -> str:
    """The variant that calls the backend of Ray variant ``name`` directly (``ray-int8`` → ``openvino-int8``)."""
    return next(other for other, (backend, _) in VARIANTS.items() if backend == VARIANTS[name][0] and not other.startswith("ray-"))


# --------------------------------------------------------------------------- variants (built in their own process)


class PlainEncoder:
    """What a user would write: ``SentenceTransformer(path).encode(texts)``, fp32."""

    def __init__(self, model_path: str, max_length: int, batch_size: int, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device=device)
        self.model.max_seq_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)


class PipelineEncoder:
    """``pipelines.embedding.TextEncoder`` (the code every embedding path uses) at a precision."""

    def __init__(self, precision: str, max_length: int, batch_size: int, threads: int, device: str = "cpu"):
        from pipelines.embedding import EmbeddingConfig, TextEncoder

        config = EmbeddingConfig(model="bundled", precision=precision, max_seq_length=max_length, batch_size=batch_size, device=device)
        self.encoder = TextEncoder(config, device=device, threads=threads)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)


class RayPipeline:
    """``embed_documents`` on a local Ray instance: payload (precision, ids, texts) → vectors in input order.

    Precision ``int8`` runs the quantized model at ``quantized_url``, as ``jobs.build_index`` does on CPU.
    """

    def __init__(self, cpus: int, max_length: int, batch_size: int, quantized_url: str = "", device: str = "cpu"):
        import ray
        from ray.data import DataContext

        ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 object_store_memory=512 * 1024 * 1024)
        DataContext.get_current().enable_progress_bars = False
        self.max_length = max_length
        self.batch_size = batch_size
        self.quantized_url = quantized_url
        self.device = device

    def __call__(self, payload: tuple[str, list[str], list[str]]) -> np.ndarray:
        import pyarrow as pa
        import ray

        from pipelines import quantization, storage
        from pipelines.documents import content_hash
        from pipelines.embedding import (
            EmbeddingConfig,
            EmbeddingStore,
            arrow_to_embeddings,
            embed_documents,
        )

        precision, ids, texts = payload
        config = EmbeddingConfig(model="bundled", precision=precision, max_seq_length=self.max_length, batch_size=self.batch_size, device=self.device)
        table = pa.table({"id": ids, "text_hash": [content_hash(text) for text in texts], "content": texts})
        quantized_url = self.quantized_url if precision == "int8" else ""
        if precision == "int8" and not quantized_url:
            raise ValueError("ray-int8 needs the openvino-int8 model (bench.backends.prepare)")
        folder = tempfile.mkdtemp(prefix="bench-embed-")
        try:
            store = EmbeddingStore(folder, config, quantization.read_settings(quantized_url) if quantized_url else None)
            rows, _ = embed_documents(ray.data.from_arrow(table), store, config, quantized_url)
            if rows != len(ids):
                raise RuntimeError(f"embed_documents wrote {rows} rows for {len(ids)} documents")
            by_id = {}
            for part in store.parts():
                stored = storage.read_parquet(part)
                by_id.update(zip(stored["id"].to_pylist(), arrow_to_embeddings(stored["embedding"])))
            return np.stack([by_id[identifier] for identifier in ids])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        import ray

        ray.shutdown()


class ExportedEncoder:
    """An OpenVINO or ONNX Runtime backend (:func:`bench.backends.load_backend`) behind the same call."""

    def __init__(self, path: str, backend: str, threads: int, max_length: int, batch_size: int):
        self.encoder = backends.load_backend(backend, "bi-encoder", path, threads, batch_size, max_length)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)


# --------------------------------------------------------------------------- analysis


def encoder_flops(length: np.ndarray, config: dict) -> np.ndarray:
    """Forward FLOPs of a BERT encoder for sequences of ``length`` tokens (matrix products only)."""
    hidden, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    length = np.asarray(length, dtype=np.float64)
    per_layer = 2 * length * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * length * length * hidden
    return layers * per_layer


def padding_analysis(lengths: np.ndarray, texts: list[str], batch_size: int, window: int, config: dict) -> list[dict]:
    """FLOPs actually computed (batches padded to their longest) relative to the useful FLOPs, by batching."""
    useful = encoder_flops(lengths, config).sum()
    characters = np.array([len(text) for text in texts])

    def computed(order: np.ndarray) -> float:
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            total += len(rows) * encoder_flops(lengths[rows].max(), config)
        return total

    def windowed(size: int) -> np.ndarray:
        parts = [start + np.argsort(-characters[start : start + size], kind="stable") for start in range(0, len(texts), size)]
        return np.concatenate(parts)

    rows = [
        ("unsorted", np.arange(len(texts))),
        (f"sorted within {window}-row Ray batches (pipeline)", windowed(window)),
        (f"sorted over all {len(texts)} (one encode call)", np.argsort(-characters, kind="stable")),
    ]
    return [{"batching": name, "computed_over_useful": computed(order) / useful} for name, order in rows]


def quality_subset(scifact: SciFact, count: int | None, seed: int = 0) -> list[int]:
    """All documents, or the test queries' relevant ones plus a seeded sample of the rest (``count`` in all)."""
    if count is None or count >= len(scifact.doc_ids):
        return list(range(len(scifact.doc_ids)))
    relevant = {doc_id for judged in scifact.qrels.values() for doc_id, score in judged.items() if score > 0}
    chosen = [position for position, doc_id in enumerate(scifact.doc_ids) if doc_id in relevant]
    others = [position for position, doc_id in enumerate(scifact.doc_ids) if doc_id not in relevant]
    extra = max(0, count - len(chosen))
    sample = np.random.default_rng(seed).choice(len(others), size=min(extra, len(others)), replace=False)
    return sorted(chosen + [others[i] for i in sample])


def _parse_quality(value: str) -> int | None:
    if value == "all":
        return None
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError("--quality-docs must be all, 0 or a positive count")
    return count


def row_docs(row: dict) -> int:
    return int(row.get("docs", 0))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 docs in 2 rounds, nDCG on 600 docs")
    parser.add_argument("--docs", type=int, default=2000, help="documents for the throughput measurement (0 = skip it)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds the throughput documents are split into")
    parser.add_argument("--quality-docs", type=_parse_quality, default=None, metavar="all|N", help="documents for nDCG@10 (0 = skip) [all]")
    add_variant_arguments(parser, VARIANTS, DEFAULT_VARIANTS)
    parser.add_argument("--calibration-docs", type=int, default=300, help="corpus documents to calibrate OpenVINO int8 on")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the torch variants (plain, torch-*, ray-*) run; fp16 needs cuda")
    parser.add_argument("--output", default=str(RESULTS / "embed.json"))
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.docs = min(arguments.docs, 128)
        arguments.quality_docs = 600 if arguments.quality_docs is None else min(arguments.quality_docs, 600)
    resolve_variants(parser, arguments, VARIANTS, BASELINE)
    for name in list(arguments.variants):  # a Ray variant is read against its backend called directly
        if name.startswith("ray-") and direct_variant(name) not in arguments.variants:
            arguments.variants.insert(arguments.variants.index(name), direct_variant(name))
    return arguments


# --------------------------------------------------------------------------- main


def start_variants(arguments, model_path: str, exports: dict[str, Path]) -> dict[str, VariantProcess]:
    """One process per variant; the Ray variants share one process (one Ray instance), told the precision per call."""
    workers: dict[str, VariantProcess] = {}
    threads, length, batch = arguments.threads, arguments.max_length, arguments.batch_size
    ray_worker = None
    for name in arguments.variants:
        started = time.perf_counter()
        if name == "plain-fp32":
            workers[name] = VariantProcess(name, PlainEncoder, model_path, length, batch, arguments.device, threads=threads)
        elif name in ("torch-bf16", "torch-fp16"):
            workers[name] = VariantProcess(name, PipelineEncoder, name.split("-")[1], length, batch, threads, arguments.device, threads=threads)
        elif name.startswith("ray-"):
            if ray_worker is None:
                quantized_url = str(exports.get("openvino-int8", ""))
                ray_worker = VariantProcess("ray", RayPipeline, threads, length, batch, quantized_url, arguments.device, threads=threads)
            workers[name] = ray_worker
        else:
            workers[name] = VariantProcess(name, ExportedEncoder, str(exports[name]), name, threads, length, batch, threads=threads)
        print(f"  started {name} in {time.perf_counter() - started:.1f} s (load {workers[name].load_s:.1f} s, threads {workers[name].thread_report})", flush=True)
    return workers


def run_call(worker: VariantProcess, name: str, ids: list[str], texts: list[str]):
    if name.startswith("ray-"):
        return worker.call((name.split("-", 1)[1], ids, texts))
    return worker.call(texts)


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    from pipelines.models import load_sentence_transformer, resolve_model_reference

    model_path = resolve_model_reference("bundled")
    scifact = load_scifact()
    environment = environment_report(arguments.threads)
    print(f"{environment['cpu']}, {environment['cores']} cores, load {environment['load_average_at_start']}; variants: {', '.join(arguments.variants)}", flush=True)
    model_digest = file_digest(Path(model_path) / "model.safetensors", extra={"max_length": arguments.max_length})

    # Exports (cached) for the OpenVINO and ONNX Runtime backends; int8 calibrated on a seeded corpus sample plus train queries.
    exported = sorted({VARIANTS[name][0] for name in arguments.variants} & set(backends.BACKENDS))
    rng = np.random.default_rng(1)
    calibration = [scifact.doc_texts[i] for i in sorted(rng.choice(len(scifact.doc_texts), arguments.calibration_docs, replace=False))]
    calibration += scifact.train_query_texts[:100]
    load = functools.partial(load_sentence_transformer, model_path, "cpu", arguments.max_length)  # as the indexing job loads it
    exports, export_seconds = backends.prepare(load, model_path, "bi-encoder", exported, calibration, arguments.max_length)

    probe = VariantProcess("gemm", GemmProbe, threads=1)  # first: a failure here costs nothing
    ceilings = probe.call("run").value
    probe.close()
    print(f"matrix-product ceilings (GFLOP per CPU-second, 1 thread): { {key: round(value) for key, value in ceilings.items()} }", flush=True)

    workers = start_variants(arguments, model_path, exports)
    names = arguments.variants
    results = {name: {"variant": name, "backend": VARIANTS[name][0], "what": VARIANTS[name][1], "wall_s": 0.0, "cpu_s": 0.0, "docs": 0,
                      "rss_mib": 0.0, "pss_mib": 0.0, "process_rss_mib": 0.0, "processes": 0, "round_ratios": []} for name in names}
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in names}
    try:
        # Warm-up: one small call each (first-call kernel selection, Ray worker start), not timed.
        warm_texts = scifact.doc_texts[:16]
        for name in names:
            run_call(workers[name], name, scifact.doc_ids[:16], warm_texts)

        # Throughput: interleaved rounds over the same documents.
        count = min(arguments.docs, len(scifact.doc_ids))
        bounds = np.linspace(0, count, max(1, arguments.rounds) + 1).round().astype(int) if count else []
        for round_index in range(len(bounds) - 1 if count else 0):
            start, end = int(bounds[round_index]), int(bounds[round_index + 1])
            ids, texts = scifact.doc_ids[start:end], scifact.doc_texts[start:end]
            walls = {}
            for name in rotated(names, round_index):
                row = results[name]
                if name.startswith("ray-"):
                    # A job's fixed cost (Ray Data planning, actor start, model load), measured on 8 documents.
                    row["overhead_s"] = row.get("overhead_s", 0.0) + run_call(workers[name], name, ids[:8], texts[:8]).wall_s
                    row["overhead_jobs"] = row.get("overhead_jobs", 0) + 1
                result = run_call(workers[name], name, ids, texts)
                row["wall_s"] += result.wall_s
                row["cpu_s"] += result.cpu_s
                row["docs"] += len(ids)
                row["rss_mib"] = max(row["rss_mib"], result.peak_rss_mib)
                row["pss_mib"] = max(row["pss_mib"], result.peak_pss_mib)
                row["process_rss_mib"] = max(row["process_rss_mib"], result.peak_process_rss_mib)
                row["processes"] = max(row["processes"], result.processes)
                if name.startswith("ray-"):
                    breakdown = row.setdefault("cpu_by_process", {})
                    for role, seconds in result.cpu_by_role.items():
                        breakdown[role] = breakdown.get(role, 0.0) + seconds
                vectors[name].append(np.asarray(result.value, dtype=np.float32))
                walls[name] = result.wall_s
                print(f"  round {round_index + 1}: {name:<14} {len(ids) / result.wall_s:7.1f} docs/s  ({result.wall_s:6.1f} s wall, {result.cpu_s:6.1f} s CPU)", flush=True)
            for name in names:
                results[name]["round_ratios"].append(walls[BASELINE] / walls[name])

        # Quality: per backend, through its direct variant; vectors cached between runs.
        subset = quality_subset(scifact, arguments.quality_docs) if arguments.quality_docs != 0 else []
        quality: dict[str, dict] = {}
        direct = {}
        for name in names:
            if not name.startswith("ray-"):
                direct.setdefault(VARIANTS[name][0], name)
        for backend_name, name in direct.items():
            # Torch backends are keyed by the model file; exported ones by their own model files.
            key = backends.backend_digest(exports[backend_name], arguments.max_length) if backend_name in exports else model_digest
            cache = VectorCache(f"{backend_name}-{key}" + ("" if arguments.device == "cpu" else f"-{arguments.device}"))  # GPU vectors apart
            if vectors[name]:
                cache.put(scifact.doc_ids[:count], np.concatenate(vectors[name]))
            if not subset:
                cache.save()
                continue
            doc_ids = [scifact.doc_ids[i] for i in subset]
            query_keys = [f"query:{query_id}" for query_id in scifact.query_ids]
            missing_docs = cache.missing(doc_ids)
            missing_queries = cache.missing(query_keys)
            started = time.perf_counter()
            for chunk in range(0, len(missing_docs), 512):
                positions = missing_docs[chunk : chunk + 512]
                cache.put([doc_ids[p] for p in positions], workers[name].call([scifact.doc_texts[subset[p]] for p in positions]).value)
                cache.save()
                print(f"  quality {backend_name}: {min(chunk + 512, len(missing_docs))}/{len(missing_docs)} missing docs embedded", flush=True)
            if missing_queries:
                cache.put([query_keys[p] for p in missing_queries], workers[name].call([scifact.query_texts[p] for p in missing_queries]).value)
                cache.save()
            document_vectors = cache.get(doc_ids)
            query_vectors = cache.get(query_keys)
            scores, top = exact_top_k(query_vectors, document_vectors, 10)
            quality[backend_name] = {
                "ndcg@10": ndcg_at_10(scifact.qrels, scifact.query_ids, doc_ids, top, scores),
                "documents": len(doc_ids),
                "embedded_now": len(missing_docs),
                "embed_seconds": time.perf_counter() - started,
            }
            print(f"  quality {backend_name}: nDCG@10 {quality[backend_name]['ndcg@10']:.4f} on {len(doc_ids)} docs", flush=True)
    finally:
        for worker in {id(worker): worker for worker in workers.values()}.values():
            worker.close()

    # Agreement with plain fp32 on the throughput documents, and the memory of each variant's process.
    reference = np.concatenate(vectors[BASELINE]) if vectors[BASELINE] else None
    for name in names:
        row = results[name]
        worker = workers[name]
        row["load_s"] = worker.load_s
        row["threads"] = worker.thread_report
        if not name.startswith("ray-"):
            row["process_rss_mib"] = max(row["process_rss_mib"], worker.overall.peak_process_rss_mib, worker.max_rss_mib)
            row["rss_mib"] = max(row["rss_mib"], worker.overall.peak_rss_mib, worker.max_rss_mib)
            row["pss_mib"] = max(row["pss_mib"], worker.overall.peak_pss_mib)
        if row["docs"]:
            row["docs_per_s"] = row["docs"] / row["wall_s"]
            row["docs_per_cpu_s"] = row["docs"] / row["cpu_s"]
            row["cores_busy"] = row["cpu_s"] / row["wall_s"]
        if reference is not None and vectors[name]:
            mine = np.concatenate(vectors[name])
            cosine = (mine * reference).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(reference, axis=1))
            row["cosine_min"], row["cosine_mean"] = float(cosine.min()), float(cosine.mean())
    base = results[BASELINE]
    for name in names:
        row = results[name]
        if row["docs"] and base["docs"]:
            row["speedup"] = base["wall_s"] / row["wall_s"]
            row["speedup_round_median"] = median(row["round_ratios"])
            row["cpu_speedup"] = base["cpu_s"] / row["cpu_s"]
        backend_quality = quality.get(row["backend"], {})
        row["ndcg@10"] = backend_quality.get("ndcg@10")
        if row["ndcg@10"] is not None and quality.get("torch-fp32"):
            row["ndcg_delta"] = row["ndcg@10"] - quality["torch-fp32"]["ndcg@10"]
    for name in names:
        if name.startswith("ray-"):
            row = results[name]
            same = direct_variant(name)
            if same in results and results[same]["docs"] and row["docs"]:
                row["vs_direct"] = results[same]["wall_s"] / row["wall_s"]
                steady_s = row["wall_s"] - row.get("overhead_s", 0.0)  # one fixed cost per timed job (one per round)
                row["overhead_per_job_s"] = row.get("overhead_s", 0.0) / max(1, row.get("overhead_jobs", 0))
                if steady_s > 0:  # else the slices are too small to tell the fixed cost from the rest
                    row["docs_per_s_steady"] = row["docs"] / steady_s
                    row["vs_direct_steady"] = results[same]["wall_s"] / steady_s

    # FLOPs per document and the bound they put on docs/s.
    from transformers import AutoTokenizer

    model_config = json.loads((Path(model_path) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sample_texts = scifact.doc_texts[: max(count, 1)] if count else scifact.doc_texts[:2000]
    lengths = np.array([len(ids) for ids in tokenizer(sample_texts, truncation=True, max_length=arguments.max_length)["input_ids"]])
    flops_per_doc = float(encoder_flops(lengths, model_config).mean())
    padding = padding_analysis(lengths, sample_texts, arguments.batch_size, 256, model_config)
    bounds_rows = [
        {"precision": precision, "gemm_gflop_per_cpu_s": gflops, "max_docs_per_cpu_s": gflops * 1e9 / flops_per_doc,
         "max_docs_per_s": arguments.threads * gflops * 1e9 / flops_per_doc, "max_speedup": gflops * 1e9 / flops_per_doc / results[BASELINE]["docs_per_cpu_s"] if results[BASELINE].get("docs_per_cpu_s") else None}
        for precision, gflops in ceilings.items()
    ]
    for name in names:
        row = results[name]
        if row.get("docs_per_s") and arguments.device == "cpu":  # CPU GEMM ceilings mean nothing for GPU variants
            row["gflop_per_cpu_s"] = row["docs_per_cpu_s"] * flops_per_doc / 1e9
            precision = "int8" if name.endswith("int8") else "bf16" if name.endswith("bf16") else "fp32"
            if precision in ceilings:
                row["of_ceiling"] = row["gflop_per_cpu_s"] / ceilings[precision]

    rows = [results[name] for name in names]
    title = (f"bench.embed: {count} SciFact docs in {arguments.rounds} interleaved rounds, {arguments.threads} threads per variant, "
             f"max length {arguments.max_length}, batch {arguments.batch_size}")
    table = format_table(rows, [
        ("variant", "variant", ""),
        ("docs_per_s", "docs/s", ".1f"),
        ("speedup", "x plain", ".2f"),
        ("speedup_round_median", "x plain (median round)", ".2f"),
        ("docs_per_cpu_s", "docs/CPU-s", ".2f"),
        ("cpu_speedup", "x plain (CPU)", ".2f"),
        ("cores_busy", "cores busy", ".2f"),
        ("vs_direct", "Ray / direct", ".2f"),
        ("overhead_per_job_s", "Ray fixed cost s per job", ".1f"),
        ("vs_direct_steady", "Ray / direct w/o overhead", ".2f"),
        ("gflop_per_cpu_s", "GFLOP/CPU-s", ".0f"),
        ("of_ceiling", "of GEMM ceiling", ".0%"),
    ], title=title)
    table += "\n\n" + format_table(rows, [
        ("variant", "variant", ""),
        ("process_rss_mib", "peak RSS MiB (largest proc)", ".0f"),
        ("pss_mib", "peak PSS MiB (tree)", ".0f"),
        ("processes", "procs", "d"),
        ("load_s", "load s", ".1f"),
        ("cosine_min", "cos vs fp32 min", ".4f"),
        ("cosine_mean", "cos vs fp32 mean", ".5f"),
        ("ndcg@10", "nDCG@10", ".4f"),
        ("ndcg_delta", "delta nDCG", "+.4f"),
    ])
    print()
    print(table)
    print()
    print(format_table(padding, [("batching", "batching (batch 32)", ""), ("computed_over_useful", "FLOPs computed / useful", ".3f")],
                       title=f"padding: {lengths.mean():.0f} tokens per doc on average ({(lengths == arguments.max_length).mean():.0%} truncated), {flops_per_doc / 1e9:.2f} GFLOP per doc"))
    print()
    print(format_table(bounds_rows, [("precision", "precision", ""), ("gemm_gflop_per_cpu_s", "GEMM GFLOP/CPU-s (torch, 1 thread)", ".0f"),
                                     ("max_docs_per_cpu_s", "ceiling docs/CPU-s", ".0f"), ("max_docs_per_s", f"ceiling docs/s on {arguments.threads} cores", ".0f"),
                                     ("max_speedup", "ceiling x plain (CPU)", ".1f")],
                       title=f"bound: {flops_per_doc / 1e9:.2f} GFLOP per document at the speed of a {GemmProbe().size}x{GemmProbe().size} matrix product"))
    for name in names:
        if results[name].get("cpu_by_process"):
            breakdown = results[name]["cpu_by_process"]
            total = sum(breakdown.values())
            print()
            print(format_table([{"process": role, "cpu_s": seconds, "share": seconds / total} for role, seconds in breakdown.items() if seconds >= 0.05],
                               [("process", "process", ""), ("cpu_s", "CPU s", ".1f"), ("share", "share", ".0%")],
                               title=f"{name}: CPU by process over the timed jobs ({row_docs(results[name])} docs; main = the driver)"))
    if quality:
        print()
        print(format_table([{"backend": key, **value} for key, value in quality.items()],
                           [("backend", "backend", ""), ("ndcg@10", "nDCG@10", ".4f"), ("documents", "docs", "d"), ("embedded_now", "embedded this run", "d"), ("embed_seconds", "s", ".0f")],
                           title="quality: SciFact test (300 queries), exact inner-product top-10"))
    payload = {
        "benchmark": "embed",
        "arguments": vars(arguments),
        "environment": environment,
        "model": model_path,
        "exports": {name: str(path) for name, path in exports.items()},
        "export_seconds": export_seconds,
        "flops_per_doc": flops_per_doc,
        "tokens_per_doc": float(lengths.mean()),
        "padding": padding,
        "bounds": bounds_rows,
        "gemm_ceilings": ceilings,
        "variants": rows,
        "quality": quality,
        "table": table,
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
