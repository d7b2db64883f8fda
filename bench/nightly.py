"""A nightly rebuild with churn against the full build: issue 11's bar for incremental indexing.

Steps, each timed with :class:`bench.scale.StageMonitor` (wall time, driver and largest Ray worker peak RSS), all
through ``pipelines.indexing.build_index`` with its defaults (BM25 on, the document store), in this process on a
local Ray instance started here:

1. ``full_build``: a cold build of the base snapshot (``--docs`` documents of :func:`bench.scale.generate_corpus`)
   on a fresh index root: everything embedded, the quantizer trained, every shard filled;
2. the churned snapshot is written as a second corpus folder (same layout: Parquet files plus one JSON-lines
   file; cached by docs, churn and seed): ``--churn`` of the documents, drawn at random through the whole
   corpus, get a new title and text, as many are removed, and as many new documents (new ids) are appended;
3. ``nightly_build``: ``build_index`` of the churned snapshot on the same root: an incremental build
   (``pipelines.incremental_index``: stored embeddings, the trained quantizer after its drift check and the
   unchanged shards are reused);
4. ``retrain_build``: the same snapshot with ``--faiss.retrain`` on the same root (embeddings reused; the
   quantizer trained anew and every shard filled), for reference;
5. recall@100 against exact search of the nightly and the retrained versions: ``--recall-queries`` synthetic
   queries (:func:`bench.scale.synthetic_queries`) embedded with the same tiny model; exact top-100 by brute-force
   inner product over the version's vectors read from the embedding store in blocks; approximate top-100 by the
   version's shard searchers at the manifest's nprobe with the default search settings, merged across shards
   (:func:`bench.scale.search_shard_by_shard`).

The bars: nightly wall time under a third of the full build's; the nightly version's recall@100 within 0.005 of
the retrained version's. The JSON (``--output``) holds the three stages, each build's per-stage seconds and its
``incremental`` entry (what was reused), the ratio, both recalls and a verdict per bar.

    python -m bench.nightly                    # 100k documents, 5% churn
    python -m bench.nightly --docs 1000000     # issue 11's run
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS,
    environment_report,
    exact_top_k,
    format_table,
    physical_cores,
    prepare_environment,
    write_results,
)
from bench.scale import (
    CHUNK,
    ROW_GROUP,
    TOP_K,
    StageMonitor,
    Vocabulary,
    _chunks,
    _json_lines,
    _publish_folder,
    generate_corpus,
    model_paths,
    search_shard_by_shard,
    start_ray,
    synthetic_documents,
    synthetic_queries,
)

RATIO_BAR = 1 / 3  # nightly wall time / full build wall time
RECALL_BAR = 0.005  # |nightly recall@100 - retrained recall@100|
EXACT_BLOCK = 100_000  # vectors read from the embedding store per block of the exact search
SUMMARY_SECONDS = ("read_seconds", "embedding_seconds", "index_seconds", "sparse_seconds", "documents_store_seconds", "wall_seconds")


def churn_counts(docs: int, churn: float) -> int:
    """Documents changed (and as many removed, as many new) for a churn fraction."""
    return round(docs * churn)


def generate_churned_corpus(workdir: Path, base: Path, churn: float, seed: int) -> Path:
    """The churned snapshot of the base corpus folder ``base`` (from :func:`generate_corpus`), generated unless cached.

    Positions changed and removed are drawn (seeded) among all the base documents; a changed document keeps its id and
    gets a new title and text; new documents ``d<docs>``... are appended to the JSON-lines file. Each base file is
    rewritten with its own documents (one file in memory at a time), under a temporary folder renamed into place."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    spec = json.loads((base.parent / "spec.json").read_text())
    docs, layout = spec["documents"], spec["layout"]
    count = churn_counts(docs, churn)
    final = workdir / f"{base.parent.name}-churn{churn:g}-seed{seed}"
    if (final / "spec.json").exists():
        return final / "corpus"
    rng = np.random.default_rng([seed, 3, docs, count])
    picked = rng.choice(docs, size=2 * count, replace=False)
    changed, removed = np.sort(picked[:count]), np.sort(picked[count:])
    temporary = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=workdir))
    data = temporary / "corpus"
    data.mkdir()
    started = time.perf_counter()
    vocabulary = Vocabulary.from_tokenizer()
    for name, first, rows in layout:
        table = pq.read_table(base / name) if name.endswith(".parquet") else pj.read_json(base / name)
        table = table.select(["_id", "title", "text"])
        local_changed = changed[(changed >= first) & (changed < first + rows)] - first
        local_removed = removed[(removed >= first) & (removed < first + rows)] - first
        new_texts = synthetic_documents(vocabulary, 2 * docs + first, len(local_changed), seed)  # other draws than any base document's
        replaced = pa.table({"_id": table["_id"].take(pa.array(local_changed)), "title": new_texts["title"], "text": new_texts["text"]}).cast(table.schema)
        take = np.arange(rows, dtype=np.int64)
        take[local_changed] = rows + np.arange(len(local_changed))
        take = np.delete(take, local_removed)
        table = pa.concat_tables([table, replaced]).take(pa.array(take))
        if name.endswith(".parquet"):
            pq.write_table(table, data / name, row_group_size=ROW_GROUP)
            continue
        with open(data / name, "wb") as handle:
            handle.writelines(_json_lines(table.slice(start, CHUNK)) for start in range(0, table.num_rows, CHUNK))
            handle.writelines(_json_lines(synthetic_documents(vocabulary, start, size, seed)) for start, size in _chunks(docs, count))
    churned = {"base": str(base), "documents": docs, "changed": len(changed), "removed": len(removed), "new": count, "churn": churn,
               "seed": seed, "generate_s": time.perf_counter() - started}
    (temporary / "spec.json").write_text(json.dumps(churned))
    _publish_folder(temporary, final)
    print(f"churned snapshot: {count:,} changed, {count:,} removed, {count:,} new in {churned['generate_s']:.1f} s: {final}", flush=True)
    return final / "corpus"


def embed_queries(texts: list[str], embedding) -> np.ndarray:
    """The query texts embedded by the documents' model and settings (float32, normalized like the documents)."""
    from pipelines.embedding import TextEncoder

    return np.asarray(TextEncoder(embedding, embedding.device).encode(texts), dtype=np.float32)


def exact_truth(root: str, manifest: dict[str, Any], embedding, queries: np.ndarray) -> np.ndarray:
    """The exact top-100 positions of ``queries`` over the version's vectors, read from the embedding store
    (located by (id, text_hash), as the build located them) EXACT_BLOCK at a time."""
    import pyarrow as pa

    from pipelines import index_store
    from pipelines.embedding import EmbeddingStore
    from pipelines.index_building import locate_vectors, read_training_vectors
    from pipelines.shard_search import empty_candidates, merge_top_k

    doc_ids = index_store.load_doc_ids(root, manifest)
    count = doc_ids.num_rows
    documents = doc_ids.select(["id", "text_hash"]).append_column("position", pa.array(np.arange(count, dtype=np.int64)))
    located = locate_vectors(documents, EmbeddingStore(root, embedding).keys())
    positions, scores = empty_candidates(len(queries), TOP_K)
    for start in range(0, count, EXACT_BLOCK):
        vectors = read_training_vectors(located, np.arange(start, min(start + EXACT_BLOCK, count)))
        block_scores, block_positions = exact_top_k(queries, vectors, TOP_K)
        positions, scores = merge_top_k(positions, scores, block_positions.astype(np.int64) + start, block_scores, TOP_K)
    return positions


def version_recall(root: str, version_id: str, embedding, queries: np.ndarray, threads: int) -> dict[str, Any]:
    """recall@100 of the version's shard searchers (the manifest's nprobe, default settings) against exact search."""
    from bench.index import recall
    from pipelines import index_store

    manifest = index_store.read_manifest(root, version_id)
    truth = exact_truth(root, manifest, embedding, queries)
    found, search_s, _, _, _ = search_shard_by_shard(root, version_id, manifest["shards"], queries, 0, threads)
    return {"version_id": version_id, "recall_at_100": recall(found, truth, TOP_K), "nprobe": manifest["index"]["nprobe"],
            "factory": manifest["index"]["factory"], "shards": len(manifest["shards"]), "search_s": search_s}


def build_row(name: str, monitor: StageMonitor, summary: dict[str, Any]) -> dict[str, Any]:
    """One build's stage result, the build summary's per-stage seconds and what it reused."""
    return {**monitor.result.__dict__, "stage": name, "version_id": summary["version_id"], "embedded": summary["embedded"],
            "reused_embeddings": summary["reused_embeddings"], "indexed": summary["indexed"], "incremental": summary["incremental"],
            "summary_seconds": {key: summary.get(key) for key in SUMMARY_SECONDS},
            "sparse_shards_reused": summary.get("sparse_shards_reused"), "documents_store_files_reused": summary.get("documents_store_files_reused")}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000, help="documents of the base snapshot")
    parser.add_argument("--churn", type=float, default=0.05, help="fraction of documents changed; as many removed, as many new")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recall-queries", type=int, default=1_000, help="queries of the recall@100 measure")
    parser.add_argument("--factory", default="auto", help="the builds' --faiss.factory (auto: the job's rule; at 1M tiny-model vectors an IVF-PQ index, "
                        "below 1M a Flat one, which has no quantizer to reuse: set e.g. IVF128,PQ16x4fs for a small run)")
    parser.add_argument("--shards", type=int, default=0, help="the builds' --faiss.shards (0: the job's rule)")
    parser.add_argument("--parquet-files", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=0, help="CPUs for Ray (0 = all)")
    parser.add_argument("--workdir", default=str(RESULTS / "nightly-work"), help="generated data (cached by size, churn and seed) and the index root")
    parser.add_argument("--keep", action="store_true", help="keep the index root")
    parser.add_argument("--output", "--out", default=str(RESULTS / "nightly.json"))
    arguments = parser.parse_args(argv)
    if arguments.docs < 100 or not 0 < arguments.churn < 0.5 or arguments.recall_queries < 1:
        parser.error("--docs of at least 100, --churn in (0, 0.5) and --recall-queries of at least 1")
    arguments.cpus = arguments.cpus or physical_cores()
    return arguments


STAGE_COLUMNS = [
    ("stage", "stage", ""),
    ("wall_s", "wall s", ".1f"),
    ("embedded", "embedded", ",d"),
    ("reused_embeddings", "embeddings reused", ",d"),
    ("quantizer", "quantizer", ""),
    ("shards", "shards copied / filled", ""),
    ("read_s", "read s", ".1f"),
    ("embedding_s", "embedding s", ".1f"),
    ("index_s", "index s", ".1f"),
    ("sparse_s", "BM25 s", ".1f"),
    ("store_s", "doc store s", ".1f"),
    ("driver_peak_rss_mib", "driver peak RSS MiB", ",.0f"),
    ("worker_peak_rss_mib", "largest worker peak RSS MiB", ",.0f"),
]


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    incremental, seconds = row["incremental"], row["summary_seconds"]
    drift = (incremental.get("drift") or {}).get("ratio")
    return {**row, "quantizer": incremental["trained"] + (f" (drift {drift})" if drift is not None else ""),
            "shards": f"{incremental['shards_reused']} / {incremental['shards_filled']}", "read_s": seconds["read_seconds"],
            "embedding_s": seconds["embedding_seconds"], "index_s": seconds["index_seconds"], "sparse_s": seconds["sparse_seconds"],
            "store_s": seconds["documents_store_seconds"], "driver_peak_rss_mib": row["driver_peak_rss_bytes"] / 2**20,
            "worker_peak_rss_mib": row["worker_peak_rss_bytes"] / 2**20 or None}


def main(argv: list[str] | None = None) -> dict:
    prepare_environment()
    arguments = parse_arguments(argv)
    from pipelines.embedding import EmbeddingConfig
    from pipelines.index_building import IndexConfig
    from pipelines.indexing import BuildIndexConfig, build_index

    workdir = Path(arguments.workdir)
    environment = environment_report(arguments.cpus)
    started = time.perf_counter()
    bi_encoder, _ = model_paths("tiny", workdir, arguments.seed)
    base = generate_corpus(workdir, arguments.docs, arguments.seed, arguments.parquet_files)
    churned = generate_churned_corpus(workdir, base, arguments.churn, arguments.seed)
    churn_spec = json.loads((churned.parent / "spec.json").read_text())
    queries_text = synthetic_queries(Vocabulary.from_tokenizer(), arguments.recall_queries, arguments.seed)["text"].to_pylist()
    embedding = EmbeddingConfig(model=bi_encoder, precision="fp32", device="cpu", max_seq_length=0)  # as bench.scale's tiny model
    run_folder = workdir / f"run-{arguments.docs}"
    shutil.rmtree(run_folder, ignore_errors=True)
    root = run_folder / "index"
    spill = run_folder / "ray-spill"
    start_ray(arguments.cpus, 0, spill)
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name, corpus, retrain in (("full_build", base, False), ("nightly_build", churned, False), ("retrain_build", churned, True)):
            config = BuildIndexConfig(corpus=str(corpus), index=str(root), embedding=embedding, faiss=IndexConfig(factory=arguments.factory, shards=arguments.shards, retrain=retrain))
            with StageMonitor(name, arguments.docs, written=[root], spill_folder=spill) as monitor:
                summary = build_index(config)
            rows[name] = build_row(name, monitor, summary)
            print(f"  {name}: {monitor.result.wall_s:.1f} s, embedded {summary['embedded']:,}, {summary['incremental']}", flush=True)
        queries = embed_queries(queries_text, embedding)
        recalls = {name: version_recall(str(root), rows[name]["version_id"], embedding, queries, arguments.cpus) for name in ("nightly_build", "retrain_build")}
    finally:
        import ray

        ray.shutdown()
    ratio = rows["nightly_build"]["wall_s"] / rows["full_build"]["wall_s"]
    difference = recalls["nightly_build"]["recall_at_100"] - recalls["retrain_build"]["recall_at_100"]
    verdicts = {"time": "pass" if ratio < RATIO_BAR else "fail", "recall": "pass" if abs(difference) <= RECALL_BAR else "fail"}
    title = (f"bench.nightly: {arguments.docs:,} documents, churn {arguments.churn:g} ({churn_spec['changed']:,} changed, {churn_spec['removed']:,} removed, "
             f"{churn_spec['new']:,} new), tiny model on CPU, {arguments.cpus} CPUs")
    table = format_table([table_row(row) for row in rows.values()], STAGE_COLUMNS, title=title)
    bars = format_table([
        {"bar": f"nightly / full wall time < {RATIO_BAR:.3f}", "value": f"{ratio:.3f}", "verdict": verdicts["time"]},
        {"bar": f"|recall@100 nightly - retrained| <= {RECALL_BAR}", "value": (f"{recalls['nightly_build']['recall_at_100']:.4f} - "
                                                                           f"{recalls['retrain_build']['recall_at_100']:.4f} = {difference:+.4f}"), "verdict": verdicts["recall"]},
    ], [("bar", "bar", ""), ("value", "value", ""), ("verdict", "verdict", "")], title=f"issue 11's bars ({arguments.recall_queries:,} recall queries)")
    table = f"{table}\n\n{bars}"
    print()
    print(table)
    if not arguments.keep:
        shutil.rmtree(run_folder, ignore_errors=True)
    payload = {
        "benchmark": "nightly",
        "arguments": vars(arguments),
        "environment": environment,
        "churn": churn_spec,
        "stages": rows,
        "full_s": rows["full_build"]["wall_s"],
        "nightly_s": rows["nightly_build"]["wall_s"],
        "retrain_s": rows["retrain_build"]["wall_s"],
        "nightly_over_full": ratio,
        "recall": recalls,
        "recall_difference": difference,
        "verdicts": verdicts,
        "wall_s": time.perf_counter() - started,
        "table": table,
    }
    write_results(arguments.output, payload)
    return payload


if __name__ == "__main__":
    main()
