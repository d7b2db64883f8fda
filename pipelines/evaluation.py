"""Evaluating runs against BEIR qrels: every stage a run holds, and what a shallower rerank would have given.

A run (Parquet at any fsspec URL: one file or a folder of ``part-*.parquet``) has one row per
(query, candidate): ``query_id``, ``rank``, ``doc_id``, ``score``, ``first_stage_rank``,
``first_stage_score``, ``rerank_score`` (null where the candidate was not reranked) and optionally
``fused_score`` and each retriever's own ``dense_rank``/``dense_score``/``sparse_rank``/``sparse_score``
(null where that retriever did not return the document; older runs lack them). From that one table
each stage's ranking is rebuilt, in pipeline order:

- ``dense``, ``sparse``: a hybrid run's (both retrievers present) candidates that retriever returned,
  by its own rank; only for hybrid runs, where the first stage is their fusion;
- ``first_stage``: by first_stage_rank (the fused first stage in hybrid mode);
- ``reranked``: the reranked candidates by rerank_score (highest first), then the others in
  first-stage order; only when some rerank_score is set;
- ``fused``: the candidates with a fused_score by it (highest first), then the others in first-stage
  order; only when the column exists and some value is set.

Ties go to the better first-stage rank, then the smaller doc_id, so every ranking is deterministic.

The reranker scores each candidate on its own, so a run reranked to depth D also shows what any
depth d <= D would have given: keep the rerank (and fused) scores of first_stage_rank <= d only
(:func:`rerank_at_depth`). A depth sweep puts quality next to cost (pairs reranked per query); the
dense and sparse stages do not depend on it.

Metrics come from ir_measures (pytrec_eval and friends), never by hand. It ranks by score, so each
ranking is handed over with score = -position. Evaluation covers exactly the queries in the qrels:
run queries without judgments are dropped, and every judged query counts in every mean, a judged
query without results scoring 0 (as does a judged query with no relevant document). pytrec_eval
alone, like trec_eval without ``-c``, only averages over the queries in the run, and not every
ir_measures version fills in the others, so the zeros are added here, explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ir_measures
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.config import config_to_dict
from pipelines.runtime import format_table
from pipelines.storage import StorageConfig

STAGES = ("dense", "sparse", "first_stage", "reranked", "fused")
STAGE_RANK_COLUMNS = {"dense": "dense_rank", "sparse": "sparse_rank"}
STAGE_SCORE_COLUMNS = {"reranked": "rerank_score", "fused": "fused_score"}
METRICS = {
    "ndcg@10": ir_measures.nDCG @ 10,
    "mrr@10": ir_measures.RR @ 10,
    "recall@10": ir_measures.R @ 10,
    "recall@20": ir_measures.R @ 20,
    "recall@100": ir_measures.R @ 100,
    "p@3": ir_measures.P @ 3,
}
PRIMARY_METRIC = "ndcg@10"
SWEEP_METRICS = ("ndcg@10", "p@3")
COST_KEY = "pairs_per_query"

# Column -> kind: "id" (string, required), "rank" (int >= 1, required), "score" (float, required),
# "optional rank" (int >= 1 or null), "optional score" (float or null). NaN is refused everywhere:
# it has no place in a ranking. Ranks are unique per query (nulls aside).
RUN_COLUMNS = {
    "query_id": "id",
    "rank": "rank",
    "doc_id": "id",
    "score": "score",
    "first_stage_rank": "rank",
    "first_stage_score": "score",
    "rerank_score": "optional score",
}
OPTIONAL_RUN_COLUMNS = {
    "fused_score": "optional score",
    "dense_rank": "optional rank",
    "dense_score": "optional score",
    "sparse_rank": "optional rank",
    "sparse_score": "optional score",
}
RANK_COLUMNS = ("first_stage_rank", *STAGE_RANK_COLUMNS.values())
COLUMN_TYPES = {"id": pa.string(), "rank": pa.int64(), "score": pa.float64(), "optional rank": pa.int64(), "optional score": pa.float64()}
QRELS_FIELDS = ("query-id", "corpus-id", "score")


class EvaluationError(ValueError):
    """Qrels, a run or a requested depth cannot be evaluated; the message names the file, row and field."""


class QrelsError(EvaluationError):
    """A qrels file is missing or malformed."""


class RunError(EvaluationError):
    """A run file is missing or malformed."""


class DepthError(EvaluationError):
    """A rerank depth the run cannot show: deeper than it was reranked, or nothing was reranked."""


# ---------------------------------------------------------------------------------------------
# Reading


def _parse_relevance(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def read_qrels(url: str) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (``query-id<TAB>corpus-id<TAB>score``) at any fsspec URL -> {query_id: {doc_id: relevance}}.

    The first line is the header when its score field is not an integer. Blank lines are skipped;
    any other line must be three tab-separated fields with non-empty ids and an integer score, or
    the error names the file and line. Compressed files (.gz, .bz2...) are read by their suffix.
    """
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    number = 0
    seen_content = False
    try:
        with fsspec.open(url, "rt", compression="infer", encoding="utf-8", newline="", **storage.filesystem_options(url)) as handle:
            for number, line in enumerate(handle, start=1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                is_first = not seen_content
                seen_content = True
                fields = text.split("\t")
                if len(fields) != 3:
                    raise QrelsError(
                        f"{url}, line {number}: expected 3 tab-separated fields ({', '.join(QRELS_FIELDS)}), "
                        f"found {len(fields)}: {text[:80]!r}"
                    )
                query_id, doc_id, score_text = (part.strip() for part in fields)
                relevance = _parse_relevance(score_text)
                if relevance is None:
                    if is_first:
                        continue  # the header
                    raise QrelsError(f"{url}, line {number}: field 'score' = {score_text!r} is not an integer")
                for name, value in (("query-id", query_id), ("corpus-id", doc_id)):
                    if not value:
                        raise QrelsError(f"{url}, line {number}: field '{name}' is empty")
                previous = qrels.setdefault(query_id, {}).get(doc_id)
                if previous is not None and previous != relevance:
                    raise QrelsError(
                        f"{url}, line {number}: field 'score': query {query_id!r}, document {doc_id!r} is judged "
                        f"{relevance} here but {previous} on line {first_line[(query_id, doc_id)]}"
                    )
                first_line.setdefault((query_id, doc_id), number)
                qrels[query_id][doc_id] = relevance
    except FileNotFoundError:
        raise QrelsError(f"{url}: no such file") from None
    except UnicodeDecodeError as error:
        raise QrelsError(f"{url}, line {number + 1}: not UTF-8 text ({error.reason})") from None
    if not qrels:
        raise QrelsError(f"{url}: no judgments found")
    return qrels


def list_run_files(url: str) -> list[str]:
    """A run file as it is, or a folder's ``*.parquet`` files (sorted; hidden and ``_`` files skipped)."""
    filesystem, path = storage.filesystem_and_path(url)
    if filesystem.isdir(path):
        files = [
            file for file in storage.list_files(url, ".parquet") if not file.rsplit("/", 1)[-1].startswith((".", "_"))
        ]
        if not files:
            raise RunError(f"{url}: no Parquet files in this folder")
        return files
    if not filesystem.exists(path):
        raise RunError(f"{url}: no such file or folder")
    return [url]


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    """Index of the first true value (nulls count as false), or None."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def _normalize_column(column: pa.ChunkedArray, name: str, kind: str, describe_row: Callable[[int], str], source: str) -> pa.ChunkedArray:
    """Cast one run column to its type and check its values; errors name the file, row and field."""
    target = COLUMN_TYPES[kind]
    found = column.type
    allowed = {
        "id": pa.types.is_string(found) or pa.types.is_large_string(found) or pa.types.is_integer(found),
        "rank": pa.types.is_integer(found) or pa.types.is_floating(found),
        "score": pa.types.is_integer(found) or pa.types.is_floating(found) or pa.types.is_decimal(found),
    }
    optional = kind.startswith("optional ")
    allowed["optional rank"] = allowed["rank"] or pa.types.is_null(found)
    allowed["optional score"] = allowed["score"] or pa.types.is_null(found)
    if not allowed[kind]:
        raise RunError(f"{source}: field '{name}' has type {found}; expected {target}")
    null_row = _first_true(pc.is_null(column))
    if null_row is not None and not optional:
        raise RunError(f"{describe_row(null_row)}: field '{name}' is empty")
    if kind.endswith("rank"):
        if pa.types.is_floating(found):
            fractional = _first_true(pc.not_equal(column, pc.floor(column)))
            if fractional is not None:
                raise RunError(f"{describe_row(fractional)}: field '{name}' = {column[fractional].as_py()} is not an integer")
        column = column.cast(target)
        below_one = _first_true(pc.less(column, 1))
        if below_one is not None:
            raise RunError(f"{describe_row(below_one)}: field '{name}' = {column[below_one].as_py()}; ranks start at 1")
        return column
    column = column.cast(target)
    if target == pa.float64():
        not_a_number = _first_true(pc.is_nan(column))
        if not_a_number is not None:
            raise RunError(f"{describe_row(not_a_number)}: field '{name}' is NaN")
    return column


def _check_unique(table: pa.Table, keys: tuple[str, str], describe_row: Callable[[int], str]) -> None:
    """Raise if two rows share the values of ``keys`` (nulls never match), naming both rows."""
    if table.num_rows < 2:
        return
    order = pc.sort_indices(table, sort_keys=[(key, "ascending") for key in keys])
    sorted_keys = table.select(list(keys)).take(order)
    same = None
    for key in keys:
        values = sorted_keys[key]
        equal = pc.equal(values.slice(1), values.slice(0, len(values) - 1))
        same = equal if same is None else pc.and_(same, equal)
    position = _first_true(same)
    if position is None:
        return
    first, second = sorted((order[position].as_py(), order[position + 1].as_py()))
    query_key, other_key = keys
    raise RunError(
        f"{describe_row(second)}: field '{other_key}' = {table[other_key][second].as_py()!r} appears twice for "
        f"{query_key} {table[query_key][second].as_py()!r} (also at {describe_row(first)})"
    )


def _check_unique_per_query(table: pa.Table, describe_row: Callable[[int], str]) -> None:
    """Each document, first-stage rank and retriever rank at most once per query."""
    for column in ("doc_id", *RANK_COLUMNS):
        if column in table.column_names:
            _check_unique(table, ("query_id", column), describe_row)


def validate_run(table: pa.Table, source: str = "run", describe_row: Callable[[int], str] | None = None) -> pa.Table:
    """The run's columns, cast to their types and checked: required columns, no empty ids, ranks or scores,
    no NaN, ranks >= 1, each document, first-stage rank and retriever rank once per query. Other columns
    are dropped."""
    describe_row = describe_row or (lambda row: f"{source}, row {row}")
    missing = [name for name in RUN_COLUMNS if name not in table.column_names]
    if missing:
        raise RunError(
            f"{source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(name) for name in missing)} "
            f"(columns: {', '.join(table.column_names)})"
        )
    columns = {**RUN_COLUMNS, **{name: kind for name, kind in OPTIONAL_RUN_COLUMNS.items() if name in table.column_names}}
    normalized = pa.table({name: _normalize_column(table[name], name, kind, describe_row, source) for name, kind in columns.items()})
    _check_unique_per_query(normalized, describe_row)
    return normalized


def _read_run_file(url: str) -> pa.Table:
    filesystem, path = storage.filesystem_and_path(url)
    try:
        with filesystem.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = [name for name in (*RUN_COLUMNS, *OPTIONAL_RUN_COLUMNS) if name in parquet.schema_arrow.names]
            missing = [name for name in RUN_COLUMNS if name not in present]
            if missing:
                raise RunError(
                    f"{url}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(name) for name in missing)} "
                    f"(columns: {', '.join(parquet.schema_arrow.names)})"
                )
            table = parquet.read(columns=present)
    except (RunError, FileNotFoundError):
        raise
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise RunError(f"{url}: cannot read as Parquet ({type(error).__name__}: {error})") from error
    return validate_run(table, source=url)


def read_run(url: str) -> pa.Table:
    """A run (Parquet file or folder of parts, any fsspec URL) as one validated table (see :func:`validate_run`).

    Errors name the file, the row (0-based, within that file) and the field.
    """
    files = list_run_files(url)
    tables = [_read_run_file(file) for file in files]
    # An optional column some parts lack is null there; every part gets the same columns in the same order.
    optional = {name: COLUMN_TYPES[kind] for name, kind in OPTIONAL_RUN_COLUMNS.items() if any(name in table.column_names for table in tables)}
    tables = [
        pa.table({
            **{name: table[name] for name in RUN_COLUMNS},
            **{name: table[name] if name in table.column_names else pa.nulls(table.num_rows, kind) for name, kind in optional.items()},
        })
        for table in tables
    ]
    run = pa.concat_tables(tables)
    if len(files) > 1:
        starts = []
        total = 0
        for table in tables:
            starts.append(total)
            total += table.num_rows

        def describe_row(row: int) -> str:
            index = max(i for i, start in enumerate(starts) if start <= row)
            return f"{files[index]}, row {row - starts[index]}"

        _check_unique_per_query(run, describe_row)
    return run


# ---------------------------------------------------------------------------------------------
# Stages and depths


def _has_values(run: pa.Table, column: str) -> bool:
    return column in run.column_names and run[column].null_count < run.num_rows


def is_hybrid(run: pa.Table) -> bool:
    """Whether the first stage fused two retrievers: both dense_rank and sparse_rank have values."""
    return all(_has_values(run, column) for column in STAGE_RANK_COLUMNS.values())


def rescored_stages(run: pa.Table) -> list[str]:
    """The stages that rescore first-stage candidates (reranked, fused) the run holds: what a rerank depth varies."""
    return [stage for stage, column in STAGE_SCORE_COLUMNS.items() if _has_values(run, column)]


def available_stages(run: pa.Table) -> list[str]:
    """The stages a run holds, in pipeline order: dense and sparse for a hybrid run, always first_stage,
    then reranked and fused when scored."""
    return [*(STAGE_RANK_COLUMNS if is_hybrid(run) else ()), "first_stage", *rescored_stages(run)]


def stage_label(stage: str, stages: Sequence[str]) -> str:
    """A stage's name in tables: the first stage of a run that also has dense and sparse stages is "first_stage (hybrid)"."""
    return "first_stage (hybrid)" if stage == "first_stage" and all(name in stages for name in STAGE_RANK_COLUMNS) else stage


def stage_ranking(run: pa.Table, stage: str) -> dict[str, list[str]]:
    """One stage's ranking: {query_id: [doc_id, best first]} (see the module docstring for the orders)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    if stage in STAGE_RANK_COLUMNS:
        column = STAGE_RANK_COLUMNS[stage]
        if column not in run.column_names:
            raise ValueError(f"the run has no stage {stage!r}: no column '{column}'")
        run = run.filter(pc.is_valid(run[column]))  # only what that retriever returned, by its own (unique) rank
        order = pc.sort_indices(run, sort_keys=[("query_id", "ascending"), (column, "ascending")])
        return _ranking(run, order)
    keys = {"query_id": run["query_id"]}
    sort_keys = [("query_id", "ascending")]
    if stage != "first_stage":
        column = STAGE_SCORE_COLUMNS[stage]
        if column not in run.column_names:
            raise ValueError(f"the run has no stage {stage!r}: no column '{column}'")
        # Scored candidates first (0 before 1), by score; explicit keys keep nulls out of the sort.
        keys["unscored"] = pc.cast(pc.is_null(run[column]), pa.int8())
        keys["stage_score"] = pc.fill_null(run[column], 0.0)
        sort_keys += [("unscored", "ascending"), ("stage_score", "descending")]
    keys["first_stage_rank"] = run["first_stage_rank"]
    keys["doc_id"] = run["doc_id"]
    sort_keys += [("first_stage_rank", "ascending"), ("doc_id", "ascending")]
    return _ranking(run, pc.sort_indices(pa.table(keys), sort_keys=sort_keys))


def _ranking(run: pa.Table, order: pa.Array) -> dict[str, list[str]]:
    """{query_id: [doc_id, ...]} from the run's rows taken in ``order``."""
    ranking: dict[str, list[str]] = {}
    for query_id, doc_id in zip(run["query_id"].take(order).to_pylist(), run["doc_id"].take(order).to_pylist()):
        ranking.setdefault(query_id, []).append(doc_id)
    return ranking


def stage_rankings(run: pa.Table) -> dict[str, dict[str, list[str]]]:
    """Every stage the run holds: {stage: {query_id: [doc_id, best first]}}."""
    return {stage: stage_ranking(run, stage) for stage in available_stages(run)}


def scored_depth(run: pa.Table, column: str) -> int | None:
    """How deep every query is scored in ``column``: the largest d such that every candidate with
    first_stage_rank <= d has a value (0: some query lacks one at rank 1); None when every candidate has one."""
    unscored = run.filter(pc.is_null(run[column]))
    if unscored.num_rows == 0:
        return None
    return int(pc.min(unscored["first_stage_rank"]).as_py()) - 1


def rerank_depth(run: pa.Table) -> int | None:
    """How deep the run was reranked: :func:`scored_depth` of rerank_score, or, when every candidate was
    reranked, the deepest first-stage rank. None when nothing was reranked."""
    if "reranked" not in available_stages(run):
        return None
    depth = scored_depth(run, "rerank_score")
    return depth if depth is not None else int(pc.max(run["first_stage_rank"]).as_py())


def rerank_at_depth(run: pa.Table, depth: int) -> pa.Table:
    """The run as if only candidates with first_stage_rank <= ``depth`` had been reranked (and fused).

    Rerank and fused scores deeper than ``depth`` become null, so :func:`stage_ranking` puts those
    candidates after the rescored ones, in first-stage order. Raises :class:`DepthError` when the run
    was scored less deep than ``depth`` (its scores cannot show what a deeper rerank would have done)
    or holds no rerank or fused scores at all. A depth beyond every query's candidates is fine: it
    equals the full rerank.
    """
    if depth < 1:
        raise DepthError(f"rerank depth must be at least 1, not {depth}")
    stages = rescored_stages(run)
    if not stages:
        raise DepthError("the run holds no rerank or fused scores: there is no rerank depth to vary")
    within = pc.less_equal(run["first_stage_rank"], depth)
    for stage in stages:
        column = STAGE_SCORE_COLUMNS[stage]
        covered = scored_depth(run, column)
        if covered is not None and depth > covered:
            raise DepthError(
                f"cannot evaluate {stage} at depth {depth}: the run has '{column}' for every candidate only "
                f"down to first_stage_rank {covered}"
            )
        masked = pc.if_else(within, run[column], pa.scalar(None, pa.float64()))
        run = run.set_column(run.column_names.index(column), column, masked)
    return run


def pairs_per_query(run: pa.Table, depth: int) -> float:
    """The cost of reranking to ``depth``: (query, document) pairs scored per query, averaged over the run's queries."""
    queries = pc.count_distinct(run["query_id"]).as_py()
    if not queries:
        return 0.0
    return pc.sum(pc.cast(pc.less_equal(run["first_stage_rank"], depth), pa.int64())).as_py() / queries


def to_ir_measures_run(ranking: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """{query_id: {doc_id: score}} for ir_measures, with score = -position so that its sort by score
    (highest first) reproduces the ranking exactly, with no ties for it to break its own way."""
    return {query_id: {doc_id: -float(position) for position, doc_id in enumerate(doc_ids, start=1)} for query_id, doc_ids in ranking.items()}


# ---------------------------------------------------------------------------------------------
# Evaluator


class RunEvaluator:
    """Scores every stage of a run table against fixed qrels, sentence-transformers evaluator style.

    ``evaluator(run_table)`` returns ``{stage: {metric: value}}`` for each stage the run holds, plus
    ``primary_metric`` ("ndcg@10"), ``queries`` (judged / with_results / without_results),
    ``rerank_depth`` (see :func:`rerank_depth`) and, when ``depths`` are given, ``depth_sweep``:
    ``{stage: {depth: {metric: value, "pairs_per_query": cost}}}`` for the reranked and fused stages,
    where a depth deeper than the run was reranked is None (not available) rather than an error, so
    one sweep serves runs of different depths.
    """

    def __init__(self, qrels: dict[str, dict[str, int]], depths: Sequence[int] = ()):
        if not qrels:
            raise ValueError("qrels are empty: nothing to evaluate against")
        invalid = [depth for depth in depths if int(depth) < 1]
        if invalid:
            raise ValueError(f"rerank depths must be at least 1: {invalid}")
        self.qrels = qrels
        self.depths = sorted({int(depth) for depth in depths})
        self.primary_metric = PRIMARY_METRIC
        self._metric_names = {measure: name for name, measure in METRICS.items()}
        self._evaluator = ir_measures.evaluator(list(METRICS.values()), qrels)
        self._judged = pa.array(sorted(qrels), pa.string())

    def evaluate_ranking(self, ranking: dict[str, list[str]]) -> dict[str, float]:
        """Mean of each metric over every judged query; judged queries missing from ``ranking`` add 0."""
        totals = dict.fromkeys(METRICS, 0.0)
        counted: set[tuple[str, str]] = set()
        judged_run = to_ir_measures_run({query_id: doc_ids for query_id, doc_ids in ranking.items() if query_id in self.qrels})
        for metric in self._evaluator.iter_calc(judged_run):
            name = self._metric_names.get(metric.measure)
            if name is None or metric.query_id not in self.qrels or (metric.query_id, name) in counted:
                continue
            counted.add((metric.query_id, name))
            totals[name] += float(metric.value)
        # Queries without a value (not in the run) contribute 0: divide by every judged query.
        return {name: total / len(self.qrels) for name, total in totals.items()}

    def depth_sweep(self, run: pa.Table) -> dict[str, dict[int, dict[str, float] | None]]:
        """{stage: {depth: metrics with the pairs_per_query cost, or None when deeper than the run was reranked}}."""
        stages = rescored_stages(run)
        sweep: dict[str, dict[int, dict[str, float] | None]] = {stage: {} for stage in stages}
        if not stages:
            return sweep
        for depth in self.depths:
            try:
                shallower = rerank_at_depth(run, depth)
            except DepthError:
                for stage in stages:
                    sweep[stage][depth] = None
                continue
            cost = pairs_per_query(run, depth)
            for stage in stages:
                metrics: dict[str, float] = self.evaluate_ranking(stage_ranking(shallower, stage))
                metrics[COST_KEY] = cost
                sweep[stage][depth] = metrics
        return sweep

    def __call__(self, run: pa.Table) -> dict[str, Any]:
        run = validate_run(run)
        judged = run.filter(pc.is_in(run["query_id"], value_set=self._judged))
        with_results = pc.count_distinct(judged["query_id"]).as_py() if judged.num_rows else 0
        results: dict[str, Any] = {
            "primary_metric": self.primary_metric,
            "queries": {"judged": len(self.qrels), "with_results": with_results, "without_results": len(self.qrels) - with_results},
            "rerank_depth": rerank_depth(judged),
        }
        for stage, ranking in stage_rankings(judged).items():
            results[stage] = self.evaluate_ranking(ranking)
        if self.depths:
            results["depth_sweep"] = self.depth_sweep(judged)
        return results


# ---------------------------------------------------------------------------------------------
# Reporting


def format_metrics_table(results_by_run: dict[str, dict[str, Any]]) -> str:
    """Readable tables of :class:`RunEvaluator` results keyed by run name: one row per run and stage
    (see :func:`stage_label`), one column per metric; then, when a sweep was run, nDCG@10, P@3 and the
    cost per rerank depth."""
    header = ["run", "stage", "queries", *METRICS]
    rows = []
    for name, results in results_by_run.items():
        queries = results["queries"]
        for stage in STAGES:
            if stage in results:
                rows.append([name, stage_label(stage, list(results)), f"{queries['with_results']}/{queries['judged']}", *(f"{results[stage][metric]:.4f}" for metric in METRICS)])
    title = "metrics (mean over all judged queries; queries = judged queries with results / judged queries, the others score 0)"
    tables = [format_table(rows, title, headers=header, left_columns=2)]

    sweep_rows = []
    for name, results in results_by_run.items():
        for stage, by_depth in results.get("depth_sweep", {}).items():
            for depth, metrics in by_depth.items():
                if metrics is None:
                    sweep_rows.append([name, stage, str(depth), f"n/a (reranked to {results['rerank_depth']})", "", ""])
                else:
                    sweep_rows.append([name, stage, str(depth), f"{metrics[COST_KEY]:.1f}", *(f"{metrics[metric]:.4f}" for metric in SWEEP_METRICS)])
    if sweep_rows:
        sweep_header = ["run", "stage", "depth", "cost (pairs/query)", *SWEEP_METRICS]
        tables.append(format_table(sweep_rows, "rerank depth sweep (only the top `depth` first-stage candidates reranked)", headers=sweep_header, left_columns=2))
    return "\n\n".join(tables)


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class EvaluateConfig:
    """Settings of jobs.evaluate."""

    qrels: str = field(default="", metadata={"help": "BEIR qrels TSV (query-id, corpus-id, score), any fsspec URL"})
    run: list[str] = field(default_factory=list, metadata={"help": "run: Parquet file or folder of part-*.parquet (any fsspec URL); repeat or comma-separate for several"})
    depths: list[int] = field(default_factory=list, metadata={"help": "rerank depths to sweep, e.g. 10,20,30,50 (empty: no sweep)"})
    output: str = field(default="", metadata={"help": "write the results as JSON to this URL (empty: print only)"})
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if not self.qrels:
            raise ValueError("--qrels is required")
        if not self.run:
            raise ValueError("--run is required (at least one)")
        repeated = sorted({url for url in self.run if self.run.count(url) > 1})
        if repeated:
            raise ValueError(f"--run names the same run more than once: {', '.join(repeated)}")
        invalid = [depth for depth in self.depths if depth < 1]
        if invalid:
            raise ValueError(f"--depths must be at least 1: {invalid}")
        from pipelines import storage

        storage.require_input(self.qrels, "qrels")
        for url in self.run:
            storage.require_input(url, "run")


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every run against the qrels; write the report as JSON (atomically) when ``output`` is set, and
    beside it its page with plots (:mod:`pipelines.report`: quality per stage, the depth sweep).

    The report: ``config``, ``qrels``, ``primary_metric``, ``metrics`` (names, in table order) and
    ``runs``: {run URL: :class:`RunEvaluator` results}. In JSON, depth keys become strings.
    """
    qrels = read_qrels(config.qrels)
    evaluator = RunEvaluator(qrels, depths=config.depths)
    runs = {url: evaluator(read_run(url)) for url in config.run}
    report = {
        "config": config_to_dict(config),
        "qrels": config.qrels,
        "primary_metric": PRIMARY_METRIC,
        "metrics": list(METRICS),
        "runs": runs,
    }
    if config.output:
        from pipelines import report as run_report

        html_url, images_url = run_report.report_paths(config.output)
        run_report.write_report(html_url, images_url, f"Evaluation: {', '.join(config.run)}", run_report.evaluation_sections(report))
        report["report"] = html_url
        storage.write_json_atomically(config.output, report)
    return report
