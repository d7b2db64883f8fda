"""The jobs end to end on N synthetic documents: where time and memory go as the corpus grows.

Stages, each run in this process through the jobs' library functions (a local Ray instance started
here, so every Ray process is a descendant of this one and is sampled):

0. ``plain encode``: ``SentenceTransformer.encode`` of the same model over the first
   ``min(--encode-docs, N)`` documents, in its own process, batch size as the pipeline's: the
   baseline of the embedding stage ("embedding / plain");
1. ``build_index``: ``pipelines.indexing.build_index`` on the N documents (a fresh index root);
2. ``first stage``: ``pipelines.retrieval.retrieve_and_rerank`` with ``rerank.model = none`` over the
   ``--queries`` query log;
2b. ``first stage, dense only``: the same with ``search.mode = dense`` (with ``--sparse on``): what the
   BM25 half of the hybrid first stage costs;
3. ``rerank``: the same with the cross-encoder on the first ``--rerank-queries`` queries, depth
   ``--rerank-depth``.

The models are a tiny random-weight bi-encoder and cross-encoder (:mod:`bench.tiny_models`, 2 layers,
32 wide), so the pipeline and not the model is measured; ``--model bundled`` runs the bundled
all-MiniLM-L6-v2 and a MiniLM cross-encoder with a random head (``bench.rerank.build_cross_encoder``)
instead, for a GPU machine. Precision is fp32 on CPU (no int8 for the tiny model), fp16 on CUDA.

Documents: seeded, abstract-like: a title of 6-15 words and a text of 150-250 words drawn from a
Zipf distribution over the 21,719 whole lowercase words of the bundled tokenizer's vocabulary (its
order is roughly by frequency); 3/4 of them in ``--parquet-files`` Parquet files (row groups of
10,000), 1/4 in one ``corpus.jsonl`` (BEIR fields ``_id``, ``title``, ``text``). Queries: 3-10
words from the same vocabulary, one Parquet file. Both are generated with numpy and Arrow
(vectorized), and cached in ``--workdir`` by (count, seed).

Per stage: wall time, rows/s, the driver's peak RSS (this process, sampled every 0.2 s), the largest
Ray worker's peak RSS (the ``ray::...`` processes among this process's descendants; RSS counts the
object-store pages a worker has mapped), object-store bytes spilled during the stage (the raylet's
``spilled_bytes_total``), and bytes written (the folders the stage wrote). With two or more
``--sizes``, the scaling exponent k of each stage (wall time proportional to N^k) between the
smallest and the largest size.

Index only (``--vectors V``; ``--index-only`` skips the document stages): V synthetic 384-d vectors
shaped like MiniLM embeddings (``bench.index.SyntheticVectors``) written as embedding-store Parquet
parts (cached), then the index steps of ``build_index`` (``locate_vectors``, ``choose_index_parameters``,
``build_shards`` on Ray, the manifest) and a ``ShardSearcher`` per shard (loaded one at a time,
candidates merged with ``merge_top_k``): build time, bytes per vector on disk and in RAM (index plus
re-scoring vectors), queries/s, recall@100 against exact search (faiss ``IndexFlatIP`` chunk by
chunk while the vectors are generated; its queries/s is the flat baseline).

    python -m bench.scale                                  # 100k documents, 100k queries
    python -m bench.scale --sizes 100000,1000000           # two sizes and the scaling exponents
    python -m bench.scale --index-only --vectors 10000000  # the index alone at 10M vectors
    python -m bench.scale --docs 200000 --model bundled --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from bench.common import (
    MIB,
    RESULTS,
    VariantProcess,
    _process_role,
    environment_report,
    format_table,
    physical_cores,
    prepare_environment,
    write_results,
)

GIB = 1024 * MIB
CHUNK = 50_000  # documents generated per vectorized chunk
VECTOR_CHUNK = 100_000  # synthetic vectors per chunk (and per embedding-store part)
ROW_GROUP = 10_000
TOP_K = 100
STAGES = ("plain_encode", "build_index", "first_stage", "first_stage_dense", "rerank")  # first_stage_dense: with --sparse on


def default_output() -> str:
    """``$OUT/scale.json`` when ``OUT`` is set (the GPU machine's result folder), else bench/results/scale.json."""
    return str(Path(os.environ["OUT"]) / "scale.json") if os.environ.get("OUT") else str(RESULTS / "scale.json")


# --------------------------------------------------------------------------- synthetic data


LOOKUP_BITS = 20  # words are drawn through a table of 2^20 slots (probability resolution 1e-6): 3x faster than searchsorted


@dataclass(frozen=True)
class Vocabulary:
    """Words with Zipf probabilities (rank = position in the tokenizer's vocabulary); ``lookup`` maps a uniform slot to a word."""

    words: Any  # pa.StringArray
    cumulative: np.ndarray
    lookup: np.ndarray

    @classmethod
    def from_tokenizer(cls, exponent: float = 1.0) -> Vocabulary:
        import pyarrow as pa

        from bench.tiny_models import _bundled_model_dir

        vocabulary = json.loads((_bundled_model_dir() / "tokenizer.json").read_text())["model"]["vocab"]
        words = [word for word in vocabulary if re.fullmatch(r"[a-z]{2,}", word)]  # plain words: no JSON escaping needed
        weights = 1.0 / (np.arange(len(words)) + 2.7) ** exponent
        cumulative = np.cumsum(weights / weights.sum())
        slots = (np.arange(1 << LOOKUP_BITS) + 0.5) / (1 << LOOKUP_BITS)
        lookup = np.minimum(np.searchsorted(cumulative, slots), len(words) - 1).astype(np.int32)
        return cls(pa.array(words, pa.string()), cumulative, lookup)

    def draw(self, rng: np.random.Generator, lengths: np.ndarray, skip: int = 0):
        """One string per entry of ``lengths``: that many words, space-separated (the ``skip`` most frequent never drawn)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        low = int(np.searchsorted(self.lookup, skip)) if skip else 0  # first slot of a word past the skipped ones
        indices = self.lookup[rng.integers(low, len(self.lookup), int(lengths.sum()), dtype=np.int32)]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets), self.words.take(pa.array(indices))), " ")


def synthetic_documents(vocabulary: Vocabulary, start: int, count: int, seed: int):
    """Documents ``start`` .. ``start + count`` as an Arrow table (``_id``, ``title``, ``text``); deterministic in (start, count, seed)."""
    import pyarrow as pa

    rng = np.random.default_rng([seed, 1, start, count])
    titles = vocabulary.draw(rng, rng.integers(6, 16, count))
    texts = vocabulary.draw(rng, rng.integers(150, 251, count))
    return pa.table({"_id": numbered("d", start, count), "title": titles, "text": texts})


def synthetic_queries(vocabulary: Vocabulary, count: int, seed: int):
    """``count`` queries of 3-10 words (the 50 most frequent words never drawn): ``_id``, ``text``."""
    import pyarrow as pa

    rng = np.random.default_rng([seed, 2, count])
    return pa.table({"_id": numbered("q", 0, count), "text": vocabulary.draw(rng, rng.integers(3, 11, count), skip=50)})


def numbered(prefix: str, start: int, count: int):
    """``prefix`` + decimal number for ``start`` .. ``start + count`` (an Arrow string array)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(start, start + count, dtype=np.int64)), pa.string()), "")


def corpus_layout(count: int, parquet_files: int) -> list[tuple[str, int, int]]:
    """(file name, first document, documents): 3/4 in ``parquet_files`` Parquet files, the rest in ``corpus.jsonl``."""
    in_parquet = count * 3 // 4
    bounds = np.linspace(0, in_parquet, parquet_files + 1).round().astype(int)
    layout = [(f"part-{number:03d}.parquet", int(bounds[number]), int(bounds[number + 1] - bounds[number])) for number in range(parquet_files)]
    return [*layout, ("corpus.jsonl", in_parquet, count - in_parquet)]


def _chunks(start: int, count: int) -> list[tuple[int, int]]:
    return [(first, min(CHUNK, start + count - first)) for first in range(start, start + count, CHUNK)]


def _json_lines(table) -> bytes:
    """A table of plain-word strings as JSON lines (the words need no escaping)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lines = pc.binary_join_element_wise('{"_id": "', table["_id"], '", "title": "', table["title"], '", "text": "', table["text"], '"}', "")
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    joined = pc.binary_join(pa.LargeListArray.from_arrays(pa.array([0, len(lines)], pa.int64()), lines.cast(pa.large_string())), pa.scalar("\n", pa.large_string()))
    return joined[0].as_py().encode() + b"\n"


def _publish_folder(temporary: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name in one rename (another run may have won)."""
    try:
        temporary.rename(final)
    except OSError:
        if not (final / "spec.json").exists():
            raise
        shutil.rmtree(temporary, ignore_errors=True)


def generate_corpus(workdir: Path, count: int, seed: int, parquet_files: int = 4) -> Path:
    """The corpus folder for (count, seed), generated unless cached: Parquet files and ``corpus.jsonl``
    (``spec.json`` beside it, in a folder renamed into place when complete)."""
    import pyarrow.parquet as pq

    final = workdir / f"corpus-{count}-seed{seed}-files{parquet_files}"
    if (final / "spec.json").exists():
        return final / "corpus"
    workdir.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=workdir))
    data = temporary / "corpus"
    data.mkdir()
    started = time.perf_counter()
    vocabulary = Vocabulary.from_tokenizer()
    for name, start, documents in corpus_layout(count, parquet_files):
        if name.endswith(".parquet"):
            writer = None
            for first, rows in _chunks(start, documents):
                table = synthetic_documents(vocabulary, first, rows, seed)
                writer = writer or pq.ParquetWriter(data / name, table.schema)
                writer.write_table(table, row_group_size=ROW_GROUP)
            if writer is not None:
                writer.close()
        else:
            with open(data / name, "wb") as handle:
                for first, rows in _chunks(start, documents):
                    handle.write(_json_lines(synthetic_documents(vocabulary, first, rows, seed)))
    spec = {"documents": count, "seed": seed, "layout": corpus_layout(count, parquet_files), "generate_s": time.perf_counter() - started}
    (temporary / "spec.json").write_text(json.dumps(spec))
    _publish_folder(temporary, final)
    print(f"generated {count:,} documents in {spec['generate_s']:.1f} s: {final}", flush=True)
    return final / "corpus"


def generate_queries(workdir: Path, count: int, seed: int) -> Path:
    """The query log for (count, seed) as one Parquet file (row groups of 10,000), generated unless cached; written under
    a temporary name and renamed."""
    path = workdir / f"queries-{count}-seed{seed}.parquet"
    if not path.exists():
        import pyarrow.parquet as pq

        workdir.mkdir(parents=True, exist_ok=True)
        table = synthetic_queries(Vocabulary.from_tokenizer(), count, seed)
        temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
        pq.write_table(table, temporary, row_group_size=ROW_GROUP)
        os.replace(temporary, path)
    return path


def read_contents(corpus: Path, count: int) -> list[str]:
    """The first ``count`` documents' embedded text (title + " " + text, as the pipeline builds it), from the Parquet files then the JSON lines."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from pipelines.documents import CorpusConfig, document_content

    config = CorpusConfig()
    texts: list[str] = []
    for name, _, _ in json.loads((corpus.parent / "spec.json").read_text())["layout"]:
        if len(texts) >= count:
            break
        table = pq.read_table(corpus / name) if name.endswith(".parquet") else pj.read_json(corpus / name)
        table = table.slice(0, count - len(texts))
        texts.extend(document_content(title, text, config) for title, text in zip(table["title"].to_pylist(), table["text"].to_pylist()))
    return texts


# --------------------------------------------------------------------------- models


def model_paths(model: str, workdir: Path, seed: int = 0) -> tuple[str, str]:
    """(bi-encoder, cross-encoder) for ``tiny`` (built once under the workdir) or ``bundled``."""
    if model == "bundled":
        from bench.rerank import build_cross_encoder

        return "bundled", str(build_cross_encoder(seed=seed))
    from bench.tiny_models import build_tiny_bi_encoder, build_tiny_cross_encoder

    paths = []
    for kind, builder in (("bi-encoder", build_tiny_bi_encoder), ("cross-encoder", build_tiny_cross_encoder)):
        final = workdir / "models" / f"tiny-{kind}-seed{seed}"
        if not (final / "spec.json").exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
            builder(temporary, seed=seed)
            (temporary / "spec.json").write_text(json.dumps({"kind": kind, "seed": seed}))
            _publish_folder(temporary, final)
        paths.append(str(final / "model"))
    return paths[0], paths[1]


class PlainEncode:
    """What a user would write: ``SentenceTransformer(path).encode(texts, batch_size)``, in its own process.

    The texts are read when the process starts (untimed); each call encodes them all and returns the count.
    """

    def __init__(self, model: str, corpus: str, count: int, max_length: int, batch_size: int, device: str, precision: str):
        from pipelines.models import load_sentence_transformer

        self.texts = read_contents(Path(corpus), count)
        self.model = load_sentence_transformer(model, device, max_length or None)
        if precision == "fp16":
            self.model.half()
        self.batch_size = batch_size
        self.model.encode(self.texts[:64], batch_size=batch_size, show_progress_bar=False)  # warm-up

    def __call__(self, _payload: Any) -> int:
        self.model.encode(self.texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return len(self.texts)


# --------------------------------------------------------------------------- measurement


def folder_bytes(path: Path | str) -> int:
    """Bytes of the files under a folder (0 if it does not exist)."""
    return sum(file_sizes(path).values())


def file_sizes(folder: Path | str | None) -> dict[str, int]:
    """Size of every file under a folder, by path (empty if there is none)."""
    sizes: dict[str, int] = {}
    if folder is None:
        return sizes
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            try:
                sizes[path] = os.path.getsize(path)
            except OSError:  # deleted while walking (the object was restored or freed)
                continue
    return sizes


def is_ray_worker(role: str) -> bool:
    """Ray worker processes (tasks and actors) are titled ``ray::...`` once they run something."""
    return role.startswith("ray::") or role.endswith("default_worker.py")


@dataclass
class StageResult:
    """What one stage cost: time, throughput, memory peaks, spill and bytes written."""

    stage: str
    rows: int
    wall_s: float = 0.0
    rows_per_s: float = 0.0
    driver_peak_rss_bytes: int = 0
    worker_peak_rss_bytes: int = 0
    worker_peak_role: str = ""
    ray_tree_peak_rss_bytes: int = 0
    spilled_bytes: int = 0
    spill_folder_peak_bytes: int = 0
    bytes_written: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StageMonitor:
    """Samples this process (the driver) and its descendants (Ray's processes, started here) during a stage.

    ``with StageMonitor("build_index", rows, written=[folder]) as monitor: ...``, then ``monitor.result``.
    Memory is sampled every ``interval`` seconds (a peak shorter than that can be missed). Spilled
    bytes: the Ray object store's spill files (``object_spilling_directory``, set by :func:`start_ray`)
    that appeared during the stage, each at the largest size seen (Ray's own spill counters are read
    over gRPC, which a minimal Ray install lacks); a file created and deleted between two samples is
    missed. Bytes written: growth of the ``written`` folders.
    """

    def __init__(self, stage: str, rows: int, written: list[Path] = (), spill_folder: Path | None = None, interval: float = 0.2):
        self.result = StageResult(stage=stage, rows=rows)
        self.written = list(written)
        self.spill_folder = spill_folder
        self.interval = interval
        self._spill_files: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        root = psutil.Process()
        try:
            driver = root.memory_info().rss
            children = root.children(recursive=True)
        except psutil.Error:
            return
        total = driver
        result = self.result
        result.driver_peak_rss_bytes = max(result.driver_peak_rss_bytes, driver)
        for process in children:
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if rss > result.worker_peak_rss_bytes:
                role = _process_role(process)
                if is_ray_worker(role):
                    result.worker_peak_rss_bytes, result.worker_peak_role = rss, role
        result.ray_tree_peak_rss_bytes = max(result.ray_tree_peak_rss_bytes, total)
        spill = file_sizes(self.spill_folder)
        result.spill_folder_peak_bytes = max(result.spill_folder_peak_bytes, sum(spill.values()))
        for path, size in spill.items():
            if path not in self._spilled_before:
                self._spill_files[path] = max(size, self._spill_files.get(path, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._written_before = sum(folder_bytes(path) for path in self.written)
        self._spilled_before = file_sizes(self.spill_folder)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.result.wall_s = time.perf_counter() - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.result.rows_per_s = self.result.rows / self.result.wall_s if self.result.wall_s > 0 else 0.0
        self.result.spilled_bytes = sum(self._spill_files.values())
        self.result.bytes_written = sum(folder_bytes(path) for path in self.written) - self._written_before


def scaling_exponent(sizes: tuple[float, float], seconds: tuple[float, float]) -> float:
    """k in time = c * N^k through two points: log(t2 / t1) / log(N2 / N1).

    Example:
        >>> round(scaling_exponent((1e5, 1e6), (10.0, 100.0)), 6)
        1.0
    """
    (n1, n2), (t1, t2) = sizes, seconds
    if n1 <= 0 or n2 <= 0 or n1 == n2 or t1 <= 0 or t2 <= 0:
        raise ValueError(f"scaling exponent needs two different positive sizes and positive times, got {sizes}, {seconds}")
    return math.log(t2 / t1) / math.log(n2 / n1)


def start_ray(cpus: int, object_store_mib: int, spill_folder: Path) -> None:
    """A local Ray instance owned by this process (so its processes are this process's descendants), spilling into ``spill_folder``."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        raise RuntimeError("bench.scale starts its own local Ray instance; Ray is already initialized in this process")
    spill_folder.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
             object_store_memory=object_store_mib * MIB if object_store_mib else None, object_spilling_directory=str(spill_folder))
    DataContext.get_current().enable_progress_bars = False


# --------------------------------------------------------------------------- document stages


def run_size(arguments, docs: int, workdir: Path, models: tuple[str, str], queries_path: Path, spill: Path) -> dict[str, Any]:
    """The four stages at one corpus size; returns stage results and the jobs' summaries."""
    import pyarrow.parquet as pq

    from pipelines.embedding import EmbeddingConfig
    from pipelines.indexing import BuildIndexConfig, build_index
    from pipelines.reranking import RerankConfig
    from pipelines.retrieval import RetrieveRerankConfig, retrieve_and_rerank
    from pipelines.shard_search import SearchConfig

    bi_encoder, cross_encoder = models
    corpus = generate_corpus(workdir, docs, arguments.seed, arguments.parquet_files)
    run_folder = workdir / f"run-{docs}"
    shutil.rmtree(run_folder, ignore_errors=True)
    run_folder.mkdir(parents=True)
    stages: dict[str, StageResult] = {}

    # 0. The plain encode loop, in its own process (its model and texts stay out of the driver's memory).
    encode_count = min(arguments.encode_docs, docs)
    worker = VariantProcess("plain-encode", PlainEncode, bi_encoder, str(corpus), encode_count, arguments.max_length, arguments.batch_size,
                            arguments.device, arguments.precision, threads=arguments.cpus)
    try:
        call = worker.call("encode")
    finally:
        worker.close()
    stages["plain_encode"] = StageResult(stage="plain_encode", rows=call.value, wall_s=call.wall_s, rows_per_s=call.value / call.wall_s,
                                         driver_peak_rss_bytes=int(max(call.peak_process_rss_mib, worker.max_rss_mib) * MIB),
                                         extra={"process": "its own (spawned); driver_peak_rss_bytes is that process's"})
    print(f"  plain encode: {call.value:,} documents in {call.wall_s:.1f} s = {call.value / call.wall_s:,.0f} docs/s", flush=True)

    # 1. build_index.
    index_root = run_folder / "index"
    embedding = EmbeddingConfig(model=bi_encoder, precision=arguments.precision, device=arguments.device, max_seq_length=arguments.max_length,
                                batch_size=arguments.batch_size)
    build_config = BuildIndexConfig(corpus=str(corpus), index=str(index_root), embedding=embedding, sparse=arguments.sparse)
    with StageMonitor("build_index", docs, written=[run_folder], spill_folder=spill) as monitor:
        build_summary = build_index(build_config)
    stages["build_index"] = monitor.result
    pipeline_docs_per_s = float(build_summary["docs_per_second"])
    embedding_row = {"pipeline_docs_per_s": pipeline_docs_per_s, "plain_docs_per_s": stages["plain_encode"].rows_per_s,
                     "ratio": pipeline_docs_per_s / stages["plain_encode"].rows_per_s, "embedding_seconds": build_summary["embedding_seconds"]}
    monitor.result.extra = {"embedding_docs_per_s": pipeline_docs_per_s, "factory": build_summary["factory"], "shards": build_summary["shards"]}
    print(f"  build_index: {monitor.result.wall_s:.1f} s; embedding {pipeline_docs_per_s:,.0f} docs/s = {embedding_row['ratio']:.2f}x plain encode", flush=True)

    # 2. First stage only, over the whole query log.
    queries = pq.read_metadata(queries_path).num_rows
    first_output = run_folder / "first-stage"
    first_config = RetrieveRerankConfig(index=str(index_root), queries=str(queries_path), output=str(first_output), rerank=RerankConfig(model="none"))
    with StageMonitor("first_stage", queries, written=[first_output], spill_folder=spill) as monitor:
        first_summary = retrieve_and_rerank(first_config)
    stages["first_stage"] = monitor.result
    print(f"  first stage: {queries:,} queries in {monitor.result.wall_s:.1f} s = {monitor.result.rows_per_s:,.0f} queries/s", flush=True)

    # 2b. The dense half alone (hybrid index): what the BM25 half costs.
    if arguments.sparse:
        dense_output = run_folder / "first-stage-dense"
        dense_config = RetrieveRerankConfig(index=str(index_root), queries=str(queries_path), output=str(dense_output), rerank=RerankConfig(model="none"),
                                            search=SearchConfig(mode="dense"))
        with StageMonitor("first_stage_dense", queries, written=[dense_output], spill_folder=spill) as monitor:
            retrieve_and_rerank(dense_config)
        stages["first_stage_dense"] = monitor.result
        print(f"  first stage, dense only: {queries:,} queries in {monitor.result.wall_s:.1f} s = {monitor.result.rows_per_s:,.0f} queries/s", flush=True)

    # 3. Reranking on a subset of the queries.
    rerank_queries = min(arguments.rerank_queries, queries)
    subset = run_folder / f"queries-{rerank_queries}.parquet"
    pq.write_table(pq.read_table(queries_path).slice(0, rerank_queries), subset)
    rerank_output = run_folder / "rerank"
    rerank = RerankConfig(model=cross_encoder, depth=arguments.rerank_depth, precision=arguments.precision, device=arguments.device)
    rerank_config = RetrieveRerankConfig(index=str(index_root), queries=str(subset), output=str(rerank_output), rerank=rerank)
    with StageMonitor("rerank", rerank_queries, written=[rerank_output], spill_folder=spill) as monitor:
        rerank_summary = retrieve_and_rerank(rerank_config)
    stages["rerank"] = monitor.result
    monitor.result.extra = {"pairs": rerank_summary["pairs_reranked"], "pairs_per_s": rerank_summary["pairs_reranked"] / monitor.result.wall_s}
    print(f"  rerank: {rerank_queries:,} queries x {arguments.rerank_depth} in {monitor.result.wall_s:.1f} s = {monitor.result.extra['pairs_per_s']:,.0f} pairs/s", flush=True)

    # 4. Texts for reranking from the version's document store: random positions, in the reranker's batches.
    fetch = measure_text_fetch(str(index_root), docs, arguments.rerank_depth, arguments.seed)
    print(f"  text fetch: {fetch['texts']:,} random texts in batches of {fetch['batch']:,}: {fetch['texts_per_second']:,.0f} texts/s", flush=True)

    if not arguments.keep:
        shutil.rmtree(run_folder, ignore_errors=True)
    return {
        "docs": docs,
        "corpus": str(corpus),
        "stages": {name: result.__dict__ for name, result in stages.items()},
        "embedding": embedding_row,
        "text_fetch": fetch,
        "summaries": {"build_index": build_summary, "first_stage": first_summary, "rerank": rerank_summary},
    }


def measure_text_fetch(index_root: str, docs: int, depth: int, seed: int, texts: int = 200_000) -> dict[str, float]:
    """Texts/s the reranker's reader fetches from the document store, at random positions, in batches of
    ``depth`` x the queries of one reranker block (the query job's ``_rows_per_block``)."""
    import ray

    from pipelines import index_store
    from pipelines.document_store import DocumentStoreReader, fetch_rate

    manifest = index_store.read_manifest(index_root)
    doc_ids = index_store.load_doc_ids(index_root, manifest)
    reader = DocumentStoreReader(index_root, manifest, ray.put(doc_ids["text_hash"].combine_chunks()))
    positions = np.random.default_rng(seed).integers(0, docs, size=texts)
    return fetch_rate(reader, positions, depth * max(1, 2048 // depth))


# --------------------------------------------------------------------------- index only


def generate_vectors(workdir: Path, count: int, queries: np.ndarray, recall_queries: int, seed: int, clusters: int) -> tuple[Path, dict]:
    """V synthetic vectors as embedding-store parts under an index root, with the exact top-100 of the
    first ``recall_queries`` queries (faiss IndexFlatIP, chunk by chunk: timed, the flat baseline); cached."""
    import faiss
    import pyarrow as pa

    from bench.index import SyntheticSpec, SyntheticVectors
    from pipelines import storage
    from pipelines.embedding import EmbeddingConfig, EmbeddingStore, embeddings_to_arrow
    from pipelines.shard_search import (
        BLAS_QUERY_THRESHOLD,
        empty_candidates,
        merge_top_k,
    )

    root = workdir / f"vectors-{count}-seed{seed}-clusters{clusters}"
    spec_path = root / "spec.json"
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        if (spec["recall_queries"], spec.get("search_queries")) == (recall_queries, len(queries)):  # the queries' draw depends on how many
            return root, spec
    shutil.rmtree(root, ignore_errors=True)
    faiss.cvar.distance_compute_blas_threshold = BLAS_QUERY_THRESHOLD  # as ShardSearcher sets it: the flat baseline on BLAS too
    data = SyntheticVectors(SyntheticSpec(count=count, queries=len(queries), clusters=clusters, seed=seed))
    store = EmbeddingStore(str(root), EmbeddingConfig(model="synthetic"))
    sample = np.ascontiguousarray(queries[:recall_queries])
    positions, scores = empty_candidates(len(sample), TOP_K)
    generate_s = flat_s = 0.0
    for number, start in enumerate(range(0, count, VECTOR_CHUNK)):
        rows = min(VECTOR_CHUNK, count - start)
        started = time.perf_counter()
        vectors = data._draw(rows, [1, number])  # the chunks bench.index's base() draws
        part = pa.table({"id": numbered("v", start, rows), "text_hash": numbered("h", start, rows), "embedding": embeddings_to_arrow(vectors)})
        storage.write_parquet_atomically(storage.join_url(store.url, f"part-{number:05d}.parquet"), part)
        generate_s += time.perf_counter() - started
        started = time.perf_counter()
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        chunk_scores, chunk_ids = flat.search(sample, min(TOP_K, rows))
        positions, scores = merge_top_k(positions, scores, chunk_ids.astype(np.int64) + start, chunk_scores, TOP_K)
        flat_s += time.perf_counter() - started
        del vectors, part, flat
    np.save(root / "truth.npy", positions)
    spec = {"count": count, "seed": seed, "clusters": clusters, "dimension": int(queries.shape[1]), "recall_queries": recall_queries, "search_queries": len(queries),
            "generate_s": generate_s, "flat_search_s": flat_s, "flat_queries_per_s": recall_queries / flat_s,
            "flat_measured_at": datetime.datetime.now(datetime.UTC).isoformat(), "load_average": os.getloadavg()}
    storage.write_json_atomically(str(spec_path), spec)
    print(f"generated {count:,} vectors in {generate_s:.0f} s; exact top-{TOP_K} of {recall_queries} queries (flat) in {flat_s:.0f} s", flush=True)
    return root, spec


def run_index_only(arguments, workdir: Path, spill: Path) -> dict[str, Any]:
    """Build the index of ``--vectors`` stored synthetic vectors with the pipeline's index steps, then search it shard by shard."""
    import pyarrow as pa

    from bench.index import SyntheticSpec, SyntheticVectors, recall
    from pipelines import index_store
    from pipelines.embedding import EmbeddingConfig, EmbeddingStore, model_key
    from pipelines.index_building import (
        IndexConfig,
        build_shards,
        choose_index_parameters,
        locate_vectors,
    )

    count = arguments.vectors
    search_queries = max(arguments.index_queries, arguments.recall_queries)
    queries = SyntheticVectors(SyntheticSpec(count=count, queries=search_queries, clusters=arguments.clusters, seed=arguments.seed)).queries()
    root, spec = generate_vectors(workdir, count, queries, arguments.recall_queries, arguments.seed, arguments.clusters)
    truth = np.load(root / "truth.npy")
    dimension = spec["dimension"]
    clear_index(root)
    version_id = f"synthetic-{count}"
    folder = Path(index_store.version_url(str(root), version_id))

    embedding = EmbeddingConfig(model="synthetic")
    store = EmbeddingStore(str(root), embedding)
    with StageMonitor("index_build", count, written=[root], spill_folder=spill) as monitor:
        documents = pa.table({"position": pa.array(np.arange(count, dtype=np.int64)), "id": numbered("v", 0, count), "text_hash": numbered("h", 0, count)})
        located = locate_vectors(documents, store.keys())
        plan = choose_index_parameters(count, dimension, IndexConfig())
        print(f"index only: {count:,} vectors, {plan.factory}, {plan.shards} shard(s), nprobe {plan.nprobe}", flush=True)
        shards = build_shards(located, plan, dimension, str(folder), str(root))
        del located
        manifest = index_store.Manifest(
            version_id=version_id,
            created_at=datetime.datetime.now(datetime.UTC).isoformat(),
            code_version={"package": "bench.scale"},
            model={"model": "synthetic", "normalize": True, "max_seq_length": 0, "key": model_key(embedding), "dimension": dimension, "metric": "inner_product"},
            documents={},
            index={"factory": plan.factory, "nprobe": plan.nprobe, "training_sample": plan.training_sample, "seed": plan.seed, "trained_file": "trained.faiss"},
            shards=shards,
            counts={"documents_read": count, "quarantined": 0, "indexed": count},
            corpus={},
            embeddings={"url": store.url},
            quarantine={"count": 0},
        )
        manifest.write_version(str(root), documents, {"bench": "scale"}, publish_now=True)
        del documents
    build = monitor.result

    points = []
    for nprobe in [0] + [value for value in arguments.nprobes if plan.nprobe and value != plan.nprobe]:  # 0: the version's own (the rule's); none for Flat
        with StageMonitor("index_search", len(queries)) as search_monitor:
            positions, search_s, ram_bytes, rss_growth = search_shard_by_shard(str(root), version_id, shards, queries, nprobe, arguments.cpus)
        points.append({"nprobe": nprobe or plan.nprobe, "queries_per_s": len(queries) / search_s, "speedup_vs_flat": len(queries) / search_s / spec["flat_queries_per_s"],
                       "recall_at_100": recall(positions[: len(truth)], truth, TOP_K), "search_s": search_s, "stage": search_monitor.result.__dict__})
    search_s = points[0]["search_s"]
    queries_per_s = len(queries) / search_s
    result = {
        "vectors": count,
        "dimension": dimension,
        "factory": plan.factory,
        "nprobe": plan.nprobe,
        "shards": len(shards),
        "build": build.__dict__,
        "search_stage": points[0]["stage"],
        "build_s": build.wall_s,
        "disk_bytes_per_vector": version_bytes(root, folder, shards) / count,
        "embedding_store_bytes_per_vector": folder_bytes(store.url) / count,
        "ram_bytes_per_vector": ram_bytes / count,
        "rss_growth_bytes_per_vector": rss_growth / count,
        "queries": len(queries),
        "search_s": search_s,
        "queries_per_s": queries_per_s,
        "recall_at_100": points[0]["recall_at_100"],
        "recall_queries": len(truth),
        "operating_points": points,
        "flat_queries_per_s": spec["flat_queries_per_s"],
        "speedup_vs_flat": queries_per_s / spec["flat_queries_per_s"],
        "generate_s": spec["generate_s"],
    }
    print(f"  index only: build {build.wall_s:.0f} s, {result['ram_bytes_per_vector']:.0f} B/vector in RAM, {queries_per_s:,.0f} queries/s "
          f"({result['speedup_vs_flat']:.1f}x flat), recall@100 {result['recall_at_100']:.3f}", flush=True)
    if not arguments.keep:
        clear_index(root)
    return result


def search_shard_by_shard(root: str, version_id: str, shards: list[dict], queries: np.ndarray, nprobe: int, threads: int) -> tuple[np.ndarray, float, int, int]:
    """Every query through one shard in memory at a time, candidates merged across shards (``nprobe`` 0: the version's).

    Returns (positions, search seconds, RAM bytes of index plus re-scoring vectors, RSS growth on loading)."""
    import psutil

    from pipelines.shard_search import (
        SearchConfig,
        ShardSearcher,
        empty_candidates,
        merge_top_k,
    )

    config = SearchConfig(top_k=TOP_K, nprobe=nprobe)
    positions, scores = empty_candidates(len(queries), TOP_K)
    search_s = 0.0
    ram_bytes = rss_growth = 0
    process = psutil.Process()
    for shard in range(len(shards)):
        gc.collect()
        before = process.memory_info().rss
        searcher = ShardSearcher(root, version_id, shard, config, threads=threads)
        rss_growth += process.memory_info().rss - before
        vectors = getattr(searcher.shard, "vectors", None)
        ram_bytes += int(shards[shard]["bytes"]) + (int(vectors.nbytes) if vectors is not None else 0)
        for start in range(0, len(queries), config.queries_per_batch):
            batch = queries[start : start + config.queries_per_batch]
            started = time.perf_counter()
            new_positions, new_scores = searcher.search(batch)
            merged = merge_top_k(positions[start : start + len(batch)], scores[start : start + len(batch)], new_positions, new_scores, TOP_K)
            search_s += time.perf_counter() - started
            positions[start : start + len(batch)], scores[start : start + len(batch)] = merged
        del searcher, vectors
    return positions, search_s, ram_bytes, rss_growth


GENERATED = ("embeddings", "spec.json", "truth.npy")  # what generate_vectors caches under the index root


def clear_index(root: Path) -> None:
    """Remove everything an index build wrote under the root (versions, shared re-scoring vectors), keeping the generated vectors."""
    if root.exists():
        for child in root.iterdir():
            if child.name not in GENERATED:
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def version_bytes(root: Path, folder: Path, shards: list[dict]) -> int:
    """Bytes on disk of a version: its folder plus the re-scoring vector files its shards name (under the folder or the root)."""
    files = file_sizes(folder)
    for shard in shards:
        name = shard.get("vectors_file")
        for candidate in (folder / name, root / name) if name else ():
            if candidate.exists():
                files[str(candidate)] = candidate.stat().st_size
                break
    return sum(files.values())


# --------------------------------------------------------------------------- main


def pipeline_batch_size(device: str) -> int:
    """The embedding job's texts per forward pass on ``device`` when not set (``EmbeddingConfig.batch_size`` 0 = by device)."""
    from pipelines import embedding

    return embedding.EmbeddingConfig().batch_size or (embedding.GPU_BATCH_SIZE if device == "cuda" else embedding.CPU_BATCH_SIZE)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000, help="documents (one size)")
    parser.add_argument("--sizes", default="", help="comma-separated document counts, e.g. 100000,1000000 (overrides --docs); k between the smallest and largest")
    parser.add_argument("--queries", type=int, default=100_000, help="queries in the log (first stage)")
    parser.add_argument("--rerank-queries", type=int, default=2_000, help="queries reranked (the first ones of the log)")
    parser.add_argument("--rerank-depth", type=int, default=30)
    parser.add_argument("--encode-docs", type=int, default=200_000, help="documents of the plain encode loop (at most N)")
    parser.add_argument("--model", choices=("tiny", "bundled"), default="tiny", help="tiny random models (the pipeline is measured) or the bundled MiniLM")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="", help="fp32 on CPU, fp16 on CUDA by default")
    parser.add_argument("--batch-size", type=int, default=0, help="texts per forward pass, pipeline and plain loop alike (0 = the pipeline's default on the device)")
    parser.add_argument("--max-length", type=int, default=-1, help="tokens per text (default: the tiny model's own 64; 256 for bundled)")
    parser.add_argument("--sparse", choices=("on", "off"), default="on", help="build the BM25 part too (the job's default)")
    parser.add_argument("--parquet-files", type=int, default=4)
    parser.add_argument("--vectors", type=int, default=0, help="index-only run at this many synthetic vectors (0 = none; --index-only: 10,000,000)")
    parser.add_argument("--index-only", action="store_true", help="only the index-only run")
    parser.add_argument("--index-queries", type=int, default=10_000, help="queries searched in the index-only run")
    parser.add_argument("--recall-queries", type=int, default=1_000, help="of them, queries with exact ground truth (recall@100)")
    parser.add_argument("--nprobes", default="", help="index-only run: more nprobe values to search at besides the rule's, e.g. 64,96")
    parser.add_argument("--clusters", type=int, default=2_000, help="gaussian clusters of the synthetic vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=0, help="CPUs for Ray and the plain loop (0 = all)")
    parser.add_argument("--object-store-mib", type=int, default=0, help="Ray object store size (0 = Ray's default)")
    parser.add_argument("--workdir", default=str(RESULTS / "scale-work"), help="generated data (cached by size and seed) and the runs' folders")
    parser.add_argument("--keep", action="store_true", help="keep the indexes and outputs of the runs")
    parser.add_argument("--output", "--out", default=default_output())
    arguments = parser.parse_args(argv)
    arguments.sizes = sorted({int(size) for size in arguments.sizes.split(",") if size.strip()}) if arguments.sizes else [arguments.docs]
    if arguments.index_only:
        arguments.sizes = []
        arguments.vectors = arguments.vectors or 10_000_000
    arguments.precision = arguments.precision or ("fp16" if arguments.device == "cuda" else "fp32")
    if arguments.max_length < 0:
        arguments.max_length = 256 if arguments.model == "bundled" else 0
    arguments.sparse = arguments.sparse == "on"
    arguments.nprobes = [int(value) for value in arguments.nprobes.split(",") if value.strip()]
    arguments.batch_size = arguments.batch_size or pipeline_batch_size(arguments.device)
    arguments.cpus = arguments.cpus or physical_cores()
    if any(size < 10 for size in arguments.sizes) or arguments.queries < 1:
        parser.error("--docs/--sizes of at least 10 and --queries of at least 1")
    return arguments


STAGE_COLUMNS = [
    ("stage", "stage", ""),
    ("rows", "rows", ",d"),
    ("wall_s", "wall s", ".1f"),
    ("rows_per_s", "rows/s", ",.1f"),
    ("driver_peak_rss_mib", "driver peak RSS MiB", ",.0f"),
    ("worker_peak_rss_mib", "largest worker peak RSS MiB", ",.0f"),
    ("worker_peak_role", "largest worker", ""),
    ("spilled_mib", "spilled MiB", ",.1f"),
    ("written_mib", "written MiB", ",.1f"),
]


def stage_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, stage in run["stages"].items():
        rows.append({**stage, "stage": name, "driver_peak_rss_mib": stage["driver_peak_rss_bytes"] / MIB, "worker_peak_rss_mib": stage["worker_peak_rss_bytes"] / MIB or None,
                     "spilled_mib": stage["spilled_bytes"] / MIB, "written_mib": stage["bytes_written"] / MIB})
    return rows


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    workdir = Path(arguments.workdir)
    environment = environment_report(arguments.cpus)
    print(f"{environment['cpu']}, {environment['cores']} cores, load {environment['load_average_at_start']}; sizes {arguments.sizes}, "
          f"{arguments.queries:,} queries, model {arguments.model} on {arguments.device} ({arguments.precision})", flush=True)
    started = time.perf_counter()
    runs = []
    models, queries_path = ("", ""), Path()
    if arguments.sizes:
        models = model_paths(arguments.model, workdir, arguments.seed)
        queries_path = generate_queries(workdir, arguments.queries, arguments.seed)
        for docs in arguments.sizes:  # generated before Ray starts: the generator's memory is not charged to any stage
            generate_corpus(workdir, docs, arguments.seed, arguments.parquet_files)
    spill = workdir / f"ray-spill-{os.getpid()}"
    start_ray(arguments.cpus, arguments.object_store_mib, spill)
    try:
        for docs in arguments.sizes:
            print(f"--- {docs:,} documents", flush=True)
            runs.append(run_size(arguments, docs, workdir, models, queries_path, spill))
        index_only = run_index_only(arguments, workdir, spill) if arguments.vectors else None
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(spill, ignore_errors=True)

    scaling = {}
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        for stage in STAGES:
            if stage in small["stages"] and stage in large["stages"]:
                sizes = (small["docs"], large["docs"])
                scaling[stage] = scaling_exponent(sizes, (small["stages"][stage]["wall_s"], large["stages"][stage]["wall_s"]))
    tables = []
    for run in runs:
        embedding = run["embedding"]
        tables.append(format_table(stage_rows(run), STAGE_COLUMNS, title=(
            f"bench.scale: {run['docs']:,} documents, model {arguments.model} on {arguments.device} ({arguments.precision}); embedding stage "
            f"{embedding['pipeline_docs_per_s']:,.0f} docs/s = {embedding['ratio']:.2f}x plain encode ({embedding['plain_docs_per_s']:,.0f} docs/s)")))
    if scaling:
        tables.append(format_table([{"stage": stage, "k": k} for stage, k in scaling.items()], [("stage", "stage", ""), ("k", "k (time ∝ N^k)", ".2f")],
                                   title=f"scaling exponents between {runs[0]['docs']:,} and {runs[-1]['docs']:,} documents (query stages: same queries, larger index)"))
    if index_only:
        tables.append(format_table([index_only], [
            ("vectors", "vectors", ",d"), ("factory", "index", ""), ("shards", "shards", "d"), ("build_s", "build s", ".0f"),
            ("disk_bytes_per_vector", "disk B/vec", ".0f"), ("ram_bytes_per_vector", "RAM B/vec (index + re-scoring)", ".0f"),
            ("queries_per_s", "queries/s", ",.0f"), ("speedup_vs_flat", "x flat", ".1f"), ("recall_at_100", "recall@100", ".3f"),
        ], title=f"index only: {arguments.vectors:,} synthetic {index_only['dimension']}-d vectors; build driver peak RSS "
                 f"{index_only['build']['driver_peak_rss_bytes'] / GIB:.2f} GiB, largest worker {index_only['build']['worker_peak_rss_bytes'] / GIB:.2f} GiB"))
    if index_only and len(index_only["operating_points"]) > 1:
        tables.append(format_table(index_only["operating_points"], [
            ("nprobe", "nprobe", "d"), ("queries_per_s", "queries/s", ",.0f"), ("speedup_vs_flat", "x flat", ".1f"), ("recall_at_100", "recall@100", ".3f"),
        ], title="index only: operating points (the first is the rule's nprobe)"))
    table = "\n\n".join(tables)
    print()
    print(table)
    payload = {
        "benchmark": "scale",
        "arguments": vars(arguments),
        "environment": environment,
        "runs": runs,
        "scaling": scaling,
        "index_only": index_only,
        "wall_s": time.perf_counter() - started,
        "table": table,
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
