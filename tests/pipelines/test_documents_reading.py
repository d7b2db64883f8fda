"""JSON lines read robustly: bad bytes and byte-order marks are per-line problems, big files split at line boundaries."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pytest

from conftest import synthetic_documents
from pipelines.documents import (
    CorpusConfig,
    inspect_corpus_file,
    number_pieces,
    plan_read_pieces,
    read_piece,
)


def read_all(path, rows_per_piece: int = 50_000) -> tuple[pa.Table, int]:
    """Every validated row of a file, read piece by piece as the job does (without Ray); and the piece count."""
    config = CorpusConfig(rows_per_read_task=rows_per_piece)
    pieces = number_pieces(plan_read_pieces([inspect_corpus_file(str(path), 0, config)], rows_per_piece))
    tables = [table for piece in pieces for table in read_piece(piece, config)]
    return pa.concat_tables(tables).sort_by("order_key"), len(pieces)


def test_a_line_that_is_not_utf8_is_quarantined_and_the_other_lines_go_on(tmp_path):
    documents = synthetic_documents(30)
    lines = [json.dumps(document).encode() for document in documents]
    lines[12] = b'{"_id": "latin1", "text": "caf\xe9 au lait"}'  # the byte 0xe9 of Latin-1, not UTF-8
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    table, _ = read_all(path)
    bad = table.filter(pa.compute.is_valid(table["reason"])).to_pylist()
    assert len(bad) == 1
    assert (bad[0]["source_file"].endswith("corpus.jsonl"), bad[0]["source_row"], bad[0]["field"]) == (True, 12, "row")
    assert bad[0]["reason"].startswith("invalid UTF-8")
    assert "caf\\xe9" in bad[0]["raw"]
    good = table.filter(pa.compute.is_null(table["reason"]))
    assert good["id"].to_pylist() == [document["_id"] for number, document in enumerate(documents) if number != 12]


def test_a_byte_order_mark_does_not_cost_the_first_document(tmp_path):
    documents = synthetic_documents(5)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(document) + "\n" for document in documents).encode("utf-8"))
    table, _ = read_all(path)
    assert table.filter(pa.compute.is_valid(table["reason"])).num_rows == 0
    assert table["id"].to_pylist() == [document["_id"] for document in documents]


@pytest.mark.parametrize("rows_per_piece", [1, 7, 50])
def test_a_large_file_is_split_at_line_boundaries_and_reads_as_the_whole_file(tmp_path, rows_per_piece):
    documents = synthetic_documents(120, seed=3)
    records = [json.dumps(document) for document in documents]
    records[40] = "{broken json"
    records.insert(77, "")  # a blank line still counts as a line
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(records) + "\n")

    whole, whole_pieces = read_all(path, rows_per_piece=10_000)
    split, pieces = read_all(path, rows_per_piece=rows_per_piece)
    assert whole_pieces == 1
    assert pieces > 1 if rows_per_piece < 50 else pieces >= 2
    assert split.select(["id", "content", "source_row", "reason"]).equals(whole.select(["id", "content", "source_row", "reason"]))
    assert split.num_rows == 120  # 119 documents and the broken line; the blank line is skipped
    broken = split.filter(pa.compute.is_valid(split["reason"])).to_pylist()
    assert [(row["source_row"], row["field"]) for row in broken] == [(40, "row")]
    assert split.filter(pa.compute.equal(split["id"], documents[100]["_id"]))["source_row"].to_pylist() == [101]


def test_compressed_json_lines_are_read_whole(tmp_path):
    documents = synthetic_documents(25)
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\ufeff" + "".join(json.dumps(document) + "\n" for document in documents))
    table, pieces = read_all(path, rows_per_piece=3)
    assert pieces == 1
    assert table["id"].to_pylist() == [document["_id"] for document in documents]
    assert table["source_row"].to_pylist() == list(range(25))
