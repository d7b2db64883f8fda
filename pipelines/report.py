"""One report per job run: PNG plots and a self-contained ``report.html`` next to the job's JSON summary.

The people who choose a rerank depth or sign off a nightly index look at pictures, not JSON. Each job
builds :class:`Section` s (plots made with matplotlib, plus a small table) from its own summary, and
:func:`write_report` writes every plot as a PNG under ``<stem>/`` and then the HTML page, which embeds
the same images (base64), so it opens from disk with no network. Every file is written atomically and
the page last: a report that exists is whole. Plots have titles, axis labels with units and legends.

Where each job writes it:

- ``build_index``: in the new version's folder (``report.html``), before its manifest;
- ``retrieve_rerank``: in the output folder, beside ``run.json``;
- ``evaluate``: beside ``--output`` (``evaluation.json`` -> ``evaluation.report.html``);
- ``train_reranker``: in the output folder, beside ``training_report.json``;
- the demo: one page holding all of them, in its work folder.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from dataclasses import dataclass, field
from typing import Any

from pipelines import storage

STAGE_COLOURS = {"dense": "#4C72B0", "sparse": "#DD8452", "first_stage": "#55A868", "reranked": "#C44E52", "fused": "#8172B3"}
SHOWN_METRICS = ("ndcg@10", "p@3", "mrr@10", "recall@100")
PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1em 0 2em}img{max-width:100%}"
    "figcaption{color:#555;font-size:.9em}"
)


@dataclass
class Plot:
    """One PNG: a file name (no suffix), a caption, and its bytes."""

    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    heading: str
    plots: list[Plot] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display, also inside Ray workers
    from matplotlib import pyplot

    return pyplot


def render(figure) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    pyplot = _pyplot()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def report_paths(summary_url: str) -> tuple[str, str]:
    """(html URL, PNG folder URL) for a report next to a JSON summary file or inside an output folder.

        >>> report_paths("/out/evaluation.json")
        ('/out/evaluation.report.html', '/out/evaluation.report')
        >>> report_paths("/out/run/")
        ('/out/run/report.html', '/out/run/report')
    """
    url = str(summary_url)
    if url.endswith(".json"):
        stem = url[: -len(".json")] + ".report"
        return f"{stem}.html", stem
    folder = url.rstrip("/")
    return f"{folder}/report.html", f"{folder}/report"


def write_report(html_url: str, images_url: str, title: str, sections: list[Section], subtitle: str = "") -> dict[str, Any]:
    """Write each plot as ``<images_url>/<name>.png``, then the self-contained page at ``html_url`` (last, atomically)."""
    images = []
    for section in sections:
        for plot in section.plots:
            url = storage.join_url(images_url, f"{plot.name}.png")
            storage.write_bytes_atomically(url, plot.png)
            images.append(url)
    page = html_page(title, sections, subtitle, images_folder=images_url.rstrip("/").rsplit("/", 1)[-1])
    storage.write_bytes_atomically(html_url, page.encode("utf-8"))
    return {"html": html_url, "images": images}


def html_page(title: str, sections: list[Section], subtitle: str = "", images_folder: str = "report") -> str:
    """The page: headings, tables, and each plot embedded as a data URL, captioned, with a link to its PNG file."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{PAGE_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p>{escape(subtitle)}</p>")
    parts.append(f"<p><small>written {escape(datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'))}</small></p>")
    for section in sections:
        parts.append(f"<h2>{escape(section.heading)}</h2>")
        for note in section.notes:
            parts.append(f"<p>{escape(note)}</p>")
        if section.rows:
            parts.append("<table><tr>" + "".join(f"<th>{escape(str(header))}</th>" for header in section.headers) + "</tr>")
            for row in section.rows:
                parts.append("<tr>" + "".join(f"<td>{escape(_cell(value))}</td>" for value in row) + "</tr>")
            parts.append("</table>")
        for plot in section.plots:
            data = base64.b64encode(plot.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.caption)}">'
                         f'<figcaption>{escape(plot.caption)} (<a href="{escape(images_folder)}/{escape(plot.name)}.png">{escape(plot.name)}.png</a>)</figcaption></figure>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:,.1f}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------------------------------------------
# build_index


def index_sections(summary: dict[str, Any], manifest: dict[str, Any], quarantine_reasons: dict[str, int]) -> list[Section]:
    """Counts (read, quarantined by reason, embedded vs reused), seconds and docs/s per stage, bytes per vector, shard sizes."""
    pyplot = _pyplot()
    sections = []

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 3.8))
    names = ["read", "quarantined", "duplicate ids", "indexed"]
    values = [summary["documents_read"], summary["quarantined"], summary.get("duplicate_ids", 0), summary["indexed"]]
    bars = left.bar(names, values, color=["#4C72B0", "#C44E52", "#DD8452", "#55A868"], label="documents")
    left.bar_label(bars, labels=[f"{value:,}" for value in values])
    left.set(title="Documents", ylabel="documents")
    left.legend()
    embedded, reused = summary.get("embedded", 0), summary.get("reused_embeddings", 0)
    right.bar(["this run"], [embedded], color="#4C72B0", label=f"embedded now ({embedded:,})")
    right.bar(["this run"], [reused], bottom=[embedded], color="#BBBBBB", label=f"reused from the embedding store ({reused:,})")
    right.set(title="Embeddings", ylabel="documents")
    right.legend()
    counts = Plot("documents", "Documents read, quarantined and indexed; embeddings computed now against reused", render(figure))
    sections.append(Section("Documents", [counts], ["documents", "count"],
                            [*([name, value] for name, value in zip(names, values)), ["embedded now", embedded], ["embeddings reused", reused]]))
    reasons = Section("Quarantine", [], ["reason", "rows"], [[reason, count] for reason, count in sorted(quarantine_reasons.items(), key=lambda item: -item[1])],
                      notes=[] if quarantine_reasons else ["no row was set aside"])
    if quarantine_reasons:
        figure, axes = pyplot.subplots(figsize=(9, 0.5 + 0.45 * len(quarantine_reasons)))
        ordered = sorted(quarantine_reasons.items(), key=lambda item: item[1])
        axes.barh([reason for reason, _ in ordered], [count for _, count in ordered], color="#C44E52", label="rows quarantined")
        axes.set(title="Quarantined rows by reason", xlabel="rows")
        axes.legend()
        reasons.plots.append(Plot("quarantine", "Rows set aside (quarantine/), by reason", render(figure)))
    sections.append(reasons)

    stages = [("read + validate", summary.get("read_seconds", 0.0), summary["documents_read"]),
              ("embedding", summary.get("embedding_seconds", 0.0), embedded),
              ("dense index", summary.get("index_seconds", 0.0), summary["indexed"]),
              ("BM25", summary.get("sparse_seconds", 0.0), summary["indexed"] if summary.get("sparse") else 0),
              ("document store", summary.get("documents_store_seconds", 0.0), summary["indexed"])]
    stages = [(name, seconds, documents) for name, seconds, documents in stages if seconds > 0]
    rows = [[name, round(seconds, 1), round(documents / seconds, 1) if documents else 0.0] for name, seconds, documents in stages]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 3.8))
    left.barh([name for name, _, _ in stages][::-1], [seconds for _, seconds, _ in stages][::-1], color="#4C72B0", label="wall seconds")
    left.set(title=f"Time per stage (job: {summary.get('wall_seconds', 0):,.0f} s)", xlabel="seconds")
    left.legend()
    right.barh([row[0] for row in rows][::-1], [row[2] for row in rows][::-1], color="#55A868", label="documents per second")
    right.set(title="Throughput per stage", xlabel="documents / s (log scale: stages differ by orders of magnitude)")
    if any(row[2] > 0 for row in rows):
        right.set_xscale("log")
    right.legend()
    sections.append(Section("Time and throughput", [Plot("throughput", "Wall time and documents per second of each stage", render(figure))],
                            ["stage", "seconds", "documents/s"], rows))

    indexed = max(1, summary["indexed"])
    parts = [("dense index", summary.get("index_bytes", 0)), (f"re-scoring ({summary.get('rescoring_code', 'float16')})", summary.get("vector_bytes", 0)),
             ("BM25", summary.get("sparse_bytes", 0)), ("document store", summary.get("documents_store_bytes", 0))]
    figure, axes = pyplot.subplots(figsize=(9, 3.6))
    bottom = 0.0
    for (name, size), colour in zip(parts, ("#4C72B0", "#8172B3", "#DD8452", "#BBBBBB")):
        axes.bar([summary.get("factory", "index")], [size / indexed], bottom=[bottom], color=colour, label=f"{name}: {size / indexed:,.0f} B")
        bottom += size / indexed
    axes.set(title="Bytes per indexed document", ylabel="bytes / document")
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    size_plot = Plot("bytes_per_vector", "Storage per document: dense index, re-scoring vectors or codes, BM25 counts, document texts", render(figure))

    shards = manifest.get("shards", [])
    figure, axes = pyplot.subplots(figsize=(9, 3.6))
    axes.bar([str(shard["shard"]) for shard in shards], [shard.get("count", 0) for shard in shards], color="#4C72B0", label="vectors")
    axes.set(title=f"Shard sizes ({len(shards)} shard(s) of {summary.get('factory', '')})", xlabel="shard", ylabel="vectors")
    axes.legend()
    shard_plot = Plot("shards", "Vectors per dense shard", render(figure))
    sections.append(Section("Index size", [size_plot, shard_plot], ["part", "bytes", "bytes/document"],
                            [[name, size, round(size / indexed, 1)] for name, size in parts]))
    return sections


def quarantine_reasons(quarantine_url: str) -> dict[str, int]:
    """Rows per quarantine reason, the reason's text up to its first detail (``:`` or ``(``), from the version's quarantine parts."""
    import pyarrow.compute as pc

    counts: dict[str, int] = {}
    for part in storage.list_files(quarantine_url, ".parquet"):
        reasons = storage.read_parquet(part, columns=["reason"])["reason"]
        for row in pc.value_counts(reasons).to_pylist():
            key = _reason_kind(str(row["values"]))
            counts[key] = counts.get(key, 0) + int(row["counts"])
    return counts


def _reason_kind(reason: str) -> str:
    """A reason without its row-specific detail: ``duplicate id (first seen in a.jsonl row 3)`` -> ``duplicate id``."""
    for separator in (" (", ": "):
        if separator in reason:
            reason = reason.split(separator, 1)[0]
    return reason.strip()


# ---------------------------------------------------------------------------------------------------
# evaluate, retrieve_rerank


def quality_plot(results_by_run: dict[str, dict[str, Any]], name: str = "quality") -> Plot:
    """Each run's stages (dense, BM25, first stage, reranked, fused) on nDCG@10, P@3, MRR@10, recall@100."""
    from pipelines.evaluation import STAGES, stage_label

    pyplot = _pyplot()
    runs = list(results_by_run.items())
    figure, axes_list = pyplot.subplots(1, len(runs), figsize=(max(7.0, 5.5 * len(runs)), 4.0), squeeze=False)
    for axes, (run_name, results) in zip(axes_list[0], runs):
        stages = [stage for stage in STAGES if stage in results]
        width = 0.8 / max(1, len(stages))
        for offset, stage in enumerate(stages):
            positions = [index + offset * width for index in range(len(SHOWN_METRICS))]
            bars = axes.bar(positions, [results[stage][metric] for metric in SHOWN_METRICS], width, color=STAGE_COLOURS.get(stage),
                            label=stage_label(stage, list(results)))
            axes.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
        axes.set_xticks([index + width * (len(stages) - 1) / 2 for index in range(len(SHOWN_METRICS))], list(SHOWN_METRICS))
        axes.set(title=f"Quality per stage: {_short(run_name)}", ylabel="score (mean over judged queries)", ylim=(0, 1.1))
        axes.legend(fontsize=8, loc="upper left")
    return Plot(name, "nDCG@10, P@3, MRR@10 and recall@100 of every stage, mean over all judged queries", render(figure))


def depth_sweep_plot(results_by_run: dict[str, dict[str, Any]], name: str = "depth_sweep") -> Plot | None:
    """nDCG@10 against the reranking cost (pairs per query) for each rerank depth; the depth the run used is marked."""
    from pipelines.evaluation import COST_KEY

    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(8.5, 4.2))
    drawn = False
    for run_name, results in results_by_run.items():
        for stage, by_depth in results.get("depth_sweep", {}).items():
            points = sorted((metrics[COST_KEY], metrics["ndcg@10"], int(depth)) for depth, metrics in by_depth.items() if metrics is not None)
            if not points:
                continue
            drawn = True
            label = f"{_short(run_name)}: {stage}" if len(results_by_run) > 1 else stage
            axes.plot([cost for cost, _, _ in points], [value for _, value, _ in points], marker="o", color=STAGE_COLOURS.get(stage), label=label)
            for cost, value, depth in points:
                axes.annotate(f"{depth}", (cost, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
            chosen = [point for point in points if point[2] == results.get("rerank_depth")]
            if chosen:
                axes.scatter([chosen[0][0]], [chosen[0][1]], s=160, facecolors="none", edgecolors="black", zorder=5,
                             label=f"depth used ({chosen[0][2]})" if stage == "fused" or len(results["depth_sweep"]) == 1 else None)
    if not drawn:
        pyplot.close(figure)
        return None
    axes.set(title="Rerank depth: quality against cost", xlabel="pairs reranked per query", ylabel="nDCG@10")
    axes.legend(fontsize=8)
    return Plot(name, "nDCG@10 of the reranked and fused stages at each rerank depth (labels), against cross-encoder pairs per query; circled: the depth the run used",
                render(figure))


def evaluation_sections(report: dict[str, Any]) -> list[Section]:
    """jobs.evaluate: quality per stage, and the depth sweep when one was asked for."""
    from pipelines.evaluation import STAGES, stage_label

    runs = report["runs"]
    rows = [[_short(name), stage_label(stage, list(results)), *(results[stage][metric] for metric in SHOWN_METRICS)]
            for name, results in runs.items() for stage in STAGES if stage in results]
    sections = [Section("Quality per stage", [quality_plot(runs)], ["run", "stage", *SHOWN_METRICS], rows,
                        notes=[f"qrels: {report.get('qrels', '')}"])]
    sweep = depth_sweep_plot(runs)
    if sweep is not None:
        sections.append(Section("Rerank depth", [sweep]))
    return sections


def query_sections(summary: dict[str, Any], evaluation: dict[str, Any] | None) -> list[Section]:
    """jobs.retrieve_rerank: queries and pairs per second, counts; quality per stage when the run's queries are judged (--qrels)."""
    pyplot = _pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 3.6))
    names = ["read", "quarantined", "run now", "reused"]
    values = [summary["queries_read"], summary["queries_quarantined"], summary["queries_run"], summary["queries_reused"]]
    bars = left.bar(names, values, color=["#4C72B0", "#C44E52", "#55A868", "#BBBBBB"], label="queries")
    left.bar_label(bars, labels=[f"{value:,}" for value in values])
    left.set(title="Queries", ylabel="queries")
    left.legend()
    rates = [("queries/s", summary.get("queries_per_second", 0.0)), ("pairs reranked/s", summary.get("pairs_per_second", 0.0))]
    bars = right.bar([name for name, _ in rates], [value for _, value in rates], color=["#4C72B0", "#C44E52"], label="throughput")
    right.bar_label(bars, labels=[f"{value:,.1f}" for _, value in rates])
    right.set(title=f"Throughput ({summary['search_mode']} first stage, reranker {_short(summary['reranker'])}, depth {summary['rerank_depth']})",
              ylabel="per second")
    right.legend()
    rows = [["index version", summary["index_version"]], ["first stage", summary["search_mode"]], ["top-K", summary["top_k"]],
            ["reranker", summary["reranker"]], ["rerank depth", summary["rerank_depth"]], ["fusion weight", summary["fusion_weight"]],
            ["pipeline seconds", summary["pipeline_seconds"]]]
    sections = [Section("Run", [Plot("throughput", "Queries read, set aside, run and reused; queries and reranked pairs per second", render(figure))],
                        ["setting", "value"], rows)]
    if evaluation:
        sections += evaluation_sections(evaluation)
    return sections


# ---------------------------------------------------------------------------------------------------
# train_reranker


def training_sections(report: dict[str, Any]) -> list[Section]:
    """jobs.train_reranker: the loss curve, dev nDCG@10 at each evaluation, and dev nDCG@10 against the fusion weight a."""
    pyplot = _pyplot()
    sections = []
    loss = report.get("loss_curve") or []
    if loss:
        figure, axes = pyplot.subplots(figsize=(8.5, 3.8))
        axes.plot([point["step"] for point in loss], [point["loss"] for point in loss], color="#4C72B0", label="training loss")
        distillation = (report.get("plan") or {}).get("distillation_steps")
        if distillation:
            axes.axvline(distillation, color="#999999", linestyle="--", label=f"end of distillation (step {distillation})")
        axes.set(title="Training loss", xlabel="step", ylabel="loss (mean over the last logging interval)")
        axes.legend()
        sections.append(Section("Loss", [Plot("loss", "Training loss per logging step", render(figure))]))
    dev = report.get("dev_curve") or []
    if dev:
        figure, axes = pyplot.subplots(figsize=(8.5, 3.8))
        steps = [point["step"] for point in dev]
        for key, stage in (("first_stage_ndcg@10", "first_stage"), ("reranked_ndcg@10", "reranked"), ("fused_ndcg@10", "fused")):
            if all(key in point for point in dev):
                axes.plot(steps, [point[key] for point in dev], marker="o", color=STAGE_COLOURS[stage], label=stage.replace("_", " "))
        if report.get("best_step"):
            axes.axvline(report["best_step"], color="#999999", linestyle="--", label=f"model kept (step {report['best_step']})")
        axes.set(title="Dev nDCG@10 during training", xlabel="step", ylabel="nDCG@10 (dev queries)")
        axes.legend()
        sections.append(Section("Dev quality", [Plot("dev_ndcg", "nDCG@10 on the held-out dev queries at each evaluation", render(figure))],
                                ["step", "first stage", "reranked", "fused", "fusion weight"],
                                [[point["step"], point.get("first_stage_ndcg@10"), point.get("reranked_ndcg@10"), point.get("fused_ndcg@10"), point.get("fusion_weight")]
                                 for point in dev]))
    curve = report.get("fusion_curve") or []
    if curve:
        figure, axes = pyplot.subplots(figsize=(8.5, 3.8))
        axes.plot([point["weight"] for point in curve], [point["ndcg@10"] for point in curve], marker="o", color=STAGE_COLOURS["fused"], label="fused, dev")
        if report.get("fusion_weight") is not None:
            axes.axvline(report["fusion_weight"], color="#999999", linestyle="--", label=f"chosen a = {report['fusion_weight']}")
        axes.set(title="Fusion weight", xlabel="a (0 = first stage alone, 1 = reranker alone)", ylabel="nDCG@10 (dev queries)")
        axes.legend()
        sections.append(Section("Fusion", [Plot("fusion_weight", "Dev nDCG@10 of the fused ranking against the fusion weight a", render(figure))]))
    serving = report.get("serving") or {}
    if serving:
        sections.append(Section("Serving", notes=[f"{serving.get('mode', '')}: {serving.get('message', '')}"]))
    return sections


def _short(text: Any, width: int = 48) -> str:
    text = str(text)
    return text if len(text) <= width else "..." + text[-(width - 3):]
