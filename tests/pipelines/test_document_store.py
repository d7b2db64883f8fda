"""The position-addressed document store (pipelines.document_store): written by Ray tasks, read by position.

Small files and batches (rows_per_file 256, rows_per_batch 64) so that a few hundred documents span
several files, several batches per file and a short last batch.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipelines import document_store, index_store, storage
from pipelines.document_store import DocumentStoreReader, build_document_store, fetch_rate, file_ranges
from pipelines.documents import content_hash

ROWS_PER_FILE = 256
ROWS_PER_BATCH = 64
COUNT = 700  # files of 256, 256, 188 rows; the last batch of the last file holds 60


def corpus_rows(texts: list[str], extra_rows: bool = True) -> tuple[pa.Table, pa.Table]:
    """A validated corpus table (order_key, id, text_hash, content, reason) and its indexed documents.

    With ``extra_rows``, invalid rows and a later duplicate are interleaved, as validate_corpus leaves them."""
    rows = {"order_key": [], "id": [], "text_hash": [], "content": [], "reason": []}
    for number, text in enumerate(texts):
        rows["order_key"].append(10 * number)
        rows["id"].append(f"doc{number}")
        rows["text_hash"].append(content_hash(text))
        rows["content"].append(text)
        rows["reason"].append(None)
        if extra_rows and number % 50 == 7:
            for offset, (identifier, content, reason) in enumerate([(None, None, "text: empty text"), (f"doc{number}", "a later copy", None)], start=1):
                rows["order_key"].append(10 * number + offset)
                rows["id"].append(identifier)
                rows["text_hash"].append(content_hash(content) if content else None)
                rows["content"].append(content)
                rows["reason"].append(reason)
    table = pa.table(rows, schema=pa.schema([("order_key", pa.int64()), ("id", pa.string()), ("text_hash", pa.string()), ("content", pa.string()), ("reason", pa.string())]))
    documents = pa.table({
        "id": [f"doc{number}" for number in range(len(texts))],
        "text_hash": [content_hash(text) for text in texts],
        "order_key": pa.array(10 * np.arange(len(texts)), pa.int64()),
        "position": pa.array(np.arange(len(texts)), pa.int64()),
    })
    return table, documents


def synthetic_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"title {number}. " + " ".join(f"w{word}" for word in rng.integers(0, 500, size=int(rng.integers(5, 60)))) + (" naïve 日本語" if number % 9 == 0 else "")
            for number in range(count)]


def build(ray_session, root, texts: list[str]) -> tuple[dict, pa.Table]:
    table, documents = corpus_rows(texts)
    rows = ray_session.data.from_arrow(table).repartition(5)  # several read blocks, rows of one file spread over them
    entry = build_document_store(rows, documents, str(root), rows_per_file=ROWS_PER_FILE, rows_per_batch=ROWS_PER_BATCH)
    return entry, documents


def manifest_for(entry: dict, count: int) -> dict:
    return {"version_id": "v1", "counts": {"indexed": count}, "documents_store": entry}


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "index"
    texts = synthetic_texts(COUNT)
    entry, documents = build(ray_session, root, texts)
    return root, texts, entry, documents


def reader_for(root, entry: dict, documents: pa.Table) -> DocumentStoreReader:
    return DocumentStoreReader(str(root), manifest_for(entry, documents.num_rows), documents["text_hash"].combine_chunks())


def copy_of(built, tmp_path):
    root, texts, entry, documents = built
    target = tmp_path / "index"
    shutil.copytree(root, target)
    return target, texts, json.loads(json.dumps(entry)), documents


def test_file_ranges_are_fixed_from_zero():
    assert file_ranges(700, 256) == [(0, 256), (256, 512), (512, 700)]
    assert file_ranges(512, 256) == [(0, 256), (256, 512)]
    assert file_ranges(0, 256) == []


def test_round_trip_by_random_positions(built):
    root, texts, entry, documents = built
    assert [(item["first_position"], item["first_position"] + item["count"]) for item in entry["files"]] == file_ranges(COUNT, ROWS_PER_FILE)
    assert not any(item["reused"] for item in entry["files"])
    for item in entry["files"]:
        data = (root / item["file"]).read_bytes()
        assert len(data) == item["bytes"] and storage.sha256_bytes(data) == item["sha256"]
    reader = reader_for(root, entry, documents)
    rng = np.random.default_rng(3)
    for size in (1, 37, 500):
        positions = rng.integers(0, COUNT, size=size)
        assert reader.fetch(positions) == [texts[position] for position in positions]
    edges = np.array([0, 63, 64, 255, 256, 511, 512, 639, 640, 699, 699])  # batch and file boundaries, a repeat
    assert reader.fetch(edges) == [texts[position] for position in edges]
    assert reader.fetch(np.array([], dtype=np.int64)) == []
    with pytest.raises(IndexError):
        reader.fetch(np.array([COUNT]))
    # The file holds the ids and text hashes of its positions, in order (the store is self-describing).
    with pa.ipc.open_file(pa.memory_map(str(root / entry["files"][1]["file"]))) as handle:
        stored = handle.read_all()
    assert stored["id"].to_pylist() == documents["id"].to_pylist()[256:512]
    assert stored["text_hash"].to_pylist() == documents["text_hash"].to_pylist()[256:512]
    assert [batch.num_rows for batch in stored.to_batches()] == [ROWS_PER_BATCH] * 4


def one_table_file(rows: pa.Table, rows_per_batch: int) -> bytes:
    """A range's file as the store wrote it before streaming: the whole range in one table, cut by the IPC writer."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, document_store.SCHEMA) as writer:
        writer.write_table(rows.select(document_store.SCHEMA.names).cast(document_store.SCHEMA).combine_chunks(), max_chunksize=rows_per_batch)
    return sink.getvalue().to_pybytes()


def test_files_are_byte_identical_to_one_table_writes_and_parts_are_removed(built):
    root, texts, entry, documents = built
    for item in entry["files"]:
        start, count = item["first_position"], item["count"]
        rows = documents.slice(start, count).select(["id", "text_hash"]).append_column("text", pa.array(texts[start : start + count]))
        assert (root / item["file"]).read_bytes() == one_table_file(rows, ROWS_PER_BATCH)
    assert sorted(path.suffix for path in (root / index_store.DOCUMENTS_FOLDER).iterdir()) == sorted([".arrow", ".json"] * len(entry["files"]))  # no parts left


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_parts_write_the_one_table_bytes(tmp_path, seed):
    """Short strings (a batch's 64-byte padding spans many later rows), parts of 1 row to several batches, part batches
    that do not align with the store's: the file is still the one-table write, byte for byte."""
    rng = np.random.default_rng(seed)
    count, rows_per_batch = 700, 64
    length = rng.integers(0, 4, size=count) if seed else rng.integers(0, 200, size=count)
    rows = pa.table({"id": [f"d{number}" for number in range(count)], "text_hash": ["h" * int(rng.integers(0, 3)) for _ in range(count)],
                     "text": ["é" * int(size) for size in length]})
    cuts = np.unique(np.concatenate([[0, count], rng.integers(0, count, size=12), [1, 2, 3]]))
    parts = []
    for number, (begin, stop) in enumerate(itertools.pairwise(cuts)):
        part = pa.table({"position": pa.array(np.arange(begin, stop), pa.int64()), **{name: rows[name][begin:stop] for name in ("id", "text_hash", "text")}})
        path = tmp_path / f"part-{number}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, document_store.PART_SCHEMA) as writer:
            writer.write_table(part.cast(document_store.PART_SCHEMA), max_chunksize=int(rng.integers(1, 100)))
        parts.append(str(path))
    result = document_store.write_store_file(parts, 0, str(tmp_path / "index"), "key", 0, count, rows_per_batch)
    data = (tmp_path / "index" / document_store.store_file("key")).read_bytes()
    assert data == one_table_file(rows, rows_per_batch)
    assert result == {"file": 0, "sha256": storage.sha256_bytes(data), "bytes": len(data)}
    with pytest.raises(RuntimeError, match="positions"):
        document_store.write_store_file(parts[:1] + parts[2:], 0, str(tmp_path / "index"), "other", 0, count, rows_per_batch)
    assert not (tmp_path / "index" / document_store.store_file("other")).exists()


def test_reader_pickles_without_open_files_and_reopens(built):
    root, texts, entry, documents = built
    reader = reader_for(root, entry, documents)
    reader.fetch(np.array([5, 300]))
    assert reader._open
    copy = pickle.loads(pickle.dumps(reader))
    assert not copy._open and not copy._batches
    assert copy.fetch(np.array([300, 5])) == [texts[300], texts[5]]
    rate = fetch_rate(copy, np.random.default_rng(0).integers(0, COUNT, size=2000), batch=300)
    assert rate["texts"] == 2000 and rate["texts_per_second"] > 0


def test_rebuild_reuses_unchanged_files_and_rewrites_only_what_changed(ray_session, built, tmp_path):
    root, texts, entry, documents = copy_of(built, tmp_path)
    mtimes = {item["file"]: os.stat(root / item["file"]).st_mtime_ns for item in entry["files"]}
    again, _ = build(ray_session, root, texts)
    assert again["files"] == [{**item, "reused": True} for item in entry["files"]]
    assert {item["file"]: os.stat(root / item["file"]).st_mtime_ns for item in again["files"]} == mtimes

    changed = list(texts)
    changed[300] = "an edited document"  # in the second file only
    edited, documents = build(ray_session, root, changed)
    assert [item["reused"] for item in edited["files"]] == [True, False, True]
    assert edited["files"][1]["file"] != entry["files"][1]["file"]
    assert os.stat(root / edited["files"][0]["file"]).st_mtime_ns == mtimes[entry["files"][0]["file"]]
    assert reader_for(root, edited, documents).fetch(np.array([300, 299])) == ["an edited document", texts[299]]
    assert (root / entry["files"][1]["file"]).exists()  # the older version's file stays for that version


def test_killed_build_rerun_finishes_the_same(ray_session, built, tmp_path):
    root, texts, entry, _ = copy_of(built, tmp_path)
    # Killed after writing file 2 but before its record; file 1 never written.
    os.remove(root / entry["files"][2]["file"].replace(".arrow", ".json"))
    os.remove(root / entry["files"][1]["file"])
    os.remove(root / entry["files"][1]["file"].replace(".arrow", ".json"))
    rerun, _ = build(ray_session, root, texts)
    assert [item["reused"] for item in rerun["files"]] == [True, False, False]
    assert [{**item, "reused": False} for item in rerun["files"]] == [{**item, "reused": False} for item in entry["files"]]


def test_a_file_that_does_not_match_the_manifest_is_an_error(built, tmp_path):
    root, texts, entry, documents = copy_of(built, tmp_path)
    # A size other than the manifest's: refused when the file is first opened.
    wrong_size = json.loads(json.dumps(entry))
    wrong_size["files"][0]["bytes"] += 1
    with pytest.raises(index_store.IndexValidationError, match="manifest says"):
        reader_for(root, wrong_size, documents).fetch(np.array([3]))
    # Same size, one text's bytes changed: refused when that text is fetched.
    path = root / entry["files"][2]["file"]
    data = bytearray(path.read_bytes())
    where = data.find(texts[600].encode())
    assert where > 0
    data[where : where + 5] = b"XXXXX"
    path.write_bytes(bytes(data))
    reader = reader_for(root, entry, documents)
    assert reader.fetch(np.array([599])) == [texts[599]]
    with pytest.raises(index_store.IndexValidationError, match="does not hash to the version's text_hash"):
        reader.fetch(np.array([600]))
    # The manifest naming another range's file (of the same size): the texts do not match doc_ids.
    swapped = json.loads(json.dumps(entry))
    swapped["files"][1] = {**swapped["files"][1], "file": entry["files"][0]["file"], "bytes": entry["files"][0]["bytes"]}
    with pytest.raises(index_store.IndexValidationError, match="does not hash"):
        reader_for(root, swapped, documents).fetch(np.array([256]))
    # Files that do not cover every position once.
    gap = json.loads(json.dumps(entry))
    del gap["files"][1]
    with pytest.raises(index_store.IndexValidationError, match="do not cover"):
        reader_for(root, gap, documents)


def test_manifest_paths_of_the_store_are_confined():
    manifest = {"shards": [], "doc_ids": {}, "model": {}, "documents_store": {"files": [{"file": "documents/abc.arrow"}]}}
    index_store.check_manifest_paths(manifest, "m")
    for bad in ("../documents/abc.arrow", "documents/../x.arrow", "elsewhere/abc.arrow", "s3://bucket/documents/abc.arrow"):
        manifest["documents_store"]["files"][0]["file"] = bad
        with pytest.raises(index_store.IndexValidationError):
            index_store.check_manifest_paths(manifest, "m")


def test_reads_from_object_storage(built, s3_bucket, monkeypatch):
    root, texts, entry, documents = built
    monkeypatch.setattr(document_store, "REMOTE_BATCHES_CACHED", 3)  # range reads of record batches, the last 3 kept
    filesystem, path = storage.filesystem_and_path(s3_bucket)
    filesystem.put(str(root / "documents") + "/", f"{path}/index/documents/", recursive=True)
    reader = reader_for(f"{s3_bucket}/index", entry, documents)
    positions = np.random.default_rng(5).integers(0, COUNT, size=200)
    assert reader.fetch(positions) == [texts[position] for position in positions]
    assert len(reader._batches) == 3


def test_a_version_without_a_store_is_named(built):
    root, _, _, documents = built
    with pytest.raises(index_store.IndexValidationError, match="no document store"):
        DocumentStoreReader(str(root), {"version_id": "old", "counts": {"indexed": COUNT}}, documents["text_hash"])


def test_the_indexing_job_writes_the_texts_it_embedded(damaged_corpus_index):
    from conftest import synthetic_documents
    from pipelines.documents import CorpusConfig, document_content

    manifest = index_store.read_manifest(str(damaged_corpus_index.root))
    doc_ids = index_store.load_doc_ids(str(damaged_corpus_index.root), manifest)
    entry = manifest["documents_store"]
    assert entry["count"] == doc_ids.num_rows == 240 and sum(item["count"] for item in entry["files"]) == 240
    assert damaged_corpus_index.summary["documents_store_bytes"] == sum(item["bytes"] for item in entry["files"]) > 0
    settings = CorpusConfig(**manifest["documents"])
    by_id = {document["_id"]: document_content(document["title"], document["text"], settings) for document in synthetic_documents(240)}
    reader = DocumentStoreReader(str(damaged_corpus_index.root), manifest, doc_ids["text_hash"].combine_chunks())
    assert reader.fetch(np.arange(240)) == [by_id[identifier] for identifier in doc_ids["id"].to_pylist()]


@pytest.mark.slow
def test_the_query_job_reranks_from_the_store_and_from_the_corpus_for_an_older_version(damaged_corpus_index, tiny_cross_encoder, tmp_path):
    from conftest import synthetic_documents, write_jsonl
    from jobs.retrieve_rerank import main as retrieve_rerank

    manifest = index_store.read_manifest(str(damaged_corpus_index.root))
    # The query job reads the store, not the corpus: it runs with the corpus gone from the manifest's URL.
    root = tmp_path / "index"
    shutil.copytree(damaged_corpus_index.root, root)
    manifest_path = root / "versions" / manifest["version_id"] / "manifest.json"
    written = json.loads(manifest_path.read_text())
    written["corpus"]["url"] = str(tmp_path / "corpus-gone")
    manifest_path.write_text(json.dumps(written))
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"_id": f"q{number}", "text": synthetic_documents(42)[number * 7]["text"][:40]} for number in range(6)])
    flags = ["--queries", str(queries), "--reranker", tiny_cross_encoder, "--top-k", "8", "--rerank-depth", "4", "--rerank.precision", "fp32", "--search.mode", "dense"]
    summary = retrieve_rerank(["--index", str(root), "--output", str(tmp_path / "store-run"), *flags])
    assert summary["pairs_reranked"] == 24

    # A version built before the store (no documents_store): the texts come from the corpus, with the same scores.
    del written["documents_store"]
    written["corpus"]["url"] = manifest["corpus"]["url"]
    manifest_path.write_text(json.dumps(written))
    retrieve_rerank(["--index", str(root), "--output", str(tmp_path / "corpus-run"), *flags])
    runs = [pa.concat_tables(storage.read_parquet(part) for part in storage.list_files(str(tmp_path / name), ".parquet")).sort_by([("query_id", "ascending"), ("rank", "ascending")])
            for name in ("store-run", "corpus-run")]
    assert runs[0].num_rows == 6 * 8 and runs[0]["rerank_score"].null_count == 6 * 4
    assert runs[0].select(["query_id", "doc_id", "rerank_score"]).equals(runs[1].select(["query_id", "doc_id", "rerank_score"]))
