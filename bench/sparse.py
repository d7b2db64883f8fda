"""The lexical (BM25) index against the dense one on a BEIR corpus: build docs/s, queries/s, bytes per document, quality.

BM25 is the pipeline's own code (:mod:`pipelines.sparse_index`, :mod:`pipelines.sparse_search`), run in
this process as the index build and a searcher's start run it:

- build: ``Tokenizer`` (bm25s: lowercase, stopwords, Snowball stemmer), ``TermCounts.from_tokens``,
  the shard file (``TermCounts.to_bytes``), the global statistics (each shard file read back, its
  document frequencies, ``GlobalStatistics.merge``, ``to_bytes``) and a searcher's start (shard file
  and statistics read back, ``SparseShardSearcher.from_counts``: the BM25 scoring matrix);
- search: ``SparseShardSearcher.search`` over the split's queries in batches of 256, top-100; with
  ``--shards`` shards, the searchers chained on each batch as the query job chains them (each merges
  its candidates into the running top-100). The sharded top-100 must equal the one-shard top-100,
  positions and scores (the JSON's ``checks``);
- baseline: plain bm25s as a user would write it (``bm25s.tokenize`` + ``BM25.index``, ``BM25.retrieve``),
  same settings; its scores must equal the pipeline's.

Dense: the bundled MiniLM's vectors of the same documents (``--encoder``: int8 = the pipeline's CPU
default, the OpenVINO model ``bench.backends`` quantizes as ``bench.embed`` does; or bf16 / fp32,
``pipelines.embedding.TextEncoder``), cached in a .npy file (``--embeddings``); a ``Flat`` faiss index
(``make_empty_index("Flat")``, ids included) searched by ``pipelines.shard_search.ShardSearcher``.
Hybrid: dense search + BM25 search + ``pipelines.hybrid_fusion.fuse_lists`` (weighted, dense weight
0.5) per query; its cost over the dense search's is the "x dense" column. Query encoding is timed
too, since every dense or hybrid query pays it.

Every measurement runs ``--repeats`` times, the cases in rotated order (background load falls on
all alike); figures are medians; queries/CPU-s and docs/CPU-s are the measures background load
disturbs least. Quality: nDCG@10 and recall@100 (ir_measures) over the split's judged queries (a
query without results counts 0).

``--pyserini``: Lucene BM25 through Pyserini, installed apart from the project's packages (it
needs a JVM, and its own requirements would replace the project's torch):

    pip install --no-deps --target /root/wd/pyserini-site pyserini==0.22.1 pyjnius onnxruntime   # Java 11+

The same document texts are written as a JsonCollection and indexed by ``python -m pyserini.index.lucene``
(``--threads`` 1 and all cores, one file per thread); docs/s are given from Anserini's own log
(indexing only), for the whole run, and for the run less its fixed cost (Python, JVM start, measured
on 8 documents). ``LuceneSearcher.batch_search`` (threads 1 and all cores, after 3,000 untimed
queries for the JIT), top-100, at Lucene's defaults (k1 0.9, b 0.4) and at bm25s's (k1 1.5, b 0.75).
Each site runs on a JDK that can read its Anserini jar's classes (the default ``java`` when it can,
else the newest under /usr/lib/jvm; ``SITE@JAVA_HOME`` to choose). A site that cannot run is
reported (``skipped:`` and the reason) and the rest goes on.

    python -m bench.sparse --quick                          # 600 SciFact docs, 2 repeats
    python -m bench.sparse                                  # all 5,183 SciFact docs, 5 repeats
    python -m bench.sparse --dataset ../shared/datasets/nfcorpus --split dev
    python -m bench.sparse --pyserini /root/wd/pyserini-site
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    CACHE,
    RESULTS,
    SCIFACT,
    VariantProcess,
    environment_report,
    file_digest,
    format_table,
    load_scifact,
    median,
    physical_cores,
    prepare_environment,
    rotated,
    set_threads,
    write_results,
)

TOP_K = 100
BATCH = 256
STEPS = ("tokenize", "term_counts", "shard_file", "statistics", "searcher_start")
DEFAULT_PYSERINI_SITE = os.environ.get("BENCH_PYSERINI", "/root/wd/pyserini-site")
LUCENE_SETTINGS = "0.9:0.4,1.5:0.75"
LUCENE_WARM_UP_QUERIES = 3000  # untimed queries per setting before Lucene search is timed
JVM_FOLDER = Path("/usr/lib/jvm")


# --------------------------------------------------------------------------- data


def document_subset(qrels: dict[str, dict[str, int]], doc_ids: Sequence[str], count: int, seed: int = 0) -> list[int]:
    """All positions (``count`` 0 or at least the corpus), or the judged-relevant documents plus a seeded sample, sorted."""
    if not count or count >= len(doc_ids):
        return list(range(len(doc_ids)))
    relevant = {doc_id for judged in qrels.values() for doc_id, score in judged.items() if score > 0}
    chosen = [position for position, doc_id in enumerate(doc_ids) if doc_id in relevant]
    others = [position for position, doc_id in enumerate(doc_ids) if doc_id not in relevant]
    extra = max(0, count - len(chosen))
    sample = np.random.default_rng(seed).choice(len(others), size=min(extra, len(others)), replace=False)
    return sorted(chosen + [others[i] for i in sample])


def quality(qrels: dict[str, dict[str, int]], query_ids: Sequence[str], rankings: Sequence[Sequence[str]], depth: int = TOP_K) -> dict[str, float]:
    """nDCG@10 and recall@100 (ir_measures) of one ranking (doc ids, best first) per query, averaged over every
    query in ``query_ids`` (one with no results counts 0, as in ``pipelines.evaluation``)."""
    import ir_measures

    measures = {"ndcg@10": ir_measures.nDCG @ 10, "recall@100": ir_measures.R @ 100}
    names = {measure: name for name, measure in measures.items()}
    run = {query_id: {doc_id: float(-rank) for rank, doc_id in enumerate(ranking[:depth])} for query_id, ranking in zip(query_ids, rankings) if len(ranking)}
    totals = dict.fromkeys(measures, 0.0)
    if run:
        for metric in ir_measures.iter_calc(list(measures.values()), {query_id: qrels[query_id] for query_id in query_ids}, run):
            totals[names[metric.measure]] += metric.value
    return {name: total / max(1, len(query_ids)) for name, total in totals.items()}


def position_rankings(positions: np.ndarray | Sequence[np.ndarray], doc_ids: Sequence[str]) -> list[list[str]]:
    """Doc ids per query from rows of positions (padding -1 dropped)."""
    return [[doc_ids[int(position)] for position in row if position >= 0] for row in positions]


# --------------------------------------------------------------------------- BM25 (the pipeline's code)


@dataclass
class SparseIndex:
    """A BM25 index built in memory as the index build does, and its searchers started as the query job starts them."""

    ranges: list[tuple[int, int]]
    files: list[bytes]  # shard files (TermCounts.to_bytes)
    statistics_file: bytes  # GlobalStatistics.to_bytes
    searchers: list
    steps: dict[str, float]  # wall seconds per step (STEPS)
    cpu_s: float

    @property
    def seconds(self) -> float:
        return float(sum(self.steps.values()))

    @property
    def bytes(self) -> int:
        return sum(len(data) for data in self.files) + len(self.statistics_file)


def build_sparse(texts: Sequence[str], config, shards: int = 1, top_k: int = TOP_K) -> SparseIndex:
    """Tokenize, count terms, write shard files, merge global statistics, start one ``SparseShardSearcher`` per shard."""
    from pipelines.index_building import shard_ranges
    from pipelines.shard_search import SearchConfig
    from pipelines.sparse_index import GlobalStatistics, TermCounts, Tokenizer
    from pipelines.sparse_search import SparseShardSearcher

    steps = dict.fromkeys(STEPS, 0.0)
    cpu_started = time.process_time()
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps[step] += now - clock
        clock = now

    ranges = shard_ranges(len(texts), shards)
    tokenize = Tokenizer(config)
    files = []
    for start, end in ranges:
        tokens = tokenize(list(texts[start:end]))
        lap("tokenize")
        counts = TermCounts.from_tokens(tokens)
        lap("term_counts")
        files.append(counts.to_bytes())
        lap("shard_file")
    per_shard = []
    for data in files:  # as sparse_index.shard_statistics reads each stored shard
        counts = TermCounts.from_bytes(data)
        per_shard.append((counts.terms, counts.document_frequencies(), counts.documents, int(counts.lengths.sum())))
    statistics_file = GlobalStatistics.merge(per_shard).to_bytes()
    lap("statistics")
    searchers = [
        SparseShardSearcher.from_counts(TermCounts.from_bytes(data), GlobalStatistics.from_bytes(statistics_file), config, start, SearchConfig(top_k=top_k))
        for (start, _), data in zip(ranges, files)
    ]
    lap("searcher_start")
    return SparseIndex(ranges, files, statistics_file, searchers, steps, time.process_time() - cpu_started)


def sparse_search(searchers: Sequence, texts: Sequence[str], batch: int = BATCH, top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (positions, scores) of every query: one searcher's ``search``, or the searchers chained per batch as the query job chains them."""
    positions, scores = [np.zeros((0, top_k), np.int64)], [np.zeros((0, top_k), np.float32)]
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        if len(searchers) == 1:
            found, values = searchers[0].search(chunk)
        else:
            rows: dict[str, Any] = {"query_text": np.asarray(chunk, dtype=object)}
            for searcher in searchers:
                rows = searcher(rows)
            found, values = rows["sparse_positions"], rows["sparse_scores"]
        positions.append(found)
        scores.append(values)
    return np.concatenate(positions), np.concatenate(scores)


def compare_top_k(positions: np.ndarray, scores: np.ndarray, other_positions: np.ndarray, other_scores: np.ndarray) -> dict[str, Any]:
    """Whether two top-k lists per query are identical (positions and scores, row by row), and if not, whether they
    differ only in which of the documents tied at the list's lowest score made the cut."""
    if positions.shape != other_positions.shape:
        return {"equal": False, "equal_apart_from_ties_at_cutoff": False, "queries": len(positions), "queries_differing": len(positions),
                "queries_differing_beyond_ties": len(positions), "max_score_difference": None}
    finite, other_finite = np.isfinite(scores), np.isfinite(other_scores)
    both = finite & other_finite
    difference = np.abs(np.where(both, scores, 0.0).astype(np.float64) - np.where(both, other_scores, 0.0).astype(np.float64))
    differing = np.flatnonzero((positions != other_positions).any(axis=1))
    beyond_ties = 0
    for row in differing:
        ranks = np.flatnonzero(positions[row] != other_positions[row])
        lowest = scores[row][finite[row]].min() if finite[row].any() else -np.inf
        if not (np.array_equal(scores[row], other_scores[row]) and np.all(scores[row, ranks] == lowest)):
            beyond_ties += 1
    return {
        "equal": bool(np.array_equal(positions, other_positions) and np.array_equal(scores, other_scores)),
        "equal_apart_from_ties_at_cutoff": bool(np.array_equal(scores, other_scores) and beyond_ties == 0),
        "queries": len(positions),
        "queries_differing": len(differing),
        "queries_differing_beyond_ties": beyond_ties,
        "max_score_difference": float(difference.max(initial=0.0)),
    }


class PlainBm25s:
    """bm25s as a user would write it (the baseline): ``bm25s.tokenize`` + ``BM25.index``; ``BM25.retrieve`` (one thread)."""

    def __init__(self, texts: Sequence[str], config):
        import bm25s

        self.config = config
        self.stemmer = None
        if config.stemmer != "none":
            import Stemmer

            self.stemmer = Stemmer.Stemmer(config.stemmer)
        self.stopwords = None if config.stopwords == "none" else config.stopwords
        self.model = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
        self.model.index(bm25s.tokenize(list(texts), lower=True, stopwords=self.stopwords, stemmer=self.stemmer, show_progress=False), show_progress=False)
        self.documents = len(texts)

    def search(self, texts: Sequence[str], batch: int = BATCH, top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores) like the pipeline's: a document scoring 0 is no candidate (-1 / -inf)."""
        import bm25s

        positions, scores = [np.zeros((0, top_k), np.int64)], [np.zeros((0, top_k), np.float32)]
        k = min(top_k, self.documents)
        for start in range(0, len(texts), batch):
            tokens = bm25s.tokenize(list(texts[start : start + batch]), lower=True, stopwords=self.stopwords, stemmer=self.stemmer, return_ids=False, show_progress=False)
            found, values = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
            found, values = np.asarray(found, dtype=np.int64), np.asarray(values, dtype=np.float32)
            keep = values > 0
            found = np.where(keep, found, -1)
            values = np.where(keep, values, -np.inf).astype(np.float32)
            if k < top_k:
                found = np.pad(found, ((0, 0), (0, top_k - k)), constant_values=-1)
                values = np.pad(values, ((0, 0), (0, top_k - k)), constant_values=-np.inf)
            positions.append(found)
            scores.append(values)
        return np.concatenate(positions), np.concatenate(scores)


def compare_with_plain(positions: np.ndarray, scores: np.ndarray, plain_positions: np.ndarray, plain_scores: np.ndarray) -> dict[str, Any]:
    """The pipeline's BM25 top-k against plain bm25s's: same scores (sorted), same documents; identical order apart from ties."""
    sorted_scores = -np.sort(-np.where(np.isfinite(scores), scores, -np.inf), axis=1)
    sorted_plain = -np.sort(-np.where(np.isfinite(plain_scores), plain_scores, -np.inf), axis=1)
    both = np.isfinite(sorted_scores) & np.isfinite(sorted_plain)
    same_count = np.isfinite(sorted_scores).sum(1) == np.isfinite(sorted_plain).sum(1)
    difference = np.abs(np.where(both, sorted_scores, 0.0).astype(np.float64) - np.where(both, sorted_plain, 0.0).astype(np.float64))
    same_documents = [set(row[row >= 0].tolist()) == set(other[other >= 0].tolist()) for row, other in zip(positions, plain_positions)]
    return {
        "queries": len(positions),
        "scores_equal": bool(same_count.all() and difference.max(initial=0.0) == 0.0),
        "max_score_difference": float(difference.max(initial=0.0)),
        "queries_same_documents": int(np.sum(same_documents)),
        "queries_same_order": int(sum(np.array_equal(row, other) for row, other in zip(positions, plain_positions))),
    }


# --------------------------------------------------------------------------- dense


def build_flat(vectors: np.ndarray):
    """``make_empty_index("Flat")`` (an IndexIDMap2 over IndexFlatIP) filled with ids 0..n-1, as ``fill_shard`` fills a shard."""
    from pipelines.index_building import make_empty_index

    index = make_empty_index("Flat", vectors.shape[1])
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.arange(len(vectors), dtype=np.int64))
    return index


def dense_searcher(index, threads: int, top_k: int = TOP_K):
    from pipelines.index_store import IndexShard
    from pipelines.shard_search import SearchConfig, ShardSearcher

    return ShardSearcher.from_shard(IndexShard(number=0, index=index, first_position=0, vectors=None), SearchConfig(top_k=top_k), threads=threads)


def dense_search(searcher, queries: np.ndarray, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    top_k = searcher.config.top_k
    positions, scores = [np.zeros((0, top_k), np.int64)], [np.zeros((0, top_k), np.float32)]
    for start in range(0, len(queries), batch):
        found, values = searcher.search(queries[start : start + batch])
        if found.shape[1] < top_k:  # fewer documents than k
            found = np.pad(found, ((0, 0), (0, top_k - found.shape[1])), constant_values=-1)
            values = np.pad(values, ((0, 0), (0, top_k - values.shape[1])), constant_values=-np.inf)
        positions.append(found)
        scores.append(values)
    return np.concatenate(positions), np.concatenate(scores)


def fuse_all(dense: tuple[np.ndarray, np.ndarray], sparse: tuple[np.ndarray, np.ndarray], dense_weight: float) -> list[np.ndarray]:
    """``fuse_lists`` (weighted) of each query's dense and BM25 lists: fused positions per query, best first."""
    from pipelines.hybrid_fusion import fuse_lists

    return [fuse_lists(dense[0][row], dense[1][row], sparse[0][row], sparse[1][row], method="weighted", dense_weight=dense_weight)["positions"] for row in range(len(dense[0]))]


def hybrid_search(searcher, sparse_searchers: Sequence, queries: np.ndarray, texts: Sequence[str], dense_weight: float, batch: int = BATCH) -> list[np.ndarray]:
    """The hybrid first stage per batch: dense search, BM25 search, ``fuse_lists`` per query."""
    fused: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        dense = searcher.search(queries[start : start + batch])
        sparse = sparse_search(sparse_searchers, texts[start : start + batch], batch, searcher.config.top_k)
        fused.extend(fuse_all(dense, sparse, dense_weight))
    return fused


class Embedder:
    """The bundled MiniLM through the pipeline's ``TextEncoder``: ``int8`` = the OpenVINO model ``bench.backends`` makes
    (calibrated like ``bench.embed``: 300 seeded corpus documents + 100 train queries), ``bf16`` / ``fp32`` = torch."""

    def __init__(self, encoder: str, threads: int, calibration: Callable[[], list[str]], int8_folder: Path | None, max_length: int = 256, batch_size: int = 32):
        from bench import backends
        from pipelines.embedding import EmbeddingConfig, TextEncoder
        from pipelines.models import load_sentence_transformer, resolve_model_reference

        model_path = resolve_model_reference("bundled")
        config = EmbeddingConfig(model="bundled", precision=encoder, max_seq_length=max_length, batch_size=batch_size, device="cpu")
        quantized_url = ""
        if encoder == "int8":
            load = lambda: load_sentence_transformer(model_path, "cpu", max_length)  # noqa: E731 - called only when the export is missing
            exports, _ = backends.prepare(load, model_path, "bi-encoder", ["openvino-int8"], calibration(), max_length, int8_folder=int8_folder)
            quantized_url = str(exports["openvino-int8"])
            self.digest = backends.backend_digest(quantized_url, max_length)
        else:
            self.digest = file_digest(Path(model_path) / "model.safetensors", extra={"max_length": max_length})
        self.encoder = TextEncoder(config, device="cpu", threads=threads, quantized_url=quantized_url)
        self.name = encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(list(texts)), dtype=np.float32)


def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cached_document_vectors(path: Path, key: dict[str, Any], count: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The vectors in ``path`` (a .npy) when its key file (``path`` + ``.json``) names the same key and count; else None."""
    sidecar = Path(f"{path}.json")
    if not path.exists() or not sidecar.exists():
        return None, {}
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None, {}
    if stored.get("key") != key:
        print(f"{path}: made for other documents or another encoder; embedding again", flush=True)
        return None, {}
    vectors = np.load(path, allow_pickle=False)
    if vectors.shape[0] != count:
        return None, {}
    return vectors.astype(np.float32, copy=False), stored


def save_document_vectors(path: Path, vectors: np.ndarray, record: dict[str, Any]) -> None:
    """The vectors as a plain .npy and their key file beside it (both written atomically)."""
    import io

    from pipelines import storage

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32))
    storage.write_bytes_atomically(str(path.resolve()), buffer.getvalue())
    storage.write_bytes_atomically(f"{path.resolve()}.json", json.dumps(record, indent=1).encode())


# --------------------------------------------------------------------------- Pyserini (Lucene BM25), optional


class PyseriniUnavailable(RuntimeError):
    """Pyserini cannot run here: not installed, no suitable JVM, or it failed (the message says which)."""


@dataclass
class PyseriniInstall:
    site: str  # folder on PYTHONPATH that holds pyserini ("" = this environment)
    version: str
    jar: str
    java_release: int  # the Java release the Anserini jar's classes need
    java_home: str
    java_version: str

    @property
    def label(self) -> str:
        return f"Pyserini {self.version} (Java {self.java_version.split('.')[0]})"

    def environment(self) -> dict[str, str]:
        """What a process running this Pyserini needs: its site folder first on PYTHONPATH, the chosen JVM."""
        environment = {"JAVA_HOME": self.java_home, "PATH": f"{self.java_home}/bin{os.pathsep}{os.environ.get('PATH', '')}"}
        if self.site:
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [self.site, os.environ.get("PYTHONPATH", "")]))
        return environment


def jar_java_release(jar: Path) -> int:
    """The Java release an Anserini fat jar's own classes were compiled for (class file major version - 44)."""
    with zipfile.ZipFile(jar) as archive:
        name = next((entry for entry in archive.namelist() if entry.startswith("io/anserini/") and entry.endswith(".class")), None)
        if name is None:
            raise PyseriniUnavailable(f"{jar}: no io/anserini classes in it")
        with archive.open(name) as handle:
            header = handle.read(8)
    return int.from_bytes(header[6:8], "big") - 44


def java_version(home: Path) -> str | None:
    """A JDK's version (``release`` file, else ``java -version``); None when ``home`` has no usable JVM library."""
    if not (home / "bin" / "java").exists() or not list(home.glob("lib/server/libjvm.so")) + list(home.glob("jre/lib/*/server/libjvm.so")):
        return None
    try:
        match = re.search(r'^JAVA_VERSION="([^"]+)"', (home / "release").read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        output = subprocess.run([str(home / "bin" / "java"), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "([^"]+)"', output)
    return match.group(1) if match else None


def java_major(version: str) -> int:
    parts = version.split(".")
    return int(parts[1]) if parts[0] == "1" and len(parts) > 1 else int(re.match(r"\d+", parts[0]).group(0))


def choose_java(release: int, explicit: str = "") -> tuple[str, str]:
    """(JAVA_HOME, version) for a jar that needs Java ``release``: ``explicit`` if given; else $JAVA_HOME or the
    default ``java``'s JDK when new enough; else the newest JDK under /usr/lib/jvm."""
    if explicit:
        version = java_version(Path(explicit))
        if version is None:
            raise PyseriniUnavailable(f"{explicit}: not a JDK with a JVM library (bin/java, lib/server/libjvm.so)")
        return explicit, version
    preferred = []
    if os.environ.get("JAVA_HOME"):
        preferred.append(Path(os.environ["JAVA_HOME"]))
    default_java = shutil.which("java")
    if default_java:
        preferred.append(Path(os.path.realpath(default_java)).parents[1])
    others = sorted(JVM_FOLDER.glob("*")) if JVM_FOLDER.exists() else []
    found = {}
    for home in [*preferred, *others]:
        home = Path(os.path.realpath(home))
        if home not in found:
            found[home] = java_version(home)
    for home in preferred:
        version = found.get(Path(os.path.realpath(home)))
        if version and java_major(version) >= release:
            return str(Path(os.path.realpath(home))), version
    usable = sorted(((java_major(version), str(home), version) for home, version in found.items() if version), reverse=True)
    if usable and usable[0][0] >= release:
        return usable[0][1], usable[0][2]
    have = ", ".join(f"{version} ({home})" for _, home, version in usable) or "none"
    raise PyseriniUnavailable(f"its Anserini jar needs Java {release}; JDKs here: {have}")


def locate_pyserini(spec: str) -> PyseriniInstall:
    """``SITE`` or ``SITE@JAVA_HOME`` (SITE "" or "env" = this environment): the Pyserini there and the JVM to run it on."""
    import importlib.metadata

    site, _, explicit_java = spec.partition("@")
    site = "" if site in ("", "env") else str(Path(site).expanduser().resolve())
    if site and not Path(site).is_dir():
        raise PyseriniUnavailable(f"no folder {site} (install Pyserini there apart from the project's packages: "
                                  f"pip install --no-deps --target {site} pyserini==0.22.1 pyjnius onnxruntime)")
    distribution = next(iter(importlib.metadata.distributions(name="pyserini", path=[site] if site else sys.path)), None)
    if distribution is None:
        where = f"under {site}" if site else "in this environment"
        raise PyseriniUnavailable(f"pyserini is not installed {where} (pip install --no-deps --target {site or DEFAULT_PYSERINI_SITE} pyserini==0.22.1 pyjnius onnxruntime)")
    package = Path(distribution.locate_file("pyserini"))
    jars = sorted((package / "resources" / "jars").glob("anserini-*-fatjar.jar"))
    if not jars:
        raise PyseriniUnavailable(f"{package}: no Anserini jar in resources/jars")
    release = jar_java_release(jars[-1])
    java_home, version = choose_java(release, explicit_java)
    if java_major(version) < release:
        raise PyseriniUnavailable(f"Pyserini {distribution.version}'s Anserini jar needs Java {release}; {java_home} is Java {version}")
    return PyseriniInstall(site, distribution.version, str(jars[-1]), release, java_home, version)


def java_error(output: str) -> str:
    """The line that says why a Pyserini / Anserini run failed (a Java exception, else the last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\b(\w+\.)*\w*(Error|Exception): ", line) and not line.startswith("File "):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "


def lucene_indexing_seconds(output: str) -> float | None:
    """Anserini's own indexing time from its log: 'Starting to index...' to 'Total N documents indexed'."""
    start = re.search(LOG_TIME + r".*Starting to index", output, re.MULTILINE)
    end = re.search(LOG_TIME + r".*Total [\d,]+ documents indexed", output, re.MULTILINE)
    if not start or not end:
        return None
    parse = lambda text: datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return (parse(end.group(1)) - parse(start.group(1))).total_seconds()


def write_collection(folder: Path, doc_ids: Sequence[str], texts: Sequence[str], files: int) -> Path:
    """The documents as a Pyserini JsonCollection ({"id", "contents"}) in ``files`` files (Anserini indexes one file per thread)."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(doc_ids), max(1, files) + 1).round().astype(int)
    for number in range(max(1, files)):
        with open(folder / f"docs-{number:02d}.jsonl", "w", encoding="utf-8") as handle:
            for position in range(bounds[number], bounds[number + 1]):
                handle.write(json.dumps({"id": doc_ids[position], "contents": texts[position]}) + "\n")
    return folder


def lucene_index(install: PyseriniInstall, collection: Path, index: Path, threads: int, timeout: int = 1800) -> dict[str, Any]:
    """``python -m pyserini.index.lucene`` (JsonCollection, DefaultLuceneDocumentGenerator) in its own process: wall and CPU seconds."""
    shutil.rmtree(index, ignore_errors=True)
    command = [sys.executable, "-m", "pyserini.index.lucene", "--collection", "JsonCollection", "--input", str(collection), "--index", str(index),
               "--generator", "DefaultLuceneDocumentGenerator", "--threads", str(threads)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(command, env={**os.environ, **install.environment()}, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = completed.stdout + completed.stderr
    if completed.returncode != 0 or not index.exists():
        raise PyseriniUnavailable(f"pyserini.index.lucene failed (exit {completed.returncode}): {java_error(output)}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), "lucene_s": lucene_indexing_seconds(output),
            "index_bytes": sum(path.stat().st_size for path in index.rglob("*") if path.is_file())}


class LuceneSearch:
    """In its own process (``VariantProcess``): ``LuceneSearcher`` over a Lucene index; a call runs ``batch_search`` once.

    Payload (k1, b, threads, query ids, query texts, k, return the run); value {wall_s, cpu_s, run: {query: [doc ids]}}.
    The JVM runs in this process (pyjnius), so its threads' CPU time is this process's.
    """

    def __init__(self, site: str, index: str):
        if site:
            sys.path.insert(0, site)
        from pyserini.search.lucene import LuceneSearcher

        self.searcher = LuceneSearcher(index)

    def __call__(self, payload: tuple) -> dict[str, Any]:
        k1, b, threads, query_ids, texts, k, want_run = payload
        self.searcher.set_bm25(k1, b)
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        hits = self.searcher.batch_search(list(texts), list(query_ids), k=k, threads=threads)
        wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
        run = {query_id: [hit.docid for hit in hits.get(query_id, [])] for query_id in query_ids} if want_run else None
        return {"wall_s": wall, "cpu_s": cpu, "run": run}


def run_pyserini(install: PyseriniInstall, doc_ids: Sequence[str], texts: Sequence[str], query_ids: Sequence[str], query_texts: Sequence[str],
                 qrels: dict[str, dict[str, int]], settings: Sequence[tuple[float, float]], thread_counts: Sequence[int], repeats: int,
                 top_k: int = TOP_K) -> dict[str, Any]:
    """Lucene BM25 through one Pyserini: indexing (per thread count, with and without a run's fixed cost), search per setting and thread count, quality."""
    result: dict[str, Any] = {"pyserini": install.version, "site": install.site or "(this environment)", "jar": install.jar, "java_home": install.java_home,
                              "java_version": install.java_version, "jar_needs_java": install.java_release, "index": [], "search": []}
    count = len(doc_ids)
    with tempfile.TemporaryDirectory(prefix="bench-sparse-lucene-") as scratch:
        folder = Path(scratch)
        tiny = write_collection(folder / "tiny", doc_ids[:8], texts[:8], 1)
        search_index = folder / "index-1"
        for threads in thread_counts:
            collection = write_collection(folder / f"collection-{threads}", doc_ids, texts, threads)
            runs, fixed = [], []
            for _ in range(repeats):
                fixed.append(lucene_index(install, tiny, folder / "tiny-index", 1)["wall_s"])
                runs.append(lucene_index(install, collection, folder / f"index-{threads}", threads))
            wall, fixed_s = median([run["wall_s"] for run in runs]), median(fixed)
            lucene_times = [run["lucene_s"] for run in runs if run["lucene_s"] is not None]
            row = {"threads": threads, "files": threads, "wall_s": wall, "fixed_s": fixed_s, "cpu_s": median([run["cpu_s"] for run in runs]),
                   "lucene_s": median(lucene_times) if lucene_times else None, "index_bytes": runs[-1]["index_bytes"],
                   "docs_per_s": count / wall, "docs_per_s_without_fixed": count / (wall - fixed_s) if wall > fixed_s else None,
                   "lucene_docs_per_s": count / median(lucene_times) if lucene_times and median(lucene_times) > 0 else None,
                   "bytes_per_doc": runs[-1]["index_bytes"] / count}
            result["index"].append(row)
            print(f"  {install.label}: indexed {count:,} docs with {threads} thread(s) in {wall:.2f} s (fixed cost {fixed_s:.2f} s)", flush=True)
        worker = VariantProcess("lucene", LuceneSearch, install.site, str(search_index), threads=max(thread_counts), environment=install.environment())
        result["searcher_load_s"] = worker.load_s
        try:
            for k1, b in settings:
                first = worker.call((k1, b, max(thread_counts), query_ids, query_texts, top_k, True)).value  # the run, and the JVM's warm-up:
                for _ in range(max(1, -(-LUCENE_WARM_UP_QUERIES // max(1, len(query_ids))) - 1)):  # the JIT compiles hot code after thousands of calls
                    worker.call((k1, b, max(thread_counts), query_ids, query_texts, top_k, False))
                scores = quality(qrels, query_ids, [first["run"][query_id] for query_id in query_ids], top_k)
                timings: dict[int, list[dict]] = {threads: [] for threads in thread_counts}
                for repeat in range(repeats):
                    for threads in rotated(list(thread_counts), repeat):
                        timings[threads].append(worker.call((k1, b, threads, query_ids, query_texts, top_k, False)).value)
                for threads in thread_counts:
                    wall, cpu = median([t["wall_s"] for t in timings[threads]]), median([t["cpu_s"] for t in timings[threads]])
                    result["search"].append({"k1": k1, "b": b, "threads": threads, "queries_per_s": len(query_ids) / wall,
                                             "queries_per_cpu_s": len(query_ids) / cpu if cpu > 0 else None, **scores})
                print(f"  {install.label}: k1 {k1} b {b}: nDCG@10 {scores['ndcg@10']:.4f}, "
                      + ", ".join(f"{row['queries_per_s']:.0f} q/s ({row['threads']} thr)" for row in result["search"][-len(thread_counts):]), flush=True)
        finally:
            worker.close()
            result["searcher_rss_mib"] = max(worker.overall.peak_process_rss_mib, worker.max_rss_mib)
    return result


# --------------------------------------------------------------------------- measurement plumbing


@dataclass
class Timings:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def per_second(self, items: int) -> tuple[float, float]:
        """(items per wall second, items per CPU-second), medians."""
        wall, cpu = median(self.wall), median(self.cpu)
        return items / wall if wall > 0 else float("nan"), items / cpu if cpu > 0 else float("nan")


def sharded_note(check: dict[str, Any], top_k: int) -> str:
    if check["equal"]:
        return f"top-{top_k} = 1 shard's: yes"
    if check["equal_apart_from_ties_at_cutoff"]:
        return f"top-{top_k} = 1 shard's: scores yes; {check['queries_differing']} queries pick another doc tied at the cutoff"
    return f"top-{top_k} = 1 shard's: NO ({check['queries_differing_beyond_ties']} queries differ)"


def timed(function: Callable[[], Any]) -> tuple[Any, float, float]:
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    value = function()
    return value, time.perf_counter() - wall_started, time.process_time() - cpu_started


def parse_settings(text: str) -> list[tuple[float, float]]:
    return [tuple(float(value) for value in pair.split(":")) for pair in text.split(",") if pair.strip()]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 600 documents (the judged ones and a seeded sample), 2 repeats")
    parser.add_argument("--dataset", default=str(SCIFACT), help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv), read in place [SciFact]")
    parser.add_argument("--split", default="test", help="qrels split whose queries are searched and judged (NFCorpus here: dev)")
    parser.add_argument("--docs", type=int, default=0, help="documents: 0 = all, N = the split's judged documents plus a seeded sample, N in all")
    parser.add_argument("--shards", type=int, default=4, help="BM25 shards for the sharded build and the equal-top-k check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="faiss, torch and Lucene threads (0 = all cores); BM25 (bm25s) is single-threaded")
    parser.add_argument("--top-k", type=int, default=TOP_K)
    parser.add_argument("--batch", type=int, default=BATCH, help="queries per search call")
    parser.add_argument("--k1", type=float, default=1.5, help="BM25 k1 (the pipeline's Bm25Config default)")
    parser.add_argument("--b", type=float, default=0.75, help="BM25 b (the pipeline's Bm25Config default)")
    parser.add_argument("--dense-weight", type=float, default=0.5, help="hybrid: fuse_lists' dense weight")
    parser.add_argument("--no-dense", action="store_true", help="BM25 only: no model, no Flat index, no hybrid")
    parser.add_argument("--encoder", choices=("int8", "bf16", "fp32"), default="int8", help="bi-encoder path for the dense vectors [int8: the pipeline's CPU default]")
    parser.add_argument("--embeddings", default="", help="document vectors cache (.npy, with a .npy.json key file beside it) [under the bench cache]")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--calibration-docs", type=int, default=300, help="int8: corpus documents to calibrate on (300, as bench.embed)")
    parser.add_argument("--pyserini", nargs="?", const=DEFAULT_PYSERINI_SITE, default="", metavar="SITE[@JAVA_HOME],...",
                        help=f"also Lucene BM25 through Pyserini installed in SITE (a --target folder; 'env' = this environment) [{DEFAULT_PYSERINI_SITE}]")
    parser.add_argument("--lucene-settings", default=LUCENE_SETTINGS, help="k1:b pairs for Lucene BM25 (Lucene's defaults, then bm25s's)")
    parser.add_argument("--output", default=str(RESULTS / "sparse.json"))
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.docs = min(arguments.docs, 600) if arguments.docs else 600
        arguments.repeats = min(arguments.repeats, 2)
    arguments.threads = arguments.threads or physical_cores()
    if arguments.shards < 1 or arguments.repeats < 1 or arguments.top_k < 1 or arguments.batch < 1:
        parser.error("--shards, --repeats, --top-k and --batch must be at least 1")
    if not 0.0 <= arguments.dense_weight <= 1.0:
        parser.error("--dense-weight must be in [0, 1]")
    return arguments


# --------------------------------------------------------------------------- main


def embed_corpus(arguments, corpus, doc_ids: list[str], texts: list[str], dataset: Path) -> tuple[Embedder, np.ndarray, dict[str, Any]]:
    """The encoder (loaded: queries are encoded every run) and the documents' vectors (from the cache file when it matches)."""
    from bench import backends
    from pipelines.reranking import INT8_FOLDER

    def calibration() -> list[str]:
        rng = np.random.default_rng(1)  # as bench.embed: the same export serves both on SciFact
        chosen = rng.choice(len(corpus.doc_texts), min(arguments.calibration_docs, len(corpus.doc_texts)), replace=False)
        return [corpus.doc_texts[i] for i in sorted(chosen)] + corpus.train_query_texts[:100]

    int8_folder = None
    if dataset.resolve() != SCIFACT.resolve():  # another corpus is calibrated on itself, into its own folder
        from pipelines.models import resolve_model_reference

        int8_folder = backends.export_folder(resolve_model_reference("bundled"), "bi-encoder", arguments.max_length) / f"{INT8_FOLDER}-{dataset.name}"
    started = time.perf_counter()
    embedder = Embedder(arguments.encoder, arguments.threads, calibration, int8_folder, arguments.max_length)
    load_s = time.perf_counter() - started
    key = {"encoder": arguments.encoder, "model": embedder.digest, "max_length": arguments.max_length, "documents": len(texts), "texts": texts_digest(texts)}
    path = Path(arguments.embeddings) if arguments.embeddings else CACHE / "bench" / "embeddings" / f"sparse-{dataset.name}-{arguments.encoder}-{texts_digest([json.dumps(key, sort_keys=True)])}.npy"
    vectors, record = cached_document_vectors(path, key, len(texts))
    if vectors is None:
        print(f"embedding {len(texts):,} documents ({arguments.encoder}, {arguments.threads} threads; cached in {path})", flush=True)
        vectors, wall, cpu = timed(lambda: embedder.encode(texts))
        record = {"key": key, "embed_s": wall, "embed_cpu_s": cpu, "embedded_at": time.strftime("%Y-%m-%d %H:%M:%S"), "cached": False}
        save_document_vectors(path, vectors, record)
    else:
        print(f"document vectors from {path} (embedded {record.get('embedded_at')})", flush=True)
        record = {**record, "cached": True}
    record.update({"path": str(path), "encoder_load_s": load_s, "docs_per_s": len(texts) / record["embed_s"], "docs_per_cpu_s": len(texts) / record["embed_cpu_s"]})
    return embedder, vectors, record


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    import faiss  # noqa: F401 - before set_threads, which sets only what is imported

    from pipelines.sparse_index import Bm25Config

    threads_report = set_threads(arguments.threads, import_missing=False)
    environment = environment_report(arguments.threads)
    environment.update(threads_report)
    import importlib.metadata

    for package in ("bm25s", "PyStemmer", "scipy"):
        try:
            environment["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            environment["versions"][package] = None
    dataset = Path(arguments.dataset)
    corpus = load_scifact(dataset, arguments.split)
    chosen = document_subset(corpus.qrels, corpus.doc_ids, arguments.docs)
    doc_ids = [corpus.doc_ids[i] for i in chosen]
    texts = [corpus.doc_texts[i] for i in chosen]
    query_ids, query_texts = corpus.query_ids, corpus.query_texts
    documents, queries = len(doc_ids), len(query_ids)
    config = Bm25Config(k1=arguments.k1, b=arguments.b)
    config.validate()
    subset_note = "" if documents == len(corpus.doc_ids) else f" (of {len(corpus.doc_ids):,}: the judged ones and a seeded sample)"
    print(f"{environment['cpu']}, {environment['cores']} cores, load {environment['load_average_at_start']}; {dataset.name}: {documents:,} docs{subset_note}, "
          f"{queries} {arguments.split} queries; BM25 {config.settings()}", flush=True)

    embedder = document_vectors = embedding = None
    if not arguments.no_dense:
        embedder, document_vectors, embedding = embed_corpus(arguments, corpus, doc_ids, texts, dataset)

    # Warm-up (imports, first-call costs), not timed.
    warm = build_sparse(texts[:64], config, 1, arguments.top_k)
    sparse_search(warm.searchers, query_texts[:8], arguments.batch, arguments.top_k)
    PlainBm25s(texts[:64], config).search(query_texts[:8], arguments.batch, arguments.top_k)

    # Builds: interleaved repeats.
    shards = arguments.shards
    build_cases = ["bm25", "bm25-sharded", "bm25s"] + ([] if arguments.no_dense else ["flat"])
    builds = {case: Timings() for case in build_cases}
    steps = {case: {step: [] for step in STEPS} for case in ("bm25", "bm25-sharded")}
    built: dict[str, Any] = {}
    for repeat in range(arguments.repeats):
        for case in rotated(build_cases, repeat):
            if case == "bm25":
                index, wall, cpu = timed(lambda: build_sparse(texts, config, 1, arguments.top_k))
            elif case == "bm25-sharded":
                index, wall, cpu = timed(lambda: build_sparse(texts, config, shards, arguments.top_k))
            elif case == "bm25s":
                index, wall, cpu = timed(lambda: PlainBm25s(texts, config))
            else:
                index, wall, cpu = timed(lambda: build_flat(document_vectors))
            builds[case].add(wall, cpu)
            if case in steps:
                for step, seconds in index.steps.items():
                    steps[case][step].append(seconds)
            built[case] = index
        print(f"  build repeat {repeat + 1}/{arguments.repeats}: " + ", ".join(f"{case} {documents / builds[case].wall[-1]:,.0f} docs/s" for case in build_cases), flush=True)

    one, sharded, plain = built["bm25"], built["bm25-sharded"], built["bm25s"]
    searcher = dense_searcher(built["flat"], arguments.threads, arguments.top_k) if not arguments.no_dense else None
    query_vectors = embedder.encode(query_texts) if embedder is not None else None  # also the encoder's warm-up

    # Searches: interleaved repeats, each case warmed up once first.
    results: dict[str, Any] = {}

    def run_case(case: str):
        if case == "bm25":
            return sparse_search(one.searchers, query_texts, arguments.batch, arguments.top_k)
        if case == "bm25-sharded":
            return sparse_search(sharded.searchers, query_texts, arguments.batch, arguments.top_k)
        if case == "bm25s":
            return plain.search(query_texts, arguments.batch, arguments.top_k)
        if case == "dense":
            return dense_search(searcher, query_vectors, arguments.batch)
        if case == "fusion":
            return fuse_all(results["dense"], results["bm25"], arguments.dense_weight)
        if case == "hybrid":
            return hybrid_search(searcher, one.searchers, query_vectors, query_texts, arguments.dense_weight, arguments.batch)
        if case == "query-encoding":
            return embedder.encode(query_texts)
        raise ValueError(case)

    search_cases = ["bm25", "bm25-sharded", "bm25s"] + ([] if arguments.no_dense else ["dense", "fusion", "hybrid", "query-encoding"])
    searches = {case: Timings() for case in search_cases}
    for case in search_cases:  # warm-up, and the results (fusion needs dense and bm25 first)
        results[case] = run_case(case)
    for repeat in range(arguments.repeats):
        for case in rotated(search_cases, repeat):
            _, wall, cpu = timed(lambda: run_case(case))
            searches[case].add(wall, cpu)
        print(f"  search repeat {repeat + 1}/{arguments.repeats}: " + ", ".join(f"{case} {queries / searches[case].wall[-1]:,.0f} q/s" for case in search_cases), flush=True)

    # Checks.
    checks = {
        f"bm25_{shards}_shards_top_{arguments.top_k}_equals_1_shard": compare_top_k(*results["bm25"], *results["bm25-sharded"]),
        "bm25_equals_plain_bm25s": compare_with_plain(*results["bm25"], *results["bm25s"]),
    }
    for name, check in checks.items():
        print(f"  check {name}: {check}", flush=True)

    # Quality.
    scores = {
        "bm25": quality(corpus.qrels, query_ids, position_rankings(results["bm25"][0], doc_ids), arguments.top_k),
        "bm25-sharded": quality(corpus.qrels, query_ids, position_rankings(results["bm25-sharded"][0], doc_ids), arguments.top_k),
        "bm25s": quality(corpus.qrels, query_ids, position_rankings(results["bm25s"][0], doc_ids), arguments.top_k),
    }
    if not arguments.no_dense:
        scores["dense"] = quality(corpus.qrels, query_ids, position_rankings(results["dense"][0], doc_ids), arguments.top_k)
        scores["hybrid"] = quality(corpus.qrels, query_ids, position_rankings(results["hybrid"], doc_ids), arguments.top_k)

    # Pyserini (optional).
    pyserini_results: list[dict[str, Any]] = []
    if arguments.pyserini:
        settings = parse_settings(arguments.lucene_settings)
        thread_counts = sorted({1, arguments.threads})
        for spec in [item for item in arguments.pyserini.split(",") if item.strip()] or [DEFAULT_PYSERINI_SITE]:
            try:
                install = locate_pyserini(spec.strip())
                print(f"Lucene BM25: {install.label} from {install.site or 'this environment'}, JAVA_HOME {install.java_home} (jar needs Java {install.java_release})", flush=True)
                pyserini_results.append(run_pyserini(install, doc_ids, texts, query_ids, query_texts, corpus.qrels, settings, thread_counts, arguments.repeats, arguments.top_k))
            except (PyseriniUnavailable, RuntimeError, OSError, subprocess.SubprocessError) as error:
                message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                if isinstance(error, RuntimeError) and not isinstance(error, PyseriniUnavailable):
                    message = java_error(str(error))
                print(f"Lucene BM25 ({spec}) skipped: {message}", flush=True)
                pyserini_results.append({"spec": spec, "error": message})

    # Tables.
    build_rate = {case: builds[case].per_second(documents) for case in build_cases}
    search_rate = {case: searches[case].per_second(queries) for case in search_cases}
    rows = [
        {"index": "BM25, pipeline (bm25s + global statistics), 1 shard", "build": build_rate["bm25"], "search": search_rate["bm25"],
         "bytes_per_doc": one.bytes / documents, **scores["bm25"], "note": "shard file + statistics"},
        {"index": f"BM25, pipeline, {shards} shards", "build": build_rate["bm25-sharded"], "search": search_rate["bm25-sharded"],
         "bytes_per_doc": sharded.bytes / documents, **scores["bm25-sharded"],
         "note": sharded_note(checks[f"bm25_{shards}_shards_top_{arguments.top_k}_equals_1_shard"], arguments.top_k)},
        {"index": "bm25s, plain (tokenize + BM25.index / retrieve)", "build": build_rate["bm25s"], "search": search_rate["bm25s"], "bytes_per_doc": None, **scores["bm25s"],
         "note": "scores = pipeline's: {}".format("yes" if checks["bm25_equals_plain_bm25s"]["scores_equal"] else "NO")},
    ]
    if not arguments.no_dense:
        dimension = document_vectors.shape[1]
        from pipelines import index_store

        flat_bytes = len(index_store.serialize_index(built["flat"]))
        rows.append({"index": f"dense Flat (faiss, {dimension}-d, {arguments.threads} threads)", "build": build_rate["flat"], "search": search_rate["dense"],
                     "bytes_per_doc": flat_bytes / documents, **scores["dense"],
                     "note": f"+ embedding {embedding['docs_per_s']:.0f} docs/s ({arguments.encoder}{', cached' if embedding['cached'] else ''})"})
        rows.append({"index": f"hybrid: dense + BM25 + fuse_lists (w {arguments.dense_weight})", "build": None, "search": search_rate["hybrid"], "bytes_per_doc": None,
                     **scores["hybrid"], "note": f"{median(searches['hybrid'].wall) / median(searches['dense'].wall):.1f}x dense search time"})
    for found in pyserini_results:
        if "error" in found:
            rows.append({"index": f"Lucene BM25, Pyserini ({found['spec']})", "note": f"skipped: {found['error'][:120]}"})
            continue
        single = next(row for row in found["index"] if row["threads"] == 1)
        for setting in dict.fromkeys((row["k1"], row["b"]) for row in found["search"]):
            search = next(row for row in found["search"] if (row["k1"], row["b"]) == setting and row["threads"] == 1)
            rows.append({"index": f"Lucene BM25, Pyserini {found['pyserini']} (Java {found['java_version'].split('.')[0]}), k1 {setting[0]} b {setting[1]}",
                         "build": (single["lucene_docs_per_s"] or single["docs_per_s_without_fixed"], None), "search": (search["queries_per_s"], search["queries_per_cpu_s"]),
                         "bytes_per_doc": single["bytes_per_doc"], "ndcg@10": search["ndcg@10"], "recall@100": search["recall@100"],
                         "note": f"1 thread; build = {'Anserini log' if single['lucene_docs_per_s'] else 'run - fixed cost'}, a run also pays {single['fixed_s']:.1f} s (Python, JVM)"})
    for row in rows:
        row["build_docs_per_s"], row["build_docs_per_cpu_s"] = row.pop("build", None) or (None, None)
        row["queries_per_s"], row["queries_per_cpu_s"] = row.pop("search", None) or (None, None)
    title = (f"bench.sparse: {dataset.name}, {documents:,} docs{subset_note}, {queries} {arguments.split} queries, top-{arguments.top_k}, "
             f"batches of {arguments.batch}; median of {arguments.repeats}; BM25 k1 {config.k1} b {config.b} (bm25s, English stopwords, Snowball)")
    table = format_table(rows, [
        ("index", "index", ""),
        ("build_docs_per_s", "build docs/s", ",.0f"),
        ("build_docs_per_cpu_s", "build docs/CPU-s", ",.0f"),
        ("queries_per_s", "queries/s", ",.0f"),
        ("queries_per_cpu_s", "queries/CPU-s", ",.0f"),
        ("bytes_per_doc", "B/doc", ",.0f"),
        ("ndcg@10", "nDCG@10", ".4f"),
        ("recall@100", "recall@100", ".4f"),
        ("note", "", ""),
    ], title=title)

    step_rows = []
    for case, label in (("bm25", "1 shard"), ("bm25-sharded", f"{shards} shards")):
        per_step = {step: median(values) for step, values in steps[case].items()}
        total = sum(per_step.values())
        step_rows.append({"build": label, **{step: seconds * 1000 for step, seconds in per_step.items()}, "total": total * 1000, "docs_per_s": documents / total,
                          "shard_files_bytes": sum(len(data) for data in built[case].files), "statistics_bytes": len(built[case].statistics_file)})
    step_table = format_table(step_rows, [("build", "BM25 build", "")] + [(step, f"{step.replace('_', ' ')} ms", ",.1f") for step in STEPS]
                              + [("total", "total ms", ",.1f"), ("docs_per_s", "docs/s", ",.0f"), ("shard_files_bytes", "shard files B", ",d"),
                                 ("statistics_bytes", "statistics B", ",d")],
                              title="BM25 build steps (medians): the index build (tokenize, term counts, shard file, statistics) and a searcher's start")

    cost_rows, cost_table = [], ""
    if not arguments.no_dense:
        dense_s = median(searches["dense"].wall)
        encode_s = median(searches["query-encoding"].wall)
        parts = [("dense", "dense search (Flat, ShardSearcher)", dense_s), ("bm25", "BM25 search (SparseShardSearcher)", median(searches["bm25"].wall)),
                 ("fusion", "fuse_lists per query", median(searches["fusion"].wall)), ("hybrid", "hybrid: dense + BM25 + fusion", median(searches["hybrid"].wall))]
        for case, label, seconds in parts:
            cost_rows.append({"stage": label, "ms_per_query": seconds / queries * 1000, "queries_per_s": queries / seconds,
                              "queries_per_cpu_s": search_rate[case][1], "x_dense": seconds / dense_s, "x_dense_with_encoding": None})
        cost_rows.append({"stage": f"query encoding ({arguments.encoder})", "ms_per_query": encode_s / queries * 1000, "queries_per_s": queries / encode_s,
                          "queries_per_cpu_s": search_rate["query-encoding"][1], "x_dense": encode_s / dense_s})
        for label, seconds in (("dense + query encoding", dense_s + encode_s), ("hybrid + query encoding", median(searches["hybrid"].wall) + encode_s)):
            cost_rows.append({"stage": label, "ms_per_query": seconds / queries * 1000, "queries_per_s": queries / seconds, "x_dense_with_encoding": seconds / (dense_s + encode_s)})
        cost_table = format_table(cost_rows, [("stage", "first stage", ""), ("ms_per_query", "ms/query", ".3f"), ("queries_per_s", "queries/s", ",.0f"),
                                              ("queries_per_cpu_s", "queries/CPU-s", ",.0f"), ("x_dense", "x dense search", ".2f"),
                                              ("x_dense_with_encoding", "x dense incl. encoding", ".2f")],
                                  title=f"first-stage cost per query ({queries} queries, batches of {arguments.batch}, medians)")

    lucene_rows, lucene_table = [], ""
    for found in pyserini_results:
        if "error" in found:
            continue
        for index_row in found["index"]:
            lucene_rows.append({"what": f"{found['pyserini']} (Java {found['java_version']}) index", "threads": index_row["threads"],
                                "rate": index_row["docs_per_s"], "rate_without_fixed": index_row["docs_per_s_without_fixed"],
                                "lucene_rate": index_row["lucene_docs_per_s"], "fixed_s": index_row["fixed_s"], "bytes_per_doc": index_row["bytes_per_doc"]})
        for search_row in found["search"]:
            lucene_rows.append({"what": f"{found['pyserini']} search k1 {search_row['k1']} b {search_row['b']}", "threads": search_row["threads"],
                                "rate": search_row["queries_per_s"], "cpu_rate": search_row["queries_per_cpu_s"],
                                "ndcg@10": search_row["ndcg@10"], "recall@100": search_row["recall@100"]})
    if lucene_rows:
        lucene_table = format_table(lucene_rows, [("what", "Pyserini (Lucene BM25)", ""), ("threads", "threads", "d"), ("rate", "docs/s or queries/s", ",.0f"),
                                                  ("rate_without_fixed", "docs/s w/o fixed cost", ",.0f"), ("lucene_rate", "docs/s (Lucene log)", ",.0f"),
                                                  ("fixed_s", "fixed cost s", ".2f"), ("bytes_per_doc", "B/doc", ",.0f"), ("cpu_rate", "queries/CPU-s", ",.0f"),
                                                  ("ndcg@10", "nDCG@10", ".4f"), ("recall@100", "recall@100", ".4f")],
                                    title="Lucene BM25 through Pyserini: indexing (JsonCollection, one file per thread; fixed cost = a run on 8 docs: Python, JVM start) and batch_search")

    print()
    for part in (table, step_table, cost_table, lucene_table):
        if part:
            print(part)
            print()
    payload = {
        "benchmark": "sparse",
        "arguments": vars(arguments),
        "environment": environment,
        "dataset": {"folder": str(dataset), "name": dataset.name, "split": arguments.split, "documents": documents, "corpus_documents": len(corpus.doc_ids), "queries": queries},
        "bm25": config.settings(),
        "rows": rows,
        "build_steps": step_rows,
        "first_stage_cost": cost_rows,
        "embedding": embedding,
        "checks": checks,
        "pyserini": pyserini_results,
        "timings": {"build": {case: vars(value) for case, value in builds.items()}, "search": {case: vars(value) for case, value in searches.items()}},
        "table": "\n\n".join(part for part in (table, step_table, cost_table, lucene_table) if part),
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
