"""Document texts by position: written once at indexing time, read by position at query time.

The reranker needs the texts of a few thousand candidate positions per query batch. Instead of
re-reading the corpus in every query job and holding every text in actor heaps
(:mod:`pipelines.document_texts`, kept for versions built before this store), the indexing job
writes the texts it embedded (``content``: title + text per the corpus settings) into files under
the index root's ``documents/`` folder, and the query job reads just the positions it needs.

Layout. Positions are cut into fixed ranges of :data:`ROWS_PER_FILE` (the last one shorter); each
range is one Arrow IPC file (``id``, ``text_hash``, ``text``) of record batches of exactly
:data:`ROWS_PER_BATCH` rows. The position → (file, batch, row) index is therefore arithmetic on the
manifest's ``first_position`` of each file: nothing to load before the first read.

Why uncompressed Arrow IPC, not Parquet: a Parquet row group (or a compressed IPC batch) must be
decompressed whole to return one row, so a random position costs a whole group (1 MB at 1,024
rows of 1 KB); a memory-mapped uncompressed IPC file is read in place, touching only the pages of
the rows asked for (measured on this machine, 100k documents of ~1 KB, random batches of 960
positions: about 120,000 texts/s with the per-row hash check below). On object storage a batch is
one range read. Why 1,024 rows a batch: the unit of a range read on object storage (about 1 MB of
text), with a footer of one entry per batch; locally the batch size barely changes the speed.
Why :data:`ROWS_PER_FILE` = 100 batches (102,400 rows, about 100-150 MB of abstracts): a changed
document rewrites only its file, and documents appended at the end leave every earlier file
unchanged (fixed ranges from position 0).

Writing without a shuffle. Positions follow the corpus order, so the rows of one file come from a
few consecutive read blocks. Each block is cut, in a Ray task, into one Arrow IPC *part* per file it
touches (its rows sorted by position), written beside the store under ``documents/parts-<uuid>/``;
then one Ray task per file streams its parts, in position order, into the file, a record batch at
a time (memory-mapped parts, the file written in place under a temporary name and renamed), and
the parts folder is removed. The groupby it replaces (a hash shuffle of every text) peaked at 3.2
GiB in one worker at 1M documents, 1.9 GiB (the read stage's worker, reused) without it, and took
34 s against 19 s (2 cores; bench.scale's synthetic corpus, this stage alone). The bytes are those of the whole range
written as one table (:func:`_store_batches`), so files written before remain valid and shared.

Files are content-addressed: the name is a hash of the format and the range's (id, text_hash)
list, so versions share unchanged files and a rebuild (or a killed build's rerun) writes only the
missing ones. A file is written atomically, then its record ``<key>.json`` (sha256, bytes): a file
with a record is complete, and the manifest takes its checksum from the record without reading it.

Verification at query time: each file's size is checked against the manifest when a reader first
opens it, and every text returned is hashed and compared with the version's ``doc_ids``
``text_hash`` at that position (``doc_ids`` itself is checksummed by ``index_store``). That
covers exactly the bytes served, for about 3 µs a text; a whole-file sha256 per reader would read
the entire store in every reranker actor (15 GB at 10M abstracts; a full download on object
storage), which is what this store exists to avoid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import index_store, storage
from pipelines.documents import content_hash

DOCUMENTS_FOLDER = index_store.DOCUMENTS_FOLDER
STORE_FORMAT = "arrow-ipc-1"
ROWS_PER_BATCH = 1024
ROWS_PER_FILE = 100 * ROWS_PER_BATCH
SCHEMA = pa.schema([("id", pa.string()), ("text_hash", pa.string()), ("text", pa.large_string())])
IPC_PADDING = 64  # Arrow's IPC writer rounds a sliced string column's bytes up to a multiple of this (see _store_batches)
PART_SCHEMA = pa.schema([("position", pa.int64()), *SCHEMA])  # what a read block sends a file (written beside the store, removed after)
REMOTE_BATCHES_CACHED = 32  # per reader, on object storage (about 32 MB of abstracts); local files are memory-mapped


def file_ranges(count: int, rows_per_file: int = ROWS_PER_FILE) -> list[tuple[int, int]]:
    """Position ranges [start, end) of the store's files: fixed size from 0, the last one shorter."""
    return [(start, min(start + rows_per_file, count)) for start in range(0, count, rows_per_file)]


def file_key(documents: pa.Table, rows_per_batch: int = ROWS_PER_BATCH) -> str:
    """The name of a range's file: the store format and the range's documents (id, text_hash, in order)."""
    from pipelines.index_building import documents_digest

    return documents_digest(f"{STORE_FORMAT} {rows_per_batch}\n".encode(), documents)[:24]


def store_file(key: str) -> str:
    """A store file, relative to the index root (shared by versions)."""
    return f"{DOCUMENTS_FOLDER}/{key}.arrow"


def record_file(key: str) -> str:
    """The record written after a store file is complete: its sha256 and size."""
    return f"{DOCUMENTS_FOLDER}/{key}.json"


def tag_rows(batch: pa.Table, keys_and_positions, rows_per_file: int) -> pa.Table:
    """Ray Data batch function: the rows of files to write, with their position and file number.

    ``keys_and_positions``: (order keys sorted ascending, their positions), for the documents of the files
    to write; a binary search per row (a hash set of every key would be rebuilt for every batch)."""
    from pipelines.runtime import resolve_broadcast

    keys, positions = resolve_broadcast(keys_and_positions)
    wanted = batch["order_key"].to_numpy()
    found = np.minimum(np.searchsorted(keys, wanted), max(0, len(keys) - 1))
    chosen = keys[found] == wanted if len(keys) else np.zeros(len(wanted), dtype=bool)
    rows = batch.filter(pa.array(chosen))
    chosen_positions = positions[found[chosen]]
    return pa.table({
        "file": pa.array(chosen_positions // rows_per_file, pa.int32()),
        "position": pa.array(chosen_positions, pa.int64()),
        "id": rows["id"],
        "text_hash": rows["text_hash"],
        "text": pc.cast(rows["content"], pa.large_string()),
    })


def write_parts(batch: pa.Table, keys_and_positions, rows_per_file: int, parts_url: str) -> pa.Table:
    """Ray Data batch function (one whole block): the block's rows of files to write, as one Arrow IPC part per file.

    A part holds ``position`` and the store's columns, sorted by position; it is written under
    ``parts_url`` (no text travels through the object store or a shuffle). Returns (file, first, rows, part)
    per part: what the driver needs to hand each file its parts in position order."""
    tagged = tag_rows(batch, keys_and_positions, rows_per_file)
    parts: dict[str, list] = {"file": [], "first": [], "rows": [], "part": []}
    if tagged.num_rows:
        positions = tagged["position"].to_numpy()
        if np.any(np.diff(positions) < 0):  # blocks of the validated corpus are in corpus order already
            tagged = tagged.sort_by("position")
            positions = tagged["position"].to_numpy()
        files = tagged["file"].to_numpy()
        cuts = np.flatnonzero(np.diff(files)) + 1
        filesystem, folder = storage.filesystem_and_path(parts_url)
        filesystem.makedirs(folder, exist_ok=True)
        for begin, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), len(files)]):
            part = tagged.slice(begin, stop - begin).select(PART_SCHEMA.names).cast(PART_SCHEMA)
            path = f"{folder}/part-{uuid.uuid4().hex}.arrow"  # a failed attempt's part is never listed: no rename needed
            with filesystem.open(path, "wb") as handle, pa.ipc.new_file(handle, PART_SCHEMA) as writer:
                writer.write_table(part, max_chunksize=ROWS_PER_BATCH)
            parts["file"].append(int(files[begin]))
            parts["first"].append(int(positions[begin]))
            parts["rows"].append(stop - begin)
            parts["part"].append(storage.to_url(filesystem, path))
    return pa.table({"file": pa.array(parts["file"], pa.int32()), "first": pa.array(parts["first"], pa.int64()),
                     "rows": pa.array(parts["rows"], pa.int64()), "part": pa.array(parts["part"], pa.string())})


def _open_ipc(url: str):
    """An Arrow IPC file reader: memory-mapped when local (pages read in place), a file handle otherwise."""
    filesystem, path = storage.filesystem_and_path(url)
    return pa.ipc.open_file(pa.memory_map(path) if storage.is_local(filesystem) else filesystem.open(path, "rb"))


def _part_batches(parts: list[str], start: int, end: int):
    """The store columns of positions [start, end), from parts in position order, checked to continue each other."""
    expected = start
    for url in parts:
        reader = _open_ipc(url)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            if not np.array_equal(batch.column(0).to_numpy(), np.arange(expected, expected + batch.num_rows)):
                raise RuntimeError(f"document store: part {url} does not continue positions at {expected}")
            expected += batch.num_rows
            yield pa.RecordBatch.from_arrays(batch.columns[1:], schema=SCHEMA)
    if expected != end:
        raise RuntimeError(f"document store: got rows for positions [{start}, {expected}) of [{start}, {end})")


def _enough_ahead(window: pa.RecordBatch, rows: int) -> bool:
    """Whether every column of ``window`` holds :data:`IPC_PADDING` bytes of strings after its first ``rows`` rows."""
    ahead = window.slice(rows)
    return all((pc.sum(pc.binary_length(column)).as_py() or 0) >= IPC_PADDING for column in ahead.columns)


def _store_batches(parts: list[str], start: int, end: int, rows_per_batch: int):
    """The record batches of positions [start, end): ``rows_per_batch`` rows each, the last one shorter, holding one part batch at a time.

    The file must be byte for byte what ``write_table(table, max_chunksize=rows_per_batch)`` writes from the whole
    range in one table (files are content-addressed and shared by versions): Arrow's IPC writer stores a sliced
    string column's bytes up to the next multiple of 64, taking the bytes that follow in memory (the next rows'),
    so each batch is cut from a fresh copy that holds it and the rows after it, :data:`IPC_PADDING` bytes of each
    column (or up to the end)."""
    pending: list[pa.RecordBatch] = []
    held = 0

    def window() -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([pa.concat_arrays([batch.column(i) for batch in pending]) for i in range(len(SCHEMA))], schema=SCHEMA)

    for batch in _part_batches(parts, start, end):
        pending.append(batch)
        held += batch.num_rows
        while held > rows_per_batch:
            rows = window()  # an exact copy: nothing past the held rows
            if not _enough_ahead(rows, rows_per_batch):
                pending = [rows]
                break
            yield rows.slice(0, rows_per_batch)
            pending, held = [rows.slice(rows_per_batch)], held - rows_per_batch
    while held:
        rows = window()
        take = min(rows_per_batch, held)
        yield rows.slice(0, take)
        pending, held = [rows.slice(take)], held - take


def _write_atomically(url: str, write) -> tuple[str, int]:
    """Write a file through ``write(sink)`` (an Arrow output stream) so that it appears whole or not at all; (sha256, bytes).

    Local files are written in place under a temporary name, then renamed (no copy of the file in memory);
    on object storage the bytes are put in one request (:func:`storage.write_bytes_atomically`)."""
    filesystem, path = storage.filesystem_and_path(url)
    if not storage.is_local(filesystem):
        sink = pa.BufferOutputStream()
        write(sink)
        data = sink.getvalue().to_pybytes()
        return storage.write_bytes_atomically(url, data), len(data)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with pa.OSFile(temporary, "wb") as sink:
            write(sink)
        digest = hashlib.sha256()
        with open(temporary, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
            os.fsync(handle.fileno())
        size = os.path.getsize(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return digest.hexdigest(), size


def write_store_file(parts: list[str], number: int, root: str, key: str, start: int, end: int, rows_per_batch: int) -> dict[str, Any]:
    """Ray task: one range's parts (in position order) streamed into its Arrow IPC file (atomic), then its record."""

    def write(sink) -> None:
        with pa.ipc.new_file(sink, SCHEMA) as writer:
            for batch in _store_batches(parts, start, end, rows_per_batch):
                writer.write_batch(batch)

    sha, size = _write_atomically(storage.join_url(root, store_file(key)), write)
    pa.default_memory_pool().release_unused()  # the worker is reused: hand freed Arrow memory back
    storage.write_json_atomically(storage.join_url(root, record_file(key)), {"sha256": sha, "bytes": size, "count": end - start, "rows_per_batch": rows_per_batch})
    return {"file": number, "sha256": sha, "bytes": size}


def _complete_record(root: str, key: str, count: int, rows_per_batch: int) -> dict | None:
    """The record of a stored file if the file is complete and its size matches, else None (write it again)."""
    record_url = storage.join_url(root, record_file(key))
    if not storage.exists(record_url):
        return None
    record = storage.read_json(record_url)
    filesystem, path = storage.filesystem_and_path(storage.join_url(root, store_file(key)))
    if record.get("count") != count or record.get("rows_per_batch") != rows_per_batch or not filesystem.exists(path) or filesystem.size(path) != record["bytes"]:
        print(f"document store: {store_file(key)} does not match its record; writing it again")
        return None
    return record


def build_document_store(rows, documents: pa.Table, root: str, rows_per_file: int = ROWS_PER_FILE, rows_per_batch: int = ROWS_PER_BATCH) -> dict[str, Any]:
    """Write (or reuse) the store files of every position range; returns the manifest's ``documents_store`` entry.

    ``rows`` is the validated corpus (Ray Dataset with order_key, id, text_hash, content); ``documents``
    has position, order_key, id and text_hash of every indexed document (position = row). Only ranges
    without a complete file are read: each block's rows of them become per-file parts (:func:`write_parts`),
    then one task per file streams its parts into it (:func:`write_store_file`); no text reaches the
    driver or crosses a shuffle.
    """
    import ray

    from pipelines.runtime import collect

    if rows_per_file % rows_per_batch:
        raise ValueError(f"rows per file {rows_per_file} must be a multiple of rows per batch {rows_per_batch}")
    ranges = file_ranges(documents.num_rows, rows_per_file)
    keys = {number: file_key(documents.slice(start, end - start), rows_per_batch) for number, (start, end) in enumerate(ranges)}
    records = {number: _complete_record(root, keys[number], end - start, rows_per_batch) for number, (start, end) in enumerate(ranges)}
    missing = [number for number, record in records.items() if record is None]
    built: set[int] = set()
    if missing:
        wanted = pa.concat_tables([documents.slice(ranges[number][0], ranges[number][1] - ranges[number][0]).select(["order_key", "position"]) for number in missing])
        order = np.argsort(wanted["order_key"].to_numpy(), kind="stable")
        keys_and_positions = (wanted["order_key"].to_numpy()[order], wanted["position"].to_numpy()[order])
        print(f"document store: writing {wanted.num_rows} texts into {len(missing)} file(s)")
        parts_url = storage.join_url(root, DOCUMENTS_FOLDER, f"parts-{uuid.uuid4().hex}")
        try:
            tagged = rows.map_batches(write_parts, fn_args=(ray.put(keys_and_positions), rows_per_file, parts_url), batch_size=None,
                                      batch_format="pyarrow", num_cpus=0.25)
            listed = collect(tagged)
            by_file: dict[int, list[tuple[int, str]]] = {}
            for file, first, part in zip(*(listed[column].to_pylist() for column in ("file", "first", "part")) if listed is not None else ()):
                by_file.setdefault(file, []).append((first, part))
            unwritten = [number for number in missing if number not in by_file]
            if unwritten:
                raise RuntimeError(f"document store: no rows reached file(s) {unwritten} (positions {ranges[unwritten[0]]}); the corpus changed while indexing?")
            task = ray.remote(num_cpus=0.5)(write_store_file)
            pending = [task.remote([part for _, part in sorted(by_file[number])], number, root, keys[number], *ranges[number], rows_per_batch) for number in missing]
            for row in ray.get(pending):
                records[row["file"]] = {"sha256": row["sha256"], "bytes": row["bytes"]}
                built.add(row["file"])
        finally:
            storage.remove_tree(parts_url)
    if len(ranges) > len(built):
        print(f"document store: reusing {len(ranges) - len(built)} unchanged file(s)")
    return {
        "format": STORE_FORMAT,
        "rows_per_batch": rows_per_batch,
        "rows_per_file": rows_per_file,
        "count": documents.num_rows,
        "files": [
            {"file": store_file(keys[number]), "first_position": start, "count": end - start, "sha256": records[number]["sha256"],
             "bytes": records[number]["bytes"], "reused": number not in built}
            for number, (start, end) in enumerate(ranges)
        ],
    }


class DocumentStoreReader:
    """Texts by position from a version's document store; ``fetch`` is what ``CrossEncoderScorer`` calls.

    Picklable and cheap to ship: files are opened lazily in the process that fetches (memory-mapped
    when local, range reads through fsspec otherwise), so an actor holds no text beyond the batch
    it is scoring (and, on object storage, its last :data:`REMOTE_BATCHES_CACHED` record batches).
    ``expected_hashes`` is the version's ``doc_ids`` ``text_hash`` column (or an object reference to
    it): every fetched text is checked against it.
    """

    def __init__(self, root: str, manifest: dict[str, Any], expected_hashes):
        entry = manifest.get("documents_store")
        if not entry:
            raise index_store.IndexValidationError(f"{root}: version {manifest['version_id']} has no document store (built before it existed); rebuild the index")
        if entry.get("format") != STORE_FORMAT:
            raise index_store.IndexValidationError(f"{root}: document store format {entry.get('format')!r}, this code reads {STORE_FORMAT}")
        self.root = root
        self.files = entry["files"]
        self.rows_per_batch = int(entry["rows_per_batch"])
        self.count = int(entry["count"])
        self.firsts = np.array([item["first_position"] for item in self.files], dtype=np.int64)
        ends = np.array([item["first_position"] + item["count"] for item in self.files], dtype=np.int64)
        if self.count != int(manifest["counts"]["indexed"]) or (len(self.files) and (self.firsts[0] != 0 or ends[-1] != self.count or not np.array_equal(self.firsts[1:], ends[:-1]))):
            raise index_store.IndexValidationError(f"{root}: the document store's files do not cover positions 0..{manifest['counts']['indexed']} exactly once")
        self.expected_hashes = expected_hashes
        self._open: dict[int, Any] = {}
        self._batches: OrderedDict = OrderedDict()
        self._hashes = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_open={}, _batches=OrderedDict(), _hashes=None)  # handles and caches stay in the process that opened them
        return state

    def _url(self, number: int) -> str:
        return storage.join_url(self.root, self.files[number]["file"])

    def _reader(self, number: int):
        """The file's IPC reader, opened once per process after checking its size and layout against the manifest."""
        if number in self._open:
            return self._open[number][0]
        entry = self.files[number]
        url = self._url(number)
        filesystem, path = storage.filesystem_and_path(url)
        if not filesystem.exists(path):
            raise index_store.IndexValidationError(f"{url}: listed in the manifest but missing")
        size = filesystem.size(path)
        if size != entry["bytes"]:
            raise index_store.IndexValidationError(f"{url}: {size} bytes, manifest says {entry['bytes']}; the file is damaged or was replaced")
        local = storage.is_local(filesystem)
        source = pa.memory_map(path) if local else filesystem.open(path, "rb")
        reader = pa.ipc.open_file(source)
        batches = -(-entry["count"] // self.rows_per_batch)
        if reader.schema != SCHEMA or reader.num_record_batches != batches:
            raise index_store.IndexValidationError(f"{url}: {reader.num_record_batches} batches of schema {reader.schema.names}, expected {batches} of {SCHEMA.names}")
        self._open[number] = (reader, local)
        return reader

    def _texts(self, number: int, batch: int) -> pa.Array:
        key = (number, batch)
        column = self._batches.get(key)
        if column is not None:
            self._batches.move_to_end(key)
            return column
        reader = self._reader(number)
        record_batch = reader.get_batch(batch)
        expected = min(self.rows_per_batch, self.files[number]["count"] - batch * self.rows_per_batch)
        if record_batch.num_rows != expected:
            raise index_store.IndexValidationError(f"{self._url(number)}: batch {batch} has {record_batch.num_rows} rows, expected {expected}")
        column = record_batch.column("text")
        self._batches[key] = column
        if not self._open[number][1] and len(self._batches) > REMOTE_BATCHES_CACHED:
            self._batches.popitem(last=False)  # memory-mapped batches cost no heap; remote ones are bytes read: keep the last few
        return column

    def fetch(self, positions: np.ndarray) -> list[str]:
        """The texts at ``positions`` (any order, repeats allowed), each checked against the version's text hash."""
        from pipelines.runtime import resolve_broadcast

        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if not positions.size:
            return []
        if positions.min() < 0 or positions.max() >= self.count:
            raise IndexError(f"positions outside the store's 0..{self.count - 1}")
        if self._hashes is None:
            self._hashes = resolve_broadcast(self.expected_hashes)
        numbers = np.searchsorted(self.firsts, positions, side="right") - 1
        batches, rows = np.divmod(positions - self.firsts[numbers], self.rows_per_batch)
        expected = self._hashes.take(pa.array(positions)).to_pylist()
        texts = []
        for position, number, batch, row, text_hash in zip(positions.tolist(), numbers.tolist(), batches.tolist(), rows.tolist(), expected):
            text = self._texts(number, batch)[row].as_py()
            if content_hash(text) != text_hash:
                raise index_store.IndexValidationError(
                    f"{self._url(number)}: the text at position {position} does not hash to the version's text_hash {text_hash}; the file is damaged or was replaced"
                )
            texts.append(text)
        return texts


def open_document_texts(index_url: str, manifest: dict[str, Any], doc_ids: pa.Table, corpus_url: str, partitions: int):
    """What the reranker fetches texts from: the version's document store, or, for a version built before the
    store existed, the corpus read into text actors (:func:`pipelines.document_texts.load_document_texts`)."""
    import ray

    if manifest.get("documents_store"):
        return DocumentStoreReader(index_url, manifest, ray.put(doc_ids["text_hash"].combine_chunks()))
    from pipelines.document_texts import load_document_texts

    print(f"index version {manifest['version_id']} has no document store: reading the reranker's texts from the corpus (rebuild the index to avoid this)")
    return load_document_texts(corpus_url, manifest, doc_ids.select(["position", "id", "text_hash"]), partitions=partitions)


def fetch_rate(reader, positions: np.ndarray, batch: int) -> dict[str, float]:
    """Fetch ``positions`` in batches of ``batch`` (as the reranker asks: depth x queries per block); texts/s.

    Files are opened (and checked) outside the timing by one warm-up fetch of the first position of each file.
    """
    positions = np.asarray(positions, dtype=np.int64)
    firsts = getattr(reader, "firsts", None)
    if firsts is not None:
        reader.fetch(firsts)
    started = time.perf_counter()
    fetched = 0
    for start in range(0, len(positions), batch):
        fetched += len(reader.fetch(positions[start : start + batch]))
    seconds = time.perf_counter() - started
    return {"texts": fetched, "batch": batch, "seconds": round(seconds, 4), "texts_per_second": round(fetched / seconds, 1) if seconds > 0 else 0.0}
