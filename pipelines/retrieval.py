"""The query job as one function: a query log in, ranked candidates (both stages) out as Parquet.

Stages, in order: read and validate the query log (documents module, same rules and quarantine)
→ QueryEncoder (the index's own bi-encoder, from its manifest) → one ShardSearcher per shard, each
merging into the running global top-K → CrossEncoderScorer on the top-N (texts fetched from the
manifest's corpus, held by DocumentTextPartition actors) → rank_candidates → atomically written
Parquet parts. One row per query flows through the chain, so memory does not grow with the log.

Output folder: ``part-*.parquet`` (complete queries only), ``quarantine/``, and ``run.json``
written last. A rerun skips queries already present in the parts.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import index_store, storage
from pipelines.config import config_to_dict
from pipelines.document_texts import load_document_texts
from pipelines.documents import CorpusConfig, find_duplicate_ids, quarantined_rows, read_corpus
from pipelines.embedding import EmbeddingConfig, plan_embedding_pool
from pipelines.reranking import CrossEncoderScorer, RerankConfig, rank_candidates, read_serving_card
from pipelines.runtime import ensure_ray, format_table, resolve_broadcast, worker_visible
from pipelines.shard_search import QueryEncoder, SearchConfig, ShardSearcher, quantized_encoder_url, query_embedding_config


def _query_log_defaults() -> CorpusConfig:
    return CorpusConfig(title_column="", use_title=False)


@dataclass
class RetrieveRerankConfig:
    """Settings of jobs.retrieve_rerank."""

    FLAG_ALIASES = {"--top-k": "search.top_k", "--reranker": "rerank.model", "--rerank-depth": "rerank.depth", "--fusion": "rerank.fusion"}

    index: str = field(default="", metadata={"help": "index root URL (built by jobs.build_index)"})
    queries: str = field(default="", metadata={"help": "query log: Parquet or JSON lines (BEIR queries.jsonl), any fsspec URL"})
    output: str = field(default="", metadata={"help": "output folder URL for the ranked Parquet parts"})
    qrels: str = field(default="", metadata={"help": "BEIR qrels TSV: run only the queries judged there"})
    version: str = field(default="", metadata={"help": "index version id (default: CURRENT)"})
    rows_per_part: int = 200_000
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    query_log: CorpusConfig = field(default_factory=_query_log_defaults)

    def validate(self) -> None:
        for name in ("index", "queries", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.rerank.enabled and self.rerank.depth > self.search.top_k:
            raise ValueError(f"--rerank-depth {self.rerank.depth} is deeper than --top-k {self.search.top_k}")


@dataclass(frozen=True)
class QueryPools:
    """Ray resources for each actor stage of the query job."""

    encoder_cpus: float
    encoder_gpus: float
    searcher_cpus: float
    reranker_size: int
    reranker_cpus: float
    reranker_gpus: float
    reranker_threads: int
    reranker_device: str


def plan_query_pools(cpus: float, gpus: float, shards: int, rerank: RerankConfig) -> QueryPools:
    """Share the cluster between encoder, searchers and rerankers, leaving room for read/write tasks."""
    reserve = 0.5
    searcher_cpus = round(min(0.25, 0.25 * max(0.5, cpus - reserve) / shards), 3)
    encoder_cpus = 0.25
    encoder_gpus = 0.1 if gpus >= 1 else 0.0
    remaining = max(0.25, cpus - reserve - encoder_cpus - searcher_cpus * shards)
    pool = plan_embedding_pool(rerank, remaining + 1.0, gpus)  # plan_embedding_pool keeps one CPU back itself
    reranker_gpus = 0.9 if pool.num_gpus else 0.0
    return QueryPools(encoder_cpus, encoder_gpus, searcher_cpus, pool.size, min(pool.num_cpus, remaining / pool.size), reranker_gpus, pool.threads, pool.device)


def reranker_serving(rerank: RerankConfig, corpus_fingerprint: str) -> dict[str, Any]:
    """How the query job uses ``rerank.model`` on an index whose documents hash to ``corpus_fingerprint``.

    A trained reranker carries a serving card (``fusion.json``): its fusion weight fitted on dev, and
    mode ``first_stage`` when no weight beat the first stage there, in which case reranking is
    skipped. On an index whose corpus is not the one the reranker was trained on, nothing shows the
    weight holds (measured: a SciFact reranker fused with its SciFact weight lowers NFCorpus dev
    nDCG@10 by 6%), so the first stage is served alone unless ``foreign_corpus`` is ``fuse``.
    ``notes`` holds what the run report should say: the fitting data, and a warning for a foreign corpus.
    """
    result: dict[str, Any] = {"model": rerank.model, "fusion_weight": None, "fitted_on": None, "trained_on": None, "notes": []}
    if not rerank.enabled:
        return result
    card = read_serving_card(rerank.model)
    if card is None:
        if rerank.fusion != "off":
            result["notes"].append(f"reranker {rerank.model} has no fusion weight (fusion.json): ranking by its scores alone")
        return result
    result["trained_on"] = card.get("trained_on")
    trained_corpus = (card.get("trained_on") or {}).get("corpus_fingerprint")
    foreign = bool(trained_corpus and trained_corpus != corpus_fingerprint)
    if foreign:
        result["notes"].append(
            f"warning: reranker {rerank.model} was trained on another corpus ({card['trained_on'].get('corpus')}) than this index's; "
            f"its fusion weight was fitted there, not on this corpus"
        )
    if rerank.fusion == "off":
        return result
    result["fusion_weight"] = card["weight"]
    result["fitted_on"] = card.get("fitted_on", "unknown (fusion.json without fitted_on)")
    result["notes"].append(f"fusion weight {card['weight']} fitted on {result['fitted_on']}")
    if card["mode"] == "first_stage":
        result["notes"].append(f"reranker {rerank.model} did not beat the first stage on its dev queries: the first stage is served alone (--fusion off reranks anyway)")
    elif foreign and rerank.foreign_corpus != "fuse":
        result["notes"].append("nothing shows the reranker helps on this corpus: the first stage is served alone (--rerank.foreign-corpus fuse fuses anyway)")
    else:
        return result
    result["model"] = "none"
    result["fusion_weight"] = None
    return result


def _valid_query_keys(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(["id", "order_key", "source_file", "source_row"])


def _queries_to_run(batch: pa.Table, order_keys, rows_per_block: int) -> Iterator[pa.Table]:
    """The pending queries of a batch, in small blocks so they stream and spread over every actor.

    (Yielding blocks here instead of a ``repartition`` avoids a whole-CPU task that a busy small
    cluster could never schedule.)
    """
    chosen = batch.filter(pc.is_in(batch["order_key"], value_set=resolve_broadcast(order_keys)))
    queries = pa.table({"query_id": chosen["id"], "query_text": chosen["content"]})
    for start in range(0, queries.num_rows, rows_per_block):
        yield queries.slice(start, rows_per_block)


def finished_query_ids(output_url: str) -> set[str]:
    """Query ids already written by an earlier (possibly killed) run."""
    done: set[str] = set()
    for part in storage.list_files(output_url, ".parquet"):
        done.update(storage.read_parquet(part, columns=["query_id"])["query_id"].unique().to_pylist())
    return done


def retrieve_and_rerank(config: RetrieveRerankConfig) -> dict[str, Any]:
    """Run the query job; returns its summary (also written as run.json in the output folder)."""
    manifest = index_store.read_manifest(config.index, config.version or None)
    with (
        worker_visible(config.index) as index_url,
        worker_visible(config.queries) as queries_url,
        worker_visible(manifest["corpus"]["url"]) as corpus_url,
        worker_visible(config.output, copy_back=True) as output_url,
    ):
        return _retrieve_and_rerank(config, manifest, index_url, queries_url, corpus_url, output_url)


def _retrieve_and_rerank(config, manifest, index_url, queries_url, corpus_url, output_url) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    ensure_ray()
    version_id = manifest["version_id"]
    doc_ids = index_store.load_doc_ids(index_url, manifest)

    # Query log: validate, quarantine, limit to judged queries, skip finished ones.
    validated, _ = read_corpus(queries_url, config.query_log)
    validated = validated.materialize()
    rows_read = validated.count()
    tables = [t for t in ray.get(validated.map_batches(_valid_query_keys, batch_format="pyarrow").to_arrow_refs()) if t.num_rows]
    if not tables:
        raise ValueError(f"{config.queries}: no valid queries among {rows_read} rows")
    keys = pa.concat_tables(tables)
    duplicates = find_duplicate_ids(keys)
    keys = keys.filter(pc.invert(pc.is_in(keys["order_key"], value_set=duplicates["order_key"])))
    if config.qrels:
        from pipelines.evaluation import read_qrels

        judged = set(read_qrels(config.qrels))
        unknown = sorted(judged - set(keys["id"].to_pylist()))
        if unknown:
            raise ValueError(f"{config.qrels}: {len(unknown)} judged query ids are not valid queries in {config.queries} (for example {unknown[:5]})")
        keys = keys.filter(pc.is_in(keys["id"], value_set=pa.array(sorted(judged))))
    quarantine_url = storage.join_url(output_url, "quarantine")
    storage.remove_tree(quarantine_url)
    quarantined, _ = storage.write_parquet_parts(
        validated.map_batches(quarantined_rows, fn_args=(ray.put(duplicates),), batch_format="pyarrow"), quarantine_url, 100_000
    )
    done = finished_query_ids(output_url)
    pending = keys.filter(pc.invert(pc.is_in(keys["id"], value_set=pa.array(sorted(done), pa.string()))))
    print(f"{rows_read} query rows: {keys.num_rows} to run, {len(done)} already done, {quarantined} quarantined")

    resources = ray.cluster_resources()
    shards = len(manifest["shards"])
    serving = reranker_serving(config.rerank, index_store.corpus_fingerprint(doc_ids))
    for line in serving["notes"]:
        print(line, flush=True)
    rerank = dataclasses.replace(config.rerank, model=serving["model"])
    fusion_weight = serving["fusion_weight"]
    pools = plan_query_pools(resources.get("CPU", 1), resources.get("GPU", 0), shards, rerank)
    pipeline_started = time.perf_counter()
    if pending.num_rows:
        rows_per_block = max(1, min(config.search.queries_per_batch, 2048 // rerank.depth)) if rerank.enabled else config.search.queries_per_batch
        queries = validated.map_batches(
            _queries_to_run, fn_args=(ray.put(pending["order_key"].combine_chunks()), rows_per_block), batch_format="pyarrow", num_cpus=0.25
        )
        embedding = query_embedding_config(manifest, EmbeddingConfig(batch_size=64))
        flow = queries.map_batches(
            QueryEncoder,
            fn_constructor_args=(embedding, manifest["model"]["dimension"], "cuda" if pools.encoder_gpus else "cpu", 1, quantized_encoder_url(index_url, manifest)),
            batch_size=config.search.queries_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=pools.encoder_cpus,
            num_gpus=pools.encoder_gpus,
        )
        for shard in range(shards):
            flow = flow.map_batches(
                ShardSearcher,
                fn_constructor_args=(index_url, version_id, shard, config.search, 1),
                batch_size=config.search.queries_per_batch,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=pools.searcher_cpus,
            )
        if rerank.enabled:
            texts = load_document_texts(corpus_url, manifest, doc_ids.select(["position", "id", "text_hash"]), partitions=shards)
            flow = flow.map_batches(
                CrossEncoderScorer,
                fn_constructor_args=(rerank, texts, pools.reranker_device, pools.reranker_threads),
                batch_size=rows_per_block,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pools.reranker_size),
                num_cpus=pools.reranker_cpus,
                num_gpus=pools.reranker_gpus,
            )
        ranked = flow.map_batches(rank_candidates, fn_args=(ray.put(doc_ids["id"].combine_chunks()), fusion_weight), batch_format="numpy", num_cpus=0.25)
        written_rows, _ = storage.write_parquet_parts(ranked, output_url, config.rows_per_part)
    else:
        written_rows = 0
    pipeline_seconds = time.perf_counter() - pipeline_started
    queries_run = pending.num_rows
    pairs = queries_run * min(rerank.depth, config.search.top_k) if rerank.enabled else 0
    summary = {
        "index": config.index,
        "index_version": version_id,
        "queries_read": rows_read,
        "queries_quarantined": quarantined,
        "queries_run": queries_run,
        "queries_reused": len(done),
        "rows_written": written_rows,
        "top_k": config.search.top_k,
        "exact_rescoring": config.search.exact_rescoring,
        "reranker": rerank.model if rerank.enabled else "none",
        "rerank_depth": rerank.depth if rerank.enabled else 0,
        "fusion_weight": fusion_weight,
        "fusion_fitted_on": serving["fitted_on"],
        "reranker_trained_on": serving["trained_on"],
        "reranker_notes": serving["notes"],
        "pairs_reranked": pairs,
        "pipeline_seconds": round(pipeline_seconds, 2),
        "queries_per_second": round(queries_run / pipeline_seconds, 2) if queries_run else 0.0,
        "pairs_per_second": round(pairs / pipeline_seconds, 2) if pairs else 0.0,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config": config_to_dict(config),
    }
    storage.write_json_atomically(storage.join_url(output_url, "run.json"), summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ("queries read", summary["queries_read"]),
        ("quarantined", summary["queries_quarantined"]),
        ("queries run now", summary["queries_run"]),
        ("queries already done", summary["queries_reused"]),
        ("rows written", summary["rows_written"]),
        ("reranker", summary["reranker"]),
        ("rerank depth", summary["rerank_depth"]),
        ("queries/s", float(summary["queries_per_second"])),
        ("pairs/s (rerank)", float(summary["pairs_per_second"])),
        ("wall time (s)", float(summary["wall_seconds"])),
    ]
    return format_table(rows, title=f"retrieve-rerank on index version {summary['index_version']}")
