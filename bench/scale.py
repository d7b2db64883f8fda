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
``spilled_bytes_total``), and bytes written (the folders the stage wrote). Memory over time too: per
sample (seconds, driver RSS, largest worker RSS, tree RSS), at most 600 points a stage, in the JSON
and in ``<output stem>-memory-<docs>-<stage>.csv`` beside it, each process's RSS at those points in
``...-<stage>-processes.csv``, with a verdict on whether memory stays flat, judged process by process
(:func:`memory_flatness`, :func:`process_flatness`; a table for the first-stage stages). With two or more
``--sizes``, the scaling exponent k of each stage (wall time proportional to N^k) between the
smallest and the largest size.

Index only (``--vectors V``; ``--index-only`` skips the document stages): V synthetic 384-d vectors
shaped like MiniLM embeddings (``bench.index.SyntheticVectors``) written as embedding-store Parquet
parts (cached), then the index steps of ``build_index`` (``locate_vectors``, ``choose_index_parameters``,
``build_shards`` on Ray, the manifest) and a ``ShardSearcher`` per shard (loaded one at a time,
candidates merged with ``merge_top_k``): build time, bytes per vector on disk and in RAM (index plus
re-scoring data, each also apart; the build's memory budget, ``--index-memory-budget``, 400 B/vector by
default, decides the index code and the re-scoring code: float16 vectors or sq8 / sq6 codes), queries/s, recall@100 against exact search (faiss ``IndexFlatIP`` chunk by
chunk while the vectors are generated; its queries/s is the flat baseline).

    python -m bench.scale                                  # 100k documents, 100k queries
    python -m bench.scale --sizes 100000,1000000           # two sizes and the scaling exponents
    python -m bench.scale --index-only --vectors 10000000  # the index alone at 10M vectors
    python -m bench.scale --docs 200000 --model bundled --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
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
MEMORY_POINTS = 600  # most points a stage's memory series keeps (an hours-long stage still gives a small JSON and CSV)
MEMORY_COLUMNS = ("seconds", "driver_rss_mib", "largest_worker_rss_mib", "tree_rss_mib")
FLAT_GROWTH_RATIO, FLAT_GROWTH_MIB = 0.05, 100.0  # the tree rule (reported, not deciding): the tree's steady-state median grew under 5% and 100 MiB
# The per-process rule (process_flatness), which decides the verdict:
PROCESS_GROWTH_RATIO, PROCESS_GROWTH_MIB = 0.05, 100.0  # each persistent process: median grew under 5% and under 100 MiB
# ... where the 5% counts only from 16 MiB up: Ray's small daemons (raylet, gcs_server: 30-60 MiB) move by a few MiB as they
# record tasks, which is 5-15% of them (seen at 5k documents) and not what the rule looks for; a leak in our own processes
# grows by far more, and many small growths still add up against PERSISTENT_GROWTH_MIB.
PROCESS_GROWTH_FLOOR_MIB = 16.0
PERSISTENT_GROWTH_MIB = 100.0  # the persistent processes together: medians grew under 100 MiB in all
PROCESS_COUNT_ALLOWANCE = 1  # live processes: the last quarter's median count at most this many above the second quarter's
PERSISTENT_LAST_QUARTER_SHARE = 0.5  # a persistent process may end in the last quarter (Ray Data tears its actor pools down) if seen in half its samples
REASONS_SHOWN = 5  # a "growing" verdict names at most this many processes over the limit
PROCESS_COLUMNS = ("seconds", "pid", "name", "rss_mib", "create_time")  # the per-process CSV, one row per process and point
ProcessKey = tuple[int, float]  # (pid, create time): a process's identity; a reused pid is another process


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


def format_rate(queries_per_s: float | None) -> str:
    return "-" if queries_per_s is None else f"{queries_per_s:,.0f} queries/s"


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
    memory_series: dict[str, list[float]] = field(default_factory=dict)  # MEMORY_COLUMNS -> values (seconds since the start, MiB)
    memory_flatness: dict[str, Any] = field(default_factory=dict)  # memory_flatness(): per-process verdict, steady-state growth, slope
    steady_from_s: float | None = None  # query stages: memory_flatness covers the samples from here (the first search) on
    # Per point of memory_series: {(pid, create time): (name, RSS MiB)} of every process of the tree; the CSV beside, not the JSON.
    process_series: list[dict[ProcessKey, tuple[str, float]]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The fields for the JSON: all but ``process_series`` (written to its own CSV, :func:`write_process_csv`)."""
        return {name: value for name, value in self.__dict__.items() if name != "process_series"}


class MemorySeries:
    """A bounded series of samples, evenly spaced in time: every ``stride``-th sample is kept; when ``limit`` are held, every
    other one is dropped and the stride doubles. ``points()``: at most ``limit``, the latest sample always last. A point is any
    tuple (StageMonitor's: seconds, driver, largest worker and tree RSS, then the per-process snapshot)."""

    def __init__(self, limit: int = MEMORY_POINTS):
        if limit < 2:
            raise ValueError(f"a memory series keeps at least 2 points, got limit {limit}")
        self.limit = limit
        self.stride = 1
        self.samples = 0
        self._kept: list[tuple] = []
        self._latest: tuple | None = None

    def add(self, point: tuple) -> None:
        if self.samples % self.stride == 0:
            self._kept.append(point)
            if len(self._kept) >= self.limit:  # kept: samples 0, s, 2s, ...; now 0, 2s, 4s, ...
                del self._kept[1::2]
                self.stride *= 2
        self.samples += 1
        self._latest = point

    def points(self) -> list[tuple]:
        if self._latest is None:
            return []
        return list(self._kept) if self._kept[-1] is self._latest else [*self._kept, self._latest]


def quarters(seconds: Sequence[float]) -> np.ndarray | None:
    """Which quarter of the stage's time each sample falls in (0: start-up, 1: second, 2: third, 3: last; the last sample is
    in quarter 3), or ``None`` when the samples span no time (fewer than two, or all at one time)."""
    times = np.asarray(seconds, dtype=float)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return np.minimum(np.floor((times - times[0]) / (times[-1] - times[0]) * 4), 3).astype(int)


def steady_state_growth(seconds: Sequence[float], values: Sequence[float]) -> dict[str, float | None]:
    """How one memory series (MiB) moved once the stage was under way: the median over the second quarter of the run
    against the median over the last quarter (growth in MiB, ratio last / second), and the least-squares slope in MiB per
    minute over the second half. The first quarter is left out: it is start-up (Ray workers starting, models and index
    shards loading). A figure is ``None`` where its window holds no sample (a stage of one or two samples)."""
    times, series = np.asarray(seconds, dtype=float), np.asarray(values, dtype=float)
    if times.shape != series.shape or times.ndim != 1:
        raise ValueError(f"seconds and values must be 1-d and of one length, got shapes {times.shape} and {series.shape}")
    figures: dict[str, float | None] = dict.fromkeys(("second_quarter_median_mib", "last_quarter_median_mib", "growth_mib", "growth_ratio", "slope_mib_per_min"))
    quarter = quarters(times)
    if quarter is None:
        return figures
    second, last = series[quarter == 1], series[quarter == 3]
    if len(second) and len(last):
        before, after = float(np.median(second)), float(np.median(last))
        figures.update(second_quarter_median_mib=before, last_quarter_median_mib=after, growth_mib=after - before,
                       growth_ratio=after / before if before > 0 else None)
    half = quarter >= 2
    if np.unique(times[half]).size >= 2:
        figures["slope_mib_per_min"] = float(np.polyfit(times[half], series[half], 1)[0]) * 60
    return figures


def process_flatness(seconds: Sequence[float], processes: Sequence[Mapping[ProcessKey, tuple[str, float]]]) -> dict[str, Any]:
    """Whether memory stays flat, judged process by process: the verdict of :func:`memory_flatness`.

    ``processes[i]``: every process of the tree alive at sample ``i`` (taken at ``seconds[i]``), keyed by (pid, create time),
    so a pid reused by a new process is another process, with its name and RSS in MiB. Summing them gives the tree, which
    swings as Ray Data starts and ends task processes; a leak shows in a process that lives through the run, or as more and
    more processes.

    Rule. Quarters of the stage's time as :func:`quarters`; the first is start-up, left out. *Persistent* processes: present
    in every sample of the second and third quarters and in at least PERSISTENT_LAST_QUARTER_SHARE (half) of the last
    quarter's samples (the driver is one; an actor pool torn down as the stage ends still counts). Growth of one: its median
    RSS over the last quarter (the samples it is in) minus its median over the second quarter. ``flat`` when

    * each persistent process grew by under PROCESS_GROWTH_MIB (100 MiB), and by under PROCESS_GROWTH_RATIO (5%) unless it grew
      by under PROCESS_GROWTH_FLOOR_MIB (16 MiB),
    * the persistent processes' growths sum to under PERSISTENT_GROWTH_MIB (100 MiB), and
    * the median number of live processes over the last quarter is at most PROCESS_COUNT_ALLOWANCE (1) above the median
      over the second quarter (a leak of whole processes);

    ``growing`` otherwise (``reasons`` says which), ``too short`` when the second or the last quarter holds no sample. A
    drop is flat. MiB are rounded to 0.1, ratios to 0.001."""
    if len(processes) != len(seconds):
        raise ValueError(f"one process snapshot per sample: {len(seconds)} samples, {len(processes)} snapshots")
    figures: dict[str, Any] = {"verdict": "too short", "reasons": [], "persistent": None, "persistent_growth_mib": None, "largest_growth": None, "over_limit": None,
                               "second_quarter_median_count": None, "last_quarter_median_count": None}
    quarter = quarters(seconds)
    if quarter is None or not (quarter == 1).any() or not (quarter == 3).any():
        return figures
    second, through, last = np.flatnonzero(quarter == 1), np.flatnonzero((quarter == 1) | (quarter == 2)), np.flatnonzero(quarter == 3)
    keys = set(processes[through[0]]).intersection(*(processes[index] for index in through[1:]))
    growths = []  # (growth MiB, ratio or None, key, median before, median after), unrounded
    for key in keys:
        present = [index for index in last if key in processes[index]]
        if len(present) < PERSISTENT_LAST_QUARTER_SHARE * len(last):
            continue
        before = float(np.median([processes[index][key][1] for index in second]))
        after = float(np.median([processes[index][key][1] for index in present]))
        growths.append((after - before, after / before if before > 0 else None, key, before, after, processes[present[-1]][key][0]))
    growths.sort(key=lambda growth: (-growth[0], growth[2]))

    def described(growth: tuple) -> dict[str, Any]:
        mib, ratio, key, before, after, name = growth
        return {"name": name, "pid": key[0], "growth_mib": round(mib, 1), "growth_ratio": None if ratio is None else round(ratio, 3),
                "second_quarter_median_mib": round(before, 1), "last_quarter_median_mib": round(after, 1)}

    over = [described(growth) for growth in growths if growth[0] >= PROCESS_GROWTH_MIB
            or (growth[0] >= PROCESS_GROWTH_FLOOR_MIB and growth[1] is not None and growth[1] >= 1 + PROCESS_GROWTH_RATIO)]
    reasons = [f"{growth['name']} (pid {growth['pid']}) {growth['growth_mib']:+,.1f} MiB"
               + ("" if growth["growth_ratio"] is None else f" ({(growth['growth_ratio'] - 1) * 100:+.1f}%)") for growth in over[:REASONS_SHOWN]]
    if len(over) > REASONS_SHOWN:
        reasons.append(f"{len(over) - REASONS_SHOWN} more processes over the limit")
    total = sum(growth[0] for growth in growths)
    if total >= PERSISTENT_GROWTH_MIB:
        reasons.append(f"persistent processes together {total:+,.1f} MiB")
    counts = np.array([len(snapshot) for snapshot in processes])
    count_before, count_after = float(np.median(counts[second])), float(np.median(counts[last]))
    if count_after > count_before + PROCESS_COUNT_ALLOWANCE:
        reasons.append(f"live processes {count_before:g} -> {count_after:g}")
    figures.update(verdict="growing" if reasons else "flat", reasons=reasons, persistent=len(growths), persistent_growth_mib=round(total, 1),
                   largest_growth=described(growths[0]) if growths else None, over_limit=len(over),
                   second_quarter_median_count=count_before, last_quarter_median_count=count_after)
    return figures


PROCESS_RULE = (f"flat: each process present from the second quarter on grew (median RSS, last quarter vs second) under {PROCESS_GROWTH_MIB:.0f} MiB "
                f"and under {PROCESS_GROWTH_RATIO:.0%} (or under {PROCESS_GROWTH_FLOOR_MIB:.0f} MiB), together under {PERSISTENT_GROWTH_MIB:.0f} MiB, and the median count of live processes "
                f"grew by at most {PROCESS_COUNT_ALLOWANCE}")


def memory_flatness(series: dict[str, Sequence[float]], processes: Sequence[Mapping[ProcessKey, tuple[str, float]]]) -> dict[str, Any]:
    """The per-process verdict (:func:`process_flatness`, its figures under ``processes``), and as before the steady-state
    growth (:func:`steady_state_growth`) of the driver, the largest Ray worker and the whole tree.

    ``verdict``: the per-process rule's (``rule``). ``tree_verdict``: the former rule, reported but no longer deciding
    (``tree_rule``: ``flat`` when the tree's median grew by under 5% and under 100 MiB from the second quarter to the last;
    the tree swings as Ray Data starts and ends task processes). MiB are rounded to 0.1, ratios to 0.001, slopes to 0.01
    MiB/minute."""
    seconds = series.get("seconds", [])
    figures = {name: steady_state_growth(seconds, series.get(f"{name}_rss_mib", [])) for name in ("driver", "largest_worker", "tree")}
    tree = figures["tree"]
    if tree["growth_mib"] is None:
        tree_verdict = "too short"
    else:
        ratio = tree["growth_ratio"]
        tree_verdict = "flat" if tree["growth_mib"] < FLAT_GROWTH_MIB and (ratio is None or ratio < 1 + FLAT_GROWTH_RATIO) else "growing"
    digits = {"growth_ratio": 3, "slope_mib_per_min": 2}
    rounded = {name: {key: None if value is None else round(value, digits.get(key, 1)) for key, value in part.items()} for name, part in figures.items()}
    per_process = process_flatness(seconds, processes)
    return {**rounded, "samples": len(seconds), "verdict": per_process.pop("verdict"), "rule": PROCESS_RULE, "processes": per_process,
            "tree_verdict": tree_verdict,
            "tree_rule": f"flat: tree RSS median over the last quarter under {1 + FLAT_GROWTH_RATIO:.2f}x and under {FLAT_GROWTH_MIB:.0f} MiB above the second quarter's"}


def flatness_line(result: StageResult) -> str:
    """One line for the log: the per-process verdict and its figures, then the former tree figures (not deciding): steady-state
    growth of driver / largest worker / tree, the tree's slope, the tree rule's verdict."""
    flatness = result.memory_flatness
    if not flatness:
        return "memory: no samples"

    def growth(name: str) -> str:
        part = flatness[name]
        if part["growth_mib"] is None:
            return f"{name.replace('_', ' ')} -"
        ratio = f" ({(part['growth_ratio'] - 1) * 100:+.1f}%)" if part["growth_ratio"] is not None else ""
        return f"{name.replace('_', ' ')} {part['growth_mib']:+,.1f} MiB{ratio}"

    processes = flatness["processes"]
    if processes["persistent"] is None:
        per_process = "-"
    else:
        largest = processes["largest_growth"]
        largest_text = "-" if largest is None else f"{largest['name']} {largest['growth_mib']:+,.1f} MiB"
        per_process = (f"{processes['persistent']} persistent processes {processes['persistent_growth_mib']:+,.1f} MiB together, largest {largest_text}; "
                       f"live processes {processes['second_quarter_median_count']:g} -> {processes['last_quarter_median_count']:g}")
    reasons = f" ({'; '.join(processes['reasons'])})" if processes["reasons"] else ""
    slope = flatness["tree"]["slope_mib_per_min"]
    slope_text = f"{slope:+,.2f} MiB/min" if slope is not None else "-"
    window = "" if flatness.get("steady_from_s") is None else f" (steady state: from {flatness['steady_from_s']:.0f} s, the first search)"
    return (f"memory{window}, last vs second quarter, per process: {per_process}: {flatness['verdict']}{reasons}. "
            f"Tree rule, not deciding: {', '.join(growth(name) for name in ('driver', 'largest_worker', 'tree'))}; "
            f"tree slope over the second half {slope_text}: {flatness['tree_verdict']}")


def memory_csv_path(output: str | Path, docs: int, stage: str, processes: bool = False) -> Path:
    """Where a stage's memory series goes: beside the JSON, ``<its stem>-memory-<docs>-<stage>.csv`` (``scale-memory-...``);
    its per-process series (``processes``): ``<its stem>-memory-<docs>-<stage>-processes.csv``."""
    output = Path(output)
    return output.with_name(f"{output.stem}-memory-{docs}-{stage}{'-processes' if processes else ''}.csv")


def write_csv_atomically(path: str | Path, header: Sequence[str], rows) -> None:
    """A CSV (``header``, then ``rows``; quoted where a value needs it), written under a temporary name and renamed."""
    from pipelines import storage

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    storage.write_bytes_atomically(str(Path(path).resolve()), text.getvalue().encode())


def write_memory_csv(path: str | Path, series: dict[str, list[float]]) -> None:
    """The series as CSV (a header of MEMORY_COLUMNS, one row per point), written under a temporary name and renamed."""
    write_csv_atomically(path, MEMORY_COLUMNS, zip(*(series.get(name, []) for name in MEMORY_COLUMNS), strict=True))


def write_process_csv(path: str | Path, seconds: Sequence[float], processes: Sequence[Mapping[ProcessKey, tuple[str, float]]]) -> None:
    """The per-process series in long format (PROCESS_COLUMNS: seconds, pid, name, RSS MiB, create time; one row per process
    and point, by point then pid), written under a temporary name and renamed. pid and create time together name a process."""
    if len(processes) != len(seconds):
        raise ValueError(f"one process snapshot per sample: {len(seconds)} samples, {len(processes)} snapshots")
    write_csv_atomically(path, PROCESS_COLUMNS, ((round(second, 1), pid, name, round(rss, 1), round(created, 2))
                                                 for second, snapshot in zip(seconds, processes, strict=True)
                                                 for (pid, created), (name, rss) in sorted(snapshot.items())))


class StageMonitor:
    """Samples this process (the driver) and its descendants (Ray's processes, started here) during a stage.

    ``with StageMonitor("build_index", rows, written=[folder]) as monitor: ...``, then ``monitor.result``.
    Memory is sampled every ``interval`` seconds (a peak shorter than that can be missed); besides the
    peaks, each sample's (seconds since the start, driver RSS, largest Ray worker RSS, tree RSS, and the
    RSS of each process of the tree by (pid, create time) with its name: ``driver``, or the process title,
    ``ray::ShardGroupSearcher``, ``ray::IDLE``, ``raylet``) goes into a :class:`MemorySeries` of at most
    ``memory_points`` points, in ``result.memory_series`` and ``result.process_series`` (MiB) with
    its :func:`memory_flatness` in ``result.memory_flatness``: whether memory stays flat. Spilled
    bytes: the Ray object store's spill files (``object_spilling_directory``, set by :func:`start_ray`)
    that appeared during the stage, each at the largest size seen (Ray's own spill counters are read
    over gRPC, which a minimal Ray install lacks); a file created and deleted between two samples is
    missed. Bytes written: growth of the ``written`` folders.
    """

    def __init__(self, stage: str, rows: int, written: list[Path] = (), spill_folder: Path | None = None, interval: float = 0.2,
                 memory_points: int = MEMORY_POINTS):
        self.result = StageResult(stage=stage, rows=rows)
        self.written = list(written)
        self.spill_folder = spill_folder
        self.interval = interval
        self.memory = MemorySeries(memory_points)
        self._origin = time.perf_counter()
        self._spill_files: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        root = psutil.Process()
        try:
            driver = root.memory_info().rss
            snapshot = {(root.pid, root.create_time()): ("driver", driver)}  # (pid, create time) -> (name, RSS bytes)
            children = root.children(recursive=True)
        except psutil.Error:
            return
        total, largest_worker = driver, 0
        result = self.result
        result.driver_peak_rss_bytes = max(result.driver_peak_rss_bytes, driver)
        for process in children:
            try:
                rss = process.memory_info().rss
                key = (process.pid, process.create_time())
            except psutil.Error:
                continue
            if rss == 0:  # exited, not yet reaped (a zombie): no memory, not a live process
                continue
            role = sys.intern(_process_role(process))  # a Ray worker's title changes (ray::IDLE, then its task's): read each sample
            snapshot[key] = (role, rss)
            total += rss
            if is_ray_worker(role):
                largest_worker = max(largest_worker, rss)
                if rss > result.worker_peak_rss_bytes:
                    result.worker_peak_rss_bytes, result.worker_peak_role = rss, role
        result.ray_tree_peak_rss_bytes = max(result.ray_tree_peak_rss_bytes, total)
        self.memory.add((time.perf_counter() - self._origin, driver, largest_worker, total, snapshot))
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
        self._origin = time.perf_counter()
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
        points = self.memory.points()
        series = {name: [point[column] / (1 if column == 0 else MIB) for point in points] for column, name in enumerate(MEMORY_COLUMNS)}
        processes = [{key: (name, rss / MIB) for key, (name, rss) in point[len(MEMORY_COLUMNS)].items()} for point in points]
        self.result.memory_flatness = memory_flatness(series, processes)
        self.result.memory_series = {name: [round(value, 1) for value in values] for name, values in series.items()}
        self.result.process_series = processes


SEARCH_TITLE = "ray::ShardGroupSearcher.search"  # Ray's process title while a shard actor runs a search (pipelines.fan_out_search)


def search_window(result: StageResult) -> tuple[float, float] | None:
    """(first, last) second of the stage at which a shard actor was seen searching (its process title), or None.

    Every query of the stage is searched inside this window, so queries / its length is the search's steady rate, with
    the start-up (Ray workers, models and shards loading) before it and the ranking and writing of the last batches
    after it left out. Why not the output parts' times: the write tasks can wait for CPUs until late in the run and then
    drain a backlog (at 1M documents the first part came 70 s after the first search), which overstates the rate."""
    seconds = result.memory_series.get("seconds", [])
    searching = [second for second, snapshot in zip(seconds, result.process_series) if any(name.startswith(SEARCH_TITLE) for name, _ in snapshot.values())]
    return (searching[0], searching[-1]) if len(searching) >= 2 and searching[-1] > searching[0] else None


def judge_steady_state(result: StageResult) -> None:
    """A query stage's steady state is its :func:`search_window`: set its steady queries/s, and judge its memory
    (:func:`memory_flatness`) over the samples from the window's start to the end of the stage, so that loading shards
    and models is not read as growth (the quarters of the rule are then quarters of that span)."""
    window = search_window(result)
    if window is None:
        result.extra = {**result.extra, "steady_queries_per_s": None}
        return
    start, end = window
    result.steady_from_s = start
    result.extra = {**result.extra, "steady_queries_per_s": result.rows / (end - start), "search_window_s": [start, end]}
    kept = [index for index, second in enumerate(result.memory_series["seconds"]) if second >= start]
    series = {name: [values[index] for index in kept] for name, values in result.memory_series.items()}
    result.memory_flatness = {**memory_flatness(series, [result.process_series[index] for index in kept]), "steady_from_s": start}


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
    judge_steady_state(monitor.result)
    print(f"  first stage: {queries:,} queries in {monitor.result.wall_s:.1f} s = {monitor.result.rows_per_s:,.0f} queries/s; "
          f"steady state {format_rate(monitor.result.extra['steady_queries_per_s'])}", flush=True)
    print(f"    {flatness_line(monitor.result)}", flush=True)

    # 2b. The dense half alone (hybrid index): what the BM25 half costs.
    if arguments.sparse:
        dense_output = run_folder / "first-stage-dense"
        dense_config = RetrieveRerankConfig(index=str(index_root), queries=str(queries_path), output=str(dense_output), rerank=RerankConfig(model="none"),
                                            search=SearchConfig(mode="dense"))
        with StageMonitor("first_stage_dense", queries, written=[dense_output], spill_folder=spill) as monitor:
            retrieve_and_rerank(dense_config)
        stages["first_stage_dense"] = monitor.result
        judge_steady_state(monitor.result)
        print(f"  first stage, dense only: {queries:,} queries in {monitor.result.wall_s:.1f} s = {monitor.result.rows_per_s:,.0f} queries/s; "
              f"steady state {format_rate(monitor.result.extra['steady_queries_per_s'])}", flush=True)
        print(f"    {flatness_line(monitor.result)}", flush=True)

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

    memory_csv, process_csv = {}, {}
    for name, result in stages.items():
        if result.memory_series:  # not plain_encode: its process is not sampled here
            memory_csv[name] = str(memory_csv_path(arguments.output, docs, name))
            write_memory_csv(memory_csv[name], result.memory_series)
            process_csv[name] = str(memory_csv_path(arguments.output, docs, name, processes=True))
            write_process_csv(process_csv[name], result.memory_series["seconds"], result.process_series)

    if not arguments.keep:
        shutil.rmtree(run_folder, ignore_errors=True)
    return {
        "docs": docs,
        "corpus": str(corpus),
        "stages": {name: result.to_json() for name, result in stages.items()},
        "memory_csv": memory_csv,
        "process_memory_csv": process_csv,
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


INDEX_BYTES_PER_VECTOR_GOAL = 400  # issue 14: at most 400 B/vector in RAM for the index plus its re-scoring data (--index-memory-budget)


def run_index_only(arguments, workdir: Path, spill: Path) -> dict[str, Any]:
    """Build the index of ``--vectors`` stored synthetic vectors with the pipeline's index steps, then search it shard by shard.

    The build's memory budget is ``--index-memory-budget`` (400 B/vector by default): the index rule picks the
    (index code, re-scoring code) pair of best measured recall within it (``pipelines.index_building.rescoring_pairs``).
    """
    import pyarrow as pa

    from bench.index import SyntheticSpec, SyntheticVectors, recall
    from pipelines import index_building, index_store
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
        plan = choose_index_parameters(count, dimension, IndexConfig(memory_budget=str(arguments.index_memory_budget)))
        print(f"index only: {count:,} vectors, {plan.factory}, {plan.rescoring_code} re-scoring, {plan.shards} shard(s), nprobe {plan.nprobe} "
              f"(memory budget {arguments.index_memory_budget} B)", flush=True)
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
            positions, search_s, ram_bytes, rss_growth, rescoring_ram = search_shard_by_shard(str(root), version_id, shards, queries, nprobe, arguments.cpus)
        points.append({"nprobe": nprobe or plan.nprobe, "queries_per_s": len(queries) / search_s, "speedup_vs_flat": len(queries) / search_s / spec["flat_queries_per_s"],
                       "recall_at_100": recall(positions[: len(truth)], truth, TOP_K), "search_s": search_s, "stage": search_monitor.result.to_json()})
    search_s = points[0]["search_s"]
    queries_per_s = len(queries) / search_s
    result = {
        "vectors": count,
        "dimension": dimension,
        "factory": plan.factory,
        "rescoring_code": plan.rescoring_code,
        "memory_budget_bytes": index_building.parse_bytes(arguments.index_memory_budget),
        "nprobe": plan.nprobe,
        "shards": len(shards),
        "build": build.to_json(),
        "search_stage": points[0]["stage"],
        "build_s": build.wall_s,
        "disk_bytes_per_vector": version_bytes(root, folder, shards) / count,
        "disk_index_bytes_per_vector": sum(int(shard["bytes"]) for shard in shards) / count,
        "disk_rescoring_bytes_per_vector": sum(int(shard["vectors_bytes"]) for shard in shards) / count,
        "embedding_store_bytes_per_vector": folder_bytes(store.url) / count,
        "ram_bytes_per_vector": ram_bytes / count,
        "ram_index_bytes_per_vector": (ram_bytes - rescoring_ram) / count,
        "ram_rescoring_bytes_per_vector": rescoring_ram / count,
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
    print(f"  index only: build {build.wall_s:.0f} s, {result['ram_bytes_per_vector']:.0f} B/vector in RAM ({result['ram_index_bytes_per_vector']:.0f} index + "
          f"{result['ram_rescoring_bytes_per_vector']:.0f} {plan.rescoring_code} re-scoring), {queries_per_s:,.0f} queries/s "
          f"({result['speedup_vs_flat']:.1f}x flat), recall@100 {result['recall_at_100']:.3f}", flush=True)
    if not arguments.keep:
        clear_index(root)
    return result


def search_shard_by_shard(root: str, version_id: str, shards: list[dict], queries: np.ndarray, nprobe: int, threads: int) -> tuple[np.ndarray, float, int, int, int]:
    """Every query through one shard in memory at a time, candidates merged across shards (``nprobe`` 0: the version's).

    Returns (positions, search seconds, RAM bytes of index plus re-scoring data, RSS growth on loading, RAM bytes of
    the re-scoring data alone: float16 vectors or sq8 / sq6 codes, plus their quantizer)."""
    import psutil

    from pipelines import index_store
    from pipelines.shard_search import (
        SearchConfig,
        ShardSearcher,
        empty_candidates,
        merge_top_k,
    )

    config = SearchConfig(top_k=TOP_K, nprobe=nprobe)
    positions, scores = empty_candidates(len(queries), TOP_K)
    search_s = 0.0
    ram_bytes = rss_growth = rescoring_ram = 0
    process = psutil.Process()
    for shard in range(len(shards)):
        gc.collect()
        before = process.memory_info().rss
        searcher = ShardSearcher(root, version_id, shard, config, threads=threads)
        rss_growth += process.memory_info().rss - before
        vectors = getattr(searcher.shard, "vectors", None)
        codec = getattr(searcher.shard, "codec", None)  # sq8 / sq6 codes: the trained quantizer that decodes them (a few kB)
        rescoring = (int(vectors.nbytes) if vectors is not None else 0) + (len(index_store.serialize_index(codec)) if codec is not None else 0)
        ram_bytes += int(shards[shard]["bytes"]) + rescoring
        rescoring_ram += rescoring
        for start in range(0, len(queries), config.queries_per_batch):
            batch = queries[start : start + config.queries_per_batch]
            started = time.perf_counter()
            new_positions, new_scores = searcher.search(batch)
            merged = merge_top_k(positions[start : start + len(batch)], scores[start : start + len(batch)], new_positions, new_scores, TOP_K)
            search_s += time.perf_counter() - started
            positions[start : start + len(batch)], scores[start : start + len(batch)] = merged
        del searcher, vectors, codec
    return positions, search_s, ram_bytes, rss_growth, rescoring_ram


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
    parser.add_argument("--index-memory-budget", default="", help="index-only run: the build's --faiss.memory-budget for the index plus its re-scoring data "
                        "(default: 400 B x --vectors, issue 14's goal of at most 400 B/vector in RAM; 0 = no limit: float16 re-scoring)")
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
    arguments.index_memory_budget = arguments.index_memory_budget or str(INDEX_BYTES_PER_VECTOR_GOAL * arguments.vectors)
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
    ("steady_rows_per_s", "steady rows/s", ",.0f"),
    ("driver_peak_rss_mib", "driver peak RSS MiB", ",.0f"),
    ("worker_peak_rss_mib", "largest worker peak RSS MiB", ",.0f"),
    ("worker_peak_role", "largest worker", ""),
    ("spilled_mib", "spilled MiB", ",.1f"),
    ("written_mib", "written MiB", ",.1f"),
]


MEMORY_TABLE_STAGES = ("first_stage", "first_stage_dense")  # issue 14: the query job's memory stays flat over the run
FLATNESS_COLUMNS = [
    ("docs", "docs", ",d"),
    ("stage", "stage", ""),
    ("samples", "samples", ",d"),
    ("steady_from_s", "steady from s", ",.0f"),
    ("persistent", "persistent processes", ",d"),
    ("persistent_growth_mib", "their growth MiB", "+,.1f"),
    ("largest_process_growth", "largest process growth", ""),
    ("process_counts", "live processes", ""),
    ("verdict", "memory (per process)", ""),
    ("driver_growth_mib", "driver growth MiB", "+,.1f"),
    ("worker_growth_mib", "largest worker growth MiB", "+,.1f"),
    ("tree_growth_mib", "tree growth MiB", "+,.1f"),
    ("tree_growth_percent", "tree growth %", "+.1f"),
    ("tree_slope_mib_per_min", "tree slope MiB/min", "+,.2f"),
    ("tree_verdict", "tree rule (not deciding)", ""),
]


def flatness_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and first-stage stage (MEMORY_TABLE_STAGES): the per-process verdict and figures of its memory_flatness,
    then the former tree figures."""
    rows = []
    for run in runs:
        for name in MEMORY_TABLE_STAGES:
            flatness = run["stages"].get(name, {}).get("memory_flatness")
            if not flatness:
                continue
            ratio, processes = flatness["tree"]["growth_ratio"], flatness["processes"]
            largest, counts = processes["largest_growth"], (processes["second_quarter_median_count"], processes["last_quarter_median_count"])
            rows.append({"docs": run["docs"], "stage": name, "samples": flatness["samples"], "steady_from_s": flatness.get("steady_from_s"),
                         "verdict": flatness["verdict"], "tree_verdict": flatness["tree_verdict"],
                         "persistent": processes["persistent"], "persistent_growth_mib": processes["persistent_growth_mib"],
                         "largest_process_growth": None if largest is None else f"{largest['name']} {largest['growth_mib']:+,.1f}",
                         "process_counts": None if counts[0] is None else f"{counts[0]:g} -> {counts[1]:g}",
                         "driver_growth_mib": flatness["driver"]["growth_mib"], "worker_growth_mib": flatness["largest_worker"]["growth_mib"],
                         "tree_growth_mib": flatness["tree"]["growth_mib"], "tree_growth_percent": None if ratio is None else (ratio - 1) * 100,
                         "tree_slope_mib_per_min": flatness["tree"]["slope_mib_per_min"]})
    return rows


def stage_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, stage in run["stages"].items():
        rows.append({**stage, "stage": name, "steady_rows_per_s": stage["extra"].get("steady_queries_per_s"), "driver_peak_rss_mib": stage["driver_peak_rss_bytes"] / MIB, "worker_peak_rss_mib": stage["worker_peak_rss_bytes"] / MIB or None,
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
    memory_rows = flatness_rows(runs)
    if memory_rows:
        tables.append(format_table(memory_rows, FLATNESS_COLUMNS, title=(
            "memory over the first stage, steady state: median RSS over the last quarter of the run minus over the second quarter, "
            f"least-squares slope over the second half; {PROCESS_RULE}; the driver / largest worker / tree figures and the tree rule "
            f"(under {FLAT_GROWTH_RATIO:.0%} and {FLAT_GROWTH_MIB:.0f} MiB) no longer decide "
            f"(series: {memory_csv_path(arguments.output, runs[0]['docs'], 'first_stage').name}, -processes.csv and beside them)")))
    if scaling:
        tables.append(format_table([{"stage": stage, "k": k} for stage, k in scaling.items()], [("stage", "stage", ""), ("k", "k (time ∝ N^k)", ".2f")],
                                   title=f"scaling exponents between {runs[0]['docs']:,} and {runs[-1]['docs']:,} documents (query stages: same queries, larger index)"))
    if index_only:
        tables.append(format_table([index_only], [
            ("vectors", "vectors", ",d"), ("factory", "index", ""), ("rescoring_code", "re-scoring", ""), ("shards", "shards", "d"), ("build_s", "build s", ".0f"),
            ("disk_bytes_per_vector", "disk B/vec", ".0f"), ("disk_index_bytes_per_vector", "disk index", ".0f"), ("disk_rescoring_bytes_per_vector", "disk re-scoring", ".0f"),
            ("ram_bytes_per_vector", "RAM B/vec (index + re-scoring)", ".0f"), ("ram_index_bytes_per_vector", "RAM index", ".0f"),
            ("ram_rescoring_bytes_per_vector", "RAM re-scoring", ".0f"),
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
