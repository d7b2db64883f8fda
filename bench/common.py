"""Measurement plumbing shared by the benchmarks: data, processes, CPU time, memory, tables, results.

Every variant of a benchmark runs in its own process (:class:`VariantProcess`), so that its memory
is its own and one variant's allocator or thread pool cannot slow the next. The parent samples the
variant's whole process tree (a Ray variant's raylet, GCS and actors included) for resident memory,
proportional set size (PSS: shared pages split between the processes that map them, so a tree's
PSS sum counts shared libraries and the object store once) and CPU time. Variants take turns on the
same slice of data in rotating order (:func:`rotated`), so background load on a shared machine falls
on all of them alike; compare ratios measured in one run, not absolute numbers across runs.

Example:
    >>> rotated(["a", "b", "c"], 1)
    ['b', 'c', 'a']
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("BENCH_SCIFACT", REPOSITORY.parent / "shared" / "datasets" / "scifact"))
CACHE = Path(os.environ.get("RETRIEVAL_PIPELINES_CACHE", "~/.cache/retrieval-pipelines")).expanduser()
RESULTS = REPOSITORY / "bench" / "results"
MIB = 1024 * 1024


def prepare_environment() -> None:
    """Offline model loading, quiet progress bars and sleeping (not spinning) idle threads, for this
    process and the ones it starts; call it before torch or faiss is imported.

    Only sets what is unset: an OPENBLAS_CORETYPE or thread setting from the caller stays as it is.
    ``OMP_WAIT_POLICY=PASSIVE`` (and ONNX Runtime without spinning, see bench.backends) matters on a
    shared machine: with more runnable threads than cores, OpenMP threads that spin at each barrier
    waiting for a descheduled partner made faiss k-means 3x slower here; every variant, baseline
    included, runs with the same policy. Set OMP_WAIT_POLICY=ACTIVE to measure the default.
    """
    for name, value in (
        ("OMP_WAIT_POLICY", "PASSIVE"),
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
        ("TQDM_DISABLE", "1"),
    ):
        os.environ.setdefault(name, value)


def physical_cores() -> int:
    """CPUs this process may run on (the benchmarks give every variant all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int, import_missing: bool = True) -> dict[str, int]:
    """Use ``threads`` threads in torch and faiss; returns what each reports.

    With ``import_missing=False`` only libraries already imported are set, so that a variant that
    does not use torch (ONNX Runtime, OpenVINO) is not charged torch's memory.
    """
    report = {}
    for module_name in ("torch", "faiss"):
        if module_name not in sys.modules and not import_missing:
            continue
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        if module_name == "torch":
            module.set_num_threads(threads)
            report["torch_threads"] = module.get_num_threads()
        else:
            module.omp_set_num_threads(threads)
            report["faiss_threads"] = module.omp_get_max_threads()
    return report


# --------------------------------------------------------------------------- data


@dataclass
class SciFact:
    """SciFact as the pipeline sees it: document text = title + " " + text; the 300 test queries."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    train_query_texts: list[str]


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path) as handle:
        next(handle)
        for line in handle:
            query_id, doc_id, score = line.rstrip("\n").split("\t")
            qrels.setdefault(query_id, {})[doc_id] = int(score)
    return qrels


def load_scifact(folder: Path = SCIFACT, split: str = "test") -> SciFact:
    """Read SciFact (or another BEIR folder) from its folder (never copied): corpus, the ``split``'s queries and qrels, train queries."""
    from pipelines.documents import CorpusConfig, document_content

    config = CorpusConfig()
    doc_ids, doc_texts = [], []
    with open(folder / "corpus.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            doc_ids.append(str(record["_id"]))
            doc_texts.append(document_content(record.get("title"), record["text"], config))
    queries = {}
    with open(folder / "queries.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            queries[str(record["_id"])] = record["text"]
    if not (folder / "qrels" / f"{split}.tsv").exists():
        found = sorted(path.stem for path in (folder / "qrels").glob("*.tsv"))
        raise FileNotFoundError(f"{folder}: no qrels/{split}.tsv (splits there: {', '.join(found) or 'none'})")
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv")
    train = _read_qrels(folder / "qrels" / "train.tsv") if (folder / "qrels" / "train.tsv").exists() else {}
    query_ids = sorted(qrels, key=lambda query_id: (len(query_id), query_id))
    return SciFact(
        doc_ids=doc_ids,
        doc_texts=doc_texts,
        query_ids=query_ids,
        query_texts=[queries[query_id] for query_id in query_ids],
        qrels=qrels,
        train_query_texts=[queries[query_id] for query_id in sorted(train) if query_id in queries],
    )


def ndcg_at_10(qrels: dict[str, dict[str, int]], query_ids: Sequence[str], doc_ids: Sequence[str], top: np.ndarray, scores: np.ndarray) -> float:
    """nDCG@10 (ir_measures) of a ranking given as row-per-query indices into ``doc_ids``."""
    import ir_measures

    run = {
        query_id: {doc_ids[int(index)]: float(score) for index, score in zip(top[row], scores[row]) if index >= 0}
        for row, query_id in enumerate(query_ids)
    }
    measure = ir_measures.nDCG @ 10
    return float(ir_measures.calc_aggregate([measure], {q: qrels[q] for q in query_ids}, run)[measure])


def exact_top_k(queries: np.ndarray, documents: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search (faiss IndexFlatIP): (scores, indices), best first."""
    import faiss

    index = faiss.IndexFlatIP(documents.shape[1])
    index.add(np.ascontiguousarray(documents, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(documents)))


# --------------------------------------------------------------------------- cache


class VectorCache:
    """Vectors by id for one backend, kept between runs (one ``.npz`` under the cache, replaced atomically).

    The key names everything that determines the vectors (model file digest, backend, max length), so
    a changed model or setting starts a fresh cache instead of mixing vectors.
    """

    def __init__(self, key: str, folder: Path = CACHE / "bench" / "embeddings"):
        self.path = folder / f"{key}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path, allow_pickle=False) as stored:
                self.vectors = dict(zip(stored["ids"].tolist(), stored["vectors"]))

    def missing(self, ids: Sequence[str]) -> list[int]:
        """Positions in ``ids`` with no cached vector."""
        return [position for position, identifier in enumerate(ids) if identifier not in self.vectors]

    def get(self, ids: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[identifier] for identifier in ids]).astype(np.float32)

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        for identifier, vector in zip(ids, np.asarray(vectors, dtype=np.float32)):
            self.vectors[identifier] = vector

    def save(self) -> None:
        from pipelines import storage

        if not self.vectors:
            return
        ids = list(self.vectors)
        buffer = io.BytesIO()
        np.savez(buffer, ids=np.array(ids), vectors=np.stack([self.vectors[i] for i in ids]))
        storage.write_bytes_atomically(str(self.path), buffer.getvalue())


def file_digest(*paths: Path | str, extra: Any = None) -> str:
    """sha256 (16 hex digits) of files' bytes plus a JSON-able ``extra``: a cache key for derived artifacts."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- processes


def peak_resident_bytes(pid: int | str = "self") -> int:
    """The kernel's high-water mark of a process's resident memory (VmHWM; reset by exec, unlike ru_maxrss)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class TreeUsage:
    """CPU seconds and memory peaks of a process tree over one sampled period."""

    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    peak_process_rss_mib: float = 0.0
    peak_processes: int = 0


class TreeSampler:
    """Samples a process and its descendants (RSS, PSS, CPU) in a background thread.

    CPU time of a descendant that exits between samples is counted up to its last sample (a Ray
    actor's last fraction of a second can be missed); the root's own CPU time is exact.
    """

    def __init__(self, pid: int, interval: float = 0.25, pss_every: int = 4):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.usage = TreeUsage()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._sample(initial=True)

    def _processes(self):
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self, initial: bool = False) -> None:
        import psutil

        rss = pss = largest = 0
        count = 0
        with_pss = self._samples % self.pss_every == 0
        for process in self._processes():
            try:
                times = process.cpu_times()
                cpu = times.user + times.system
                if with_pss:
                    info = process.memory_full_info()
                    pss += info.pss
                else:
                    info = process.memory_info()
                rss += info.rss
                largest = max(largest, info.rss, peak_resident_bytes(process.pid))
            except psutil.Error:
                continue
            count += 1
            role = self.names.get(process.pid)
            if role is None or role == "ray::IDLE" or role.endswith("default_worker.py"):  # Ray retitles a worker once it runs something
                self.names[process.pid] = _process_role(process)
            self.first_cpu.setdefault(process.pid, cpu if initial else 0.0)
            self.last_cpu[process.pid] = cpu
        self._samples += 1
        self.usage.peak_rss_mib = max(self.usage.peak_rss_mib, rss / MIB)
        if with_pss:
            self.usage.peak_pss_mib = max(self.usage.peak_pss_mib, pss / MIB)
        self.usage.peak_process_rss_mib = max(self.usage.peak_process_rss_mib, largest / MIB)
        self.usage.peak_processes = max(self.usage.peak_processes, count)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._samples = 0
        self._sample()
        self.usage.cpu_s = sum(self.last_cpu[pid] - self.first_cpu.get(pid, 0.0) for pid in self.last_cpu)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the sampled period by process role (the root is ``main``), largest first."""
        totals: dict[str, float] = {}
        for pid, last in self.last_cpu.items():
            role = "main" if pid == self.root.pid else self.names.get(pid, "?")
            totals[role] = totals.get(role, 0.0) + last - self.first_cpu.get(pid, 0.0)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _process_role(process) -> str:
    """A short name for a process: Ray's title (``ray::MapWorker(...)``, ``raylet``) or the program."""
    import psutil

    try:
        arguments = process.cmdline()
    except (OSError, psutil.Error):
        return "?"
    if not arguments:
        return "?"
    first = arguments[0]
    if first.startswith("ray::"):
        return first.split(" ")[0]
    program = first.rsplit("/", 1)[-1]
    if program.startswith("python") and len(arguments) > 1:
        script = next((item for item in arguments[1:] if item.endswith(".py")), arguments[-1])
        return f"python {script.rsplit('/', 1)[-1]}"
    return program


@dataclass
class CallResult:
    """One call to a variant: its value, wall seconds, CPU seconds of the tree, memory peaks."""

    value: Any
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    peak_process_rss_mib: float
    processes: int
    cpu_by_role: dict[str, float] = field(default_factory=dict)


def _worker_main(connection, factory: Callable[..., Callable], args: tuple, threads: int, environment: dict[str, str]) -> None:
    os.environ.update(environment)
    prepare_environment()
    try:
        started = time.perf_counter()
        target = factory(*args)
        set_threads(threads, import_missing=False)
        connection.send(("ready", time.perf_counter() - started, set_threads_report(threads)))
    except BaseException:  # noqa: BLE001 - whatever failed, the parent gets the traceback
        connection.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the parent is gone: nothing left to report to
            return
        if message is None:
            break
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        try:
            value = target(message)
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            connection.send(("error", traceback.format_exc()))
            continue
        connection.send(("done", value, time.perf_counter() - wall_started, time.process_time() - cpu_started))
    close = getattr(target, "close", None)
    if callable(close):
        close()
    connection.send(("closed", peak_resident_bytes() / MIB))


def set_threads_report(threads: int) -> dict[str, int]:
    """The thread counts a worker actually runs with (after its factory may have changed them)."""
    report = {"requested": threads}
    if "torch" in sys.modules:
        report["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "faiss" in sys.modules:
        report["faiss_threads"] = sys.modules["faiss"].omp_get_max_threads()
    return report


class VariantProcess:
    """A benchmark variant in its own (spawned) process: ``factory(*args)`` builds it, each call runs it once.

    Example:
        >>> worker = VariantProcess("len", len_factory)          # doctest: +SKIP
        >>> worker.call(["a", "bb"]).value                      # doctest: +SKIP
        2
    """

    def __init__(self, name: str, factory: Callable[..., Callable], *args: Any, threads: int = 0, environment: dict[str, str] | None = None):
        self.name = name
        self.threads = threads or physical_cores()
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, factory, args, self.threads, environment or {}), name=f"bench-{name}", daemon=True)
        self.process.start()
        self.overall = TreeUsage()
        self.max_rss_mib = 0.0
        with TreeSampler(self.process.pid) as sampler:
            reply = self.connection.recv()
        if reply[0] == "error":
            self.process.join()
            raise RuntimeError(f"variant {name} failed to start:\n{reply[1]}")
        self.load_s = reply[1]
        self.thread_report = reply[2]
        self._merge(sampler.usage)

    def _merge(self, usage: TreeUsage) -> None:
        self.overall.peak_rss_mib = max(self.overall.peak_rss_mib, usage.peak_rss_mib)
        self.overall.peak_pss_mib = max(self.overall.peak_pss_mib, usage.peak_pss_mib)
        self.overall.peak_process_rss_mib = max(self.overall.peak_process_rss_mib, usage.peak_process_rss_mib)
        self.overall.peak_processes = max(self.overall.peak_processes, usage.peak_processes)

    def call(self, payload: Any) -> CallResult:
        if payload is None:
            raise ValueError("None is the worker's stop message; pass any other payload")
        with TreeSampler(self.process.pid) as sampler:
            self.connection.send(payload)
            reply = self.connection.recv()
        if reply[0] == "error":
            raise RuntimeError(f"variant {self.name} failed:\n{reply[1]}")
        _, value, wall_s, own_cpu_s = reply
        self._merge(sampler.usage)
        root_cpu = sampler.last_cpu.get(self.process.pid, 0.0) - sampler.first_cpu.get(self.process.pid, 0.0)
        cpu_s = own_cpu_s + max(0.0, sampler.usage.cpu_s - root_cpu)
        usage = sampler.usage
        return CallResult(value=value, wall_s=wall_s, cpu_s=cpu_s, peak_rss_mib=usage.peak_rss_mib, peak_pss_mib=usage.peak_pss_mib,
                          peak_process_rss_mib=usage.peak_process_rss_mib, processes=usage.peak_processes,
                          cpu_by_role={role: seconds for role, seconds in sampler.cpu_by_role().items() if role != "main"} | {"main": own_cpu_s})

    def close(self) -> None:
        if not self.process.is_alive():
            return
        self.connection.send(None)
        reply = self.connection.recv()
        if reply[0] == "closed":
            self.max_rss_mib = reply[1]
        self.process.join(timeout=60)


class GemmProbe:
    """Single-thread matrix-product throughput per CPU-second in torch: fp32, bf16 and int8 (``torch._int_mm``).

    The empirical ceiling a transformer's matrix products can reach on this CPU with these kernels,
    measured per CPU-second so that background load does not lower it. Run it in its own process
    with one thread: ``VariantProcess("gemm", GemmProbe, threads=1).call("run").value``.
    """

    def __init__(self, size: int = 2048, seconds: float = 1.5):
        self.size = size
        self.seconds = seconds

    def __call__(self, _payload: Any) -> dict[str, float]:
        import torch

        size = self.size
        results = {}
        cases = {
            "fp32": (lambda: torch.randn(size, size), torch.matmul),
            "bf16": (lambda: torch.randn(size, size, dtype=torch.bfloat16), torch.matmul),
            "int8": (lambda: torch.randint(-127, 127, (size, size), dtype=torch.int8), getattr(torch, "_int_mm", None)),
        }
        for precision, (make, product) in cases.items():
            if product is None:
                continue
            a, b = make(), make()
            try:
                product(a, b)
            except RuntimeError:
                continue
            cpu_started, wall_started, repetitions = time.process_time(), time.perf_counter(), 0
            while time.perf_counter() - wall_started < self.seconds:
                product(a, b)
                repetitions += 1
            results[precision] = 2 * size**3 * repetitions / (time.process_time() - cpu_started) / 1e9
        return results


def add_variant_arguments(parser, variants: Sequence[str], defaults: Sequence[str]) -> None:
    """The flags every benchmark of variants takes: ``--variants``, ``--threads``, ``--batch-size``, ``--max-length``."""
    parser.add_argument("--variants", default=",".join(defaults), help="comma-separated, from: " + ", ".join(variants) + " (or all)")
    parser.add_argument("--threads", type=int, default=0, help="threads per variant (0 = all cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)


def resolve_variants(parser, arguments, variants: Sequence[str], baseline: str) -> None:
    """``arguments.variants`` as a list (``all`` = every one; the baseline first if missing), ``arguments.threads`` filled in."""
    chosen = arguments.variants
    arguments.variants = list(variants) if chosen == "all" else [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in arguments.variants if name not in variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(variants)}")
    if baseline not in arguments.variants:
        arguments.variants.insert(0, baseline)
    arguments.threads = arguments.threads or physical_cores()


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order in which variants take their turn in a round: rotated by one each round."""
    shift = round_index % max(1, len(names))
    return list(names[shift:]) + list(names[:shift])


# --------------------------------------------------------------------------- reporting


def environment_report(threads: int) -> dict[str, Any]:
    """What a result depends on besides the code: CPU, cores, load, threads, package versions, commit."""
    import importlib.metadata

    versions = {}
    for package in ("torch", "transformers", "sentence-transformers", "faiss-cpu", "ray", "onnxruntime", "onnx", "openvino", "nncf", "numpy", "ir-measures"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    model_name = platform.processor()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPOSITORY, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "cpu": model_name,
        "cores": physical_cores(),
        "isa": sorted(flag for flag in flags if flag.startswith(("avx512", "amx", "avx_vnni", "avx2"))),
        "threads_per_variant": threads,
        "load_average_at_start": os.getloadavg(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "versions": versions,
        "environment": {name: os.environ[name] for name in sorted(os.environ) if name.startswith(("OMP_", "MKL_", "OPENBLAS_", "TOKENIZERS_"))},
        "commit": commit,
    }


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], title: str = "") -> str:
    """A Markdown table: ``columns`` are (key, header, format spec); missing values print as ``-``."""

    def cell(value: Any, spec: str) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        if spec and isinstance(value, (int, float, np.integer, np.floating)):
            return format(value, spec)
        return str(value)

    from pipelines.runtime import format_table as format_text_table

    header = [heading for _, heading, _ in columns]
    body = [[cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    return format_text_table(body, title + "\n" if title else "", headers=header, markdown=True)


def write_results(path: str | Path, payload: dict[str, Any]) -> None:
    """Write the results JSON atomically (the folder is created; bench/results/ is git-ignored)."""
    from pipelines import storage

    payload = dict(payload)
    payload.setdefault("load_average_at_end", os.getloadavg())
    storage.write_json_atomically(str(Path(path).resolve()), _jsonable(payload))
    print(f"results written to {path}")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


@dataclass
class Timer:
    """Wall seconds of a block: ``with Timer() as timer: ...; timer.seconds``."""

    seconds: float = 0.0
    _started: float = field(default=0.0, repr=False)

    def __enter__(self) -> Self:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
