"""Index choice on one million structured synthetic vectors: build time, bytes per vector, queries/s, recall.

The vectors imitate all-MiniLM-L6-v2 document embeddings (384-d, normalized) in the statistics that
matter to IVF and PQ, measured on SciFact: a shared mean direction (mean vector norm 0.38, mean cosine
of random pairs 0.14) and a covariance whose eigenvalues fall off as 1/i in a random basis; they are
a mixture of ``--clusters`` gaussian clusters of lognormal sizes. Queries are drawn from the same
distribution (not from the base set). Ground truth is brute force (numpy, in chunks).

Variants, all searched through ``pipelines.shard_search.ShardSearcher`` (one shard, batches of 256
queries, its merge and its exact re-scoring against the shard's stored vectors):

- ``Flat``: exact inner-product search (``IndexFlatIP`` as ``make_empty_index("Flat")`` builds it);
- IVF-PQ from ``choose_index_parameters`` (trained by ``pipelines.index_building.train_index`` on the
  sample the rule asks for, filled like ``fill_shard``), at several nprobe, without re-scoring and with
  exact re-scoring of ``--depths`` candidates (``SearchConfig.rescoring_candidates``; 200 = 2 x top-k,
  the default); other PQ sizes reuse its coarse quantizer; other nlist are trained the same way;
- ``fp16`` rows re-score against float16 copies of the vectors (half the memory of the float32 file).

Each search configuration runs ``--repeats`` times in rotating order together with Flat; queries/s
are medians and speed-ups are per repeat (median), so that background load falls on all alike.

    python -m bench.index --quick          # 100k vectors, about two minutes
    python -m bench.index                  # 1M vectors, about ten minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from unittest import mock

import numpy as np

from bench.common import RESULTS, environment_report, format_table, median, physical_cores, prepare_environment, set_threads, write_results

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


def make_searcher(index, vectors: np.ndarray | None, nprobe: int, depth: int, threads: int):
    """A real ``ShardSearcher`` over an in-memory shard (its storage loading patched out)."""
    from pipelines import index_store
    from pipelines.index_store import IndexShard
    from pipelines.shard_search import SearchConfig, ShardSearcher

    shard = IndexShard(number=0, index=index, first_position=0, vectors=vectors if depth else None)
    config = SearchConfig(top_k=TOP_K, exact_rescoring=bool(depth), rescoring_candidates=depth, nprobe=nprobe)
    with mock.patch.object(index_store, "read_manifest", return_value={}), mock.patch.object(index_store, "load_shard", return_value=shard):
        return ShardSearcher("memory://unused", "unused", 0, config, threads=threads)


def run_searcher(searcher, queries: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    """Top-k positions for all queries through the searcher's Ray Data batch call; (positions, seconds)."""
    out = []
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        result = searcher({"query_embedding": queries[start : start + batch]})
        out.append(result["candidate_positions"])
    return np.concatenate(out), time.perf_counter() - started


@dataclass
class BuiltIndex:
    name: str
    factory: str
    index: object
    nlist: int
    pq_bytes: int
    train_s: float
    add_s: float
    index_bytes: int
    default_nprobe: int
    training_sample: int


def build_flat(base: np.ndarray) -> BuiltIndex:
    from pipelines import index_store
    from pipelines.index_building import make_empty_index

    started = time.perf_counter()
    index = make_empty_index("Flat", base.shape[1])
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    add_s = time.perf_counter() - started
    return BuiltIndex("Flat", "Flat", index, 0, 0, 0.0, add_s, len(index_store.serialize_index(index)), 0, 0)


def build_with_pipeline(base: np.ndarray, factory: str, name: str) -> BuiltIndex:
    """Train like ``build_shards`` (rule's sample, ``train_index``) and fill like ``fill_shard``."""
    import faiss

    from pipelines import index_store
    from pipelines.index_building import IndexConfig, choose_index_parameters, sample_positions, train_index

    plan = choose_index_parameters(len(base), base.shape[1], IndexConfig(factory=factory))
    sample = base[sample_positions(len(base), plan.training_sample, plan.seed)]
    started = time.perf_counter()
    trained = train_index(plan.factory, sample, plan.seed)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    index = index_store.deserialize_index(trained)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    add_s = time.perf_counter() - started
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    return BuiltIndex(name, plan.factory, index, int(ivf.nlist), int(ivf.pq.M), train_s, add_s, len(index_store.serialize_index(index)), plan.nprobe, plan.training_sample)


def build_sharing_quantizer(base: np.ndarray, reference: BuiltIndex, pq_bytes: int, assignment: np.ndarray, assign_s: float) -> BuiltIndex:
    """IVF-PQ with ``reference``'s trained coarse quantizer and a new PQ of ``pq_bytes`` (trained on the same sample)."""
    import faiss

    from pipelines import index_store
    from pipelines.index_building import IndexConfig, choose_index_parameters, sample_positions

    factory = f"IVF{reference.nlist},PQ{pq_bytes}"
    plan = choose_index_parameters(len(base), base.shape[1], IndexConfig(factory=factory))
    quantizer = faiss.clone_index(faiss.extract_index_ivf(reference.index).quantizer)
    index = faiss.IndexIVFPQ(quantizer, base.shape[1], reference.nlist, pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.seed = plan.seed
    sample = base[sample_positions(len(base), plan.training_sample, plan.seed)]
    started = time.perf_counter()
    index.train(sample)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    ids = np.arange(len(base), dtype=np.int64)
    for start in range(0, len(base), CHUNK):
        end = min(start + CHUNK, len(base))
        index.add_core(end - start, faiss.swig_ptr(base[start:end]), faiss.swig_ptr(ids[start:end]), faiss.swig_ptr(assignment[start:end]))
    add_s = time.perf_counter() - started + assign_s
    size = len(index_store.serialize_index(index))
    return BuiltIndex(f"IVF{reference.nlist},PQ{pq_bytes}", factory, index, reference.nlist, pq_bytes, reference.train_s + train_s, add_s, size, plan.nprobe, plan.training_sample)


def parse_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k vectors, 200 queries, 200 clusters, 2 repeats")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobes", default="16,32,64,128,256", help="nprobe values for the rule's nlist (scaled for other nlist)")
    parser.add_argument("--depths", default="0,200,500,1000", help="re-scored candidates (0 = no re-scoring; 200 = 2 x top-k, the default)")
    parser.add_argument("--pq", default="32,96", help="extra PQ sizes (bytes per vector) on the rule's coarse quantizer")
    parser.add_argument("--nlists", default="1024", help="extra nlist values, trained like the rule's (0 = none)")
    parser.add_argument("--extra-nprobe-depth", default="64:500,128:500,128:1000", help="nprobe:depth pairs (at the rule's nlist) for the extra indexes and fp16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0 = all cores)")
    parser.add_argument("--output", default=str(RESULTS / "index.json"))
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.count, arguments.queries, arguments.clusters, arguments.repeats = min(arguments.count, 100_000), min(arguments.queries, 200), min(arguments.clusters, 200), 2
        arguments.nlists = "64"
        arguments.nprobes = "8,16,32,64"
        arguments.depths = "0,200,1000"
        arguments.extra_nprobe_depth = "32:500"
    arguments.threads = arguments.threads or physical_cores()
    return arguments


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    import faiss

    from pipelines.index_building import IndexConfig, choose_index_parameters

    threads = set_threads(arguments.threads)
    environment = environment_report(arguments.threads)
    environment.update(threads)
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

    rule = choose_index_parameters(spec.count, spec.dimension, IndexConfig())
    print(f"choose_index_parameters({spec.count:,}, {spec.dimension}) -> {rule.factory}, nprobe {rule.nprobe}, training sample {rule.training_sample:,}", flush=True)
    indexes: dict[str, BuiltIndex] = {"Flat": build_flat(base)}
    reference = build_with_pipeline(base, rule.factory, rule.factory)
    indexes[reference.name] = reference
    print(f"built {reference.name}: train {reference.train_s:.0f} s, add {reference.add_s:.0f} s", flush=True)
    started = time.perf_counter()
    _, assignment = faiss.extract_index_ivf(reference.index).quantizer.search(base, 1)
    assignment = np.ascontiguousarray(assignment.reshape(-1), dtype=np.int64)
    assign_s = time.perf_counter() - started
    for pq_bytes in parse_list(arguments.pq):
        if spec.dimension % pq_bytes or pq_bytes == reference.pq_bytes:
            continue
        built = build_sharing_quantizer(base, reference, pq_bytes, assignment, assign_s)
        indexes[built.name] = built
        print(f"built {built.name} (shared coarse quantizer): PQ train {built.train_s - reference.train_s:.0f} s, add {built.add_s:.0f} s", flush=True)
    for nlist in parse_list(arguments.nlists):
        if nlist and nlist != reference.nlist:
            built = build_with_pipeline(base, f"IVF{nlist},PQ{reference.pq_bytes}", f"IVF{nlist},PQ{reference.pq_bytes}")
            indexes[built.name] = built
            print(f"built {built.name}: train {built.train_s:.0f} s, add {built.add_s:.0f} s", flush=True)
    del assignment
    half = base.astype(np.float16)

    # Search configurations: (label, index name, nprobe, depth, vectors).
    configs = [("Flat", "Flat", 0, 0, None)]
    for nprobe in parse_list(arguments.nprobes):
        for depth in parse_list(arguments.depths):
            configs.append((f"{reference.name} nprobe={nprobe} depth={depth}", reference.name, nprobe, depth, base))
    extra_pairs = [tuple(int(x) for x in pair.split(":")) for pair in arguments.extra_nprobe_depth.split(",") if pair]
    for name, built in indexes.items():
        if name in ("Flat", reference.name):
            continue
        for nprobe, depth in extra_pairs:
            scaled = max(1, round(nprobe * built.nlist / reference.nlist))
            configs.append((f"{name} nprobe={scaled} depth={depth}", name, scaled, depth, base))
    for nprobe, depth in extra_pairs:
        label = f"{reference.name} nprobe={nprobe} depth={depth}"
        if label not in [existing for existing, *_ in configs]:
            configs.append((label, reference.name, nprobe, depth, base))
        configs.append((f"{label} fp16", reference.name, nprobe, depth, half))
    default_label = f"{reference.name} nprobe={rule.nprobe} depth={2 * TOP_K}"
    if default_label not in [label for label, *_ in configs]:
        configs.append((default_label, reference.name, rule.nprobe, 2 * TOP_K, base))

    rows = {label: {"config": label, "index": name, "nprobe": nprobe, "depth": depth, "seconds": [], "speedups": []} for label, name, nprobe, depth, _ in configs}
    for repeat in range(arguments.repeats):
        order = configs[1:][repeat % max(1, len(configs) - 1):] + configs[1:][: repeat % max(1, len(configs) - 1)]
        flat_seconds = None
        for label, name, nprobe, depth, vectors in [configs[0], *order]:
            searcher = make_searcher(indexes[name].index, vectors, nprobe, depth, arguments.threads)
            found, seconds = run_searcher(searcher, queries)
            row = rows[label]
            row["seconds"].append(seconds)
            if label == "Flat":
                flat_seconds = seconds
            row["speedups"].append(flat_seconds / seconds)
            if repeat == 0:
                row["recall@10"] = recall(found, truth, 10)
                row["recall@100"] = recall(found, truth, 100)
        print(f"  repeat {repeat + 1}/{arguments.repeats}: flat {spec.queries / flat_seconds:.0f} q/s", flush=True)

    vector_bytes = {None: 0, "float32": 4 * spec.dimension, "float16": 2 * spec.dimension}
    table_rows = []
    for label, name, nprobe, depth, vectors in configs:
        row = rows[label]
        built = indexes[name]
        row["queries_per_s"] = spec.queries / median(row["seconds"])
        row["speedup"] = median(row["speedups"])
        row["index_bytes_per_vector"] = built.index_bytes / spec.count
        kind = None if not depth else ("float16" if vectors is half else "float32")
        row["rescoring_vectors"] = kind
        row["bytes_per_vector"] = row["index_bytes_per_vector"] + vector_bytes[kind]
        row["build_s"] = built.train_s + built.add_s
        row["marker"] = "<- default rule" if label == default_label else ""
        table_rows.append(row)
    table = format_table(table_rows, [
        ("config", "configuration", ""),
        ("queries_per_s", "queries/s", ".0f"),
        ("speedup", "x Flat", ".1f"),
        ("recall@10", "recall@10", ".3f"),
        ("recall@100", "recall@100", ".3f"),
        ("index_bytes_per_vector", "index B/vec", ".0f"),
        ("bytes_per_vector", "B/vec incl. re-scoring", ".0f"),
        ("build_s", "build s", ".0f"),
        ("marker", "", ""),
    ], title=f"bench.index: {spec.count:,} synthetic {spec.dimension}-d vectors ({spec.clusters} clusters), {spec.queries} queries, top-{TOP_K}, {arguments.threads} faiss threads, median of {arguments.repeats}")
    builds = [{"index": b.name, "factory": b.factory, "training_sample": b.training_sample, "train_s": b.train_s, "add_s": b.add_s, "index_bytes": b.index_bytes, "rule_nprobe": b.default_nprobe} for b in indexes.values()]
    build_table = format_table(builds, [("index", "index", ""), ("training_sample", "training sample", ",d"), ("train_s", "train s", ".0f"), ("add_s", "add s", ".0f"), ("index_bytes", "bytes", ",d")], title="builds (PQ variants reuse the rule's coarse quantizer: train s includes it, add s includes the shared assignment)")
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
        "builds": builds,
        "configs": table_rows,
        "table": table,
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
