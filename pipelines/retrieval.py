"""The query job: a query log in, ranked candidates (both stages) out as Parquet.

Three steps, each a function here:
1. :func:`select_pending_queries`: read and validate the log (documents module, same rules and
   quarantine), keep judged queries, claim the output folder (``run_identity.json``: a folder of
   another configuration is refused), skip queries an earlier run wrote whole;
2. :func:`build_query_flow`: QueryEncoder (the index's own bi-encoder, from its manifest) → FanOutSearch,
   every shard searched at once by shard-holding actors and merged to the global top-K → CrossEncoderScorer on the
   top-N, each actor reading the candidates' texts by position from the version's document store
   (pipelines.document_store: no corpus re-read, no text held beyond the batch scored; a version
   built before the store falls back to reading the corpus). One row per query flows through the chain,
   so memory does not grow with the log;
3. :func:`write_run`: rank each batch of whole queries and commit it as one Parquet part.

Output folder: ``run_identity.json`` (first), ``part-*.parquet`` (whole queries only),
``quarantine/``, and ``run.json`` written last. A killed run reruns to the same rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import index_store, storage
from pipelines.config import config_to_dict
from pipelines.document_store import open_document_texts
from pipelines.documents import CorpusConfig, CorpusError, ValidatedCorpus, validate_corpus
from pipelines.embedding import EmbeddingConfig, plan_embedding_pool
from pipelines.models import check_model_reference
from pipelines.reranking import CrossEncoderScorer, RerankConfig, rank_candidates, read_serving_card
from pipelines.runtime import ensure_ray, format_table, resolve_broadcast, worker_visible
from pipelines.hybrid_fusion import candidate_width, resolve_search_mode
from pipelines.fan_out_search import FanOutSearch, ShardPoolPlan, plan_shard_pool, resident_bytes, start_shard_pool
from pipelines.shard_search import QueryEncoder, SearchConfig, quantized_encoder_url, query_embedding_config
from pipelines.storage import StorageConfig


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
    rows_per_part: int = field(default=200_000, metadata={"help": "output rows per Parquet part, rounded down to whole queries (unit of resume)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an output folder written by another configuration (otherwise that is an error)"})
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    query_log: CorpusConfig = field(default_factory=_query_log_defaults)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        for name in ("index", "queries", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.rerank.enabled and self.rerank.depth > self.search.top_k:
            raise ValueError(f"--rerank-depth {self.rerank.depth} is deeper than --top-k {self.search.top_k}")
        from pipelines.config import require_at_least

        require_at_least(self, {"rows_per_part": 1})
        storage.require_input(self.queries, "queries")
        if self.qrels:
            storage.require_input(self.qrels, "qrels")
        if self.version:
            index_store.plain_name(self.version, "--version", "command line")


@dataclass(frozen=True)
class QueryPools:
    """Ray resources for each actor stage of the query job."""

    encoder_cpus: float
    encoder_gpus: float
    search: ShardPoolPlan
    reranker_size: int
    reranker_cpus: float
    reranker_gpus: float
    reranker_threads: int
    reranker_device: str


SEARCH_SHARE_WITH_CPU_RERANKER = 0.25  # cross-encoder scoring on CPU costs far more than search: it gets the rest


def plan_query_pools(cpus: float, gpus: float, shards: int, rerank: RerankConfig, int8_index: bool = False, *,
                     sparse_shards: int = 0, shard_bytes: int = 0, memory_bytes: float = 0) -> QueryPools:
    """Share the cluster between encoder, shard actors (``shards`` dense, ``sparse_shards`` BM25) and rerankers,
    leaving half a CPU for read/write tasks (pure function, no Ray calls).

    Search gets every CPU left when nothing reranks on CPU, a quarter of them when a CPU reranker
    does; :func:`~pipelines.fan_out_search.plan_shard_pool` turns that into shard groups and
    replicas (``shard_bytes``: one replica's resident size, against ``memory_bytes``).

    The query encoder (there when ``shards``) must be the model the documents were embedded with:
    for an index built with the int8 (OpenVINO, CPU) bi-encoder that is a CPU actor even on a GPU
    cluster; an fp16 GPU encoder would put queries and documents in slightly different spaces.
    """
    reserve = 0.5
    encoder_cpus = 0.25 if shards else 0.0
    encoder_gpus = 0.1 if shards and gpus >= 1 and not int8_index else 0.0
    available = max(0.5, cpus - reserve - encoder_cpus)
    pool, reranker_cpus, reranker_gpus = None, 0.0, 0.0
    search_cpus = available
    if rerank.enabled:
        # Torch threads follow the node's CPUs (a 2-CPU machine runs 2 threads on the 1 CPU the actor claims);
        # the reserve for read/write tasks is already out of ``available``.
        threads = rerank.threads_per_actor or int(min(max(1.0, cpus), 4))
        settings = dataclasses.replace(rerank, threads_per_actor=threads)
        if plan_embedding_pool(settings, available, gpus, reserve_cpus=0.0).device == "cuda":  # GPU rerankers: at most one CPU each, at most half the CPUs
            pool = plan_embedding_pool(settings, available, gpus, reserve_cpus=0.0)
            reranker_cpus = _floor(min(pool.num_cpus, 0.5 * available / pool.size))
            reranker_gpus = 0.9
        else:
            remaining = available * (1.0 - SEARCH_SHARE_WITH_CPU_RERANKER)
            pool = plan_embedding_pool(settings, remaining, 0, reserve_cpus=0.0)
            reranker_cpus = _floor(min(pool.num_cpus, remaining / pool.size))
        search_cpus = available - pool.size * reranker_cpus
    search = plan_shard_pool(search_cpus, shards, sparse_shards, shard_bytes, memory_bytes)
    if pool is None:
        return QueryPools(encoder_cpus, encoder_gpus, search, 0, 0.0, 0.0, 0, "cpu")
    return QueryPools(encoder_cpus, encoder_gpus, search, pool.size, reranker_cpus, reranker_gpus, pool.threads, pool.device)


def _floor(value: float) -> float:
    return math.floor(value * 1000) / 1000


def reranker_serving(rerank: RerankConfig, corpus_fingerprint: str) -> dict[str, Any]:
    """How the query job uses ``rerank.model`` on an index whose documents hash to ``corpus_fingerprint``.

    A trained reranker carries a serving card (``fusion.json``): its fusion weight fitted on dev, and
    mode ``first_stage`` when no weight beat the first stage there, in which case reranking is
    skipped. On an index whose corpus is not the one the reranker was trained on, nothing shows the
    weight holds (measured: a SciFact reranker fused with its SciFact weight lowers NFCorpus dev
    nDCG@10 by 6%), so the first stage is served alone unless ``foreign_corpus`` is ``fuse``.
    ``notes`` holds what the run report should say: the fitting data, and a warning for a foreign corpus.
    """
    result: dict[str, Any] = {"model": rerank.model, "fusion_weight": None, "fitted_on": None, "trained_on": None, "dense_weight": None, "notes": []}
    if not rerank.enabled:
        return result
    card = read_serving_card(rerank.model)
    if card is not None and (card.get("first_stage") or {}).get("mode") == "hybrid":
        trained = (card.get("trained_on") or {}).get("corpus_fingerprint")
        if not trained or trained == corpus_fingerprint:
            result["dense_weight"] = card["first_stage"]["dense_weight"]
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


def hybrid_dense_weight(search: SearchConfig, serving: dict[str, Any]) -> float:
    """The weighted fusion's dense weight: the one given, else the one fitted with the served reranker's corpus, else 0.5."""
    from pipelines.hybrid_fusion import DEFAULT_DENSE_WEIGHT

    if search.dense_weight >= 0:
        return search.dense_weight
    return serving.get("dense_weight") if serving.get("dense_weight") is not None else DEFAULT_DENSE_WEIGHT


def _queries_to_run(batch: pa.Table, order_keys, rows_per_block: int) -> Iterator[pa.Table]:
    """The pending queries of a batch, in small blocks so they stream and spread over every actor.

    (Yielding blocks here instead of a ``repartition`` avoids a whole-CPU task that a busy small
    cluster could never schedule.)
    """
    chosen = batch.filter(pc.is_in(batch["order_key"], value_set=resolve_broadcast(order_keys)))
    queries = pa.table({"query_id": chosen["id"], "query_text": chosen["content"]})
    for start in range(0, queries.num_rows, rows_per_block):
        yield queries.slice(start, rows_per_block)


RUN_IDENTITY_FILE = "run_identity.json"
QUERY_IDS_METADATA = b"query_ids"  # every query of a part, rows or not (Parquet schema metadata)


class OutputMismatchError(ValueError):
    """The output folder holds results of another configuration; the message names what differs."""


def run_identity(config: RetrieveRerankConfig, version_id: str, serving: dict[str, Any]) -> dict[str, Any]:
    """What decides the ranked rows of a run: a rerun may only add to an output folder with the same identity.

    Settings that change speed but not results (pool sizes, threads, batch sizes, rows per part) are left out.
    """
    rerank = config_to_dict(config.rerank)
    for speed_only in ("pool_size", "threads_per_actor", "batch_size"):
        rerank.pop(speed_only)
    search = config_to_dict(config.search)
    search.pop("queries_per_batch", None)
    return {
        "index": config.index,
        "index_version": version_id,
        "queries": config.queries,
        "qrels": config.qrels,
        "query_log": config_to_dict(config.query_log),
        "search": search,
        "rerank": rerank,
        "served_reranker": serving["model"],
        "fusion_weight": serving["fusion_weight"],
    }


def claim_output(output_url: str, identity: dict[str, Any], overwrite: bool) -> None:
    """Record ``identity`` in the output folder, or check it against the one there.

    A folder written by another configuration is an error naming the differing settings; with
    ``overwrite`` its results are removed first. The record is written before any result part.
    """
    record_url = storage.join_url(output_url, RUN_IDENTITY_FILE)
    parts = storage.list_files(output_url, ".parquet")
    if storage.exists(record_url):
        previous = storage.read_json(record_url)
        differing = sorted(_differing_keys(previous, identity))
        if differing and not overwrite:
            shown = ", ".join(f"{key} ({_lookup(previous, key)!r} there, {_lookup(identity, key)!r} now)" for key in differing[:4])
            raise OutputMismatchError(f"{output_url}: written by another configuration: {shown}{' …' if len(differing) > 4 else ''}; use another --output or --overwrite")
        if not differing:
            return
    elif parts and not overwrite:
        raise OutputMismatchError(f"{output_url}: holds {len(parts)} result part(s) without {RUN_IDENTITY_FILE} (another tool or an older version wrote them); use another --output or --overwrite")
    for part in parts:
        storage.remove_tree(part)
    for stale in (RUN_IDENTITY_FILE, "run.json"):
        storage.remove_tree(storage.join_url(output_url, stale))
    storage.write_json_atomically(record_url, identity)


def _differing_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = []
        for key in sorted(set(before) | set(after)):
            keys += _differing_keys(before.get(key), after.get(key), f"{prefix}{key}.")
        return keys
    return [] if before == after else [prefix.rstrip(".")]


def _lookup(values: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def finished_query_ids(output_url: str) -> set[str]:
    """Query ids already written whole by an earlier (possibly killed) run.

    Parts are written atomically and hold whole queries only (:func:`rank_and_write`); a part with a
    query whose ranks are not exactly 1..n is not ours to resume from, and is an error.
    """
    done: set[str] = set()
    for part in storage.list_files(output_url, ".parquet"):
        table = storage.read_parquet(part, columns=["query_id", "rank"])
        stats = table.group_by("query_id").aggregate([("rank", "count"), ("rank", "min"), ("rank", "max"), ("rank", "count_distinct")])
        whole = pc.and_(pc.and_(pc.equal(stats["rank_min"], 1), pc.equal(stats["rank_max"], stats["rank_count"])), pc.equal(stats["rank_count_distinct"], stats["rank_count"]))
        if not pc.all(whole).as_py():
            broken = stats.filter(pc.invert(whole))["query_id"][0].as_py()
            raise OutputMismatchError(f"{part}: query {broken} is not whole (ranks are not 1..n); the folder was not written by this job: use --overwrite")
        ids = stats["query_id"].to_pylist()
        repeated = done.intersection(ids)
        if repeated:
            raise OutputMismatchError(f"{part}: query {sorted(repeated)[0]} is also in another part; the folder was not written by this job: use --overwrite")
        done.update(ids)
        recorded = (table.schema.metadata or {}).get(QUERY_IDS_METADATA)
        if recorded:
            done.update(json.loads(recorded))
    return done


def rank_and_write(batch: dict[str, np.ndarray], doc_ids, fusion_weight: float | None, output_url: str) -> pa.Table:
    """Ray Data batch function: rank a batch of whole queries and commit them as one Parquet part.

    Ranking and writing in one step keeps every query's rows in one atomically written part, so a
    killed job leaves whole queries only, and resume never counts a half-written query as done.
    """
    table = rank_candidates(batch, doc_ids, fusion_weight)
    # A query with no candidate (no BM25 match in sparse mode) has no rows: the part names it as done anyway.
    table = table.replace_schema_metadata({QUERY_IDS_METADATA: json.dumps([str(query) for query in batch["query_id"]]).encode()})
    return storage.write_parquet_part(table, output_url)


def retrieve_and_rerank(config: RetrieveRerankConfig) -> dict[str, Any]:
    """Run the query job; returns its summary (also written as run.json in the output folder)."""
    if config.rerank.enabled:
        check_model_reference(config.rerank.model, "--reranker")
    manifest = index_store.read_manifest(config.index, config.version or None)
    resolve_search_mode(config.search.mode, manifest)  # a mode the version cannot serve fails before the output is claimed
    with (
        worker_visible(config.index) as index_url,
        worker_visible(config.queries) as queries_url,
        worker_visible(manifest["corpus"]["url"]) as corpus_url,
        worker_visible(config.output, copy_back=True) as output_url,
    ):
        return _retrieve_and_rerank(config, manifest, index_url, queries_url, corpus_url, output_url)


@dataclass
class PendingQueries:
    """The validated query log, and which of its queries this run still has to rank."""

    log: ValidatedCorpus
    pending: pa.Table
    selected: int
    done: int
    quarantined: int


def select_pending_queries(config: RetrieveRerankConfig, queries_url: str, output_url: str, identity: dict[str, Any]) -> PendingQueries:
    """Validate the log, keep the judged queries (with ``qrels``), claim the output folder, quarantine,
    and leave out the queries an earlier run of the same configuration already wrote whole."""
    log = validate_corpus(queries_url, config.query_log, public_url=config.queries, what="queries")
    keys = log.keys
    if config.qrels:
        from pipelines.evaluation import read_qrels

        judged = set(read_qrels(config.qrels))
        unknown = sorted(judged - set(keys["id"].to_pylist()))
        if unknown:
            raise CorpusError(f"{config.qrels}: {len(unknown)} judged query ids are not valid queries in {config.queries} (for example {unknown[:5]})")
        keys = keys.filter(pc.is_in(keys["id"], value_set=pa.array(sorted(judged))))
    claim_output(output_url, identity, config.overwrite)
    quarantined = log.write_quarantine(storage.join_url(output_url, "quarantine"))
    done = finished_query_ids(output_url)
    pending = keys.filter(pc.invert(pc.is_in(keys["id"], value_set=pa.array(sorted(done), pa.string()))))
    print(f"{log.rows_read} query rows: {keys.num_rows} to run, {len(done)} already done, {quarantined} quarantined")
    return PendingQueries(log, pending, keys.num_rows, len(done), quarantined)


def build_query_flow(queries, config: RetrieveRerankConfig, rerank: RerankConfig, manifest: dict[str, Any], index_url: str, corpus_url: str, doc_ids: pa.Table):
    """The lazy Ray Data flow from query rows to ranked candidates: encoder → one fan-out stage searching every
    dense and BM25 shard in parallel (shard-holding actors) → the fused first stage (``search.mode``) → reranker."""
    import ray

    from pipelines.hybrid_fusion import first_stage
    from pipelines.sparse_index import config_from_manifest

    resources = ray.cluster_resources()
    shards = len(manifest["shards"])
    mode = resolve_search_mode(config.search.mode, manifest)
    query_encoder_url = quantized_encoder_url(index_url, manifest)
    dense_shards = shards if mode != "sparse" else 0
    sparse_shards = len(manifest["sparse"]["shards"]) if mode != "dense" else 0
    pools = plan_query_pools(resources.get("CPU", 1), resources.get("GPU", 0), dense_shards, rerank, int8_index=bool(query_encoder_url), sparse_shards=sparse_shards,
                             shard_bytes=resident_bytes(manifest, mode, config.search), memory_bytes=resources.get("memory", 0))
    replicas = start_shard_pool(pools.search, index_url, manifest["version_id"], config.search)
    flow = queries
    if mode != "sparse":
        embedding = query_embedding_config(manifest, EmbeddingConfig(batch_size=64))
        flow = flow.map_batches(
            QueryEncoder,
            fn_constructor_args=(embedding, manifest["model"]["dimension"], "cuda" if pools.encoder_gpus else "cpu", 1, query_encoder_url),
            batch_size=config.search.queries_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=pools.encoder_cpus,
            num_gpus=pools.encoder_gpus,
        )
    flow = flow.map_batches(
        FanOutSearch,
        fn_constructor_args=(replicas, mode, config.search.top_k, config_from_manifest(manifest["sparse"]) if sparse_shards else None),
        batch_size=config.search.queries_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pools.search.fan_out_size),
        num_cpus=pools.search.fan_out_cpus,
    )
    search = config.search
    flow = flow.map_batches(first_stage, fn_args=(mode, search.top_k, search.hybrid_fusion, search.dense_weight, search.rrf_k),
                            batch_size=search.queries_per_batch, batch_format="numpy", num_cpus=0.25)
    if rerank.enabled:
        texts = open_document_texts(index_url, manifest, doc_ids, corpus_url, partitions=shards)
        flow = flow.map_batches(
            CrossEncoderScorer,
            fn_constructor_args=(rerank, texts, pools.reranker_device, pools.reranker_threads),
            batch_size=_rows_per_block(config, rerank),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pools.reranker_size),
            num_cpus=pools.reranker_cpus,
            num_gpus=pools.reranker_gpus,
        )
    return flow


def _rows_per_block(config: RetrieveRerankConfig, rerank: RerankConfig) -> int:
    return max(1, min(config.search.queries_per_batch, 2048 // rerank.depth)) if rerank.enabled else config.search.queries_per_batch


def write_run(flow, doc_ids: pa.Table, fusion_weight: float | None, output_url: str, queries_per_part: int) -> int:
    """Rank and commit the flow's queries as Parquet parts of whole queries; returns the rows written."""
    import ray

    written = flow.map_batches(
        rank_and_write, fn_args=(ray.put(doc_ids["id"].combine_chunks()), fusion_weight, output_url), batch_size=queries_per_part, batch_format="numpy", num_cpus=0.25
    )
    return storage.count_written(written)


def _retrieve_and_rerank(config, manifest, index_url, queries_url, corpus_url, output_url) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    ensure_ray()
    version_id = manifest["version_id"]
    doc_ids = index_store.load_doc_ids(index_url, manifest)
    serving = reranker_serving(config.rerank, index_store.corpus_fingerprint(doc_ids))
    for line in serving["notes"]:
        print(line, flush=True)
    rerank = dataclasses.replace(config.rerank, model=serving["model"])
    config = dataclasses.replace(config, search=dataclasses.replace(config.search, dense_weight=hybrid_dense_weight(config.search, serving)))

    queries = select_pending_queries(config, queries_url, output_url, run_identity(config, version_id, serving))
    pipeline_started = time.perf_counter()
    written_rows = 0
    if queries.pending.num_rows:
        rows = queries.log.rows.map_batches(
            _queries_to_run, fn_args=(ray.put(queries.pending["order_key"].combine_chunks()), _rows_per_block(config, rerank)), batch_format="pyarrow", num_cpus=0.25
        )
        flow = build_query_flow(rows, config, rerank, manifest, index_url, corpus_url, doc_ids)
        width = candidate_width(resolve_search_mode(config.search.mode, manifest), config.search.top_k)
        written_rows = write_run(flow, doc_ids, serving["fusion_weight"], output_url, max(1, config.rows_per_part // width))
    pipeline_seconds = time.perf_counter() - pipeline_started
    queries_run = queries.pending.num_rows
    pairs = queries_run * min(rerank.depth, config.search.top_k) if rerank.enabled else 0
    summary = {
        "index": config.index,
        "index_version": version_id,
        "queries_read": queries.log.rows_read,
        "queries_quarantined": queries.quarantined,
        "queries_run": queries_run,
        "queries_reused": queries.done,
        "rows_written": written_rows,
        "top_k": config.search.top_k,
        "exact_rescoring": config.search.exact_rescoring,
        "reranker": rerank.model if rerank.enabled else "none",
        "rerank_depth": rerank.depth if rerank.enabled else 0,
        "fusion_weight": serving["fusion_weight"],
        "fusion_fitted_on": serving["fitted_on"],
        "search_mode": resolve_search_mode(config.search.mode, manifest),
        "dense_weight": config.search.dense_weight,
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
    summary["report"] = write_query_report(config, summary, output_url)
    storage.write_json_atomically(storage.join_url(output_url, "run.json"), summary)
    return summary


def write_query_report(config: RetrieveRerankConfig, summary: dict[str, Any], output_url: str) -> str:
    """The run's page with plots (:mod:`pipelines.report`) in the output folder; with ``--qrels``, the quality of every
    stage of the whole run too (every judged query is in it). Returns the page's URL as the user named the output."""
    from pipelines import report as run_report
    from pipelines.evaluation import PRIMARY_METRIC, RunEvaluator, read_qrels, read_run

    evaluation = None
    if config.qrels:
        evaluation = {"qrels": config.qrels, "primary_metric": PRIMARY_METRIC, "runs": {config.output: RunEvaluator(read_qrels(config.qrels))(read_run(output_url))}}
    run_report.write_report(*run_report.report_paths(output_url), title=f"Retrieve and rerank: {config.output}", sections=run_report.query_sections(summary, evaluation),
                            subtitle=f"index {config.index}, version {summary['index_version']}; queries {config.queries}")
    return run_report.report_paths(config.output)[0]


def summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ("queries read", summary["queries_read"]),
        ("quarantined", summary["queries_quarantined"]),
        ("queries run now", summary["queries_run"]),
        ("queries already done", summary["queries_reused"]),
        ("rows written", summary["rows_written"]),
        ("first stage", summary["search_mode"] + (f" (dense weight {summary['dense_weight']})" if summary["search_mode"] == "hybrid" else "")),
        ("reranker", summary["reranker"]),
        ("rerank depth", summary["rerank_depth"]),
        ("queries/s", float(summary["queries_per_second"])),
        ("pairs/s (rerank)", float(summary["pairs_per_second"])),
        ("wall time (s)", float(summary["wall_seconds"])),
    ]
    return format_table(rows, title=f"retrieve-rerank on index version {summary['index_version']}")
