"""Tokenized model batches whose results do not depend on the other texts in the batch.

Transformer kernels (OpenVINO's int8 CPU kernels and torch's alike) process the sequence in blocks,
and the padded length of a batch decides the blocking: measured on the int8 MiniLM, a SciFact query
of 15 tokens embeds to the same vector padded to 15 or 16 tokens, but differs by up to 0.005 padded
to 18 or more. Padding every batch to its longest text (as ``encode``/``predict`` do) therefore
makes a text's vector depend on its batch neighbours, and a resumed job, which batches differently,
ranks near-ties differently. Here each text is padded to a length bucket chosen from its own
length (the next multiple of 16 tokens), and a batch holds texts of one bucket only, so each
text's result is a function of the text alone (the batch size, measured, does not change it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import chain

import numpy as np

LENGTH_BUCKET = 16


def padded_length(length: int, max_length: int, bucket: int = LENGTH_BUCKET) -> int:
    """The length a sequence of ``length`` tokens is padded to: the next multiple of ``bucket``, at most ``max_length``."""
    return max(length, min(-(-length // bucket) * bucket, max_length))


def tokenize_unpadded(tokenizer, items: Sequence, max_length: int) -> dict[str, list[list[int]]]:
    """Token ids (and mask, token types) of texts, or of (query, document) pairs truncated longest-first, unpadded."""
    if len(items) and isinstance(items[0], (tuple, list)):
        return tokenizer([item[0] for item in items], [item[1] for item in items], truncation="longest_first", max_length=max_length, padding=False)
    return tokenizer(list(items), truncation=True, max_length=max_length, padding=False)


def bucketed_batches(encodings, batch_size: int, max_length: int, pad_token_id: int, input_names: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``(rows, features)`` per batch: the row indices into ``encodings`` and int64 arrays padded to the rows' bucket.

    Longest buckets first (like sentence-transformers' length sorting); rows keep their order within a bucket.
    Padding is vectorized (one flat copy per feature and batch), so it costs little beside the tokenizer.
    """
    ids = encodings["input_ids"]
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    targets = np.maximum(lengths, np.minimum(-(-lengths // LENGTH_BUCKET) * LENGTH_BUCKET, np.maximum(max_length, lengths)))
    order = np.lexsort((np.arange(len(ids)), -targets))
    ordered_targets = targets[order]
    bucket_starts = np.flatnonzero(np.r_[True, ordered_targets[1:] != ordered_targets[:-1]])
    bucket_ends = np.r_[bucket_starts[1:], len(order)]
    for bucket_start, bucket_end in zip(bucket_starts.tolist(), bucket_ends.tolist()):
        target = int(ordered_targets[bucket_start])
        for start in range(bucket_start, bucket_end, batch_size):
            rows = order[start : min(start + batch_size, bucket_end)]
            row_lengths = lengths[rows]
            filled = np.arange(target) < row_lengths[:, None]
            features = {}
            for name in input_names:
                array = np.full((len(rows), target), pad_token_id if name == "input_ids" else 0, dtype=np.int64)
                if name in encodings:
                    column = encodings[name]
                    array[filled] = np.fromiter(chain.from_iterable(column[row] for row in rows), dtype=np.int64, count=int(row_lengths.sum()))
                features[name] = array
            yield rows, features


def run_bucketed(
    tokenizer, items: Sequence, max_length: int, batch_size: int, run: Callable[[dict[str, np.ndarray]], np.ndarray], input_names: Sequence[str] = ()
) -> np.ndarray:
    """``run``'s outputs for ``items`` (texts or (query, document) pairs), in the items' order.

    Tokenizes once, then calls ``run(features)`` per bucketed batch (int64 arrays named like the
    tokenizer's outputs, or ``input_names``); every path that runs a model on text (torch and OpenVINO, bi- and
    cross-encoder) goes through here, so none tokenizes twice.
    """
    encodings = tokenize_unpadded(tokenizer, items, max_length)
    names = list(input_names or encodings.keys())
    outputs: np.ndarray | None = None
    for rows, features in bucketed_batches(encodings, batch_size, max_length, tokenizer.pad_token_id, names):
        result = np.asarray(run(features), dtype=np.float32)
        if outputs is None:
            outputs = np.zeros((len(items), *result.shape[1:]), dtype=np.float32)
        outputs[rows] = result
    return outputs if outputs is not None else np.zeros((0,), dtype=np.float32)
