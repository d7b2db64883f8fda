"""Document text by position for versions built before the document store, and texts by id for training.

Versions built since have their texts in :mod:`pipelines.document_store`, written at indexing time and
read by position; :func:`load_document_texts` is the query job's fallback for older versions only: it
re-reads the corpus and holds every text in actor memory.

The texts come from the corpus named in the index manifest, read with the same reader and
settings as at indexing time. Each :class:`DocumentTextPartition` actor holds the texts of one
contiguous range of positions; the read tasks route every row to its partition, keeping only rows
whose (id, text_hash) the index holds, so a corpus changed since indexing is detected rather than
silently reranking the wrong text.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.documents import CorpusConfig, read_corpus
from pipelines.index_building import shard_ranges
from pipelines.runtime import resolve_broadcast


class DocumentTextPartition:
    """Ray actor: the texts of positions [first, first + count)."""

    def __init__(self, first: int, count: int):
        self.first = first
        self.texts = np.empty(count, dtype=object)

    def add(self, positions: np.ndarray, texts: list[str]) -> int:
        self.texts[np.asarray(positions) - self.first] = texts
        return len(texts)

    def missing(self) -> list[int]:
        """Positions with no text yet (should be none once the corpus has been read)."""
        return [self.first + int(offset) for offset in np.flatnonzero(self.texts == None)]  # noqa: E711

    def get(self, positions: list[int]) -> list[str]:
        return list(self.texts[np.asarray(positions, dtype=np.int64) - self.first])


def route_rows(batch: pa.Table, doc_ids: pa.Table, partitions: list, bounds: list[tuple[int, int]]) -> pa.Table:
    """Ray Data batch function: send each indexed row's text to the partition that owns its position."""
    import ray

    doc_ids = resolve_broadcast(doc_ids)
    valid = batch.filter(pc.is_null(batch["reason"])).select(["id", "text_hash", "content"])
    matched = valid.join(doc_ids, ["id", "text_hash"], join_type="inner", use_threads=False)
    positions = matched["position"].to_numpy()
    contents = matched["content"].to_pylist()
    starts = np.array([start for start, _ in bounds])
    owner = np.searchsorted(starts, positions, side="right") - 1
    calls = []
    for partition in np.unique(owner):
        rows = np.flatnonzero(owner == partition)
        calls.append(partitions[partition].add.remote(positions[rows], [contents[row] for row in rows]))
    ray.get(calls)
    return pa.table({"routed": [len(positions)]})


@dataclass
class DocumentTexts:
    """Handles to the partition actors; ``fetch`` returns texts for any positions."""

    partitions: list
    bounds: list[tuple[int, int]]

    def fetch(self, positions: np.ndarray) -> list[str]:
        import ray

        positions = np.asarray(positions, dtype=np.int64)
        starts = np.array([start for start, _ in self.bounds])
        owner = np.searchsorted(starts, positions, side="right") - 1
        grouped: dict[int, list[int]] = defaultdict(list)
        for row, partition in enumerate(owner):
            grouped[int(partition)].append(row)
        texts: list[str] = [""] * len(positions)
        requests = {partition: self.partitions[partition].get.remote(positions[rows].tolist()) for partition, rows in grouped.items()}
        for partition, reference in requests.items():
            for row, text in zip(grouped[partition], ray.get(reference)):
                texts[row] = text
        return texts


def load_document_texts(corpus_url: str, manifest: dict, doc_ids: pa.Table, partitions: int) -> DocumentTexts:
    """Read the manifest's corpus once (Ray tasks) into ``partitions`` text actors."""
    import ray

    count = doc_ids.num_rows
    bounds = shard_ranges(count, max(1, min(partitions, count)))
    actor_class = ray.remote(num_cpus=0)(DocumentTextPartition)
    actors = [actor_class.remote(start, end - start) for start, end in bounds]
    dataset, _ = read_corpus(corpus_url, CorpusConfig(**manifest["documents"]))
    routed = dataset.map_batches(route_rows, fn_args=(ray.put(doc_ids), actors, bounds), batch_format="pyarrow", num_cpus=0.25)
    routed.materialize()
    missing = [position for missing_positions in ray.get([actor.missing.remote() for actor in actors]) for position in missing_positions]
    if missing:
        example = doc_ids["id"][missing[0]].as_py()
        raise ValueError(
            f"{corpus_url}: {len(missing)} indexed documents are missing from the corpus or changed since the index "
            f"was built (for example id {example!r}); rebuild the index or point the manifest at the right corpus"
        )
    return DocumentTexts(partitions=actors, bounds=bounds)


def _rows_with_ids(batch: pa.Table, ids) -> pa.Table:
    ids = resolve_broadcast(ids)
    valid = batch.filter(pc.is_null(batch["reason"]))
    return valid.filter(pc.is_in(valid["id"], value_set=ids)).select(["id", "content", "order_key"])


def texts_by_id(corpus_url: str, corpus_config: CorpusConfig, ids: list[str]) -> dict[str, str]:
    """Texts of a (small) set of documents or queries, by id; the first occurrence of an id wins."""
    import ray

    dataset, _ = read_corpus(corpus_url, corpus_config)
    wanted = ray.put(pa.array(sorted(set(ids)), pa.string()))
    tables = [t for t in ray.get(dataset.map_batches(_rows_with_ids, fn_args=(wanted,), batch_format="pyarrow").to_arrow_refs()) if t.num_rows]
    texts: dict[str, str] = {}
    if tables:
        table = pa.concat_tables(tables).sort_by("order_key")
        for identifier, content in zip(table["id"].to_pylist(), table["content"].to_pylist()):
            texts.setdefault(identifier, content)
    return texts
