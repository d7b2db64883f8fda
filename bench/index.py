"""Index choice on one million structured synthetic vectors: build time, bytes per vector, queries/s, recall.

The vectors imitate all-MiniLM-L6-v2 document embeddings (384-d, normalized) in the statistics that
matter to IVF and PQ, measured on SciFact: a shared mean direction (mean vector norm 0.38, mean cosine
of random pairs 0.14) and a covariance whose eigenvalues fall off as 1/i in a random basis; they are
a mixture of ``--clusters`` gaussian clusters of lognormal sizes. Queries are drawn from the same
distribution (not from the base set). Ground truth is brute force (numpy, in chunks).

Every configuration is searched through ``pipelines.shard_search.ShardSearcher`` (one shard in
memory, ``ShardSearcher.from_shard``; batches of 256 queries, its merge, and its exact re-scoring of
``depth`` candidates against the shard's float32 vectors), in one of two modes:

- ``[pipeline]``: the searcher as it is: it sets ``faiss.cvar.distance_compute_blas_threshold = 20``
  (faiss 1.15 keeps batches under 128,000 query x dimension values off BLAS: a batch of 256 384-d
  queries ran 7.6x slower on 2 threads), re-scores with ``faiss.fvec_inner_products_by_idx``
  (``pipelines.shard_search.exact_scores``) and does not re-score exact indexes (Flat);
- ``[old]``: the searcher before issue 5, for a baseline: faiss's default threshold and an einsum over
  the gathered candidates (:func:`numpy_exact_scores`).

Indexes: ``Flat`` (as ``make_empty_index("Flat")`` builds it); the IVF-PQ of ``choose_index_parameters``
(``IVF4096,PQ192x4fs`` at 1M; under 250,000 vectors the rule picks Flat, and the IVF-PQ it would pick
from 250,000 up is built at this size instead), trained by ``pipelines.index_building.train_index`` on
the sample the rule asks for and filled like ``fill_shard``; the previous rule's index
(:func:`old_index_parameters`, ``IVF4096,PQ48``, nprobe 128 at 1M), trained the same way; other codecs
(8-bit PQ, 4-bit fast-scan PQ) on the rule's coarse quantizer; other nlist trained the same way;
``Refine(SQfp16)`` / ``Refine(SQ8)`` rows re-score in faiss (``IndexRefine``) against 2- or
1-byte-per-dimension copies of the vectors instead of the searcher's float32 ones. "x Flat" compares
with ``Flat [pipeline]`` (BLAS), "x Flat [old]" with faiss's default path.

Each configuration runs ``--repeats`` times in rotating order together with Flat; queries/s are
medians and speed-ups per repeat (median), so that background load falls on all alike.

    python -m bench.index --quick          # 100k vectors, a few minutes
    python -m bench.index                  # 1M vectors, about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import dataclass
from unittest import mock

import numpy as np

from bench.common import (
    RESULTS,
    environment_report,
    format_table,
    median,
    physical_cores,
    prepare_environment,
    set_threads,
    write_results,
)

TOP_K = 100
CHUNK = 100_000


@dataclass(frozen=True)
class SyntheticSpec:
    """A seeded mixture of anisotropic gaussian clusters around a shared mean, normalized."""

    count: int = 1_000_000
    queries: int = 1000
    dimension: int = 384
    clusters: int = 2000
    seed: int = 0
    mean_norm: float = 0.374
    center_scale: float = 0.6
    noise_scale: float = 0.707
    decay: float = 1.0


class SyntheticVectors:
    """Generates the base set chunk by chunk (each chunk from its own seed) and the queries.

    Example:
        >>> data = SyntheticVectors(SyntheticSpec(count=1000, queries=10, clusters=20))
        >>> data.base().shape, data.queries().shape
        ((1000, 384), (10, 384))
    """

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        dimension = spec.dimension
        self.basis, _ = np.linalg.qr(rng.standard_normal((dimension, dimension)))
        variances = np.arange(1, dimension + 1, dtype=np.float64) ** (-spec.decay)
        self.scales = np.sqrt(variances / variances.sum())
        mean = rng.standard_normal(dimension)
        self.mean = mean / np.linalg.norm(mean) * spec.mean_norm
        self.centers = (rng.standard_normal((spec.clusters, dimension)) * self.scales) @ self.basis.T * spec.center_scale
        weights = rng.lognormal(0.0, 1.0, spec.clusters)
        self.weights = weights / weights.sum()

    def _draw(self, count: int, stream: list[int]) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, *stream])
        labels = rng.choice(self.spec.clusters, size=count, p=self.weights)
        noise = (rng.standard_normal((count, self.spec.dimension)) * self.scales) @ self.basis.T * self.spec.noise_scale
        points = self.mean + self.centers[labels] + noise
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        return points.astype(np.float32)

    def base(self) -> np.ndarray:
        out = np.empty((self.spec.count, self.spec.dimension), dtype=np.float32)
        for number, start in enumerate(range(0, self.spec.count, CHUNK)):
            end = min(start + CHUNK, self.spec.count)
            out[start:end] = self._draw(end - start, [1, number])
        return out

    def queries(self) -> np.ndarray:
        return self._draw(self.spec.queries, [2, 0])


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids per query by inner product (numpy, chunked), best first."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(base), CHUNK):
        scores = queries @ base[start : start + CHUNK].T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, axis=1)
        best_ids = np.take_along_axis(best_ids, keep, axis=1)
    return best_ids


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    hits = [len(np.intersect1d(found[row, :k], truth[row, :k], assume_unique=False)) for row in range(len(truth))]
    return float(np.mean(hits) / k)


def numpy_exact_scores(queries: np.ndarray, vectors: np.ndarray, local_ids: np.ndarray) -> np.ndarray:
    """``pipelines.shard_search.exact_scores`` before issue 5: an einsum over the gathered (queries, candidates, d) array."""
    valid = local_ids >= 0
    gathered = vectors[np.where(valid, local_ids, 0)]
    scores = np.einsum("qd,qkd->qk", queries, gathered, dtype=np.float32)
    return np.where(valid, scores, -np.inf).astype(np.float32)


FAISS_DEFAULT_BLAS_THRESHOLD = None  # faiss's own value, read by main before any searcher sets it


@contextlib.contextmanager
def searcher_mode(mode: str):
    """Within: searchers made by :func:`make_searcher` run as ``pipeline`` (as they are) or ``old`` (before issue 5)."""
    import faiss

    from pipelines import shard_search

    if mode == "pipeline":
        yield
        return
    saved = faiss.cvar.distance_compute_blas_threshold
    try:
        with mock.patch.object(shard_search, "exact_scores", numpy_exact_scores):
            yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def make_searcher(index, vectors: np.ndarray | None, nprobe: int, depth: int, threads: int, mode: str = "pipeline"):
    """A real ``ShardSearcher`` over an in-memory shard; in ``old`` mode with faiss's default BLAS threshold again."""
    import faiss

    from pipelines.index_store import IndexShard
    from pipelines.shard_search import SearchConfig, ShardSearcher

    shard = IndexShard(number=0, index=index, first_position=0, vectors=vectors if depth else None)
    config = SearchConfig(top_k=TOP_K, exact_rescoring=bool(depth), rescoring_candidates=depth, nprobe=nprobe)
    searcher = ShardSearcher.from_shard(shard, config, threads=threads)
    if mode == "old":
        assert FAISS_DEFAULT_BLAS_THRESHOLD is not None, "main records faiss's default first"
        faiss.cvar.distance_compute_blas_threshold = FAISS_DEFAULT_BLAS_THRESHOLD
    return searcher


def default_rescoring_depth(threads: int) -> int:
    """The candidates ``ShardSearcher`` re-scores for an approximate index when ``SearchConfig.rescoring_candidates`` is left at 0."""
    import faiss

    from pipelines.index_store import IndexShard
    from pipelines.shard_search import SearchConfig, ShardSearcher

    approximate = faiss.IndexScalarQuantizer(4, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    shard = IndexShard(number=0, index=approximate, first_position=0, vectors=np.zeros((0, 4), dtype=np.float32))
    return int(ShardSearcher.from_shard(shard, SearchConfig(top_k=TOP_K), threads=threads).candidates)


def run_searcher(searcher, queries: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    """Top-k positions for all queries through the searcher's Ray Data batch call; (positions, seconds)."""
    out = []
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        result = searcher({"query_embedding": queries[start : start + batch]})
        out.append(result["candidate_positions"])
    return np.concatenate(out), time.perf_counter() - started


def old_index_parameters(count: int, dimension: int):
    """The plan ``choose_index_parameters`` made before issue 5, for the baseline row.

    Flat under 2,000 vectors; IVF with a power of two near sqrt(n) lists (4·sqrt(n) from a million up),
    at least 39 vectors per list, and 8-bit PQ with one byte per 8 dimensions; nprobe half the lists,
    at most 128; shards and training sample as today.
    """
    from pipelines.index_building import (
        IndexConfig,
        _power_of_two,
        choose_index_parameters,
        ivf_list_count,
        pq_subquantizers,
    )

    factory = "Flat"
    if count >= 2_000:
        nlist = max(1, min(_power_of_two(math.sqrt(count) * (4 if count >= 1_000_000 else 1)), count // 39))
        factory = f"IVF{nlist},PQ{pq_subquantizers(dimension)}"
    nprobe = min(128, max(1, ivf_list_count(factory, dimension) // 2)) if factory != "Flat" else 0
    return choose_index_parameters(count, dimension, IndexConfig(factory=factory, nprobe=nprobe))


@dataclass
class BuiltIndex:
    name: str
    factory: str
    index: object
    nlist: int
    train_s: float
    add_s: float
    index_bytes: int
    rule_nprobe: int
    training_sample: int
    note: str = ""


def build_flat(base: np.ndarray) -> BuiltIndex:
    from pipelines import index_store
    from pipelines.index_building import make_empty_index

    started = time.perf_counter()
    index = make_empty_index("Flat", base.shape[1])
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    add_s = time.perf_counter() - started
    return BuiltIndex("Flat", "Flat", index, 0, 0.0, add_s, len(index_store.serialize_index(index)), 0, 0)


def build_with_pipeline(base: np.ndarray, factory: str) -> BuiltIndex:
    """Train like ``build_shards`` (the rule's sample, ``train_index``) and fill like ``fill_shard``."""
    import faiss

    from pipelines import index_store
    from pipelines.index_building import (
        IndexConfig,
        choose_index_parameters,
        sample_positions,
        train_index,
    )

    plan = choose_index_parameters(len(base), base.shape[1], IndexConfig(factory=factory))
    sample = base[sample_positions(len(base), plan.training_sample, plan.seed)]
    started = time.perf_counter()
    trained = train_index(plan.factory, sample, plan.seed)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    index = index_store.deserialize_index(trained)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    add_s = time.perf_counter() - started
    nlist = int(faiss.extract_index_ivf(index).nlist)
    return BuiltIndex(factory, factory, index, nlist, train_s, add_s, len(index_store.serialize_index(index)), plan.nprobe, plan.training_sample,
                      "train_index + add_with_ids")


def build_sharing_quantizer(base: np.ndarray, reference: BuiltIndex, codec: str, assignment: np.ndarray, assign_s: float) -> BuiltIndex:
    """IVF with ``reference``'s trained coarse quantizer and a new ``codec`` (e.g. PQ32, PQ192x4fs) trained on the same sample."""
    import faiss

    from pipelines import index_store
    from pipelines.index_building import (
        IndexConfig,
        choose_index_parameters,
        make_empty_index,
        sample_positions,
    )

    factory = f"IVF{reference.nlist},{codec}"
    plan = choose_index_parameters(len(base), base.shape[1], IndexConfig(factory=factory))
    index = make_empty_index(factory, base.shape[1])
    ivf = faiss.extract_index_ivf(index)
    reference_quantizer = faiss.extract_index_ivf(reference.index).quantizer
    ivf.quantizer.add(reference_quantizer.reconstruct_n(0, reference.nlist))
    sample = base[sample_positions(len(base), plan.training_sample, plan.seed)]
    started = time.perf_counter()
    index.train(sample)  # the quantizer is trained and full: only the codec is trained
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    ids = np.arange(len(base), dtype=np.int64)
    if "fs" in codec:  # fast-scan packs codes in blocks: add through its own path (assigns again)
        index.add_with_ids(base, ids)
        add_s = time.perf_counter() - started
    else:
        for start in range(0, len(base), CHUNK):
            end = min(start + CHUNK, len(base))
            index.add_core(end - start, faiss.swig_ptr(base[start:end]), faiss.swig_ptr(ids[start:end]), faiss.swig_ptr(assignment[start:end]))
        add_s = time.perf_counter() - started + assign_s
    size = len(index_store.serialize_index(index))
    return BuiltIndex(factory, factory, index, reference.nlist, reference.train_s + train_s, add_s, size, plan.nprobe, plan.training_sample,
                      f"coarse quantizer of {reference.name}")


@dataclass(frozen=True)
class Case:
    """One search configuration: index, nprobe, re-scored candidates (0 = none), vectors, searcher mode."""

    index: str
    nprobe: int
    depth: int
    vectors: str | None  # float32 (the searcher re-scores), SQfp16 / SQ8 (faiss IndexRefine re-scores), None
    mode: str  # pipeline or old (see searcher_mode)
    repeats: int = 0  # 0 = every repeat

    @property
    def label(self) -> str:
        parts = [self.index]
        if self.nprobe:
            parts.append(f"nprobe={self.nprobe}")
        if self.index != "Flat":
            parts.append(f"depth={self.depth}")
        if self.vectors in REFINE_BYTES:
            parts.append(f"Refine({self.vectors})")
        parts.append(f"[{self.mode}]")
        return " ".join(parts)


REFINE_BYTES = {"SQfp16": 2, "SQ8": 1}


def refine_index(index, base: np.ndarray, kind: str):
    """``faiss.IndexRefine``: ``index``'s candidates re-scored against ``kind``-encoded vectors (ids = positions)."""
    import faiss

    quantizer_type = {"SQfp16": faiss.ScalarQuantizer.QT_fp16, "SQ8": faiss.ScalarQuantizer.QT_8bit}[kind]
    refine = faiss.IndexScalarQuantizer(base.shape[1], quantizer_type, faiss.METRIC_INNER_PRODUCT)
    refine.train(base[:: max(1, len(base) // 100_000)])
    refine.add(base)
    wrapper = faiss.IndexRefine(index, refine)
    wrapper.own_fields = False
    return wrapper, refine  # keep the refine index alive as long as the wrapper


def parse_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in pair.split(":")) for pair in text.split(",") if pair.strip()]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k vectors, 200 queries, 200 clusters, 2 repeats, a smaller grid (the rule picks Flat there)")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobes", default="32,64,128,256", help="nprobe grid at the rule's nlist (scaled for other nlist)")
    parser.add_argument("--depths", default="0,200,500,1000", help="re-scored candidates (0 = none)")
    parser.add_argument("--codecs", default="PQ32,PQ96,PQ96x4fs", help="other codecs on the rule's coarse quantizer (8-bit PQm, or 4-bit fast-scan PQmx4fs)")
    parser.add_argument("--nlists", default="1024", help="other nlist, trained like the rule's (0 = none)")
    parser.add_argument("--pairs", default="64:500,128:500,128:1000", help="nprobe:depth (at the rule's nlist) for the other indexes and the Refine rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0 = all cores)")
    parser.add_argument("--output", default=str(RESULTS / "index.json"))
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.count, arguments.queries, arguments.clusters, arguments.repeats = min(arguments.count, 100_000), min(arguments.queries, 200), min(arguments.clusters, 200), 2
        arguments.nlists, arguments.nprobes, arguments.depths, arguments.pairs, arguments.codecs = "0", "64,256", "0,200,500", "128:500", "PQ96x4fs"
    arguments.threads = arguments.threads or physical_cores()
    return arguments


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    import faiss

    from pipelines import index_building
    from pipelines.index_building import IndexConfig, choose_index_parameters

    threads = set_threads(arguments.threads)
    environment = environment_report(arguments.threads)
    environment.update(threads)
    global FAISS_DEFAULT_BLAS_THRESHOLD
    FAISS_DEFAULT_BLAS_THRESHOLD = environment["faiss_distance_compute_blas_threshold"] = faiss.cvar.distance_compute_blas_threshold
    spec = SyntheticSpec(count=arguments.count, queries=arguments.queries, clusters=arguments.clusters, seed=arguments.seed)
    print(f"{environment['cpu']}, {environment['cores']} cores, load {environment['load_average_at_start']}, faiss threads {faiss.omp_get_max_threads()}", flush=True)

    started = time.perf_counter()
    data = SyntheticVectors(spec)
    base, queries = data.base(), data.queries()
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    truth = brute_force(base, queries, TOP_K)
    truth_s = time.perf_counter() - started
    print(f"generated {spec.count:,} x {spec.dimension} in {generate_s:.0f} s; brute-force top-{TOP_K} of {spec.queries} queries in {truth_s:.0f} s", flush=True)
    random_pairs = np.random.default_rng(0).integers(0, len(base), (5000, 2))
    statistics = {
        "random_pair_cosine": float((base[random_pairs[:, 0]] * base[random_pairs[:, 1]]).sum(1).mean()),
        "mean_vector_norm": float(np.linalg.norm(base[: min(len(base), 200_000)].mean(0))),
        "query_top1_cosine": float((queries * base[truth[:, 0]]).sum(1).mean()),
        "query_top100_cosine": float((queries * base[truth[:, -1]]).sum(1).mean()),
    }

    # Indexes: Flat; the rule's IVF-PQ and the old rule's (trained by the pipeline's code); other codecs on the
    # rule's quantizer; other nlist.
    rule = choose_index_parameters(spec.count, spec.dimension, IndexConfig())
    ivf_rule = rule
    if rule.factory == "Flat":  # the IVF-PQ the rule picks from FLAT_BELOW up, at this size
        ivf_rule = choose_index_parameters(spec.count, spec.dimension, IndexConfig(factory=f"IVF{index_building.ivf_lists(spec.count)},{index_building.pq_codecs(spec.dimension)[0]}"))
    old = old_index_parameters(spec.count, spec.dimension)
    print(f"choose_index_parameters -> {rule.factory}, nprobe {rule.nprobe}" + (f" (IVF-PQ: {ivf_rule.factory}, nprobe {ivf_rule.nprobe})" if ivf_rule is not rule else "")
          + f"; old rule -> {old.factory}, nprobe {old.nprobe}", flush=True)
    indexes: dict[str, BuiltIndex] = {"Flat": build_flat(base)}
    reference = build_with_pipeline(base, ivf_rule.factory)
    indexes[reference.name] = reference
    print(f"built {reference.name}: train {reference.train_s:.0f} s, add {reference.add_s:.0f} s", flush=True)
    if old.factory not in indexes:
        built = build_with_pipeline(base, old.factory)
        indexes[built.name] = built
        print(f"built {built.name} (old rule): train {built.train_s:.0f} s, add {built.add_s:.0f} s", flush=True)
    codecs = [codec for codec in arguments.codecs.split(",") if codec.strip() and f"IVF{reference.nlist},{codec}" not in indexes]
    if any("fs" not in codec for codec in codecs):  # 8-bit PQ is added with the shared assignment
        started = time.perf_counter()
        _, assignment = faiss.extract_index_ivf(reference.index).quantizer.search(base, 1)
        assignment = np.ascontiguousarray(assignment.reshape(-1), dtype=np.int64)
        assign_s = time.perf_counter() - started
    else:
        assignment, assign_s = None, 0.0
    for codec in codecs:
        built = build_sharing_quantizer(base, reference, codec, assignment, assign_s)
        indexes[built.name] = built
        print(f"built {built.name} ({built.note}): codec train {built.train_s - reference.train_s:.0f} s, add {built.add_s:.0f} s", flush=True)
    for nlist in parse_list(arguments.nlists):
        name = f"IVF{nlist},{reference.name.split(',', 1)[1]}"
        if nlist and name not in indexes:
            built = build_with_pipeline(base, name)
            indexes[built.name] = built
            print(f"built {built.name}: train {built.train_s:.0f} s, add {built.add_s:.0f} s", flush=True)
    del assignment
    vectors = {"float32": base, None: None}
    refines = {}

    # Search cases.
    def scaled(nprobe: int, nlist: int) -> int:
        return max(1, min(nlist, round(nprobe * nlist / reference.nlist)))

    depth = default_rescoring_depth(arguments.threads)
    flat_old = Case("Flat", 0, 0, None, "old", repeats=1)
    baseline = Case("Flat", 0, 0, None, "pipeline")
    ivf_case = Case(reference.name, ivf_rule.nprobe, depth, "float32", "pipeline")
    default_case = baseline if rule.factory == "Flat" else ivf_case
    cases = [flat_old, baseline, ivf_case]
    old_case = None
    if old.factory != "Flat":
        old_case = Case(old.factory, old.nprobe, depth, "float32", "old")
        cases += [old_case, Case(old.factory, old.nprobe, depth, "float32", "pipeline")]
    for nprobe in parse_list(arguments.nprobes):
        for grid_depth in parse_list(arguments.depths):
            cases.append(Case(reference.name, nprobe, grid_depth, "float32" if grid_depth else None, "pipeline"))
    for name, built in indexes.items():
        if name in ("Flat", reference.name):
            continue
        for nprobe, pair_depth in parse_pairs(arguments.pairs):
            cases.append(Case(name, scaled(nprobe, built.nlist), pair_depth, "float32", "pipeline"))
    for kind in REFINE_BYTES:
        for nprobe, pair_depth in parse_pairs(arguments.pairs):
            cases.append(Case(reference.name, nprobe, pair_depth, kind, "pipeline"))
    cases = list(dict.fromkeys(cases))
    markers = {default_case: "<- pipeline default", old_case: "<- old rule and searcher"}
    if ivf_case != default_case:
        markers[ivf_case] = f"<- rule's IVF-PQ (from {index_building.FLAT_BELOW:,} vectors)"

    rows = {case: {"config": case.label, "index": case.index, "nprobe": case.nprobe, "depth": case.depth, "vectors": case.vectors, "mode": case.mode,
                   "seconds": [], "speedups": []} for case in cases}
    others = [case for case in cases if case != baseline]
    for repeat in range(arguments.repeats):
        shift = repeat % max(1, len(others))
        flat_seconds = None
        for case in [baseline, *others[shift:], *others[:shift]]:
            if case.repeats and repeat >= case.repeats:
                continue
            with searcher_mode(case.mode):
                if case.vectors in REFINE_BYTES:
                    key = (case.index, case.vectors)
                    if key not in refines:
                        refines[key] = refine_index(indexes[case.index].index, base, case.vectors)
                    wrapper = refines[key][0]
                    wrapper.k_factor = case.depth / TOP_K
                    searcher = make_searcher(wrapper, None, case.nprobe, 0, arguments.threads, case.mode)
                else:
                    searcher = make_searcher(indexes[case.index].index, vectors[case.vectors], case.nprobe, case.depth, arguments.threads, case.mode)
                found, seconds = run_searcher(searcher, queries)
            row = rows[case]
            row["seconds"].append(seconds)
            if case == baseline:
                flat_seconds = seconds
            row["speedups"].append(flat_seconds / seconds)
            if "recall@100" not in row:
                row["recall@10"] = recall(found, truth, 10)
                row["recall@100"] = recall(found, truth, 100)
        print(f"  repeat {repeat + 1}/{arguments.repeats}: Flat [pipeline] {spec.queries / flat_seconds:.0f} q/s", flush=True)

    vector_bytes = {None: 0, "float32": 4 * spec.dimension} | {kind: size * spec.dimension for kind, size in REFINE_BYTES.items()}
    table_rows = []
    for case in cases:
        row = rows[case]
        built = indexes[case.index]
        row["queries_per_s"] = spec.queries / median(row["seconds"])
        row["speedup"] = median(row["speedups"])
        row["speedup_vs_flat_old"] = median(rows[flat_old]["seconds"]) / median(row["seconds"])
        row["index_bytes_per_vector"] = built.index_bytes / spec.count
        row["bytes_per_vector"] = row["index_bytes_per_vector"] + vector_bytes[case.vectors if case.depth else None]
        row["build_s"] = built.train_s + built.add_s
        row["marker"] = markers.get(case, "")
        table_rows.append(row)
    table = format_table(table_rows, [
        ("config", "configuration [searcher]", ""),
        ("queries_per_s", "queries/s", ".0f"),
        ("speedup", "x Flat", ".1f"),
        ("speedup_vs_flat_old", "x Flat [old]", ".1f"),
        ("recall@10", "recall@10", ".3f"),
        ("recall@100", "recall@100", ".3f"),
        ("index_bytes_per_vector", "index B/vec", ".0f"),
        ("bytes_per_vector", "B/vec incl. re-scoring", ".0f"),
        ("build_s", "build s", ".0f"),
        ("marker", "", ""),
    ], title=(f"bench.index: {spec.count:,} synthetic {spec.dimension}-d vectors ({spec.clusters} clusters), {spec.queries} queries, top-{TOP_K}, "
              f"{arguments.threads} faiss threads, median of {arguments.repeats} (Flat [old]: 1)\n"
              "[pipeline] = pipelines.shard_search as it is (BLAS for query batches, faiss re-scoring); "
              "[old] = its searcher before issue 5 (faiss 1.15's BLAS threshold, numpy re-scoring)"))
    builds = [{"index": b.name, "training_sample": b.training_sample, "train_s": b.train_s, "add_s": b.add_s, "index_bytes": b.index_bytes,
               "rule_nprobe": b.rule_nprobe, "note": b.note} for b in indexes.values()]
    build_table = format_table(builds, [("index", "index", ""), ("training_sample", "training sample", ",d"), ("train_s", "train s", ".0f"),
                                        ("add_s", "add s", ".0f"), ("index_bytes", "bytes", ",d"), ("note", "", "")],
                               title="builds (shared quantizer: train s includes the rule's coarse training; 8-bit PQ add s includes the shared assignment)")
    print()
    print(table)
    print()
    print(build_table)
    print(f"\nsynthetic data: {statistics}")
    payload = {
        "benchmark": "index",
        "arguments": vars(arguments),
        "environment": environment,
        "spec": spec.__dict__,
        "statistics": statistics,
        "generate_s": generate_s,
        "ground_truth_s": truth_s,
        "rule": rule.__dict__,
        "ivf_rule": ivf_rule.__dict__,
        "old_rule": old.__dict__,
        "builds": builds,
        "configs": table_rows,
        "table": table,
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
