"""Incremental index builds: reuse the trained quantizer and the unchanged shards of the version a build starts from.

A rebuild already reuses stored embeddings, BM25 shards and document-store files. This module lets it also
skip training and most of the filling: when the version CURRENT names at the start of the build (the
*previous* version) was built with the same model key, dimension, index factory, re-scoring code and shard
layout (the same shard count, its ranges laid out by ``index_building.shard_ranges``), the new version
copies the previous ``trained.faiss`` (and ``rescoring.faiss`` for sq8 / sq6 re-scoring codes) instead of
training, unless ``--faiss.retrain`` is set or the new vectors have drifted away from its IVF centroids
(:func:`measure_drift`, :data:`DRIFT_THRESHOLD`). With the quantizer reused, every shard whose position range
and documents (id, text_hash, in order) equal a previous shard's is copied as it is (its faiss file and stats;
ids are global positions and the trained index is the same, so a fill would write the same bytes; its
re-scoring vectors are content-addressed under ``vectors/`` and stay referenced); the other shards are filled.

The version id: a version that trains its own quantizer keeps the id :func:`index_building.version_fingerprint`
gives its inputs, as before. A version that reuses a trained quantizer adds the quantizer's sha256 (and the
re-scoring quantizer's) to the identity it hashes, so its id names what it holds: a ``--faiss.retrain`` build of
the same documents is another version (and really trains), and a rerun after a kill, starting from the same
CURRENT, takes the same decisions (the drift samples are seeded) and resumes the same version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import index_store, storage
from pipelines.index_building import (
    IndexPlan,
    documents_digest,
    locate_vectors,
    make_empty_index,
    read_sources,
    sample_positions,
    shard_ranges,
    training_sources,
)

# Retrain when the new version's vectors lie, on average, more than 10% further (in squared distance) from
# their nearest IVF centroid than the previous version's vectors do. Why 10%: the figure is the k-means
# objective the IVF training minimized, so vectors from the distribution the quantizer was trained on give the
# same value up to sampling noise, which for samples of DRIFT_SAMPLE vectors is well under 1% (the standard
# error of a mean of 20,000 squared distances whose spread is about their mean: 1/sqrt(20,000) = 0.7%); and the
# two samples are paired (same seed; at an unchanged document count the same positions), so unchanged documents
# add the same amount to both figures and the ratio moves only with what changed. A 10% rise then needs, for
# example, 5% of the corpus new and three times as far from the centroids as the rest, or 20% at 1.5 times: a new
# topic the lists were not trained for, where lists grow unevenly and a query's nprobe lists hold fewer of its
# neighbours. Smaller rises keep the quantizer (and so the unchanged shards) at the price of a slightly less
# fitting clustering; the figures are recorded in the summary to watch the trend, and --faiss.retrain (or a
# periodic full build) trains anew whatever the figure. Not measured against recall: a conservative rule of thumb.
DRIFT_THRESHOLD = 1.10
DRIFT_SAMPLE = 20_000  # vectors of each version compared (fewer when a version holds fewer)


@dataclass
class IncrementalPlan:
    """What a build reuses from the previous version (see the module docstring); ``reused`` False: train and fill all."""

    previous_version: str | None
    reused: bool
    reason: str
    drift: dict[str, Any] | None = None
    trained: bytes | None = None  # the previous trained.faiss, when reused
    rescoring: bytes | None = None  # the previous rescoring.faiss (sq8 / sq6 re-scoring codes), when reused
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)  # new shard number -> the previous manifest entry to copy
    trained_in_version: str | None = None  # the version whose build trained the reused quantizer

    def identity(self) -> dict[str, str]:
        """What the version id hashes besides the inputs: the reused quantizers' checksums (nothing when training anew)."""
        if not self.reused or self.trained is None:
            return {}
        fields = {"trained_sha256": storage.sha256_bytes(self.trained)}
        if self.rescoring is not None:
            fields["rescoring_sha256"] = storage.sha256_bytes(self.rescoring)
        return fields

    def summary(self, shards: int) -> dict[str, Any]:
        """The summary's ``incremental`` entry for a version of ``shards`` shards."""
        return {
            "previous_version": self.previous_version,
            "trained": "reused" if self.reused else "retrained",
            "reason": self.reason,
            "trained_in_version": self.trained_in_version,
            "drift": self.drift,
            "shards_reused": len(self.shards),
            "shards_filled": shards - len(self.shards),
        }


def needs_training(factory: str, dimension: int) -> bool:
    """Whether an index of ``factory`` learns anything from data (IVF lists, PQ codebooks); a Flat index does not."""
    return not make_empty_index(factory, dimension).is_trained


def plan_incremental(
    root: str,
    started_from: str | None,
    documents: pa.Table,
    located: pa.Table,
    stored: pa.Table,
    plan: IndexPlan,
    dimension: int,
    model_key: str,
    retrain: bool = False,
) -> IncrementalPlan:
    """Decide what the build of ``documents`` (position order; ``id``, ``text_hash``) reuses from version ``started_from``.

    ``located`` is ``locate_vectors`` of the documents, ``stored`` the embedding store's keys (where the previous
    version's vectors are found for the drift check).
    """
    if not started_from:
        return IncrementalPlan(None, False, "no current version to start from")
    try:
        previous = index_store.read_manifest(root, started_from)
    except index_store.IndexValidationError as error:
        return IncrementalPlan(started_from, False, f"the current version cannot be read ({error})")
    mismatch = incompatibility(previous, plan, dimension, model_key)
    if mismatch:
        return IncrementalPlan(started_from, False, mismatch)
    if retrain:
        return IncrementalPlan(started_from, False, "--faiss.retrain")
    folder = index_store.version_url(root, started_from)
    trained_url = storage.join_url(folder, index_store.plain_name(previous["index"].get("trained_file", "trained.faiss"), "index.trained_file", folder))
    if not storage.exists(trained_url):
        return IncrementalPlan(started_from, False, f"{trained_url} is missing")
    trained = storage.read_bytes(trained_url)
    if previous["index"].get("trained_sha256") not in (None, storage.sha256_bytes(trained)):
        return IncrementalPlan(started_from, False, f"{trained_url} does not match the checksum in its manifest")
    rescoring = None
    quantizer_sha = {entry.get("quantizer_sha256") for entry in previous["shards"] if entry.get("vectors_code")}
    if quantizer_sha:
        rescoring_url = storage.join_url(folder, index_store.RESCORING_QUANTIZER_FILE)
        rescoring = storage.read_bytes(rescoring_url) if storage.exists(rescoring_url) else None
        if rescoring is None or quantizer_sha != {storage.sha256_bytes(rescoring)}:
            return IncrementalPlan(started_from, False, f"{rescoring_url} is missing or does not match the shards' checksum")
    origin = previous["index"].get("trained_in_version") or started_from
    try:
        previous_ids = index_store.load_doc_ids(root, previous)
    except index_store.IndexValidationError as error:
        return IncrementalPlan(started_from, False, f"the current version's document ids cannot be read ({error})")
    if not needs_training(plan.factory, dimension):
        # Nothing learned (Flat): the "trained" index is the same empty one every build makes, so the version id stays
        # the one a full build gives; only the unchanged shards are copied.
        reason = f"{plan.factory} has nothing to train: unchanged shards are reused"
        return IncrementalPlan(started_from, True, reason, None, None, None, reusable_shards(root, previous, previous_ids, documents, plan))
    drift = measure_drift(trained, located, previous_ids, stored, plan.seed)
    if drift is None:
        return IncrementalPlan(started_from, False, "the previous version's vectors are not all in the embedding store: no drift check")
    if drift["ratio"] is None or drift["ratio"] > DRIFT_THRESHOLD:
        return IncrementalPlan(started_from, False, f"drift: ratio {drift['ratio']} > {DRIFT_THRESHOLD}", drift)
    reason = f"same model, factory, re-scoring code and shard layout as {started_from}; drift ratio {drift['ratio']} <= {DRIFT_THRESHOLD}"
    return IncrementalPlan(started_from, True, reason, drift, trained, rescoring, reusable_shards(root, previous, previous_ids, documents, plan), origin)


def incompatibility(previous: dict[str, Any], plan: IndexPlan, dimension: int, model_key: str) -> str:
    """Why the previous version's trained quantizer does not fit this build ("" when it does)."""
    model, index = previous["model"], previous["index"]
    checks = [
        ("model key", model.get("key"), model_key),
        ("dimension", model.get("dimension"), dimension),
        ("index factory", index.get("factory"), plan.factory),
        ("re-scoring code", index.get("rescoring_code", "float16"), plan.rescoring_code),
        ("shard count", len(previous["shards"]), plan.shards),
    ]
    for what, there, now in checks:
        if there != now:
            return f"{what} differs ({there!r} in {previous['version_id']}, {now!r} now)"
    layout = [(entry.get("first_position"), entry.get("first_position", 0) + entry.get("count", 0)) for entry in previous["shards"]]
    if layout != shard_ranges(int(previous["counts"]["indexed"]), len(layout)):
        return f"the shards of {previous['version_id']} are not laid out by the current shard ranges rule"
    return ""


def range_digest(table: pa.Table, start: int, end: int) -> str:
    """sha256 of the (id, text_hash) list of positions [start, end) of ``table``."""
    return documents_digest(b"", table.select(["id", "text_hash"]).slice(start, end - start))


def reusable_shards(root: str, previous: dict[str, Any], previous_ids: pa.Table, documents: pa.Table, plan: IndexPlan) -> dict[int, dict[str, Any]]:
    """The new shards equal to a previous one: same range [start, end), same documents in order, re-scoring vectors
    shared under ``vectors/`` (versions from before that folder keep them in their own folder: filled anew)."""
    by_range = {(entry["first_position"], entry["first_position"] + entry["count"]): entry for entry in previous["shards"]}
    reusable = {}
    for shard, (start, end) in enumerate(shard_ranges(documents.num_rows, plan.shards)):
        entry = by_range.get((start, end))
        if entry is None or end > previous_ids.num_rows or not str(entry.get("vectors_file", "")).startswith(f"{index_store.VECTORS_FOLDER}/"):
            continue
        if range_digest(documents, start, end) != range_digest(previous_ids, start, end):
            continue
        if storage.exists(storage.join_url(root, entry["vectors_file"])):
            reusable[shard] = entry
    return reusable


def mean_squared_centroid_distance(index, vectors: np.ndarray, block: int = 4096) -> float:
    """The mean squared (L2) distance from each vector to the IVF centroid it is assigned to (the quantizer's nearest)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    total = 0.0
    for start in range(0, len(vectors), block):
        part = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
        _, assigned = ivf.quantizer.search(part, 1)
        total += float(np.sum((part - centroids[assigned[:, 0]]) ** 2, dtype=np.float64))
    return total / max(1, len(vectors))


def drift_figures(trained: bytes, new_sources: list, previous_sources: list, count: int) -> tuple[float, float]:
    """(new, previous) mean squared centroid distances of two samples read from the embedding store (in a Ray task)."""
    index = index_store.deserialize_index(trained)
    return (mean_squared_centroid_distance(index, read_sources(new_sources, count)),
            mean_squared_centroid_distance(index, read_sources(previous_sources, count)))


def measure_drift(trained: bytes, located: pa.Table, previous_ids: pa.Table, stored: pa.Table, seed: int) -> dict[str, Any] | None:
    """Mean squared distance to the nearest IVF centroid of the trained index, over a seeded sample of up to
    DRIFT_SAMPLE vectors of the new version and as many of the previous one (same seed), their ratio new / previous
    and the threshold; None when a previous vector is missing from the embedding store."""
    import ray

    count = min(DRIFT_SAMPLE, located.num_rows, previous_ids.num_rows)
    new_positions = sample_positions(located.num_rows, count, seed)
    chosen = previous_ids.select(["id", "text_hash"]).take(pa.array(sample_positions(previous_ids.num_rows, count, seed)))
    chosen = chosen.append_column("position", pa.array(np.arange(count, dtype=np.int64)))
    try:
        previous_located = locate_vectors(chosen, stored)
    except RuntimeError:
        return None
    new, old = ray.get(ray.remote(num_cpus=1)(drift_figures).remote(
        trained, training_sources(located, new_positions), training_sources(previous_located, np.arange(count)), count))
    ratio = round(new / old, 4) if old > 0 else (1.0 if new == 0 else None)
    print(f"drift check on {count} vectors: mean squared distance to the nearest centroid {new:.6g} now, {old:.6g} in the previous version "
          f"(ratio {ratio}, threshold {DRIFT_THRESHOLD})")
    return {"sample": count, "new_mean_squared_distance": float(f"{new:.6g}"), "previous_mean_squared_distance": float(f"{old:.6g}"), "ratio": ratio,
            "threshold": DRIFT_THRESHOLD}


def reuse_into(incremental: IncrementalPlan, root: str, folder: str) -> None:
    """Copy what the plan reuses into the new version ``folder``: ``rescoring.faiss``, then ``trained.faiss`` (what
    ``build_shards`` finds and uses), then each reused shard's faiss file and, last, its stats (the shard is then
    complete, so ``build_shards`` skips it). Files a resumed build already wrote are left as they are."""
    if not incremental.reused:
        return
    if incremental.rescoring is not None and not storage.exists(storage.join_url(folder, index_store.RESCORING_QUANTIZER_FILE)):
        storage.write_bytes_atomically(storage.join_url(folder, index_store.RESCORING_QUANTIZER_FILE), incremental.rescoring)
    trained_url = storage.join_url(folder, "trained.faiss")
    if incremental.trained is not None and not storage.exists(trained_url):
        storage.write_bytes_atomically(trained_url, incremental.trained)
    previous_folder = index_store.version_url(root, incremental.previous_version)
    for shard, entry in sorted(incremental.shards.items()):
        name = index_store.shard_name(shard)
        stats_url = storage.join_url(folder, f"{name}.json")
        if storage.exists(stats_url):
            continue
        data = index_store.read_checked(storage.join_url(previous_folder, index_store.plain_name(entry["file"], "shard file", previous_folder)), entry["sha256"])
        storage.write_bytes_atomically(storage.join_url(folder, f"{name}.faiss"), data)
        storage.write_json_atomically(stats_url, {**entry, "shard": shard, "file": f"{name}.faiss"})
    if incremental.shards:
        print(f"copied {len(incremental.shards)} unchanged shard(s) of version {incremental.previous_version}")
