"""Sharded BM25 (pipelines.sparse_index, pipelines.sparse_search) against one unsharded bm25s index.

No Ray: term counts are built in memory (TermCounts.from_tokens), merged into global statistics
as build_sparse_shards does, and searched with SparseShardSearcher.from_counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.shard_search import PADDING_POSITION, SearchConfig, empty_candidates, merge_top_k
from pipelines.sparse_index import Bm25Config, GlobalStatistics, TermCounts, Tokenizer, bm25_model
from pipelines.sparse_search import SparseShardSearcher

# Real words (inflections the stemmer merges, stopwords the tokenizer drops) and made-up ones.
VOCABULARY = (
    "protein proteins cell cells cellular gene genes genetic mutation mutations tumor tumour cancer cancers "
    "running runs runner immune immunity virus viral infection infected dose doses trial trials patient patients "
    "xq7 zorblat quenk flimmer vrask drubb plonk skiv yattle omrex naïve größe 日本語 café"
).split()
STOPWORDS = ("the", "and", "of", "in", "with", "a", "is")
RARE = ("hapax", "oncewordx")  # each in exactly one document
SHARDS = [(0, 37), (37, 201), (201, 300)]  # three uneven shards
TOP_K = 10


def zipf_corpus(documents: int = 300, seed: int = 0) -> list[str]:
    """Texts with Zipf-like term frequencies, stopwords, a few terms repeated many times, two rare words, one stopword-only text."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(VOCABULARY) + 1) ** 1.1
    weights /= weights.sum()
    texts = []
    for number in range(documents):
        words = list(rng.choice(VOCABULARY, size=int(rng.integers(3, 40)), p=weights))
        words += list(rng.choice(STOPWORDS, size=int(rng.integers(0, 5))))
        if number % 17 == 0:  # a term repeated many times: tf up to ~12
            words += [str(rng.choice(VOCABULARY[:8]))] * int(rng.integers(4, 12))
        rng.shuffle(words)
        texts.append(" ".join(words))
    texts[40] += " hapax"
    texts[250] += " OnceWordX"
    texts[120] = "the and of"  # no terms left after stopwords: length 0
    return texts


def random_queries(count: int = 60, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    queries = [" ".join(rng.choice(VOCABULARY, size=int(rng.integers(1, 6)))) for _ in range(count)]
    queries += [
        "protein protein protein cell",  # a repeated query term counts each time
        "hapax", "oncewordx tumor", "cells of the immune system",  # rare words, stopwords, unseen words
        "running runs runner",  # three spellings, one stem
        "Größe NAÏVE 日本語",  # non-ASCII terms (sorted and stored as UTF-8)
    ]
    return queries


@pytest.fixture(scope="module")
def bm25() -> Bm25Config:
    return Bm25Config()


@pytest.fixture(scope="module")
def tokens(bm25) -> list[list[str]]:
    return Tokenizer(bm25)(zipf_corpus())


@pytest.fixture(scope="module")
def shard_counts(tokens) -> list[TermCounts]:
    return [TermCounts.from_tokens(tokens[start:end]) for start, end in SHARDS]


@pytest.fixture(scope="module")
def statistics(shard_counts) -> GlobalStatistics:
    # As build_sparse_shards does: one pass over each stored shard's own statistics.
    stored = [TermCounts.from_bytes(counts.to_bytes()) for counts in shard_counts]
    return GlobalStatistics.merge([(c.terms, c.document_frequencies(), c.documents, int(c.lengths.sum())) for c in stored])


@pytest.fixture(scope="module")
def searchers(shard_counts, statistics, bm25) -> list[SparseShardSearcher]:
    config = SearchConfig(top_k=TOP_K)
    return [SparseShardSearcher.from_counts(counts, statistics, bm25, start, config) for counts, (start, _) in zip(shard_counts, SHARDS)]


@pytest.fixture(scope="module")
def unsharded(tokens, bm25):
    import bm25s

    model = bm25s.BM25(k1=bm25.k1, b=bm25.b, method="lucene")
    model.index(tokens, show_progress=False)
    return model


def test_the_corpus_exercises_what_it_should(tokens, shard_counts, statistics):
    assert tokens[120] == [] and shard_counts[2].documents == 99
    assert max(int(c.counts.max()) for c in shard_counts) >= 8  # repeated terms
    assert "run" in statistics.terms and "running" not in statistics.terms  # stemmed
    assert "the" not in statistics.terms  # stopwords dropped
    assert {"größe", "naïv", "日本語", "café"} <= set(statistics.terms.tolist())  # non-ASCII terms
    for word in ("hapax", "oncewordx"):
        assert statistics.frequencies_of(np.array([word]))[0] == 1
    # No shard holds every term: the global statistics are more than any one shard's.
    assert all(len(c.terms) < len(statistics.terms) for c in shard_counts)
    assert statistics.documents == 300 and statistics.total_length == sum(map(len, tokens))


def test_sharded_scores_equal_one_unsharded_bm25s_index_exactly(searchers, unsharded, bm25):
    tokenize = Tokenizer(bm25)
    checked = 0
    for query, terms in zip(random_queries(), tokenize(random_queries())):
        sharded = np.concatenate([searcher.scores(terms) for searcher in searchers])
        known = [term for term in terms if term in unsharded.vocab_dict]
        if not known:
            assert not sharded.any(), query
            continue
        expected = unsharded.get_scores(known)
        assert sharded.dtype == expected.dtype == np.float32
        assert np.array_equal(sharded, expected), (query, np.flatnonzero(sharded != expected)[:5])
        checked += 1
    assert checked >= 60


def test_merged_top_k_over_shards_equals_the_unsharded_top_k(searchers, unsharded, bm25):
    queries = random_queries()
    positions, scores = empty_candidates(len(queries), TOP_K)
    for searcher in reversed(searchers):  # the order shards are visited does not matter
        new_positions, new_scores = searcher.search(queries)
        positions, scores = merge_top_k(positions, scores, new_positions, new_scores, TOP_K)
    for row, terms in enumerate(Tokenizer(bm25)(queries)):
        known = [term for term in terms if term in unsharded.vocab_dict]
        expected = unsharded.get_scores(known) if known else np.zeros(300, np.float32)
        matching = np.flatnonzero(expected > 0)
        best = matching[np.lexsort((matching, -expected[matching]))][:TOP_K]  # ties: smaller position first
        found = positions[row][positions[row] >= 0]
        assert np.array_equal(found, best), queries[row]
        assert np.array_equal(scores[row][: len(best)], expected[best])
        assert np.all(positions[row][len(best):] == PADDING_POSITION)


def test_a_rare_word_finds_its_one_document(searchers):
    for query, position in (("hapax", 40), ("oncewordx", 250)):
        found = [searcher.search([query])[0][0] for searcher in searchers]
        hits = np.concatenate([row[row >= 0] for row in found])
        assert hits.tolist() == [position]


def test_a_query_of_unknown_terms_returns_no_candidates(searchers):
    for query in ("unseenword anotherone", "the and of", ""):
        for searcher in searchers:
            positions, scores = searcher.search([query])
            assert np.all(positions == PADDING_POSITION) and np.all(np.isneginf(scores)), query
    # Called as the Ray stage: the running top-K stays empty.
    batch = {"query_text": np.array(["unseenword", "zzz qqq"], dtype=object)}
    for searcher in searchers:
        batch = searcher(batch)
    assert np.all(batch["sparse_positions"] == PADDING_POSITION) and batch["sparse_positions"].shape == (2, TOP_K)


def test_the_ray_stage_chains_shards_into_the_global_top_k(searchers):
    queries = random_queries()[:8]
    batch = {"query_text": np.array(queries, dtype=object)}
    for searcher in searchers:
        batch = searcher(batch)
    positions, scores = empty_candidates(len(queries), TOP_K)
    for searcher in searchers:
        positions, scores = merge_top_k(positions, scores, *searcher.search(queries), TOP_K)
    assert np.array_equal(batch["sparse_positions"], positions) and np.array_equal(batch["sparse_scores"], scores)


def test_term_counts_round_trip_through_bytes(shard_counts):
    for counts in shard_counts:
        again = TermCounts.from_bytes(counts.to_bytes())
        for name in ("terms", "indptr", "indices", "counts", "lengths"):
            assert np.array_equal(getattr(again, name), getattr(counts, name)), name
            assert getattr(again, name).dtype.kind == getattr(counts, name).dtype.kind, name
        assert again.documents == counts.documents
    empty = TermCounts.from_tokens([[], []])
    again = TermCounts.from_bytes(empty.to_bytes())
    assert again.documents == 2 and len(again.terms) == 0 and again.indptr.tolist() == [0, 0, 0]


def test_global_statistics_round_trip_through_bytes(statistics):
    again = GlobalStatistics.from_bytes(statistics.to_bytes())
    assert np.array_equal(again.terms, statistics.terms)
    assert np.array_equal(again.document_frequencies, statistics.document_frequencies)
    assert (again.documents, again.total_length) == (statistics.documents, statistics.total_length)
    assert again.average_length == statistics.average_length
    empty = GlobalStatistics.from_bytes(GlobalStatistics.merge([]).to_bytes())
    assert empty.documents == 0 and len(empty.terms) == 0
    assert empty.frequencies_of(np.array(["x"])).tolist() == [0]


def test_global_statistics_are_the_unsharded_ones(statistics, unsharded, tokens):
    assert statistics.average_length == np.array([len(t) for t in tokens]).mean()
    whole = TermCounts.from_tokens(tokens)
    assert np.array_equal(statistics.terms, whole.terms)
    assert np.array_equal(statistics.document_frequencies, whole.document_frequencies())
    # Terms the statistics lack get frequency 0, before, between and after the known ones.
    probe = np.array(["", "aaaa", statistics.terms[3], "mmmmzz", "zzzzzz"])
    frequencies = statistics.frequencies_of(probe)
    assert frequencies[2] == statistics.document_frequencies[3] and frequencies[[0, 1, 3, 4]].tolist() == [0, 0, 0, 0]


def test_bm25_model_of_one_shard_holding_everything_is_bm25s(tokens, bm25, unsharded):
    whole = TermCounts.from_tokens(tokens)
    model = bm25_model(whole, GlobalStatistics.merge([(whole.terms, whole.document_frequencies(), whole.documents, int(whole.lengths.sum()))]), bm25)
    for terms in Tokenizer(bm25)(random_queries()[:20]):
        known = [term for term in terms if term in unsharded.vocab_dict]
        if known:
            assert np.array_equal(model.get_scores(known), unsharded.get_scores(known))


@pytest.mark.parametrize("settings, message", [
    ({"stemmer": "klingon"}, "not a Snowball stemmer"),
    ({"b": 1.5}, r"--bm25.b 1.5 in \[0, 1\]"),
    ({"b": -0.1}, r"in \[0, 1\]"),
    ({"k1": -1.0}, "must be >= 0"),
])
def test_bm25_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        Bm25Config(**settings).validate()


def test_bm25_config_accepts_its_edges():
    for settings in ({"b": 0.0}, {"b": 1.0}, {"k1": 0.0}, {"stemmer": "none"}, {"stemmer": "german"}):
        Bm25Config(**settings).validate()


def test_tokenizer_settings_change_the_terms():
    text = ["The runners are running"]
    assert Tokenizer(Bm25Config())(text) == [["runner", "run"]]
    assert Tokenizer(Bm25Config(stemmer="none"))(text) == [["runners", "running"]]
    assert Tokenizer(Bm25Config(stopwords="none", stemmer="none"))(text) == [["the", "runners", "are", "running"]]
    assert Tokenizer(Bm25Config())([]) == []


def test_ties_at_the_top_k_boundary_go_to_the_smaller_positions(bm25):
    # 1,000 documents with the same score: the top 5 are the first five positions, as merge_top_k's rule has it.
    counts = TermCounts.from_tokens(Tokenizer(bm25)(["alpha beta"] * 1000))
    statistics = GlobalStatistics.merge([(counts.terms, counts.document_frequencies(), counts.documents, int(counts.lengths.sum()))])
    searcher = SparseShardSearcher.from_counts(counts, statistics, bm25, 100, SearchConfig(top_k=5))
    positions, _ = searcher.search(["alpha"])
    assert positions[0].tolist() == [100, 101, 102, 103, 104]


def test_bm25_config_rejects_an_unknown_stopword_list():
    with pytest.raises(ValueError, match="stopwords"):
        Bm25Config(stopwords="klingon").validate()


def test_parts_counted_per_block_stack_into_the_whole_shard(tokens):
    # As build_sparse_shards does: blocks arrive in any order, each counted alone; stacking the parts
    # and sorting by position gives the same file as counting the whole shard at once.
    whole = TermCounts.from_tokens(tokens)
    shuffled = np.random.default_rng(3).permutation(len(tokens))
    blocks = np.array_split(shuffled, 5)
    parts = [TermCounts.from_tokens([tokens[i] for i in block]) for block in blocks]
    stacked = TermCounts.stack(parts).take(np.argsort(np.concatenate(blocks), kind="stable"))
    assert stacked.to_bytes() == whole.to_bytes()
    # A part taken from a block keeps only the terms its own documents use.
    assert whole.take(np.arange(10, 20)).to_bytes() == TermCounts.from_tokens(tokens[10:20]).to_bytes()
    assert TermCounts.stack([TermCounts.from_tokens([[], []])]).to_bytes() == TermCounts.from_tokens([[], []]).to_bytes()


def test_bm25_shards_follow_dense_shards_up_to_a_size_cap():
    from pipelines.sparse_index import MAX_SHARD_DOCUMENTS, shard_count

    assert shard_count(5_183, 1) == 1 and shard_count(0, 1) == 1
    assert shard_count(1_000_000, 1) == 1_000_000 // MAX_SHARD_DOCUMENTS
    assert shard_count(MAX_SHARD_DOCUMENTS + 1, 1) == 2
    assert shard_count(1_000_000, 8) == 8


@pytest.mark.parametrize("top_k", [1, 3, 10, 40])
def test_search_equals_a_full_sort_of_every_score(bm25, top_k):
    # search_terms selects only above a floor (a K-th score within one term's list); the result must be what
    # sorting every document's score gives: higher score first, then the smaller position, ties at the K-th kept whole.
    texts = zipf_corpus(400, seed=5)
    texts += texts[:60]  # duplicated documents: many exact ties
    counts = TermCounts.from_tokens(Tokenizer(bm25)(texts))
    statistics = GlobalStatistics.merge([(counts.terms, counts.document_frequencies(), counts.documents, int(counts.lengths.sum()))])
    searcher = SparseShardSearcher.from_counts(counts, statistics, bm25, 7, SearchConfig(top_k=top_k))
    queries = random_queries(120, seed=top_k)
    positions, scores = searcher.search(queries)
    for row, terms in enumerate(Tokenizer(bm25)(queries)):
        values = searcher.scores(terms)
        matching = np.flatnonzero(values > 0)
        order = np.lexsort((matching, -values[matching]))[:top_k]
        expected = np.full(top_k, PADDING_POSITION)
        expected[: len(order)] = matching[order] + 7
        assert positions[row].tolist() == expected.tolist(), queries[row]
        assert np.array_equal(scores[row, : len(order)], values[matching[order]])
