"""Hybrid (dense + BM25) first stage end to end: jobs.build_index with its BM25 part, jobs.retrieve_rerank in
every search mode, an index without a BM25 part, and an incremental rebuild that reuses unchanged BM25 shards.

One index (tiny random bi-encoder, 3 shards, BM25 on by default) is built once for the module; tests that
rebuild work on a copy, whose stored embeddings make the rebuild cheap.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import WORDS, build_index_flags, synthetic_documents, write_jsonl
from pipelines import index_store, storage
from pipelines.evaluation import read_run
from pipelines.hybrid_fusion import fuse_lists
from pipelines.index_store import IndexValidationError
from pipelines.reranking import OUTPUT_SCHEMA

TOP_K = 8
DOCUMENTS = 120  # three shards of 40: positions [0, 40), [40, 80), [80, 120)
RARE_WORD, RARE_DOCUMENT = "zyxquatl", 17  # in exactly one document (shard 0)
CHANGED_DOCUMENT = 100  # in the last shard; its text changes for the incremental rebuild
BUILD_FLAGS = ("--embedding.precision", "fp32", "--embedding.max-seq-length", "64", "--faiss.shards", "3")


def corpus_records() -> list[dict]:
    documents = synthetic_documents(DOCUMENTS, seed=11)
    documents[RARE_DOCUMENT]["text"] += f" {RARE_WORD}"
    return documents


def build_job(*flags: str) -> dict:
    from jobs.build_index import main

    return main(list(flags))


def query_job(*flags: str) -> dict:
    from jobs.retrieve_rerank import main

    return main(list(flags))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hybrid-corpus") / "corpus.jsonl", corpus_records())


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    """10 topic queries, the rare word alone, and a query of words no document has."""
    rng = np.random.default_rng(5)
    records = [{"_id": f"q{n}", "text": " ".join(rng.choice(WORDS[(n % 10) * 50 : (n % 10 + 1) * 50], size=4))} for n in range(10)]
    records += [{"_id": "q-rare", "text": f"the {RARE_WORD}"}, {"_id": "q-unknown", "text": "nothingmatches anywhere"}]
    return str(write_jsonl(tmp_path_factory.mktemp("hybrid-queries") / "queries.jsonl", records))


@pytest.fixture(scope="module")
def hybrid_index(ray_session, tiny_bi_encoder, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid-index") / "index"
    summary = build_job(*build_index_flags(corpus, root, tiny_bi_encoder, *BUILD_FLAGS))
    return root, summary


def run_mode(index_root, queries, output, *flags) -> tuple[dict, pa.Table]:
    summary = query_job("--index", str(index_root), "--queries", queries, "--output", str(output), "--reranker", "none", "--top-k", str(TOP_K), *flags)
    return summary, read_run(str(output))


@pytest.fixture(scope="module")
def hybrid_run(hybrid_index, queries, tmp_path_factory):
    return run_mode(hybrid_index[0], queries, tmp_path_factory.mktemp("run") / "hybrid")  # auto: hybrid on this index


@pytest.fixture(scope="module")
def sparse_run(hybrid_index, queries, tmp_path_factory):
    return run_mode(hybrid_index[0], queries, tmp_path_factory.mktemp("run") / "sparse", "--search.mode", "sparse")


@pytest.fixture(scope="module")
def dense_run(hybrid_index, queries, tmp_path_factory):
    return run_mode(hybrid_index[0], queries, tmp_path_factory.mktemp("run") / "dense", "--search.mode", "dense")


def rows_by_query(table: pa.Table) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in table.sort_by([("query_id", "ascending"), ("rank", "ascending")]).to_pylist():
        grouped.setdefault(row["query_id"], []).append(row)
    return grouped


def raw_parts(output) -> pa.Table:
    return pa.concat_tables([storage.read_parquet(part) for part in storage.list_files(str(output), ".parquet")])


# --- the build ---------------------------------------------------------------------------------------


def test_the_build_writes_a_bm25_part_beside_the_dense_shards(hybrid_index):
    root, summary = hybrid_index
    assert summary["sparse"] is True and summary["sparse_shards_reused"] == 0 and summary["sparse_bytes"] > 0
    assert (summary["sparse_documents_tokenized"], summary["sparse_documents_reused"]) == (DOCUMENTS, 0)
    manifest = index_store.read_manifest(str(root))
    sparse = manifest["sparse"]
    assert (sparse["method"], sparse["k1"], sparse["b"], sparse["stopwords"], sparse["stemmer"]) == ("lucene", 1.5, 0.75, "en", "english")
    assert [(s["first_position"], s["count"]) for s in sparse["shards"]] == [(s["first_position"], s["count"]) for s in manifest["shards"]] == [(0, 40), (40, 40), (80, 40)]
    assert sparse["statistics"]["documents"] == DOCUMENTS
    for entry in sparse["shards"]:
        assert entry["file"].startswith("sparse/") and (root / entry["file"]).exists()
        assert storage.sha256_bytes((root / entry["file"]).read_bytes()) == entry["sha256"]
    assert (root / "versions" / manifest["version_id"] / sparse["statistics"]["file"]).exists()
    assert summary["sparse_bytes"] == sum(s["bytes"] for s in sparse["shards"]) + sparse["statistics"]["bytes"]


# --- (a) hybrid, sparse and dense queries on one index --------------------------------------------


def test_hybrid_output_carries_both_retrievers_ranks(hybrid_run):
    summary, table = hybrid_run
    assert summary["search_mode"] == "hybrid" and summary["queries_run"] == 12
    for name in ("dense_rank", "dense_score", "sparse_rank", "sparse_score"):
        assert name in table.column_names
    no_retriever = pc.and_(pc.is_null(table["dense_rank"]), pc.is_null(table["sparse_rank"]))
    assert not pc.any(no_retriever).as_py()
    # A score exactly where its rank is.
    for name in ("dense", "sparse"):
        assert pc.all(pc.equal(pc.is_null(table[f"{name}_rank"]), pc.is_null(table[f"{name}_score"]))).as_py()
    for query, rows in rows_by_query(table).items():
        count = len(rows)
        assert TOP_K <= count <= 2 * TOP_K, query  # the union of two top-K lists (dense always returns K)
        assert [row["first_stage_rank"] for row in rows] == list(range(1, count + 1))
        assert [row["rank"] for row in rows] == list(range(1, count + 1))
        assert len({row["doc_id"] for row in rows}) == count
        assert sorted(row["dense_rank"] for row in rows if row["dense_rank"] is not None) == list(range(1, TOP_K + 1))
        sparse = sorted(row["sparse_rank"] for row in rows if row["sparse_rank"] is not None)
        assert sparse == list(range(1, len(sparse) + 1)) and len(sparse) <= TOP_K
    # Fusion brought in documents only BM25 found and documents only the dense index found.
    only_sparse = pc.and_(pc.is_null(table["dense_rank"]), pc.is_valid(table["sparse_rank"]))
    only_dense = pc.and_(pc.is_valid(table["dense_rank"]), pc.is_null(table["sparse_rank"]))
    assert pc.sum(only_sparse.cast(pa.int64())).as_py() > 0 and pc.sum(only_dense.cast(pa.int64())).as_py() > 0


def test_the_raw_parts_have_the_output_schema(hybrid_run, sparse_run, dense_run):
    for summary, _ in (hybrid_run, sparse_run, dense_run):
        assert raw_parts(summary["config"]["output"]).schema.equals(OUTPUT_SCHEMA)


def test_a_rare_word_brings_its_one_document_into_the_candidates(hybrid_run):
    rows = rows_by_query(hybrid_run[1])["q-rare"]
    found = [row for row in rows if row["doc_id"] == f"d{RARE_DOCUMENT}"]
    assert len(found) == 1 and found[0]["sparse_rank"] == 1 and found[0]["sparse_score"] > 0
    assert [row["doc_id"] for row in rows if row["sparse_rank"] is not None] == [f"d{RARE_DOCUMENT}"]
    # A query of words no document has: BM25 adds nothing, the dense list stands alone.
    unknown = rows_by_query(hybrid_run[1])["q-unknown"]
    assert len(unknown) == TOP_K and all(row["sparse_rank"] is None for row in unknown)


def test_hybrid_ranks_are_each_retrievers_own_and_the_order_is_their_fusion(hybrid_run, sparse_run, dense_run, hybrid_index):
    doc_ids = index_store.load_doc_ids(str(hybrid_index[0]), index_store.read_manifest(str(hybrid_index[0])))
    position_of = {doc: position for position, doc in enumerate(doc_ids["id"].to_pylist())}
    hybrid = rows_by_query(hybrid_run[1])
    alone = {"dense": rows_by_query(dense_run[1]), "sparse": rows_by_query(sparse_run[1])}
    for query, rows in hybrid.items():
        lists = {}
        for name in ("dense", "sparse"):
            mine = sorted((row for row in rows if row[f"{name}_rank"] is not None), key=lambda row: row[f"{name}_rank"])
            theirs = alone[name].get(query, [])
            assert [(row["doc_id"], row[f"{name}_rank"], row[f"{name}_score"]) for row in mine] == \
                   [(row["doc_id"], row["first_stage_rank"], row["first_stage_score"]) for row in theirs], (query, name)
            lists[name] = (np.array([position_of[row["doc_id"]] for row in mine], dtype=np.int64), np.array([row[f"{name}_score"] for row in mine], dtype=np.float32))
        fused = fuse_lists(*lists["dense"], *lists["sparse"], method="weighted", dense_weight=0.5)
        assert [doc_ids["id"][int(p)].as_py() for p in fused["positions"]] == [row["doc_id"] for row in rows], query
        np.testing.assert_array_equal(fused["scores"], np.array([row["first_stage_score"] for row in rows], dtype=np.float32))


def test_sparse_mode_serves_bm25_alone_with_the_scores_of_one_unsharded_index(sparse_run):
    import bm25s

    from pipelines.documents import CorpusConfig, document_content
    from pipelines.sparse_index import Bm25Config, Tokenizer

    summary, table = sparse_run
    assert summary["search_mode"] == "sparse"
    assert table["dense_rank"].null_count == table["dense_score"].null_count == table.num_rows
    assert pc.all(pc.equal(table["sparse_rank"], table["first_stage_rank"])).as_py()
    assert pc.all(pc.equal(table["sparse_score"], table["first_stage_score"])).as_py()
    grouped = rows_by_query(table)
    assert "q-unknown" not in grouped  # no candidate: no row
    assert [row["doc_id"] for row in grouped["q-rare"]] == [f"d{RARE_DOCUMENT}"]

    records = corpus_records()
    tokenize = Tokenizer(Bm25Config())
    model = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    model.index(tokenize([document_content(r["title"], r["text"], CorpusConfig()) for r in records]), show_progress=False)
    texts = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(summary["config"]["queries"])}
    for query, rows in grouped.items():
        terms = [term for term in tokenize([texts[query]])[0] if term in model.vocab_dict]
        scores = model.get_scores(terms)
        matching = np.flatnonzero(scores > 0)
        best = matching[np.lexsort((matching, -scores[matching]))][:TOP_K]
        assert [row["doc_id"] for row in rows] == [records[i]["_id"] for i in best], query
        assert [row["sparse_score"] for row in rows] == scores[best].tolist(), query


def test_dense_mode_leaves_the_bm25_columns_null(dense_run):
    summary, table = dense_run
    assert summary["search_mode"] == "dense"
    assert table.num_rows == 12 * TOP_K
    assert table["sparse_rank"].null_count == table["sparse_score"].null_count == table.num_rows
    assert pc.all(pc.equal(table["dense_rank"], table["first_stage_rank"])).as_py()
    assert pc.all(pc.equal(table["dense_score"], table["first_stage_score"])).as_py()


def test_a_rerun_of_a_sparse_run_runs_no_query_again(sparse_run, tmp_path):
    summary, _ = sparse_run
    output = tmp_path / "copy"
    shutil.copytree(summary["config"]["output"], output)
    parts = sorted(storage.list_files(str(output), ".parquet"))
    rerun, table = run_mode(summary["config"]["index"], summary["config"]["queries"], output, "--search.mode", "sparse")
    order = [("query_id", "ascending"), ("rank", "ascending")]
    assert table.sort_by(order).equals(sparse_run[1].sort_by(order))
    assert rerun["rows_written"] == 0
    assert sorted(storage.list_files(str(output), ".parquet")) == parts
    assert (rerun["queries_reused"], rerun["queries_run"]) == (12, 0)  # q-unknown included: it has no candidate


# --- (b) an index without a BM25 part --------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_only_index(hybrid_index, tiny_bi_encoder, corpus, tmp_path_factory):
    """The same corpus built with --sparse off, on a copy of the hybrid index (its stored vectors are reused)."""
    root = tmp_path_factory.mktemp("dense-only") / "index"
    shutil.copytree(hybrid_index[0], root)
    summary = build_job(*build_index_flags(corpus, root, tiny_bi_encoder, *BUILD_FLAGS, "--sparse", "off"))
    return root, summary


def test_a_build_with_sparse_off_has_no_bm25_part(dense_only_index, hybrid_index):
    root, summary = dense_only_index
    assert summary["version_id"] != hybrid_index[1]["version_id"]
    assert (summary["embedded"], summary["reused_embeddings"]) == (0, DOCUMENTS)
    assert summary["sparse"] is False and summary["sparse_bytes"] == 0 and summary["sparse_shards_reused"] == 0
    manifest = index_store.read_manifest(str(root))
    assert manifest["version_id"] == summary["version_id"] and not manifest.get("sparse")
    assert not (root / "versions" / summary["version_id"] / "bm25-statistics.npz").exists()


def test_an_index_without_bm25_serves_dense_only_queries(dense_only_index, queries, dense_run, tmp_path):
    summary, table = run_mode(dense_only_index[0], queries, tmp_path / "auto")
    assert summary["search_mode"] == "dense"
    assert table.num_rows == 12 * TOP_K
    assert table["sparse_rank"].null_count == table["sparse_score"].null_count == table.num_rows
    assert pc.all(pc.equal(table["dense_rank"], table["first_stage_rank"])).as_py()
    # The same vectors, the same exact index: the dense run of the hybrid index, row for row.
    columns = ["query_id", "rank", "doc_id", "first_stage_score"]
    order = [("query_id", "ascending"), ("rank", "ascending")]
    assert table.select(columns).sort_by(order).equals(dense_run[1].select(columns).sort_by(order))


@pytest.mark.parametrize("mode", ["hybrid", "sparse"])
def test_bm25_modes_on_an_index_without_bm25_are_a_clear_error(dense_only_index, queries, tmp_path, mode):
    version = dense_only_index[1]["version_id"]
    with pytest.raises(IndexValidationError, match=f"--search.mode {mode}: index version {version} has no BM25 part .*--sparse off.*use --search.mode dense"):
        run_mode(dense_only_index[0], queries, tmp_path / "run", "--search.mode", mode)
    assert not (tmp_path / "run").exists() or not storage.list_files(str(tmp_path / "run"), ".parquet")


def test_the_rerun_the_mode_error_suggests_works_in_the_same_output(dense_only_index, queries, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(IndexValidationError, match="use --search.mode dense"):
        run_mode(dense_only_index[0], queries, output, "--search.mode", "hybrid")
    summary, table = run_mode(dense_only_index[0], queries, output, "--search.mode", "dense")
    assert summary["queries_run"] == 12 and table.num_rows == 12 * TOP_K


# --- (c) an incremental rebuild reuses unchanged BM25 shards ---------------------------------------


def test_an_incremental_rebuild_reuses_the_unchanged_bm25_shards(hybrid_index, tiny_bi_encoder, tmp_path):
    from pipelines.shard_search import SearchConfig
    from pipelines.sparse_search import SparseShardSearcher

    before_root, before_summary = hybrid_index
    root = tmp_path / "index"
    shutil.copytree(before_root, root)
    before = index_store.read_manifest(str(root))["sparse"]
    records = corpus_records()
    records[CHANGED_DOCUMENT]["text"] = "brandnewword " + records[CHANGED_DOCUMENT]["text"]
    corpus = write_jsonl(tmp_path / "corpus" / "corpus.jsonl", records)

    summary = build_job(*build_index_flags(corpus, root, tiny_bi_encoder, *BUILD_FLAGS))
    assert summary["version_id"] != before_summary["version_id"]
    assert (summary["embedded"], summary["reused_embeddings"]) == (1, DOCUMENTS - 1)
    assert summary["sparse_shards_reused"] == 2
    assert (summary["sparse_documents_tokenized"], summary["sparse_documents_reused"]) == (1, 39)  # the third shard: its other 39 from the old one
    manifest = index_store.read_manifest(str(root))
    assert manifest["version_id"] == summary["version_id"]
    after = manifest["sparse"]
    assert [entry["reused"] for entry in after["shards"]] == [True, True, False]
    for number in (0, 1):
        assert (after["shards"][number]["file"], after["shards"][number]["sha256"]) == (before["shards"][number]["file"], before["shards"][number]["sha256"])
    assert after["shards"][2]["file"] != before["shards"][2]["file"] and after["shards"][2]["sha256"] != before["shards"][2]["sha256"]
    assert (root / before["shards"][2]["file"]).exists()  # the old version still has its shard
    assert after["statistics"]["sha256"] != before["statistics"]["sha256"]

    # The new version's BM25 finds the new word in the changed document, and only there.
    config = SearchConfig(top_k=TOP_K)
    hits = []
    for shard in range(3):
        positions, _ = SparseShardSearcher(str(root), manifest["version_id"], shard, config).search(["brandnewword"])
        hits += positions[0][positions[0] >= 0].tolist()
    assert hits == [CHANGED_DOCUMENT]
    # The old version, still readable, does not know the word.
    old = SparseShardSearcher(str(root), before_summary["version_id"], 2, config).search(["brandnewword"])[0]
    assert (old == -1).all()


def test_changes_spread_through_the_corpus_tokenize_only_the_changed_documents_and_give_a_full_builds_shards(hybrid_index, tiny_bi_encoder, tmp_path):
    """A removal near the start shifts every position, so no shard keeps its documents; the counts of the documents
    whose text is unchanged come from the previous version's shards, and each shard file is the bytes a build from
    scratch of the same snapshot writes."""
    before_root, _ = hybrid_index
    root = tmp_path / "index"
    shutil.copytree(before_root, root)
    records = corpus_records()
    records[50]["text"] = "brandnewword " + records[50]["text"]
    records = records[:5] + records[6:] + [{"_id": "added", "title": "", "text": "an added document about brandnewword"}]
    corpus = write_jsonl(tmp_path / "corpus" / "corpus.jsonl", records)

    summary = build_job(*build_index_flags(corpus, root, tiny_bi_encoder, *BUILD_FLAGS))
    assert summary["sparse_shards_reused"] == 0
    assert (summary["sparse_documents_tokenized"], summary["sparse_documents_reused"]) == (2, DOCUMENTS - 2)
    scratch = build_job(*build_index_flags(corpus, tmp_path / "scratch", tiny_bi_encoder, *BUILD_FLAGS))
    assert (scratch["sparse_documents_tokenized"], scratch["sparse_documents_reused"]) == (DOCUMENTS, 0)
    incremental, fresh = (index_store.read_manifest(str(folder))["sparse"] for folder in (root, tmp_path / "scratch"))
    assert [(entry["file"], entry["sha256"]) for entry in incremental["shards"]] == [(entry["file"], entry["sha256"]) for entry in fresh["shards"]]
    assert incremental["statistics"]["sha256"] == fresh["statistics"]["sha256"]
