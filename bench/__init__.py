"""Benchmarks of the pipeline stages against what a user would write by hand.

Each benchmark is a module run from the repository root and prints a table and writes JSON
(``bench/results/<name>.json`` by default, git-ignored)::

    python -m bench.embed   [--quick]   bi-encoder docs/s, memory and SciFact nDCG@10 per backend
    python -m bench.index   [--quick]   flat vs IVF-PQ (+ exact re-scoring) on 1M synthetic vectors
    python -m bench.rerank  [--quick]   cross-encoder pairs/s per backend
    python -m bench.sparse  [--quick]   BM25 vs dense Flat vs hybrid on SciFact
    python -m bench.scale               the jobs end to end on N synthetic documents (tiny models): time,
                                        memory, spill, bytes per stage, scaling exponents; --vectors: index only
    bench/gpu.sh [--dry-run]            the GPU check: bench.embed / bench.rerank at fp16, bench.scale with MiniLM

:mod:`bench.common` holds the measurement plumbing (one process per variant, CPU time and memory
of its process tree, interleaved rounds, tables, JSON); :mod:`bench.backends` the backends
compared: the pipeline's OpenVINO int8 models (:mod:`pipelines.quantization`) and the OpenVINO fp32
and ONNX Runtime baselines; :mod:`bench.tiny_models` the tiny random-weight models of bench.scale and the tests.
See bench/README.md for what each benchmark measures and how to read it.
"""
