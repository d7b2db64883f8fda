"""The lexical half of an index version: sharded BM25 (bm25s scoring) with global statistics.

BM25 shards are contiguous position ranges, as many as the dense shards, more when those would hold
over ``MAX_SHARD_DOCUMENTS`` documents (:func:`shard_count`). A shard file holds only what depends
on its own documents: their tokenized term counts (a sparse documents x terms matrix over the
shard's own vocabulary) and lengths. It is named by a hash of
the tokenizer settings and the shard's (id, text_hash) list, stored under the index root's
``sparse/`` folder, and reused by every version whose shard holds the same documents (a rerun, or
an incremental rebuild where other shards changed).

Scores need corpus-wide statistics: document frequencies, the document count and the average
length. They are computed in one pass over the shards' own statistics and written into the
version (``bm25-statistics.npz``). A searcher turns its shard's counts into BM25 scores with
these global statistics, with bm25s's own Lucene-variant formulas, so a sharded score equals the
score of one unsharded ``bm25s.BM25`` index over all the documents, bit for bit.

Why bm25s (README, "Lexical retrieval"): pure Python on numpy/scipy sparse matrices, no JVM,
6,500 documents/s indexed and 12,000 queries/s (one shard, one thread) on SciFact, nDCG@10 0.686
there with its defaults (k1 1.5, b 0.75, English stopwords, Snowball stemmer); bench.sparse.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import index_store, storage

SPARSE_FOLDER = index_store.SPARSE_FOLDER
STATISTICS_FILE = "bm25-statistics.npz"
METHOD = "lucene"
TOKENIZE_BATCH_ROWS = 8192  # documents tokenized at a time by a ShardTermCounter: whole blocks (up to 128 MiB of text) held 3.2 GiB at 1M
MAX_SHARD_DOCUMENTS = 200_000  # BM25 shard size cap: a shard's counts and scores take about 1 GiB to build and to search at 200k abstracts


def shard_count(documents: int, dense_shards: int) -> int:
    """BM25 shards for a version: as many as dense shards, more where those would pass ``MAX_SHARD_DOCUMENTS``.

    BM25 shards are searched by position range like dense ones but need not share their ranges; a
    1M-document shard took 5.1 GiB to build and 5.7 GiB to search (bench.scale), so they are capped.

        >>> shard_count(5_183, 1), shard_count(1_000_000, 1), shard_count(1_000_000, 8)
        (1, 5, 8)
    """
    return max(dense_shards, -(-documents // MAX_SHARD_DOCUMENTS), 1)


@dataclass
class Bm25Config:
    """BM25 settings (bm25s, Lucene variant): the same tokenizer at index and query time."""

    k1: float = field(default=1.5, metadata={"help": "term-frequency saturation (bm25s default)"})
    b: float = field(default=0.75, metadata={"help": "length normalization (bm25s default)"})
    stopwords: str = field(default="en", metadata={"help": "bm25s stopword list (en, or none)"})
    stemmer: str = field(default="english", metadata={"help": "Snowball stemmer language (PyStemmer), or none"})

    def validate(self) -> None:
        if self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise ValueError(f"--bm25.k1 {self.k1} must be >= 0 and --bm25.b {self.b} in [0, 1]")
        if self.stopwords != "none":
            import bm25s

            try:
                bm25s.tokenize(["probe"], stopwords=self.stopwords, return_ids=False, show_progress=False)
            except ValueError as error:
                raise ValueError(f"--bm25.stopwords {self.stopwords}: {error}") from None
        if self.stemmer != "none":
            import Stemmer

            if self.stemmer not in Stemmer.algorithms():
                raise ValueError(f"--bm25.stemmer {self.stemmer}: not a Snowball stemmer (known: {', '.join(Stemmer.algorithms())})")

    def settings(self) -> dict[str, Any]:
        """What decides the scores: recorded in the manifest, hashed into shard names."""
        import bm25s

        return {"library": f"bm25s {bm25s.__version__}", "method": METHOD, "k1": self.k1, "b": self.b, "lower": True, "stopwords": self.stopwords, "stemmer": self.stemmer}


def config_from_manifest(sparse: dict[str, Any]) -> Bm25Config:
    return Bm25Config(k1=sparse["k1"], b=sparse["b"], stopwords=sparse["stopwords"], stemmer=sparse["stemmer"])


class Tokenizer:
    """bm25s's tokenizer (lowercase, word regex, stopwords, Snowball stemming): texts to lists of terms."""

    def __init__(self, config: Bm25Config):
        self.config = config
        self.stemmer = None
        if config.stemmer != "none":
            import Stemmer

            self.stemmer = Stemmer.Stemmer(config.stemmer)

    def __call__(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        if not texts:
            return []
        stopwords = None if self.config.stopwords == "none" else self.config.stopwords
        return bm25s.tokenize(list(texts), lower=True, stopwords=stopwords, stemmer=self.stemmer, return_ids=False, show_progress=False)


@dataclass
class TermCounts:
    """One shard's documents as term counts: CSR rows = documents, columns = the shard's own sorted terms."""

    terms: np.ndarray  # str, sorted
    indptr: np.ndarray  # int64, documents + 1
    indices: np.ndarray  # int32, term of each (document, term) entry
    counts: np.ndarray  # int32
    lengths: np.ndarray  # int64, terms per document (with repeats)

    @classmethod
    def from_tokens(cls, tokens: list[list[str]]) -> TermCounts:
        lengths = np.array([len(document) for document in tokens], dtype=np.int64)
        vocabulary: dict[str, int] = {}
        first_seen = np.fromiter((vocabulary.setdefault(term, len(vocabulary)) for document in tokens for term in document), dtype=np.int64, count=int(lengths.sum()))
        names = list(vocabulary)
        order = sorted(range(len(names)), key=names.__getitem__)  # code-point order, as np.unique sorts strings
        rank = np.empty(len(names), dtype=np.int64)
        rank[order] = np.arange(len(names))
        size = max(1, len(names))
        keys, counts = np.unique(np.repeat(np.arange(len(tokens), dtype=np.int64), lengths) * size + rank[first_seen], return_counts=True)
        documents = keys // size
        return cls(
            terms=np.asarray([names[number] for number in order], dtype=str),
            indptr=np.concatenate([[0], np.cumsum(np.bincount(documents, minlength=len(tokens)))]).astype(np.int64),
            indices=(keys % size).astype(np.int32),
            counts=counts.astype(np.int32),
            lengths=lengths,
        )

    @classmethod
    def stack(cls, parts: list[TermCounts]) -> TermCounts:
        """Several parts' documents, in order, over the union of their vocabularies (sorted as ``from_tokens`` sorts)."""
        import scipy.sparse as sp

        terms = np.asarray(sorted(set().union(*(part.terms.tolist() for part in parts))), dtype=str)
        if not parts or not terms.size:
            lengths = np.concatenate([part.lengths for part in parts]) if parts else np.zeros(0, np.int64)
            return cls(terms, np.zeros(len(lengths) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), lengths.astype(np.int64))
        matrices = [sp.csr_matrix((part.counts, np.searchsorted(terms, part.terms)[part.indices], part.indptr), shape=(part.documents, len(terms)))
                    for part in parts]
        return cls._from_matrix(terms, sp.vstack(matrices, format="csr"), np.concatenate([part.lengths for part in parts]))

    def take(self, rows: np.ndarray) -> TermCounts:
        """The documents ``rows`` (in that order) over the terms they use, as ``from_tokens`` would count them."""
        import scipy.sparse as sp

        rows = np.asarray(rows, dtype=np.int64)
        matrix = sp.csr_matrix((self.counts, self.indices, self.indptr), shape=(self.documents, len(self.terms)))[rows]
        used = np.unique(matrix.indices)
        if len(used) < len(self.terms):
            matrix = sp.csr_matrix((matrix.data, np.searchsorted(used, matrix.indices), matrix.indptr), shape=(len(rows), len(used)))
        return self._from_matrix(self.terms[used], matrix, self.lengths[rows])

    @classmethod
    def _from_matrix(cls, terms: np.ndarray, matrix, lengths: np.ndarray) -> TermCounts:
        matrix.sort_indices()
        return cls(terms=terms, indptr=matrix.indptr.astype(np.int64), indices=matrix.indices.astype(np.int32), counts=matrix.data.astype(np.int32),
                   lengths=np.asarray(lengths, dtype=np.int64))

    @property
    def documents(self) -> int:
        return len(self.lengths)

    def document_frequencies(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=len(self.terms)).astype(np.int64)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, terms=_terms_to_bytes(self.terms), indptr=self.indptr, indices=self.indices, counts=self.counts, lengths=self.lengths)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TermCounts:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            return cls(terms=_terms_from_bytes(stored["terms"]), indptr=stored["indptr"], indices=stored["indices"], counts=stored["counts"], lengths=stored["lengths"])


def _terms_to_bytes(terms: np.ndarray) -> np.ndarray:
    return np.frombuffer("\n".join(terms.tolist()).encode("utf-8"), dtype=np.uint8)


def _terms_from_bytes(data: np.ndarray) -> np.ndarray:
    text = data.tobytes().decode("utf-8")
    return np.asarray(text.split("\n") if text else [], dtype=str)


@dataclass
class GlobalStatistics:
    """Corpus-wide BM25 statistics: sorted terms with their document frequencies, documents, total length."""

    terms: np.ndarray
    document_frequencies: np.ndarray
    documents: int
    total_length: int

    @property
    def average_length(self) -> np.float64:
        # As bm25s computes it (np.mean over integer lengths): the same float64.
        return np.float64(self.total_length) / np.float64(self.documents) if self.documents else np.float64(1.0)

    @classmethod
    def merge(cls, shards: list[tuple[np.ndarray, np.ndarray, int, int]]) -> GlobalStatistics:
        """One pass over every shard's (terms, document frequencies, documents, total length)."""
        if not shards:
            return cls(np.zeros(0, dtype=str), np.zeros(0, np.int64), 0, 0)
        terms, inverse = np.unique(np.concatenate([shard[0] for shard in shards]), return_inverse=True)
        frequencies = np.bincount(inverse, weights=np.concatenate([shard[1] for shard in shards]), minlength=len(terms)).astype(np.int64)
        return cls(terms, frequencies, sum(int(shard[2]) for shard in shards), sum(int(shard[3]) for shard in shards))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, terms=_terms_to_bytes(self.terms), document_frequencies=self.document_frequencies, totals=np.array([self.documents, self.total_length], dtype=np.int64))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GlobalStatistics:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            totals = stored["totals"]
            return cls(_terms_from_bytes(stored["terms"]), stored["document_frequencies"], int(totals[0]), int(totals[1]))

    def frequencies_of(self, terms: np.ndarray) -> np.ndarray:
        """Global document frequencies of ``terms`` (0 for a term the statistics lack)."""
        if not len(self.terms):
            return np.zeros(len(terms), dtype=np.int64)
        where = np.minimum(np.searchsorted(self.terms, terms), len(self.terms) - 1)
        return np.where(self.terms[where] == terms, self.document_frequencies[where], 0)


def bm25_model(counts: TermCounts, statistics: GlobalStatistics, config: Bm25Config):
    """A ``bm25s.BM25`` over one shard's documents whose scores use the global statistics.

    The score of (document, term) is bm25s's Lucene variant, idf(df, N) x tf / (tf + k1 (1 - b + b dl / avgdl)),
    computed with bm25s's own functions and dtypes, so it equals an unsharded bm25s index's score.
    """
    import bm25s
    import scipy.sparse as sp
    from bm25s.scoring import _score_idf_lucene, _score_tfc_lucene

    model = bm25s.BM25(k1=config.k1, b=config.b, method=METHOD)
    frequencies = statistics.frequencies_of(counts.terms)
    idf = np.zeros(len(counts.terms), dtype=model.dtype)
    for term, frequency in enumerate(frequencies):
        if frequency:
            idf[term] = _score_idf_lucene(int(frequency), N=statistics.documents)
    per_entry = np.diff(counts.indptr)
    lengths = np.repeat(counts.lengths, per_entry)
    tfc = _score_tfc_lucene(tf_array=counts.counts.astype(model.dtype), l_d=lengths, l_avg=statistics.average_length, k1=config.k1, b=config.b)
    scores = np.empty(len(counts.counts), dtype=model.dtype)
    scores[:] = idf[counts.indices] * tfc
    documents = np.repeat(np.arange(counts.documents, dtype=np.int32), per_entry)
    matrix = sp.csc_matrix((scores, (documents, counts.indices)), shape=(counts.documents, len(counts.terms)), dtype=model.dtype)
    model.scores = {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr, "num_docs": counts.documents}
    model.vocab_dict = {term: number for number, term in enumerate(counts.terms.tolist())}
    model.nonoccurrence_array = None  # the Lucene variant has none (bm25s sets it in index())
    return model


def shard_key(documents: pa.Table, config: Bm25Config) -> str:
    """The name of a shard's term-count file: its tokenizer settings and its documents (id, text_hash, order)."""
    from pipelines.index_building import documents_digest

    return documents_digest(json.dumps(config.settings(), sort_keys=True).encode(), documents)[:24]


def shard_file(key: str) -> str:
    """Where a shard's term counts live, relative to the index root (shared by versions)."""
    return f"{SPARSE_FOLDER}/{key}.npz"


class ShardTermCounter:
    """Ray Data callable class: a block of corpus rows into one term-count part per shard it touches.

    Counting happens here, next to tokenization, so no token lists cross the object store: a part
    holds the compact CSR counts of the block's documents of one shard and their positions."""

    def __init__(self, config: Bm25Config):
        self.tokenize = Tokenizer(config)

    def __call__(self, batch: pa.Table, positions_by_key, shard_by_position) -> pa.Table:
        from pipelines.runtime import resolve_broadcast

        mapping = resolve_broadcast(positions_by_key)  # order_key -> position, for documents of shards to build
        shard_of = resolve_broadcast(shard_by_position)
        chosen = batch.filter(pc.is_in(batch["order_key"], value_set=mapping["order_key"]))
        positions = mapping["position"].take(pc.index_in(chosen["order_key"], value_set=mapping["order_key"])).to_numpy()
        counts = TermCounts.from_tokens(self.tokenize(chosen["content"].to_pylist()))
        return parts_by_shard(counts, np.arange(counts.documents), positions, shard_of)


def parts_by_shard(counts: TermCounts, rows: np.ndarray, positions: np.ndarray, shard_by_position: np.ndarray) -> pa.Table:
    """Rows ``rows`` of ``counts``, whose documents go to ``positions``, as term-count parts: one per shard they fall in
    (shard, positions, counts bytes), what :func:`write_shard_counts` stacks per shard."""
    shards = shard_by_position[positions]
    parts = {"shard": [], "positions": [], "counts": []}
    for shard in np.unique(shards).tolist():
        chosen = np.flatnonzero(shards == shard)
        parts["shard"].append(shard)
        parts["positions"].append(positions[chosen])
        whole = len(chosen) == counts.documents and np.array_equal(rows[chosen], np.arange(counts.documents))
        parts["counts"].append((counts if whole else counts.take(rows[chosen])).to_bytes())  # most blocks lie in one shard: no copy
    return pa.table({"shard": pa.array(parts["shard"], pa.int32()), "positions": pa.array(parts["positions"], pa.list_(pa.int64())),
                     "counts": pa.array(parts["counts"], pa.large_binary())})


def write_shard_counts(parts: pa.Table, root: str, keys: dict[int, str]) -> pa.Table:
    """Ray Data group function: one shard's term-count parts, in position order, into its file (atomic); returns its stats row."""
    shard = int(parts["shard"][0].as_py())
    stacked = TermCounts.stack([TermCounts.from_bytes(blob) for blob in parts["counts"].to_pylist()])
    positions = pc.list_flatten(parts["positions"]).to_numpy()
    counts = stacked.take(np.argsort(positions, kind="stable"))
    data = counts.to_bytes()
    sha = storage.write_bytes_atomically(storage.join_url(root, shard_file(keys[shard])), data)
    return pa.table({"shard": [shard], "sha256": [sha], "bytes": [len(data)], "documents": [counts.documents]})


def shard_statistics(root: str, file: str, sha256: str | None) -> tuple[tuple[np.ndarray, np.ndarray, int, int], str, int]:
    """((terms, document frequencies, documents, total length), sha256, bytes) of one stored shard.

    A shard built by this run is checked against its checksum; a reused one has its checksum taken here,
    so each shard file is read once."""
    url = storage.join_url(root, file)
    data = index_store.read_checked(url, sha256) if sha256 else storage.read_bytes(url)
    counts = TermCounts.from_bytes(data)
    return (counts.terms, counts.document_frequencies(), counts.documents, int(counts.lengths.sum())), sha256 or storage.sha256_bytes(data), len(data)


def previous_rows(root: str, previous_version: str | None, config: Bm25Config) -> pa.Table | None:
    """Where each document of ``previous_version``'s BM25 shards is: (id, text_hash, shard, row), or None when there is no
    previous version, it has no BM25 part, or its tokenizer settings differ (its counts would not be this build's)."""
    if not previous_version:
        return None
    try:
        previous = index_store.read_manifest(root, previous_version)
    except index_store.IndexValidationError:
        return None  # the build then tokenizes everything; the incremental plan reports why the version cannot be read
    sparse = previous.get("sparse")
    if not sparse or {key: sparse.get(key) for key in config.settings()} != config.settings():
        return None
    try:
        ids = index_store.load_doc_ids(root, previous).select(["id", "text_hash"])
    except index_store.IndexValidationError:
        return None
    shard = np.full(ids.num_rows, -1, dtype=np.int32)  # -1: its shard file is gone, tokenize it again
    row = np.arange(ids.num_rows, dtype=np.int64)
    for entry in sparse["shards"]:
        start, count = int(entry["first_position"]), int(entry["count"])
        if storage.exists(storage.join_url(root, entry["file"])):
            shard[start : start + count] = int(entry["shard"])
        row[start : start + count] -= start
    table = ids.append_column("previous_shard", pa.array(shard)).append_column("previous_row", pa.array(row))
    return table.filter(pc.greater_equal(table["previous_shard"], 0))


def reused_parts(root: str, entry: dict[str, Any], rows: np.ndarray, positions: np.ndarray, shard_by_position: np.ndarray) -> pa.Table:
    """Ray task: the term counts of rows ``rows`` of a previous version's shard (``entry`` of its manifest), now at
    ``positions``, as :class:`ShardTermCounter`'s parts (one per new shard they fall in): counts are a function of the
    text and the tokenizer settings alone, so taking them equals tokenizing the same texts again."""
    counts = TermCounts.from_bytes(index_store.read_checked(storage.join_url(root, entry["file"]), entry["sha256"]))
    return parts_by_shard(counts, np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64), shard_by_position)


def split_reusable(wanted: pa.Table, previous: pa.Table | None) -> tuple[pa.Table, pa.Table]:
    """``wanted`` (position, order_key, id, text_hash) split into documents to tokenize and documents whose counts a previous
    shard holds (with ``previous_shard`` / ``previous_row``); an (id, text_hash) held twice is taken from one place."""
    if previous is None or not wanted.num_rows:
        return wanted, wanted.slice(0, 0)
    first = previous.group_by(["id", "text_hash"], use_threads=False).aggregate([("previous_shard", "first"), ("previous_row", "first")])
    first = first.select(["id", "text_hash", "previous_shard_first", "previous_row_first"]).rename_columns(["id", "text_hash", "previous_shard", "previous_row"])
    joined = wanted.join(first, keys=["id", "text_hash"], join_type="left outer", use_threads=False)
    found = pc.is_valid(joined["previous_row"])
    return joined.filter(pc.invert(found)).select(wanted.column_names), joined.filter(found)


def build_sparse_shards(rows, documents: pa.Table, ranges: list[tuple[int, int]], config: Bm25Config, root: str, folder: str,
                        previous_version: str | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """Build (or reuse) every BM25 shard and the version's global statistics; returns the manifest's ``sparse`` entry and
    what was done (``documents_tokenized``, ``documents_reused``).

    ``rows`` is the validated corpus (Ray Dataset with order_key and content); ``documents`` has
    position, order_key, id and text_hash for every indexed document. Only shards whose file is
    missing are built. Their documents that ``previous_version`` (the version CURRENT named when the build started) held
    with the same text and tokenizer settings take their counts from its shard files; the others are tokenized and
    counted per block (in parallel actors). The parts are stacked per shard, so a shard file is the same bytes whichever
    way its documents came (a nightly snapshot with changes spread through the corpus changes every shard, yet tokenizes
    only the changed and new documents). Statistics come from all shards.
    """
    import ray
    from tqdm import tqdm

    from pipelines.runtime import collect

    keys = {shard: shard_key(documents.slice(start, end - start), config) for shard, (start, end) in enumerate(ranges)}
    missing = [shard for shard in keys if not storage.exists(storage.join_url(root, shard_file(keys[shard])))]
    built: dict[int, dict] = {}
    work = {"documents_tokenized": 0, "documents_reused": 0}
    if missing:
        shard_by_position = np.zeros(documents.num_rows, dtype=np.int32)
        wanted = []
        for shard in missing:
            start, end = ranges[shard]
            shard_by_position[start:end] = shard
            wanted.append(documents.slice(start, end - start).select(["position", "order_key", "id", "text_hash"]))
        previous = previous_rows(root, previous_version, config)
        to_tokenize, found = split_reusable(pa.concat_tables(wanted).combine_chunks(), previous)
        work = {"documents_tokenized": to_tokenize.num_rows, "documents_reused": found.num_rows}
        reused_text = f", {found.num_rows} counted already in version {previous_version}'s shards" if previous is not None else ""
        print(f"BM25: {len(missing)} shard(s) to build: tokenizing {to_tokenize.num_rows} documents{reused_text}")
        shard_by_position_ref = ray.put(shard_by_position)
        sources = []
        if to_tokenize.num_rows:
            sources.append(rows.map_batches(
                ShardTermCounter, fn_constructor_args=(config,), fn_args=(ray.put(to_tokenize.select(["order_key", "position"])), shard_by_position_ref),
                batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)), num_cpus=0.5,
            ))
        if found.num_rows:
            entries = {int(entry["shard"]): entry for entry in index_store.read_manifest(root, previous_version)["sparse"]["shards"]}
            task = ray.remote(num_cpus=0.5)(reused_parts)
            previous_shard, previous_row, position = (found[name].to_numpy() for name in ("previous_shard", "previous_row", "position"))
            refs = []
            for number in np.unique(previous_shard).tolist():
                chosen = np.flatnonzero(previous_shard == number)
                refs.append(task.remote(root, entries[number], previous_row[chosen], position[chosen], shard_by_position_ref))
            sources.append(ray.data.from_arrow_refs(refs))
        parts = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
        written = collect(parts.groupby("shard").map_groups(write_shard_counts, fn_args=(root, keys), batch_format="pyarrow", num_cpus=0.5))
        for row in written.to_pylist() if written is not None else []:
            built[row["shard"]] = row
    reused = len(keys) - len(built)
    if reused:
        print(f"BM25: reusing {reused} unchanged shard(s)")
    task = ray.remote(num_cpus=0.5)(shard_statistics)
    pending = [task.remote(root, shard_file(keys[shard]), built[shard]["sha256"] if shard in built else None) for shard in range(len(ranges))]
    results = [ray.get(reference) for reference in tqdm(pending, desc="BM25 statistics", disable=len(pending) < 2)]
    per_shard = [result[0] for result in results]
    shards = [{"shard": shard, "file": shard_file(keys[shard]), "sha256": sha, "bytes": size, "count": end - start, "first_position": start, "reused": shard not in built}
              for shard, ((start, end), (_, sha, size)) in enumerate(zip(ranges, results))]
    statistics = GlobalStatistics.merge(per_shard)
    if statistics.documents != documents.num_rows:
        raise RuntimeError(f"BM25 shards hold {statistics.documents} documents, the version {documents.num_rows}")
    data = statistics.to_bytes()
    sha = storage.write_bytes_atomically(storage.join_url(folder, STATISTICS_FILE), data)
    return {
        **config.settings(),
        "statistics": {"file": STATISTICS_FILE, "sha256": sha, "bytes": len(data), "documents": statistics.documents, "terms": len(statistics.terms),
                       "average_length": float(statistics.average_length)},
        "shards": shards,
    }, work


def load_statistics(root: str, manifest: dict[str, Any]) -> GlobalStatistics:
    entry = manifest["sparse"]["statistics"]
    return GlobalStatistics.from_bytes(index_store.read_checked(storage.join_url(index_store.version_url(root, manifest["version_id"]), entry["file"]), entry["sha256"]))


def load_shard_counts(root: str, manifest: dict[str, Any], shard: int) -> TermCounts:
    entry = manifest["sparse"]["shards"][shard]
    url = storage.join_url(root, entry["file"])
    counts = TermCounts.from_bytes(index_store.read_checked(url, entry["sha256"]))
    if counts.documents != entry["count"]:
        raise index_store.IndexValidationError(f"{url}: {counts.documents} documents, manifest says {entry['count']}")
    return counts
