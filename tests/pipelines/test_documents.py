"""Reading and validation (pipelines.documents): the read planner, row checks, duplicates, unreadable files.

Everything here runs in the test process (no Ray): the Ray path is exercised end to end by
tests/test_build_index_job.py.
"""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import documents
from pipelines.documents import (
    CorpusConfig,
    CorpusError,
    CorpusFile,
    ReadPiece,
    find_duplicate_ids,
    inspect_corpus_file,
    list_corpus_files,
    mark_duplicates,
    order_key,
    plan_read_pieces,
    read_piece,
    validate_record,
)

from conftest import synthetic_documents, write_jsonl


def read_rows(url: str, config: CorpusConfig | None = None, file_index: int = 0) -> list[dict]:
    """Every validated row of one file, in order (inspect, plan, read each piece)."""
    config = config or CorpusConfig()
    described = inspect_corpus_file(url, file_index, config)
    rows = []
    for piece in plan_read_pieces([described], config.rows_per_read_task):
        for table in read_piece(piece, config, batch_rows=7):
            assert table.schema == documents.VALIDATED_SCHEMA
            rows.extend(table.to_pylist())
    return rows


def parquet_file(path, rows: list[dict], schema: pa.Schema, row_group_size: int) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return str(path)


TEXT_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


# --- the planner: pure, no I/O -------------------------------------------------------------------


def parquet_description(url: str, file_index: int, row_groups: tuple[int, ...]) -> CorpusFile:
    return CorpusFile(url=url, file_index=file_index, format="parquet", id_column="id", has_title=True, row_group_rows=row_groups)


def test_planner_groups_parquet_row_groups_up_to_the_row_limit():
    pieces = plan_read_pieces([parquet_description("s3://b/x.parquet", 0, (30, 30, 30, 10))], rows_per_piece=60)
    assert [(piece.row_groups, piece.first_row) for piece in pieces] == [((0, 1), 0), ((2, 3), 60)]
    assert all(piece.url == "s3://b/x.parquet" and piece.format == "parquet" and piece.id_column == "id" for piece in pieces)


def test_planner_gives_an_oversized_row_group_a_piece_of_its_own():
    pieces = plan_read_pieces([parquet_description("x.parquet", 0, (100, 10, 10, 100, 5))], rows_per_piece=50)
    assert [(piece.row_groups, piece.first_row) for piece in pieces] == [((0,), 0), ((1, 2), 100), ((3,), 120), ((4,), 220)]


def test_planner_covers_every_row_exactly_once():
    row_groups = (7, 13, 1, 50, 49, 2, 2, 2, 30)
    for limit in (1, 10, 50, 51, 1000):
        pieces = plan_read_pieces([parquet_description("x.parquet", 0, row_groups)], rows_per_piece=limit)
        covered = [group for piece in pieces for group in piece.row_groups]
        assert covered == list(range(len(row_groups)))
        for piece in pieces:
            assert piece.first_row == sum(row_groups[: piece.row_groups[0]])
            assert len(piece.row_groups) == 1 or sum(row_groups[g] for g in piece.row_groups) <= limit


def test_planner_keeps_file_order_and_reads_json_lines_whole():
    files = [
        CorpusFile(url="a.jsonl", file_index=0, format="jsonl", id_column="_id", has_title=False),
        parquet_description("b.parquet", 1, (5, 5)),
        parquet_description("c.parquet", 2, ()),  # an empty file has nothing to read
        CorpusFile(url="d.jsonl.gz", file_index=3, format="jsonl", id_column="id", has_title=True),
    ]
    pieces = plan_read_pieces(files, rows_per_piece=5)
    assert pieces == [
        ReadPiece(url="a.jsonl", file_index=0, format="jsonl", id_column="_id", has_title=False),
        ReadPiece(url="b.parquet", file_index=1, format="parquet", id_column="id", has_title=True, row_groups=(0,), first_row=0),
        ReadPiece(url="b.parquet", file_index=1, format="parquet", id_column="id", has_title=True, row_groups=(1,), first_row=5),
        ReadPiece(url="d.jsonl.gz", file_index=3, format="jsonl", id_column="id", has_title=True),
    ]


# --- row validation ------------------------------------------------------------------------------

PIECE = ReadPiece(url="x.jsonl", file_index=0, format="jsonl", id_column="id", has_title=True)


@pytest.mark.parametrize(
    ("record", "problems"),
    [
        ({"text": "t"}, [("id", "missing id")]),
        ({"id": None, "text": "t"}, [("id", "null id")]),
        ({"id": " ", "text": "t"}, [("id", "empty id")]),
        ({"id": True, "text": "t"}, [("id", "wrong type for id: bool")]),
        ({"id": 2.0, "text": "t"}, [("id", "wrong type for id: float")]),
        ({"id": {"a": 1}, "text": "t"}, [("id", "wrong type for id: dict")]),
        ({"id": "a"}, [("text", "missing text")]),
        ({"id": "a", "text": None}, [("text", "null text")]),
        ({"id": "a", "text": " \n"}, [("text", "empty text")]),
        ({"id": "a", "text": 3}, [("text", "wrong type for text: int")]),
        ({"id": "a", "text": "t", "title": ["x"]}, [("title", "wrong type for title: list")]),
        ({"id": None, "text": ""}, [("id", "null id"), ("text", "empty text")]),
        ("a string", [("row", "not a JSON object (str)")]),
        ([1, 2], [("row", "not a JSON object (list)")]),
    ],
)
def test_each_kind_of_bad_record_is_reported_with_its_field(record, problems):
    values, found = validate_record(record, PIECE, CorpusConfig())
    assert found == problems
    assert "content" not in values


def test_a_good_record_is_normalized():
    config = CorpusConfig()
    values, problems = validate_record({"id": 7, "title": " Title ", "text": " body  "}, PIECE, config)
    assert problems == []
    assert values == {"id": "7", "content": "Title body"}
    values, _ = validate_record({"id": "x", "title": None, "text": "body"}, PIECE, config)
    assert values["content"] == "body"
    untitled = CorpusConfig(use_title=False)
    assert validate_record({"id": "x", "title": "T", "text": "body"}, PIECE, untitled)[0]["content"] == "body"
    separated = CorpusConfig(title_separator=" | ")
    assert validate_record({"id": "x", "title": "T", "text": "body"}, PIECE, separated)[0]["content"] == "T | body"


def test_json_lines_every_bad_row_is_kept_with_reason_file_and_line(tmp_path):
    lines = [
        {"_id": "a", "title": "A", "text": "first"},
        {"_id": None, "text": "x"},
        {"_id": "", "text": "x"},
        "",  # blank: skipped, yet it counts as a line
        {"_id": ["x"], "text": "x"},
        {"_id": "b"},
        {"_id": "c", "text": ""},
        {"_id": "d", "text": {"nested": 1}},
        '{"_id": "e", "text": "no closing brace"',
        {"_id": 5, "title": "T", "text": "an integer id is fine"},
    ]
    url = str(write_jsonl(tmp_path / "corpus.jsonl", lines))
    rows = read_rows(url)
    assert [row["source_row"] for row in rows] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert all(row["source_file"] == url for row in rows)
    # JSON lines sort by the line's byte offset (known to a piece that starts mid-file), in file 0's key range.
    keys = [row["order_key"] for row in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(order_key(0, 0) <= key < order_key(1, 0) for key in keys)
    reasons = [(row["source_row"], row["field"], row["reason"]) for row in rows if row["reason"]]
    assert reasons[:5] == [
        (1, "_id", "null id"),
        (2, "_id", "empty id"),
        (4, "_id", "wrong type for id: list"),
        (5, "text", "missing text"),
        (6, "text", "empty text"),
    ]
    assert reasons[5] == (7, "text", "wrong type for text: dict")
    assert reasons[6][:2] == (8, "row") and reasons[6][2].startswith("invalid JSON: ")
    assert len(reasons) == 7
    bad = {row["source_row"]: row for row in rows if row["reason"]}
    assert json.loads(bad[5]["raw"]) == {"_id": "b"}
    assert bad[8]["raw"] == '{"_id": "e", "text": "no closing brace"'
    good = [row for row in rows if not row["reason"]]
    assert [(row["id"], row["content"]) for row in good] == [("a", "A first"), ("5", "T an integer id is fine")]
    assert good[0]["text_hash"] == documents.content_hash("A first") and good[0]["raw"] is None
    assert all(row["content"] is None and row["text_hash"] is None for row in rows if row["reason"])


def test_gzipped_json_lines_are_read(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for document in synthetic_documents(12):
            handle.write(json.dumps(document) + "\n")
    rows = read_rows(str(path))
    assert [row["id"] for row in rows] == [f"d{i}" for i in range(12)]
    assert not any(row["reason"] for row in rows)


def test_parquet_rows_are_numbered_across_row_groups_and_pieces(tmp_path):
    records = [{"id": f"p{i}", "title": None, "text": f"text {i}"} for i in range(95)]
    records[3]["id"] = None
    records[41]["text"] = "   "
    records[88]["id"] = ""
    url = parquet_file(tmp_path / "corpus.parquet", records, TEXT_SCHEMA, row_group_size=10)
    config = CorpusConfig(rows_per_read_task=25)
    described = inspect_corpus_file(url, 2, config)
    assert described.row_group_rows == (10,) * 9 + (5,)
    assert len(plan_read_pieces([described], 25)) == 5
    rows = read_rows(url, config, file_index=2)
    assert [row["source_row"] for row in rows] == list(range(95))
    assert rows[50]["order_key"] == order_key(2, 50)
    bad = [(row["source_row"], row["field"], row["reason"]) for row in rows if row["reason"]]
    assert bad == [(3, "id", "null id"), (41, "text", "empty text"), (88, "id", "empty id")]
    assert rows[60]["id"] == "p60" and rows[60]["content"] == "text 60"


def test_parquet_columns_of_the_wrong_type_are_row_errors(tmp_path):
    schema = pa.schema([("_id", pa.int64()), ("title", pa.int64()), ("text", pa.string())])
    url = parquet_file(tmp_path / "typed.parquet", [{"_id": 1, "title": None, "text": "a"}, {"_id": 2, "title": 3, "text": "b"}], schema, 10)
    rows = read_rows(url)
    assert (rows[0]["id"], rows[0]["reason"]) == ("1", None)
    assert (rows[1]["field"], rows[1]["reason"]) == ("title", "wrong type for title: int")
    numeric_text = pa.schema([("id", pa.string()), ("text", pa.float64())])
    rows = read_rows(parquet_file(tmp_path / "numeric-text.parquet", [{"id": "a", "text": 1.0}], numeric_text, 10))
    assert rows[0]["reason"] == "wrong type for text: float"


def test_custom_id_and_text_columns(tmp_path):
    schema = pa.schema([("doc", pa.string()), ("body", pa.string())])
    url = parquet_file(tmp_path / "custom.parquet", [{"doc": "x", "body": "hello"}], schema, 10)
    rows = read_rows(url, CorpusConfig(id_column="doc", text_column="body", title_column=""))
    assert (rows[0]["id"], rows[0]["content"], rows[0]["reason"]) == ("x", "hello", None)


# --- duplicates ----------------------------------------------------------------------------------


def key_table(rows: list[tuple[str, int, str, int]]) -> pa.Table:
    """(id, order key, file, row) rows as the keys table find_duplicate_ids takes."""
    ids, keys, files, source_rows = zip(*rows)
    return pa.table({"id": list(ids), "order_key": pa.array(keys, pa.int64()), "source_file": list(files), "source_row": pa.array(source_rows, pa.int64())})


def test_the_first_copy_in_file_order_wins_whatever_order_rows_arrive_in():
    keys = key_table(
        [
            ("x", order_key(1, 0), "b.parquet", 0),  # read first, but in the second file
            ("y", order_key(0, 9), "a.jsonl", 9),
            ("x", order_key(0, 4), "a.jsonl", 4),
            ("z", order_key(1, 1), "b.parquet", 1),
            ("x", order_key(0, 7), "a.jsonl", 7),
            ("y", order_key(1, 2), "b.parquet", 2),
        ]
    )
    duplicates = find_duplicate_ids(keys)
    assert duplicates.to_pylist() == [
        {"order_key": order_key(0, 7), "first_file": "a.jsonl", "first_row": 4},
        {"order_key": order_key(1, 0), "first_file": "a.jsonl", "first_row": 4},
        {"order_key": order_key(1, 2), "first_file": "a.jsonl", "first_row": 9},
    ]
    assert find_duplicate_ids(keys.slice(0, 0)).num_rows == 0
    assert find_duplicate_ids(key_table([("a", 1, "f", 1), ("b", 2, "f", 2)])).num_rows == 0


def test_marked_duplicates_become_quarantined_rows_naming_the_kept_copy():
    batch = pa.Table.from_pylist(
        [
            {"id": "x", "content": "c", "text_hash": "h", "source_file": "b.parquet", "source_row": 0, "order_key": order_key(1, 0), "reason": None, "field": None, "raw": None},
            {"id": "q", "content": "c", "text_hash": "h", "source_file": "b.parquet", "source_row": 1, "order_key": order_key(1, 1), "reason": None, "field": None, "raw": None},
            {"id": None, "content": None, "text_hash": None, "source_file": "b.parquet", "source_row": 2, "order_key": order_key(1, 2), "reason": "null id", "field": "id", "raw": "{}"},
        ],
        schema=documents.VALIDATED_SCHEMA,
    )
    duplicates = pa.table({"order_key": pa.array([order_key(1, 0)], pa.int64()), "first_file": ["a.jsonl"], "first_row": pa.array([4], pa.int64())})
    marked = mark_duplicates(batch, duplicates).to_pylist()
    assert marked[0]["reason"] == "duplicate id (first seen in a.jsonl row 4)"
    assert marked[0]["field"] == "id" and json.loads(marked[0]["raw"]) == {"id": "x"}
    assert marked[1]["reason"] is None
    assert marked[2]["reason"] == "null id"
    assert mark_duplicates(batch, duplicates.slice(0, 0)) is batch


# --- files: listing, format, unreadable files ----------------------------------------------------


def test_listing_a_folder_finds_data_files_recursively_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b" / "two.jsonl", synthetic_documents(1))
    write_jsonl(tmp_path / "a.jsonl", synthetic_documents(1))
    write_jsonl(tmp_path / "_SUCCESS.jsonl", [])
    write_jsonl(tmp_path / ".hidden.jsonl", [])
    (tmp_path / "notes.txt").write_text("not data")
    parquet_file(tmp_path / "c.parquet", [{"id": "x", "title": "t", "text": "t"}], TEXT_SCHEMA, 10)
    expected = [f"file://{tmp_path}/a.jsonl", f"file://{tmp_path}/b/two.jsonl", f"file://{tmp_path}/c.parquet"]
    assert list_corpus_files(str(tmp_path)) == expected
    assert list_corpus_files(f"{tmp_path}/*.jsonl") == expected[:1]
    assert list_corpus_files(f"{tmp_path}/c.parquet") == expected[2:]


def test_missing_or_empty_corpus_locations_are_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file or folder"):
        list_corpus_files(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no Parquet or JSON-lines files"):
        list_corpus_files(str(tmp_path / "empty"))


def test_a_corrupt_parquet_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(CorpusError, match=f"{path}: cannot read as Parquet"):
        inspect_corpus_file(str(path), 0, CorpusConfig())
    # a real Parquet file cut short (a crashed writer) is just as unreadable
    whole = tmp_path / "whole.parquet"
    parquet_file(whole, [{"id": str(i), "title": "t", "text": "t" * 50} for i in range(100)], TEXT_SCHEMA, 10)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(CorpusError, match=f"{truncated}: cannot read as Parquet"):
        inspect_corpus_file(str(truncated), 0, CorpusConfig())


def test_files_without_the_needed_columns_are_errors_naming_the_file(tmp_path):
    schema = pa.schema([("id", pa.string()), ("body", pa.string())])
    no_text = parquet_file(tmp_path / "no-text.parquet", [{"id": "a", "body": "b"}], schema, 10)
    with pytest.raises(CorpusError, match=f"{no_text}: no text column 'text' \\(columns: id, body\\)"):
        inspect_corpus_file(no_text, 0, CorpusConfig())
    no_text_lines = str(write_jsonl(tmp_path / "no-text.jsonl", [{"id": "a", "body": "b"}]))
    with pytest.raises(CorpusError, match=f"{no_text_lines}: no text column 'text'"):
        inspect_corpus_file(no_text_lines, 0, CorpusConfig())
    no_id = str(write_jsonl(tmp_path / "no-id.jsonl", [{"key": "a", "text": "b"}]))
    with pytest.raises(CorpusError, match=f"{no_id}: no id column 'id' or '_id'"):
        inspect_corpus_file(no_id, 0, CorpusConfig())
    with pytest.raises(CorpusError, match=f"{no_id}: no id column 'doc'"):
        inspect_corpus_file(no_id, 0, CorpusConfig(id_column="doc"))
    not_json = str(write_jsonl(tmp_path / "prose.jsonl", ["just words", "more words"]))
    with pytest.raises(CorpusError, match=f"{not_json}: no JSON object found"):
        inspect_corpus_file(not_json, 0, CorpusConfig())


def test_format_comes_from_the_name_or_the_setting():
    assert documents.file_format("s3://b/x.PARQUET", "auto") == "parquet"
    assert documents.file_format("x.ndjson", "auto") == "jsonl"
    assert documents.file_format("x.data", "jsonl") == "jsonl"
    with pytest.raises(CorpusError, match="x.data: cannot tell the format"):
        documents.file_format("x.data", "auto")
    with pytest.raises(CorpusError, match="unknown corpus format 'csv'"):
        documents.file_format("x.csv", "csv")
