"""FAISS index building: parameters from corpus size and a memory budget, one training on a sample, shards filled in parallel.

The index is trained once (IVF centroids and PQ codebooks) on a seeded sample of the embeddings,
saved as ``trained.faiss``, and every shard is a copy of that empty index filled with a contiguous
range of document *positions* (the global id space: position = rank of the document in file order).
Each shard is filled in its own Ray task and written atomically with a stats file last, so a rerun
skips shards that are complete. Search results from all shards can be merged directly, because
they share the trained quantizer and the id space.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import faiss

from pipelines import index_store, storage
from pipelines.embedding import read_vectors

FLAT_BELOW = 250_000  # exact search below this many vectors (see choose_index_parameters)
IVF_MIN_VECTORS = 2_000  # too few vectors for IVF lists below this: Flat, or an error under a smaller memory budget
SCANNED_PER_QUERY = 32_768  # IVF: probe enough lists to scan about this many vectors per query
MIN_PROBED_FRACTION = 32  # ... and at least 1/32 of the lists


@dataclass
class IndexConfig:
    """Index parameters; ``auto`` values are chosen from the corpus size (see choose_index_parameters)."""

    factory: str = field(default="auto", metadata={"help": "faiss factory string, e.g. IVF4096,PQ192x4fs (auto = from corpus size and memory budget)"})
    shards: int = field(default=0, metadata={"help": "number of shards (0 = one per million documents)"})
    nprobe: int = field(default=0, metadata={"help": "IVF lists visited per query (0 = enough to scan ~32k vectors, at least 1/32 of the lists)"})
    training_sample: int = field(default=0, metadata={"help": "vectors to train on (0 = from nlist)"})
    memory_budget: str = field(
        default="0",
        metadata={"help": "RAM for the faiss index, all shards together, e.g. 8GiB or 500MB (0 = no limit); auto picks the (index code, "
                          "re-scoring code) pair of best measured recall that fits and errors if none does. For a compressed index it "
                          "includes the re-scoring data exact re-scoring loads (float16: 2 B x dimension per vector; sq8: 1; sq6: 0.75; "
                          "memory-mapped from local storage)"},
    )
    rescoring_code: str = field(
        default="auto",
        metadata={"help": "how a compressed index's re-scoring vectors are stored: float16, sq8 or sq6 (faiss scalar quantizer codes, "
                          "1 or 0.75 B per dimension, re-scored by decoding the candidates' codes), or auto: float16 unless the memory "
                          "budget needs a smaller code"},
    )
    seed: int = 1234
    retrain: bool = field(default=False, metadata={
        "help": "train the index anew even when the version CURRENT names has a trained quantizer this build could reuse (same model, "
                "factory, re-scoring code and shard layout, no drift: pipelines.incremental_index); its unchanged shards are then filled anew too"})

    def validate(self) -> None:
        from pipelines.config import require_at_least

        require_at_least(self, {"shards": 0, "nprobe": 0, "training_sample": 0})
        if self.rescoring_code not in ("auto", *index_store.RESCORING_CODES):
            raise ValueError(f"--rescoring-code {self.rescoring_code}: choose auto, {', '.join(index_store.RESCORING_CODES)}")
        try:
            parse_bytes(self.memory_budget)
        except ValueError as error:
            raise ValueError(f"--memory-budget {self.memory_budget}: {error}") from None


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nprobe: int
    shards: int
    training_sample: int
    seed: int
    rescoring_code: str = "float16"  # of the re-scoring vectors (index_store.RESCORING_CODES); float16 for exact indexes, which load none


class MemoryBudgetError(ValueError):
    """No index the rule considers fits ``IndexConfig.memory_budget``."""


_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: str | int) -> int:
    """A byte count from an int or a string such as ``8GiB``, ``500MB``, ``1.5e9`` (0 = no limit).

    Example:
        >>> parse_bytes("1.5GiB"), parse_bytes("500 MB"), parse_bytes(0)
        (1610612736, 500000000, 0)
    """
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if not match or match.group(2) not in _BYTE_UNITS:
            raise ValueError(f"not a byte count: {value!r} (examples: 8GiB, 500MB, 0)")
        number, unit = float(match.group(1)), match.group(2)
    if number < 0:
        raise ValueError(f"not a byte count: {value!r}")
    return int(number * _BYTE_UNITS[unit])


def _power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(1.0, value))))


def pq_subquantizers(dimension: int, dims_per_code: int = 8) -> int:
    """The number of PQ sub-quantizers: a divisor of ``dimension`` near ``dimension / dims_per_code``."""
    target = max(1, dimension // dims_per_code)
    divisors = [m for m in range(1, dimension + 1) if dimension % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


MAX_IVF_LISTS = 4096  # see ivf_lists


def ivf_lists(count: int) -> int:
    """IVF lists for ``count`` vectors: a power of two near 4·sqrt(n), with at least 39 vectors per list, at most 4,096.

    The cap keeps the build linear in n: every vector added is compared with every list centroid
    (a flat coarse quantizer), and k-means training costs sample x lists with a sample that grows
    with the lists. At 10M 384-d vectors, 16,384 lists (the 4·sqrt(n) rule) would cost 126 TFLOP to
    assign and 63 to train, about 40 minutes on 2 cores at 80 GFLOP/s; 4,096 lists cost a quarter
    to assign and an eighth to train, and nprobe 128 then scans about 300k codes per query.
    Set ``faiss.factory`` (e.g. ``IVF65536_HNSW32,PQ192x4fs``) for more lists on a bigger machine.
    """
    return max(1, min(_power_of_two(4 * math.sqrt(count)), count // 39, MAX_IVF_LISTS))


def ivf_nprobe(nlist: int, count: int) -> int:
    """Lists to probe: enough to scan about SCANNED_PER_QUERY vectors per query, at least 1/MIN_PROBED_FRACTION of them."""
    return max(1, min(nlist, max(nlist // MIN_PROBED_FRACTION, math.ceil(SCANNED_PER_QUERY * nlist / max(1, count)))))


def pq_codecs(dimension: int) -> list[str]:
    """The compressed codes the rule considers, best recall first (bench.index, 1M 384-d vectors, recall@100 at
    nprobe 128 and 500 candidates re-scored): 4-bit fast-scan PQ with one sub-quantizer per 2 dimensions
    (PQ192x4fs: 0.970, 116 B/vector, the fastest), 8-bit PQ with one byte per 8 dimensions (PQ48: 0.957,
    63 B/vector; the 4-bit PQ96x4fs of the same size gives 0.897), per 12 (PQ32: 0.924, 47 B/vector); smaller
    8-bit codes (one byte per 16, 24, 32, 48, 64 dimensions) are not measured and lose recall further.
    """
    codecs = [f"PQ{pq_subquantizers(dimension, 2)}x4fs"]
    for dims_per_code in (8, 12, 16, 24, 32, 48, 64):
        codecs.append(f"PQ{pq_subquantizers(dimension, dims_per_code)}")
    return list(dict.fromkeys(codecs))


def estimate_index_bytes(factory: str, count: int, dimension: int, shards: int = 1) -> int:
    """The size of an index of ``count`` vectors in ``shards`` shards, in RAM and serialized (pure arithmetic).

    Codes and 8-byte ids per vector; per shard, the IVF centroids (4 B x dimension per list), the PQ codebooks,
    and for fast-scan codes, which are stored in blocks of 32 vectors per list, half a block of padding per
    list. Within 0.2% of the serialized sizes bench.index measured at 1M vectors (Flat 1,544 B/vector;
    IVF4096,PQ48 63; IVF4096,PQ192x4fs 116). Flat shards also keep an id map in RAM (tens of bytes per vector).
    """
    import faiss

    index = make_empty_index(factory, dimension)
    found = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(found) if found is not None else None
    if ivf is None:
        inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else faiss.downcast_index(index)
        code_size = getattr(inner, "code_size", None)
        if not isinstance(code_size, int):
            raise ValueError(f"cannot estimate the size of a {factory} index")
        return count * (code_size + 8)
    padding = (ivf.bbs // 2) * ivf.code_size if hasattr(ivf, "bbs") else 0
    codebooks = 4 * ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub if hasattr(ivf, "pq") else 0
    per_shard = ivf.nlist * (4 * dimension + padding) + codebooks
    return count * (ivf.code_size + 8) + max(1, shards) * per_shard


def choose_index_parameters(count: int, dimension: int, config: IndexConfig) -> IndexPlan:
    """Index parameters for ``count`` vectors (pure function); explicit settings in ``config`` win.

    From bench.index (1M synthetic 384-d vectors shaped like all-MiniLM-L6-v2 embeddings, top-100,
    2 cores, ``ShardSearcher`` with 500 candidates re-scored; bench/results/index.json):

    - under 250,000 vectors: exact (flat) search. Flat answers 264 queries/s at 1M and 1,027 at 250k:
      25x more than the CPU bi-encoder encodes queries (~40/s), exact and nothing to train, though
      larger in RAM than a compressed index plus the float16 vectors its re-scoring loads (1,544 B/vector
      against 116 + 768). At 250k the IVF-PQ below (IVF2048, nprobe 269) gives recall@100 0.982 at 5,800
      queries/s, built in 14 s, where the speed starts to matter more than exactness;
    - otherwise IVF with a power of two near 4·sqrt(n) lists (4,096 at 1M, at least 39 vectors per list)
      and 4-bit fast-scan PQ with one sub-quantizer per 2 dimensions (``IVF4096,PQ192x4fs``, 96 bytes
      of code for 384-d): recall@100 0.970 at 5,358 queries/s at nprobe 128, 20x Flat, built in about
      62 s; the previous rule's ``IVF4096,PQ48`` gave 0.957 at 1,951 queries/s with the same searcher;
    - nprobe: enough lists to scan about 32k vectors per query, and at least 1/32 of the lists (135 of
      4,096 at 1M; recall@100 0.946 at 64, 0.970 at 128, 0.984 at 256); one shard per million vectors;
    - ``memory_budget`` (bytes of RAM for the faiss index, all shards, plus a compressed index's re-scoring
      data: :func:`memory_bytes`): with no budget, or one the rule's index with float16 re-scoring vectors
      fits, that; otherwise the first (index code, re-scoring code) pair of :func:`rescoring_pairs` that
      fits (fast-scan codes by measured recall, then 8-bit ones: e.g. at 1M, PQ192x4fs with sq8 codes,
      500.6 B/vector, recall@100 0.966, then with sq6, 404.6 B, 0.951; at 10M within 400 B/vector,
      PQ128x4fs with sq6, 370.5 B, 0.933 at 1M); ``rescoring_code`` other than auto keeps to that code;
      below 250,000 vectors Flat when it fits, else IVF-PQ the same way (from 2,000 vectors);
      :class:`MemoryBudgetError`, naming the codes considered, when nothing fits. An explicit ``factory``
      gets the first of float16, sq8, sq6 that fits with it (float16 if none: it is not refused).
    """
    shards = config.shards or max(1, math.ceil(count / 1_000_000))
    shards = max(1, min(shards, max(1, count)))
    budget = parse_bytes(config.memory_budget)
    if config.factory == "auto":
        factory, code = _auto_factory(count, dimension, shards, budget, config.rescoring_code)
    else:
        factory, code = config.factory, _code_for_factory(config.factory, count, dimension, shards, budget, config.rescoring_code)
    nlist = ivf_list_count(factory, dimension)
    nprobe = config.nprobe or (ivf_nprobe(nlist, count) if nlist else 0)
    if config.training_sample:
        sample = config.training_sample
    else:
        sample = max(256 * 39, 64 * nlist) if nlist else 0
        sample = min(sample, 500_000)
    return IndexPlan(factory=factory, nprobe=nprobe, shards=shards, training_sample=min(sample, count), seed=config.seed, rescoring_code=code)


def rescoring_bytes(factory: str, count: int, dimension: int, code: str = "float16") -> int:
    """RAM for the re-scoring data a searcher loads with an index of ``factory``: ``code``'s bytes per vector
    (:func:`index_store.rescoring_code_size`: float16 2 B x dimension, sq8 1, sq6 0.75) for a compressed index,
    0 for one that scores exactly (Flat, IVF-Flat: its candidates are not re-scored, so its vectors are never loaded).

    Example:
        >>> rescoring_bytes("IVF1024,PQ192x4fs", 1_000_000, 384), rescoring_bytes("IVF1024,PQ192x4fs", 1_000_000, 384, "sq6")
        (768000000, 288000000)
        >>> rescoring_bytes("Flat", 1_000_000, 384)
        0
    """
    if is_exact(factory, dimension):
        return 0
    return count * index_store.rescoring_code_size(code, dimension)


def is_exact(factory: str, dimension: int) -> bool:
    """Whether an index of ``factory`` scores exactly (its candidates are not re-scored: ``shard_search.has_exact_scores``)."""
    from pipelines.shard_search import has_exact_scores

    index = make_empty_index(factory, dimension)  # held here: has_exact_scores rebinds its argument to downcast proxies
    return has_exact_scores(index)


def memory_bytes(factory: str, count: int, dimension: int, shards: int = 1, code: str = "float16") -> int:
    """What ``IndexConfig.memory_budget`` counts: the index (:func:`estimate_index_bytes`) plus its re-scoring data (:func:`rescoring_bytes`)."""
    return estimate_index_bytes(factory, count, dimension, shards) + rescoring_bytes(factory, count, dimension, code)


# Recall@100 at 1M vectors of each (index code, re-scoring code) pair the rule considers (see rescoring_pairs):
# the PQ code as (dimensions per sub-quantizer, 4-bit fast-scan), the re-scoring code, the recall.
MEASURED_PAIRS: tuple[tuple[tuple[int, bool], str, float], ...] = (
    ((2, True), "float16", 0.9703), ((2, True), "sq8", 0.9660), ((2, True), "sq6", 0.9512),  # PQ192x4fs, 116.6 B/vector
    ((3, True), "float16", 0.9466), ((3, True), "sq8", 0.9438), ((3, True), "sq6", 0.9328),  # PQ128x4fs, 82.5
    ((4, False), "float16", 0.9726), ((4, False), "sq8", 0.9682), ((4, False), "sq6", 0.9526),  # PQ96, 110.7
    ((6, False), "float16", 0.9687), ((6, False), "sq8", 0.9646), ((6, False), "sq6", 0.9500),  # PQ64, 78.7
    ((8, False), "float16", 0.9568), ((8, False), "sq8", 0.9538), ((8, False), "sq6", 0.9409),  # PQ48, 62.7
)


def _pq_code(dimension: int, dims_per_code: int, fast_scan: bool) -> str:
    count = pq_subquantizers(dimension, dims_per_code)
    return f"PQ{count}x4fs" if fast_scan else f"PQ{count}"


def rescoring_pairs(dimension: int, code: str = "auto") -> list[tuple[str, str]]:
    """The (index code, re-scoring code) pairs the rule considers under a memory budget, in order (``code`` other than
    auto: only the pairs with that re-scoring code): the 4-bit fast-scan codes first, then the 8-bit ones, each group
    by measured recall; then the smaller 8-bit codes of :func:`pq_codecs`, not measured with sq8 / sq6.

    Measured at 1M (``/root/wd/exp/rescore_pairs.py``: ``bench.index``'s synthetic 384-d vectors, 1,000 queries,
    IVF4096 with the rule's coarse quantizer and training sample, nprobe 128 as the rule sets it at 10M, 500
    candidates re-scored as ``ShardSearcher`` does, the float16 / sq8 / sq6 codes written by faiss scalar
    quantizers trained on the same sample); recall@100 against exact search, index B/vector (1 shard of 1M;
    at 10M in 10 shards the same), seconds for 1,000 queries x 500 candidates from the index alone (2 threads
    on a loaded 2-core machine: a rough ratio only):

    ==========  =====  ==============  =======  =====  =====  =====
    index code  B/vec  search 1,000 q  no re-s  fp16   sq8    sq6
    ==========  =====  ==============  =======  =====  =====  =====
    PQ192x4fs   116.6  0.3 s           0.759    0.970  0.966  0.951
    PQ128x4fs    82.5  0.3-0.7 s       0.653    0.947  0.944  0.933
    PQ96x4fs     65.5  0.1 s           0.566    0.897  0.896  0.888
    PQ96        110.7  1.7 s           0.832    0.973  0.968  0.953
    PQ64         78.7  1.2 s           0.747    0.969  0.965  0.950
    PQ48         62.7  0.5 s           0.688    0.957  0.954  0.941
    ==========  =====  ==============  =======  =====  =====  =====

    Re-scoring codes per vector: float16 768 B, sq8 384, sq6 288 (one range per dimension: ``QT_8bit`` /
    ``QT_6bit``). sq8 loses 0.003-0.005 of recall, sq6 0.015-0.02, whatever the index code (sq4, 192 B: 0.877
    with PQ192x4fs, not offered). Re-scoring 256 queries x 500 candidates of 384-d (one thread, loaded machine):
    float16 91 ms, sq8 67 ms, sq6 251 ms (faiss decodes 6-bit codes component by component; a numpy unpacking
    took as long). Fast-scan codes come first because 8-bit PQ scans 3-6x slower (bench.index: PQ48 1,951 against
    PQ192x4fs 5,358 queries/s): an 8-bit pair is chosen only when no fast-scan pair fits. PQ96x4fs is not
    considered (PQ48's size, far lower recall). Sizes with the 10M rule (10 shards, 4,096 lists): PQ192x4fs +
    sq6 404.6 B/vector, PQ128x4fs + sq6 370.5, PQ96 + sq6 398.7, PQ64 + sq6 366.7, PQ48 + sq6 350.7.
    """
    codes = index_store.RESCORING_CODES if code == "auto" else (code,)
    measured = sorted(MEASURED_PAIRS, key=lambda pair: (not pair[0][1], -pair[2]))
    pairs = [(_pq_code(dimension, *pq), rescoring) for pq, rescoring, _ in measured if rescoring in codes]
    pairs += [(codec, rescoring) for codec in pq_codecs(dimension) for rescoring in codes]  # the rest: smaller PQ codes, not measured with SQ
    return list(dict.fromkeys(pairs))


def _code_for_factory(factory: str, count: int, dimension: int, shards: int, budget: int, code: str) -> str:
    """The re-scoring code of an explicit factory: ``code`` when set; with auto, the first of float16, sq8, sq6 that fits
    the budget (float16 when none does, or for an exact index: an explicit factory is never refused for the budget)."""
    if is_exact(factory, dimension):
        return "float16"
    if code != "auto":
        return code
    fitting = [rescoring for rescoring in index_store.RESCORING_CODES if not budget or memory_bytes(factory, count, dimension, shards, rescoring) <= budget]
    return fitting[0] if fitting else "float16"


def _auto_factory(count: int, dimension: int, shards: int, budget: int, code: str = "auto") -> tuple[str, str]:
    """The rule's (factory, re-scoring code) for ``count`` vectors within ``budget`` bytes (0 = no limit)."""
    def size(factory: str, rescoring: str = "float16") -> int:
        return memory_bytes(factory, count, dimension, shards, rescoring)

    if count < FLAT_BELOW and (not budget or size("Flat") <= budget):
        return "Flat", "float16"
    if count < IVF_MIN_VECTORS:
        raise MemoryBudgetError(
            f"memory_budget {budget:,} B is less than a Flat index of {count:,} {dimension}-d vectors needs ({size('Flat'):,} B), and "
            f"{count:,} vectors are too few for a compressed (IVF-PQ) index (at least {IVF_MIN_VECTORS:,}); raise the budget or set faiss.factory"
        )
    nlist = ivf_lists(count)
    pairs = [(f"IVF{nlist},{codec}", rescoring) for codec, rescoring in rescoring_pairs(dimension, code)]
    for factory, rescoring in pairs:
        if not budget or size(factory, rescoring) <= budget:
            return factory, rescoring
    smallest, smallest_code = min(pairs, key=lambda pair: size(*pair))
    considered = ", ".join(f"{rescoring} ({index_store.rescoring_code_size(rescoring, dimension)} B/vector)" for rescoring in dict.fromkeys(r for _, r in pairs))
    raise MemoryBudgetError(
        f"memory_budget {budget:,} B is too small for {count:,} {dimension}-d vectors in {shards} shard(s): the smallest index considered, "
        f"{smallest} with {smallest_code} re-scoring codes, needs about {size(smallest, smallest_code):,} B ({size(smallest, smallest_code) / count:.0f} B/vector, "
        f"{rescoring_bytes(smallest, 1, dimension, smallest_code)} of them re-scoring data); re-scoring codes considered: {considered}; "
        f"raise the budget, or set faiss.factory"
    )


def ivf_list_count(factory: str, dimension: int) -> int:
    """nlist of a factory string's IVF part (0 for non-IVF indexes)."""
    import faiss

    found = faiss.try_extract_index_ivf(make_empty_index(factory, dimension))
    return int(found.nlist) if found is not None else 0


def make_empty_index(factory: str, dimension: int) -> faiss.Index:
    """An untrained index for inner-product search (vectors are normalized: inner product = cosine)."""
    import faiss

    index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    return index if faiss.try_extract_index_ivf(index) is not None else faiss.IndexIDMap2(index)


def seed_clustering(index: faiss.Index, seed: int) -> None:
    """Seed every k-means an IVF index runs in training (coarse quantizer, PQ codebooks), so rebuilds are reproducible.

    Checked explicitly, not with a blanket ``except``: if a faiss release moves these parameters,
    the build fails here rather than training unseeded and silently producing different indexes.
    """
    import faiss

    found = faiss.try_extract_index_ivf(index)
    if found is None:
        return  # flat and other untrained indexes run no clustering
    ivf = faiss.downcast_index(found)  # the IndexIVFPQ, not its IndexIVF base
    if not hasattr(ivf, "cp") or not hasattr(ivf.cp, "seed"):
        raise RuntimeError(f"{type(ivf).__name__}: faiss no longer exposes the clustering seed (cp.seed); index training would not be reproducible")
    ivf.cp.seed = seed
    if hasattr(ivf, "pq"):
        if not hasattr(ivf.pq, "cp") or not hasattr(ivf.pq.cp, "seed"):
            raise RuntimeError(f"{type(ivf).__name__}: faiss no longer exposes the PQ clustering seed (pq.cp.seed); index training would not be reproducible")
        ivf.pq.cp.seed = seed
    if hasattr(ivf, "do_polysemous_training"):
        # The factory turns it on for IVF-PQ, but search never uses polysemous codes; it only
        # reorders the PQ centroids and is most of the training time (10 s of 11 s for IVF128,PQ8).
        ivf.do_polysemous_training = False


def train_index(factory: str, vectors: np.ndarray, seed: int) -> bytes:
    """Train an empty index on a sample; returns it serialized."""
    index = make_empty_index(factory, vectors.shape[1])
    seed_clustering(index, seed)
    if not index.is_trained:
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return index_store.serialize_index(index)


def fill_shard(
    trained: bytes,
    sources: list[tuple[str, np.ndarray, np.ndarray]],
    first_position: int,
    count: int,
    dimension: int,
    folder: str,
    shard: int,
    root: str,
    rescoring: dict | None = None,
) -> dict:
    """Add one shard's vectors (read from embedding parts) to a copy of the trained index and write it.

    ``sources`` lists (part URL, rows in that part, positions of those rows). Writes the faiss file
    into the version ``folder``, the re-scoring vectors as float16 under the index ``root``'s
    ``vectors/`` (:func:`index_store.write_shard_vectors`: named by their content, so an unchanged
    shard references the file an earlier version wrote), or their sq8 / sq6 codes when ``rescoring``
    gives the trained quantizer (:func:`rescoring_quantizer`), then the stats file last; returns the stats.
    """
    vectors = np.zeros((count, dimension), dtype=np.float32)
    filled = np.zeros(count, dtype=bool)
    for part_url, rows, positions in sources:
        offsets = positions - first_position
        vectors[offsets] = read_vectors(part_url, rows)
        filled[offsets] = True
    if not filled.all():
        raise RuntimeError(f"shard {shard}: {int((~filled).sum())} positions have no stored vector")
    index = index_store.deserialize_index(trained)
    index.add_with_ids(vectors, np.arange(first_position, first_position + count, dtype=np.int64))
    name = index_store.shard_name(shard)
    index_bytes = index_store.serialize_index(index)
    stats = {
        "shard": shard,
        "file": f"{name}.faiss",
        "count": count,
        "first_position": first_position,
        "sha256": storage.write_bytes_atomically(storage.join_url(folder, f"{name}.faiss"), index_bytes),
        "bytes": len(index_bytes),
        **index_store.write_shard_vectors(root, vectors, rescoring),
    }
    storage.write_json_atomically(storage.join_url(folder, f"{name}.json"), stats)
    return stats


JOIN_PARTITION_ROWS = 262_144


def hash_join(
    left: pa.Table,
    right: pa.Table,
    keys: list[str],
    join_type: str,
    left_output: list[str],
    right_output: list[str] | None = None,
    partition_by: str | None = None,
) -> pa.Table:
    """An Acero hash join that outputs only the named columns (``Table.join`` also copies the key columns,
    strings of every row); rows come in no particular order.

    With ``partition_by`` (one of ``keys``, a string column), the rows are split by a hash of that column
    into parts of about JOIN_PARTITION_ROWS rows and joined part by part: equal keys meet in the same part,
    and the join's hash table, which holds several times the key bytes, is built for one part at a time.
    """
    from pyarrow import acero

    def join(left_part: pa.Table, right_part: pa.Table) -> pa.Table:
        options = acero.HashJoinNodeOptions(join_type, keys, keys, left_output=left_output, right_output=right_output or [])
        sources = [acero.Declaration("table_source", acero.TableSourceNodeOptions(table)) for table in (left_part, right_part)]
        return acero.Declaration("hashjoin", options, inputs=sources).to_table(use_threads=True)

    parts = max(1, math.ceil(max(left.num_rows, right.num_rows) / JOIN_PARTITION_ROWS)) if partition_by else 1
    if parts == 1:
        return join(left, right)
    from pipelines.embedding import string_prefix_hashes

    left_part, right_part = (string_prefix_hashes(table[partition_by]) % np.uint64(parts) for table in (left, right))
    return pa.concat_tables(
        [join(left.take(pa.array(np.flatnonzero(left_part == part))), right.take(pa.array(np.flatnonzero(right_part == part)))) for part in range(parts)]
    )


def part_codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A ``part`` column as (int32 part index per row, part URLs); the column is dictionary-encoded (or plain URLs)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    return column.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False), column.dictionary.to_pylist()


def locate_vectors(documents: pa.Table, stored: pa.Table) -> pa.Table:
    """For each document position, the embedding part and row holding its vector.

    ``documents`` has ``position`` (0..n-1, in any order), ``id``, ``text_hash``; ``stored`` is
    EmbeddingStore.keys() (``part`` dictionary-encoded, in (part, row) order): of several copies of a key
    the first is used. Returns ``position`` (0..n-1: row i is position i), ``part`` (dictionary-encoded
    URL) and ``row``: integers per document, the key strings are not copied. Raises if a document has no
    stored vector.
    """
    count = documents.num_rows
    codes, urls = part_codes(stored["part"])
    numbered = stored.select(["id", "text_hash"]).append_column("stored", pa.array(np.arange(stored.num_rows, dtype=np.int64)))
    joined = hash_join(documents.select(["id", "text_hash", "position"]), numbered, ["id", "text_hash"], "left outer", ["position"], ["stored"], "text_hash")
    del numbered
    positions = joined["position"].to_numpy()
    chosen = pc.fill_null(joined["stored"], -1).to_numpy()
    del joined
    if len(positions) > count:  # a key stored more than once (keys() leaves none): the first copy in (part, row) order
        order = np.lexsort((chosen, positions))
        positions, chosen = positions[order], chosen[order]
        first = np.ones(len(positions), dtype=bool)
        first[1:] = positions[1:] != positions[:-1]
        positions, chosen = positions[first], chosen[first]
    if len(positions) != count or (count and (positions.min() < 0 or positions.max() >= count)) or not np.bincount(positions, minlength=count).all():
        raise ValueError(f"document positions must be 0..{count - 1}, each once")
    located = np.empty(count, dtype=np.int64)
    located[positions] = chosen
    missing = np.flatnonzero(located < 0)
    if len(missing):
        where = pc.index(documents["position"], pa.scalar(int(missing[0]), pa.int64())).as_py()
        raise RuntimeError(f"{len(missing)} documents have no stored embedding (for example id {documents['id'][where].as_py()!r})")
    rows = stored["row"].to_numpy()
    return pa.table({
        "position": pa.array(np.arange(count, dtype=np.int64)),
        "part": pa.DictionaryArray.from_arrays(pa.array(codes[located]), pa.array(urls, pa.string())),
        "row": pa.array(rows[located]),
    })


def shard_ranges(count: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal position ranges [start, end) for each shard."""
    bounds = np.linspace(0, count, shards + 1).round().astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(shards)]


def sources_for_range(located: pa.Table, start: int, end: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Group the positions [start, end) by embedding part: (part URL, rows, positions), parts in index order."""
    piece = located.slice(start, end - start)
    return group_by_part(piece["part"], piece["row"].to_numpy(), piece["position"].to_numpy())


def group_by_part(part: pa.Array | pa.ChunkedArray, rows: np.ndarray, values: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(part URL, rows in it, the matching ``values``) per part present in ``part``, keeping the given order within a part."""
    codes, urls = part_codes(part)
    order = np.argsort(codes, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(order) else []
    return [(urls[int(codes[group[0]])], rows[group], values[group]) for group in groups]


FINGERPRINT_BLOCK_ROWS = 65_536


def version_fingerprint(documents: pa.Table, plan: IndexPlan, model_settings: dict) -> str:
    """A version id from what determines the index: the documents (id, text_hash, order), parameters, model.

    A rerun with the same inputs finds the same (possibly half-finished) version and resumes it. The
    documents are hashed in blocks of a fixed number of rows straight from the Arrow buffers (each value's
    byte length, then the values' bytes): no Python strings, memory bounded by a block, and the same id
    whatever the table's chunking. Ids from before this scheme (which hashed one joined string) differ:
    those versions stay readable, but a rebuild of the same inputs writes a new version beside them.
    """
    settings = dict(plan.__dict__)
    if settings.get("rescoring_code") == "float16":
        del settings["rescoring_code"]  # float16 is what every version held before the setting: their ids stay the same
    return documents_digest(json.dumps({"plan": settings, "model": model_settings}, sort_keys=True).encode(), documents)[:16]


def documents_digest(settings: bytes, documents: pa.Table) -> str:
    """sha256 (hex) of ``settings`` then the documents' ``id`` and ``text_hash`` columns, in order (:func:`digest_strings`):
    what names a version, and each content-addressed file shared by versions (BM25 shards, document store)."""
    digest = hashlib.sha256(settings)
    for column in ("id", "text_hash"):
        digest_strings(digest, documents[column], column, FINGERPRINT_BLOCK_ROWS)
        digest.update(b"\0")
    return digest.hexdigest()


def digest_strings(digest, values: pa.Array | pa.ChunkedArray, name: str = "values", block_rows: int = FINGERPRINT_BLOCK_ROWS) -> None:
    """Feed a string column to a hashlib digest: per block of ``block_rows`` rows, each value's byte length
    (int64), then the values' bytes, read from the Arrow buffers; the same bytes whatever the chunking."""
    for start in range(0, len(values), block_rows):
        block = values.slice(start, block_rows)
        block = block.combine_chunks() if isinstance(block, pa.ChunkedArray) else block
        if block.null_count:
            raise ValueError(f"{name}: null values cannot be hashed")
        block = block.cast(pa.large_string())
        offsets = np.frombuffer(block.buffers()[1], dtype=np.int64)[block.offset : block.offset + len(block) + 1]
        digest.update(np.diff(offsets).astype("<i8").tobytes())
        if offsets[-1] > offsets[0]:
            digest.update(memoryview(block.buffers()[2])[offsets[0] : offsets[-1]])


def sample_positions(count: int, sample: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if sample >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, size=sample, replace=False))


def training_sources(located: pa.Table, positions: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Where the vectors at ``positions`` are: (part URL, rows, indexes into ``positions``) per part."""
    chosen = located.take(pa.array(positions))
    return group_by_part(chosen["part"], chosen["row"].to_numpy(), np.arange(len(positions)))


def read_sources(sources: list[tuple[str, np.ndarray, np.ndarray]], count: int) -> np.ndarray:
    """``count`` vectors: those at (part, rows) go to the given output rows; each part is read once."""
    out: np.ndarray | None = None
    for part, rows, offsets in sources:
        vectors = read_vectors(part, rows)
        if out is None:
            out = np.zeros((count, vectors.shape[1]), dtype=np.float32)
        out[offsets] = vectors
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def read_training_vectors(located: pa.Table, positions: np.ndarray) -> np.ndarray:
    """The vectors at ``positions``, in that order (reads each part once)."""
    return read_sources(training_sources(located, positions), len(positions))


def train_on_sample(factory: str, sources: list[tuple[str, np.ndarray, np.ndarray]], count: int, seed: int) -> bytes:
    """Read a training sample (:func:`training_sources`) and train on it: in a Ray task, so the sample never reaches the driver."""
    return train_index(factory, read_sources(sources, count), seed)


def train_quantizer_on_sample(code: str, sources: list[tuple[str, np.ndarray, np.ndarray]], count: int) -> bytes:
    """The sq8 / sq6 re-scoring quantizer trained on the index's training sample (:func:`index_store.train_rescoring_quantizer`), in a Ray task."""
    return index_store.train_rescoring_quantizer(code, read_sources(sources, count))


def rescoring_quantizer(located: pa.Table, plan: IndexPlan, dimension: int, folder: str) -> dict | None:
    """The trained quantizer of the plan's sq8 / sq6 re-scoring codes as :func:`fill_shard` takes it (None for float16 or
    an exact index): read from the version folder's ``rescoring.faiss`` when a run wrote it, else trained on the index's
    training sample (the same seeded positions) and written there, before ``trained.faiss`` (so a resumed build that
    reuses the trained index finds it)."""
    import ray

    if plan.rescoring_code == "float16" or is_exact(plan.factory, dimension):
        return None
    url = storage.join_url(folder, index_store.RESCORING_QUANTIZER_FILE)
    if storage.exists(url):
        return quantizer_for_fill(plan.rescoring_code, storage.read_bytes(url))
    count = located.num_rows
    positions = sample_positions(count, plan.training_sample or count, plan.seed)
    print(f"training the {plan.rescoring_code} re-scoring quantizer on {len(positions)} vectors")
    data = ray.get(ray.remote(num_cpus=1)(train_quantizer_on_sample).remote(plan.rescoring_code, training_sources(located, positions), len(positions)))
    return write_rescoring_quantizer(folder, plan.rescoring_code, data)


def write_rescoring_quantizer(folder: str, code: str, data: bytes) -> dict:
    """Write a trained re-scoring quantizer (serialized) as the version folder's ``rescoring.faiss``; returns it as :func:`fill_shard` takes it."""
    storage.write_bytes_atomically(storage.join_url(folder, index_store.RESCORING_QUANTIZER_FILE), data)
    return quantizer_for_fill(code, data)


def quantizer_for_fill(code: str, data: bytes) -> dict:
    return {"code": code, "data": data, "file": index_store.RESCORING_QUANTIZER_FILE, "sha256": storage.sha256_bytes(data)}


def sources_for_positions(located: pa.Table) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return sources_for_range(located, 0, located.num_rows)


def build_shards(
    located: pa.Table,
    plan: IndexPlan,
    dimension: int,
    folder: str,
    root: str,
) -> list[dict]:
    """Train (or reuse ``trained.faiss``) and fill every shard not already complete; returns shard stats.

    ``folder`` is the version's folder, ``root`` the index root (shared re-scoring vectors: :func:`fill_shard`; with an
    sq8 / sq6 ``plan.rescoring_code``, their quantizer is trained first: :func:`rescoring_quantizer`).
    """
    import ray

    count = located.num_rows
    trained_url = storage.join_url(folder, "trained.faiss")
    rescoring = rescoring_quantizer(located, plan, dimension, folder)
    if storage.exists(trained_url):
        trained = storage.read_bytes(trained_url)
        print(f"reusing trained index {trained_url}")
    else:
        positions = sample_positions(count, plan.training_sample, plan.seed) if plan.training_sample else np.arange(0)
        print(f"training {plan.factory} on {len(positions)} vectors" if len(positions) else f"{plan.factory}: nothing to train")
        if len(positions):
            train = ray.remote(num_cpus=1)(train_on_sample).remote(plan.factory, training_sources(located, positions), len(positions), plan.seed)
        else:
            train = ray.remote(num_cpus=1)(train_index).remote(plan.factory, np.zeros((1, dimension), dtype=np.float32), plan.seed)
        trained = ray.get(train)
        storage.write_bytes_atomically(trained_url, trained)
    trained_reference = ray.put(trained)
    stats: dict[int, dict] = {}
    pending = {}
    fill = ray.remote(num_cpus=1)(fill_shard)
    for shard, (start, end) in enumerate(shard_ranges(count, plan.shards)):
        stats_url = storage.join_url(folder, f"{index_store.shard_name(shard)}.json")
        if storage.exists(stats_url):
            stats[shard] = storage.read_json(stats_url)
            continue
        sources = sources_for_range(located, start, end)
        pending[fill.remote(trained_reference, sources, start, end - start, dimension, folder, shard, root, rescoring)] = shard
    if stats:
        print(f"reusing {len(stats)} finished shard(s)")
    from tqdm import tqdm

    with tqdm(total=len(pending), desc="filling shards", disable=not pending) as progress:
        remaining = list(pending)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            result = ray.get(done[0])
            stats[result["shard"]] = result
            progress.update(1)
    return [stats[shard] for shard in range(plan.shards)]
