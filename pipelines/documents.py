"""Reading and validating documents: Parquet or JSON lines at any fsspec URL, one row at a time checked.

The corpus is split into *read pieces* by :func:`plan_read_pieces`, a pure function over file
metadata: Parquet row groups are grouped up to ``rows_per_read_task`` rows; an uncompressed
JSON-lines file is cut into byte ranges of about as many lines (a piece owns the lines that start
in its range, so no line is read twice or lost); a compressed one (``.jsonl.gz``) is one piece,
since it cannot be read from the middle. Each piece is read in a Ray task and every row is
validated: a line that is not UTF-8 or not JSON; null, empty or wrongly typed id; missing, null,
empty or wrongly typed text; wrongly typed title. A bad row is kept with its ``reason``, ``field``,
source file and row (0-based; for JSON lines the line index) so that it can be quarantined; good
rows go on. A UTF-8 byte-order mark at the start of a file is skipped. Duplicate ids need a global view and are found afterwards by
:func:`find_duplicate_ids` (the first occurrence in file order wins).

A file that cannot be read at all (corrupt Parquet, no text column) raises :class:`CorpusError`
naming the file, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")

# Order keys sort rows by (file index, row; for JSON lines the line's byte offset, which sorts as the
# line index and is known without reading the lines before it): they decide which duplicate wins and
# each document's position.
ROW_BITS = 40
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")

VALIDATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("content", pa.string()),
        ("text_hash", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("order_key", pa.int64()),
        ("reason", pa.string()),
        ("field", pa.string()),
        ("raw", pa.string()),
    ]
)

QUARANTINE_COLUMNS = ["source_file", "source_row", "field", "reason", "id", "raw"]


class CorpusError(ValueError):
    """A corpus file cannot be read at all; the message names the file and the problem."""


@dataclass
class CorpusConfig:
    """How to find and read documents."""

    format: str = field(default="auto", metadata={"help": "auto (from the file suffix), parquet or jsonl"})
    id_column: str = field(default="auto", metadata={"help": "id column; auto = 'id', else '_id' (BEIR)"})
    text_column: str = "text"
    title_column: str = field(default="title", metadata={"help": "optional title column ('' for none)"})
    use_title: bool = field(default=True, metadata={"help": "embed title + separator + text"})
    title_separator: str = " "
    rows_per_read_task: int = field(default=50_000, metadata={"help": "rows per read task (Parquet row groups are grouped, JSON lines cut into byte ranges, to about this many)"})

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"rows_per_read_task": 1})
        if self.format not in ("auto", "parquet", "jsonl"):
            raise ValueError(f"--format {self.format}: use auto, parquet or jsonl")


@dataclass(frozen=True)
class CorpusFile:
    """What the planner needs to know about one file (read from its footer or first lines)."""

    url: str
    file_index: int
    format: str
    id_column: str
    has_title: bool
    row_group_rows: tuple[int, ...] = ()
    size_bytes: int = 0
    line_bytes: float = 0.0
    compressed: bool = False


@dataclass(frozen=True)
class ReadPiece:
    """One unit of reading work: a run of Parquet row groups, or the JSON lines starting in a byte range."""

    url: str
    file_index: int
    format: str
    id_column: str
    has_title: bool
    row_groups: tuple[int, ...] = ()
    first_row: int = 0
    byte_start: int = 0
    byte_end: int = -1  # -1: to the end of the file


def order_key(file_index: int, row: int) -> int:
    return (file_index << ROW_BITS) | row


def content_hash(content: str) -> str:
    """Key of the embedded text: reindexing re-embeds a document only when this changes."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]


def document_content(title: str | None, text: str, config: CorpusConfig) -> str:
    """The text that is embedded and reranked: title, separator, text (or the text alone)."""
    if config.use_title and title and title.strip():
        return f"{title.strip()}{config.title_separator}{text.strip()}"
    return text.strip()


def file_format(url: str, requested: str) -> str:
    if requested != "auto":
        if requested not in ("parquet", "jsonl"):
            raise CorpusError(f"unknown corpus format {requested!r}: use parquet, jsonl or auto")
        return requested
    lowered = url.lower()
    if lowered.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lowered.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise CorpusError(f"{url}: cannot tell the format from the name; set corpus.format to parquet or jsonl")


def list_corpus_files(url: str, requested_format: str = "auto") -> list[str]:
    """A file URL as it is; a folder's (recursive) data files; a glob's matches. Sorted, so order is stable."""
    filesystem, path = storage.filesystem_and_path(url)
    if any(character in path for character in "*?["):
        paths = filesystem.glob(path)
    elif filesystem.isdir(path):
        suffixes = PARQUET_SUFFIXES + JSONL_SUFFIXES
        paths = [p for p in filesystem.find(path) if requested_format != "auto" or p.lower().endswith(suffixes)]
    elif filesystem.exists(path):
        paths = [path]
    else:
        raise CorpusError(f"{url}: no such file or folder")
    paths = sorted(p for p in paths if not p.rsplit("/", 1)[-1].startswith((".", "_")))
    if not paths:
        raise CorpusError(f"{url}: no Parquet or JSON-lines files found")
    return [storage.to_url(filesystem, p) for p in paths]


def _resolve_id_column(columns: list[str], config: CorpusConfig, url: str) -> str:
    if config.id_column != "auto":
        if config.id_column not in columns:
            raise CorpusError(f"{url}: no id column '{config.id_column}' (columns: {', '.join(columns)})")
        return config.id_column
    for candidate in ("id", "_id"):
        if candidate in columns:
            return candidate
    raise CorpusError(f"{url}: no id column 'id' or '_id' (columns: {', '.join(columns)})")


def inspect_corpus_file(url: str, file_index: int, config: CorpusConfig) -> CorpusFile:
    """Read a file's footer (Parquet) or first records (JSON lines) and check its columns."""
    kind = file_format(url, config.format)
    filesystem, path = storage.filesystem_and_path(url)
    if kind == "parquet":
        try:
            with filesystem.open(path, "rb") as handle:
                metadata = pq.ParquetFile(handle).metadata
                columns = list(metadata.schema.names)
                row_groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise CorpusError(f"{url}: cannot read as Parquet ({type(error).__name__}: {error})") from error
    else:
        columns_seen: set[str] = set()
        parsed = 0
        sampled_bytes = sampled_lines = 0
        compressed = url.lower().endswith(COMPRESSED_SUFFIXES)
        with filesystem.open(path, "rb", compression="infer") as handle:
            for raw_line in handle:
                sampled_bytes += len(raw_line)
                sampled_lines += 1
                line = _decode_line(raw_line, sampled_bytes - len(raw_line))
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    columns_seen.update(record)
                    parsed += 1
                if parsed >= 100:
                    break
        if parsed == 0:
            raise CorpusError(f"{url}: no JSON object found in the first lines; is it JSON lines?")
        columns = sorted(columns_seen)
        id_column = _resolve_id_column(columns, config, url)
        if config.text_column not in columns:
            raise CorpusError(f"{url}: no text column '{config.text_column}' (columns: {', '.join(columns)})")
        has_title = bool(config.title_column) and config.title_column in columns
        size = 0 if compressed else int(filesystem.size(path))
        return CorpusFile(url, file_index, kind, id_column, has_title, (), size, sampled_bytes / max(1, sampled_lines), compressed)
    if config.text_column not in columns:
        raise CorpusError(f"{url}: no text column '{config.text_column}' (columns: {', '.join(columns)})")
    id_column = _resolve_id_column(columns, config, url)
    has_title = bool(config.title_column) and config.title_column in columns
    return CorpusFile(url, file_index, kind, id_column, has_title, row_groups)


def plan_read_pieces(files: list[CorpusFile], rows_per_piece: int) -> list[ReadPiece]:
    """Split files into read pieces: whole JSON-lines files, runs of Parquet row groups. No I/O."""
    pieces = []
    for corpus_file in files:
        common = dict(
            url=corpus_file.url,
            file_index=corpus_file.file_index,
            format=corpus_file.format,
            id_column=corpus_file.id_column,
            has_title=corpus_file.has_title,
        )
        if corpus_file.format != "parquet":
            if corpus_file.compressed or not corpus_file.size_bytes:
                pieces.append(ReadPiece(**common))
                continue
            piece_bytes = max(1, int(rows_per_piece * max(1.0, corpus_file.line_bytes)))
            for start in range(0, corpus_file.size_bytes, piece_bytes):
                pieces.append(ReadPiece(**common, byte_start=start, byte_end=min(start + piece_bytes, corpus_file.size_bytes)))
            continue
        group_run: list[int] = []
        run_rows = 0
        run_first_row = 0
        next_row = 0
        for group_index, group_rows in enumerate(corpus_file.row_group_rows):
            if group_run and run_rows + group_rows > rows_per_piece:
                pieces.append(ReadPiece(**common, row_groups=tuple(group_run), first_row=run_first_row))
                group_run, run_rows, run_first_row = [], 0, next_row
            group_run.append(group_index)
            run_rows += group_rows
            next_row += group_rows
        if group_run:
            pieces.append(ReadPiece(**common, row_groups=tuple(group_run), first_row=run_first_row))
    return pieces


def validate_record(record: object, piece: ReadPiece, config: CorpusConfig) -> tuple[dict, list[tuple[str, str]]]:
    """Normalize one raw record; returns (values, problems as (field, reason))."""
    problems: list[tuple[str, str]] = []
    if not isinstance(record, dict):
        return {}, [("row", f"not a JSON object ({type(record).__name__})")]
    id_column, text_column, title_column = piece.id_column, config.text_column, config.title_column
    identifier = None
    if id_column not in record:
        problems.append((id_column, "missing id"))
    elif record[id_column] is None:
        problems.append((id_column, "null id"))
    elif isinstance(record[id_column], bool) or not isinstance(record[id_column], (str, int, np.integer)):
        problems.append((id_column, f"wrong type for id: {type(record[id_column]).__name__}"))
    else:
        identifier = str(record[id_column]).strip()
        if not identifier:
            problems.append((id_column, "empty id"))
            identifier = None
    text = record.get(text_column)
    if text_column not in record:
        problems.append((text_column, "missing text"))
    elif text is None:
        problems.append((text_column, "null text"))
    elif not isinstance(text, str):
        problems.append((text_column, f"wrong type for text: {type(text).__name__}"))
    elif not text.strip():
        problems.append((text_column, "empty text"))
    title = record.get(title_column) if piece.has_title else None
    if title is not None and not isinstance(title, str):
        problems.append((title_column, f"wrong type for title: {type(title).__name__}"))
        title = None
    values = {"id": identifier}
    if not problems:
        values["content"] = document_content(title, text, config)
    return values, problems


def _iterate_records(piece: ReadPiece, config: CorpusConfig) -> Iterator[tuple[int, object]]:
    """(row, raw record) pairs of one piece (for JSON lines the row is (line index, byte offset)); a line that is
    not UTF-8 or not JSON yields its error as the record."""
    filesystem, path = storage.filesystem_and_path(piece.url)
    if piece.format == "parquet":
        columns = [piece.id_column, config.text_column] + ([config.title_column] if piece.has_title else [])
        with filesystem.open(path, "rb") as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(piece.row_groups), columns=columns)
        for offset, record in enumerate(table.to_pylist()):
            yield piece.first_row + offset, record
        return
    for offset, number, raw_line in _piece_lines(piece):
        line = _decode_line(raw_line, offset)
        row = (piece.first_row + number, offset)
        if line is None:
            yield row, _InvalidJson(raw_line.decode("utf-8", "backslashreplace"), "not valid UTF-8", "invalid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as error:
            yield row, _InvalidJson(line, str(error))


def _decode_line(raw_line: bytes, offset: int) -> str | None:
    """A line as text (the file's first line, at offset 0, without its byte-order mark), or None if it is not UTF-8."""
    try:
        return raw_line.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError:
        return None


def _piece_lines(piece: ReadPiece) -> Iterator[tuple[int, int, bytes]]:
    """``(byte offset, line index within the piece, bytes)`` of the lines that start in the piece's range.

    A range that starts mid-line skips to the next line start: the previous piece reads that line
    to its end. A whole-file piece (``byte_end`` -1, e.g. a compressed file) reads every line.
    """
    filesystem, path = storage.filesystem_and_path(piece.url)
    whole = piece.byte_end < 0
    with filesystem.open(path, "rb", compression="infer" if whole else None) as handle:
        position = piece.byte_start
        if position > 0:
            handle.seek(position - 1)
            position += len(handle.readline()) - 1  # past the end of the line that holds byte start-1
        number = 0
        while whole or position < piece.byte_end:
            line = handle.readline()
            if not line:
                break
            yield position, number, line
            position += len(line)
            number += 1


def count_piece_lines(piece: ReadPiece, chunk_bytes: int = 1 << 24) -> int:
    """How many lines start in a byte-range piece: the newlines in bytes [start-1, end-1), plus the line at 0."""
    filesystem, path = storage.filesystem_and_path(piece.url)
    first = max(0, piece.byte_start - 1)
    count = 1 if piece.byte_start == 0 and piece.byte_end > 0 else 0
    with filesystem.open(path, "rb") as handle:
        handle.seek(first)
        remaining = piece.byte_end - 1 - first
        while remaining > 0:
            data = handle.read(min(chunk_bytes, remaining))
            if not data:
                break
            count += data.count(b"\n")
            remaining -= len(data)
    return count


def number_pieces(pieces: list[ReadPiece], count_lines=None) -> list[ReadPiece]:
    """Give each byte-range piece the file line index of its first line (``first_row``).

    ``count_lines(pieces) -> counts`` counts the lines starting in each piece (in Ray tasks, in the
    job); only pieces followed by another piece of the same file need counting.
    """
    needed = [index for index, piece in enumerate(pieces[:-1]) if piece.byte_end >= 0 and pieces[index + 1].url == piece.url and pieces[index + 1].byte_end >= 0]
    if not needed:
        return pieces
    counts = dict(zip(needed, (count_lines or (lambda chosen: [count_piece_lines(p) for p in chosen]))([pieces[i] for i in needed])))
    numbered, next_row = [], 0
    for index, piece in enumerate(pieces):
        if piece.byte_end >= 0:
            if piece.byte_start == 0:
                next_row = 0
            numbered.append(dataclasses.replace(piece, first_row=next_row))
            next_row += counts.get(index, 0)
        else:
            numbered.append(piece)
    return numbered


@dataclass
class _InvalidJson:
    line: str
    error: str
    reason: str = "invalid JSON"


def read_piece(piece: ReadPiece, config: CorpusConfig, batch_rows: int = 10_000) -> Iterator[pa.Table]:
    """Read and validate one piece; yields tables with :data:`VALIDATED_SCHEMA`."""
    columns: dict[str, list] = {name: [] for name in VALIDATED_SCHEMA.names}

    def flush() -> pa.Table:
        table = pa.Table.from_pydict(columns, schema=VALIDATED_SCHEMA)
        for values in columns.values():
            values.clear()
        return table

    for row, record in _iterate_records(piece, config):
        if isinstance(record, _InvalidJson):
            values, problems = {}, [("row", f"{record.reason}: {record.error}")]
            raw = record.line.strip()
        else:
            values, problems = validate_record(record, piece, config)
            raw = json.dumps(record, default=str, ensure_ascii=False) if problems else None
        content = values.get("content")
        columns["id"].append(values.get("id"))
        columns["content"].append(content)
        columns["text_hash"].append(content_hash(content) if content is not None else None)
        line_row, sort_row = row if isinstance(row, tuple) else (row, row)
        columns["source_file"].append(piece.url)
        columns["source_row"].append(line_row)
        columns["order_key"].append(order_key(piece.file_index, sort_row))
        columns["reason"].append("; ".join(reason for _, reason in problems) if problems else None)
        columns["field"].append(",".join(dict.fromkeys(name for name, _ in problems)) if problems else None)
        columns["raw"].append(raw[:4000] if raw else None)
        if len(columns["id"]) >= batch_rows:
            yield flush()
    if columns["id"]:
        yield flush()


def read_corpus(url: str, config: CorpusConfig):
    """All rows of a corpus, validated, as a Ray Dataset (lazy), plus the file list in order.

    The files are inspected up front so that an unreadable file fails the job before any work.
    """
    import ray

    files = list_corpus_files(url, config.format)
    described = [inspect_corpus_file(file_url, index, config) for index, file_url in enumerate(files)]
    pieces = number_pieces(plan_read_pieces(described, config.rows_per_read_task), _count_lines_in_tasks)
    items = [{"piece": json.dumps(dataclasses.asdict(piece))} for piece in pieces]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_pieces_batch, fn_args=(config,), batch_size=1, batch_format="numpy"
    )
    return dataset, files


def _count_lines_in_tasks(pieces: list[ReadPiece]) -> list[int]:
    import ray

    count = ray.remote(num_cpus=0.25)(count_piece_lines)
    return ray.get([count.remote(piece) for piece in pieces])


def read_pieces_batch(batch: dict, config: CorpusConfig) -> Iterator[pa.Table]:
    """Ray Data batch function: serialized pieces in, validated rows out."""
    for serialized in batch["piece"]:
        yield from read_piece(ReadPiece(**json.loads(serialized)), config)


def find_duplicate_ids(keys: pa.Table) -> pa.Table:
    """Rows whose id was already seen earlier in file order.

    ``keys`` has ``id``, ``order_key``, ``source_file`` and ``source_row`` for the rows that passed the
    row checks. Returns ``order_key`` of each later duplicate with ``first_file``/``first_row``: where
    the kept copy is.
    """
    if keys.num_rows == 0:
        return pa.table({"order_key": pa.array([], pa.int64()), "first_file": pa.array([], pa.string()), "first_row": pa.array([], pa.int64())})
    first = keys.group_by("id", use_threads=False).aggregate([("order_key", "min")]).rename_columns(["id", "first_key"])
    joined = keys.select(["id", "order_key"]).join(first, "id", use_threads=False)
    duplicates = joined.filter(pc.not_equal(joined["order_key"], joined["first_key"]))
    first_locations = keys.select(["order_key", "source_file", "source_row"]).rename_columns(["first_key", "first_file", "first_row"])
    located = duplicates.join(first_locations, "first_key", use_threads=False)
    return located.select(["order_key", "first_file", "first_row"]).sort_by("order_key")


def mark_duplicates(batch: pa.Table, duplicates: pa.Table) -> pa.Table:
    """Turn later copies of a duplicate id into quarantined rows (reason names the kept copy)."""
    if duplicates.num_rows == 0 or batch.num_rows == 0:
        return batch
    index = pc.index_in(batch["order_key"], value_set=duplicates["order_key"])
    if pc.all(pc.is_null(index)).as_py():
        return batch
    reasons = batch["reason"].to_pylist()
    fields = batch["field"].to_pylist()
    raws = batch["raw"].to_pylist()
    first_files = duplicates["first_file"].to_pylist()
    first_rows = duplicates["first_row"].to_pylist()
    for row, position in enumerate(index.to_pylist()):
        if position is None:
            continue
        reasons[row] = f"duplicate id (first seen in {first_files[position]} row {first_rows[position]})"
        fields[row] = "id"
        raws[row] = json.dumps({"id": batch["id"][row].as_py()})
    batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    batch = batch.set_column(batch.schema.get_field_index("field"), "field", pa.array(fields, pa.string()))
    return batch.set_column(batch.schema.get_field_index("raw"), "raw", pa.array(raws, pa.string()))


def quarantined_rows(batch: pa.Table, duplicates: pa.Table, effective_root: str = "", public_root: str = "") -> pa.Table:
    """Ray Data batch function: the rows to quarantine (bad rows and later duplicates), quarantine columns only.

    Files read from a temporary mirror of process-local storage are named by the user's URL
    (``effective_root`` → ``public_root``), in ``source_file`` and in a duplicate's reason.
    """
    from pipelines.runtime import public_url, resolve_broadcast

    marked = mark_duplicates(batch, resolve_broadcast(duplicates))
    rows = marked.filter(pc.is_valid(marked["reason"])).select(QUARANTINE_COLUMNS)
    if effective_root and public_root and effective_root != public_root:
        for column in ("source_file", "reason"):
            names = [public_url(value, effective_root, public_root) for value in rows[column].to_pylist()]
            rows = rows.set_column(rows.schema.get_field_index(column), column, pa.array(names, pa.string()))
    return rows


def _valid_keys(batch: pa.Table) -> pa.Table:
    """The keys the driver collects, with ``source_file`` dictionary-encoded: each file's URL once, not per row."""
    keys = batch.filter(pc.is_null(batch["reason"])).select(["id", "text_hash", "order_key", "source_file", "source_row"])
    return keys.set_column(3, "source_file", pc.dictionary_encode(keys["source_file"]))


@dataclass
class ValidatedCorpus:
    """A read and validated corpus (or query log): what both jobs start from.

    ``rows``: the materialized Ray Dataset of every row (:data:`VALIDATED_SCHEMA`, bad rows with their
    reason); ``keys``: the valid rows to use (first occurrence of each id), sorted in file order;
    ``duplicates``: the later copies, which go to quarantine with the rows that failed their checks.
    """

    url: str
    public_url: str
    files: list[str]
    rows: object
    rows_read: int
    keys: pa.Table
    duplicates: pa.Table

    @property
    def quarantined(self) -> int:
        return self.rows_read - self.keys.num_rows

    def write_quarantine(self, folder_url: str) -> int:
        """Rewrite ``folder_url`` with the quarantined rows (atomic parts); returns their count."""
        import ray

        storage.remove_tree(folder_url)
        quarantine = self.rows.map_batches(quarantined_rows, fn_args=(ray.put(self.duplicates), self.url, self.public_url), batch_format="pyarrow")
        rows, _ = storage.write_parquet_parts(quarantine, folder_url, 100_000)
        return rows


def validate_corpus(url: str, config: CorpusConfig, public_url: str = "", what: str = "documents") -> ValidatedCorpus:
    """Read and check every row of ``url`` in Ray tasks, and find duplicate ids (the first in file order wins).

    ``public_url`` is the URL the user gave when ``url`` is a temporary mirror of it (memory://):
    errors and the quarantine name the user's files. No valid row at all is a :class:`CorpusError`.
    """
    from pipelines.runtime import collect, public_url as to_public

    public = public_url or url
    try:
        dataset, files = read_corpus(url, config)
    except CorpusError as error:
        message = to_public(str(error), url, public)
        if message == str(error):
            raise
        raise CorpusError(message) from error
    dataset = dataset.materialize()
    rows_read = dataset.count()
    keys = collect(dataset.map_batches(_valid_keys, batch_format="pyarrow"))
    if keys is None or keys.num_rows == 0:
        raise CorpusError(f"{public}: no valid {what} among {rows_read} rows")
    keys = keys.unify_dictionaries()  # one list of files for every block (joins need it)
    duplicates = find_duplicate_ids(keys)
    keys = keys.filter(pc.invert(pc.is_in(keys["order_key"], value_set=duplicates["order_key"]))).sort_by("order_key")
    return ValidatedCorpus(url, public, [to_public(f, url, public) for f in files], dataset, rows_read, keys, duplicates)
