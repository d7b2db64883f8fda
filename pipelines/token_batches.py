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

from collections.abc import Iterator, Sequence

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
    """
    ids = encodings["input_ids"]
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    targets = np.fromiter((padded_length(int(n), max(max_length, int(n))) for n in lengths), dtype=np.int64, count=len(ids))
    order = np.lexsort((np.arange(len(ids)), -targets))
    start = 0
    while start < len(order):
        target = targets[order[start]]
        end = start
        while end < len(order) and end - start < batch_size and targets[order[end]] == target:
            end += 1
        rows = order[start:end]
        features = {}
        for name in input_names:
            fill = pad_token_id if name == "input_ids" else 0
            array = np.full((len(rows), target), fill, dtype=np.int64)
            for out_row, row in enumerate(rows):
                values = encodings[name][row] if name in encodings else [0] * lengths[row]
                array[out_row, : lengths[row]] = values
            features[name] = array
        yield rows, features
        start = end
