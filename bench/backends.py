"""The backends the benchmarks compare: the pipeline's OpenVINO int8 models, OpenVINO fp32, ONNX Runtime.

OpenVINO int8 is what the pipeline runs on CPU, and the benchmarks run it through the pipeline's own
code (:mod:`pipelines.quantization`): :func:`prepare` quantizes the loaded model with
``quantize_model`` into an ``openvino_int8/`` folder (the layout ``jobs.train_reranker`` writes next
to a reranker), and the variants load it with ``QuantizedTextEncoder`` / ``QuantizedPairScorer``.

This module adds only the baselines the pipeline does not have:

- ``openvino-fp32``: the same ONNX export without the NNCF step, saved as a ``pipelines.quantization``
  folder (``precision: fp32`` in ``quantization.json``), so it runs through the same inference class;
- ``onnx-fp32``: ONNX Runtime on that export after its BERT fusions (attention, bias-GELU, skip
  layer norm); ``onnx-int8``: ONNX Runtime's dynamic quantization of the fused graph (int8 weights
  per output channel, activations quantized per batch), as Optimum's ``avx512_vnni`` configuration.
  A rejected alternative: its vectors depend on the batch a document lands in.

sentence-transformers' own ``backend="onnx"`` / ``"openvino"`` go through Optimum, which does not
install next to transformers 5 (optimum-onnx 0.1.0 needs transformers < 4.58; optimum-intel 2.2.0
needs transformers < 5.6 and would replace torch).

Every backend tokenizes and batches like ``pipelines.quantization.QuantizedModel`` (the ONNX Runtime
classes replace only its compiled model): length-sorted, padded per batch, truncated to the
max length. Exports are cached under ``~/.cache/retrieval-pipelines/models/`` in a folder named by a
digest of the weights, the export settings and the runtime versions; an int8 folder is redone when
its calibration, max length or runtime versions differ from what is asked.

Example:
    >>> paths, _ = prepare(load_model, source, "bi-encoder", ["onnx-int8"], max_length=256)   # doctest: +SKIP
    >>> load_backend("onnx-int8", "bi-encoder", paths["onnx-int8"], threads=2).encode(["a text"]).shape  # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import CACHE, file_digest
from pipelines import quantization, storage
from pipelines.reranking import INT8_FOLDER

EXPORT_VERSION = 2
MODELS = CACHE / "models"
BACKENDS = ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-fp32": "model_fused.onnx", "onnx-int8": "model_fused_qint8.onnx"}
OPENVINO_FILES = (quantization.MODEL_FILE, quantization.MODEL_FILE.replace(".xml", ".bin"))


def _versions() -> dict[str, str | None]:
    versions = quantization.runtime_versions()
    for package in ("onnx", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def export_folder(source: str | Path, kind: str, max_length: int) -> Path:
    """The cache folder for ``source``'s fp32 exports (named by its weights, the export code and runtime versions)."""
    source = Path(source)
    if kind not in quantization.KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {quantization.KINDS}")
    weights = [source / name for name in ("model.safetensors", "pytorch_model.bin") if (source / name).exists()][:1]
    if not weights:
        raise FileNotFoundError(f"{source}: no model.safetensors or pytorch_model.bin")
    digest = file_digest(weights[0], source / "config.json", extra={"kind": kind, "max_length": max_length, "version": EXPORT_VERSION, "versions": _versions()})
    slug = source.name if source.name not in ("model", "") else source.parent.name
    return MODELS / f"{slug}-{kind}-{digest}"


def backend_digest(path: str | Path, max_length: int) -> str:
    """A key for what a backend computes: its model file (ONNX) or its OpenVINO model files (folder)."""
    path = Path(path)
    files = [path / name for name in OPENVINO_FILES] if path.is_dir() else [path]
    return file_digest(*files, extra={"max_length": max_length})


# --------------------------------------------------------------------------- exports


def export_fp32(model, kind: str, source: str | Path, folder: Path, max_length: int) -> Path:
    """``model.onnx`` plus the same graph as an fp32 OpenVINO model, tokenizer and ``quantization.json``: a
    ``pipelines.quantization`` folder that ``QuantizedTextEncoder`` / ``QuantizedPairScorer`` load as they
    load an int8 one (the export is ``quantize_model``'s, without the NNCF step)."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    input_names = quantization.model_input_names(model.tokenizer)
    with tempfile.TemporaryDirectory(prefix="export-", dir=folder) as scratch:
        onnx_path = os.path.join(scratch, ONNX_FILES["onnx"])
        quantization.export_onnx(model, kind, input_names, onnx_path)
        fp32 = ov.Core().read_model(onnx_path)
        ov.save_model(fp32, os.path.join(scratch, quantization.MODEL_FILE), compress_to_fp16=False)
        model.tokenizer.save_pretrained(scratch)
        sample = quantization.tokenize(model.tokenizer, [("a", "b") if kind == "cross-encoder" else "a"], max_length, input_names)
        dimension = int(ov.Core().compile_model(fp32, "CPU")(sample)[0].shape[-1])
        files = sorted(name for name in os.listdir(scratch) if os.path.isfile(os.path.join(scratch, name)))
        for name in files:
            os.replace(os.path.join(scratch, name), folder / name)
    settings = {"format": quantization.FORMAT, "kind": kind, "source": str(source), "precision": "fp32", "max_length": max_length,
                "input_names": input_names, "dimension": dimension, "files": [name for name in files if name != ONNX_FILES["onnx"]], "versions": _versions()}
    storage.write_json_atomically(str(folder / quantization.QUANTIZATION_FILE), settings)  # last: the folder is complete
    return folder


def _publish_onnx(final: Path, make: Callable[[str], None]) -> Path:
    """``final``, written once by ``make(temporary path)`` and renamed into place."""
    if not final.exists():
        temporary = final.with_name(f"{final.stem}.tmp-{os.getpid()}.onnx")
        make(str(temporary))
        os.replace(temporary, final)
    return final


def fuse_onnx(folder: Path) -> Path:
    """ONNX Runtime's BERT fusions of ``model.onnx``: ``model_fused.onnx``."""

    def make(temporary: str) -> None:
        from onnxruntime.transformers import optimizer

        config = json.loads(Path(quantization.read_settings(str(folder))["source"], "config.json").read_text())
        optimized = optimizer.optimize_model(str(folder / ONNX_FILES["onnx"]), model_type="bert", num_heads=config["num_attention_heads"],
                                             hidden_size=config["hidden_size"], opt_level=1)
        optimized.save_model_to_file(temporary)

    return _publish_onnx(folder / ONNX_FILES["onnx-fp32"], make)


def quantize_onnx(folder: Path) -> Path:
    """ONNX Runtime dynamic int8 quantization of the fused graph (weights int8 per channel): ``model_fused_qint8.onnx``."""
    fused = fuse_onnx(folder)

    def make(temporary: str) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fused), temporary, weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    return _publish_onnx(folder / ONNX_FILES["onnx-int8"], make)


def quantize_int8(model, kind: str, source: str | Path, folder: Path, calibration: Sequence, max_length: int) -> Path:
    """The pipeline's int8 model (``pipelines.quantization.quantize_model``) in ``folder``, redone when its calibration
    items, max length or runtime versions are not the ones asked for."""
    if quantization.is_complete(str(folder)):
        settings = quantization.read_settings(str(folder))
        wanted = (quantization.calibration_digest(calibration), max_length, quantization.runtime_versions())
        if (settings["calibration_digest"], settings["max_length"], settings["versions"]) == wanted:
            return folder
    shutil.rmtree(folder, ignore_errors=True)
    quantization.quantize_model(model, kind, calibration, max_length, str(folder), str(source))
    return folder


def prepare(load_model: Callable[[], object], source: str | Path, kind: str, backends: Sequence[str], calibration: Sequence = (),
            max_length: int = 256, int8_folder: str | Path | None = None) -> tuple[dict[str, Path], float]:
    """Export (or find cached) every backend in ``backends``: ({backend: ONNX file, or model folder for OpenVINO}, seconds).

    ``load_model()`` gives the SentenceTransformer / CrossEncoder (called only when something is
    missing); ``openvino-int8`` is quantized on ``calibration`` into ``int8_folder`` (default:
    ``openvino_int8/`` in the export folder).
    """
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}: use {BACKENDS}")
    if not backends:
        return {}, 0.0
    started = time.perf_counter()
    folder = export_folder(source, kind, max_length)
    model = functools.cache(load_model)  # loaded once, and only if something must be made
    paths: dict[str, Path] = {}
    for backend in backends:
        if backend == "openvino-int8":
            paths[backend] = quantize_int8(model(), kind, source, Path(int8_folder or folder / INT8_FOLDER), calibration, max_length)
            continue
        if not quantization.is_complete(str(folder)):
            export_fp32(model(), kind, source, folder, max_length)
        if backend == "openvino-fp32":
            paths[backend] = folder
        else:
            paths[backend] = fuse_onnx(folder) if backend == "onnx-fp32" else quantize_onnx(folder)
    seconds = time.perf_counter() - started
    print(f"exports ready in {seconds:.1f} s: {sorted(str(path) for path in paths.values())}", flush=True)
    return paths, seconds


# --------------------------------------------------------------------------- inference


class OnnxRuntimeSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (not spinning when OMP_WAIT_POLICY=PASSIVE),
    called like a compiled OpenVINO model: ``session(features)[0]``."""

    def __init__(self, path: str | Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # same idle-thread policy as torch and faiss
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [item.name for item in self.session.get_inputs()]

    def __call__(self, features: dict):
        return self.session.run(None, {name: features[name] for name in self.inputs})


class _OnnxRuntimeModel:
    """A ``pipelines.quantization`` model class with ONNX Runtime in place of its compiled OpenVINO model:
    the same tokenizer, batching and outputs. ``path``: an ONNX file of an :func:`export_fp32` folder."""

    def __init__(self, path: str | Path, threads: int = 0, batch_size: int = 32, max_length: int = 0):
        from transformers import AutoTokenizer

        folder = Path(path).parent
        self.settings = quantization.read_settings(str(folder))
        self.compiled = OnnxRuntimeSession(path, threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.input_names = self.settings["input_names"]
        self.batch_size = batch_size
        self.max_length = max_length or int(self.settings["max_length"])


class OnnxTextEncoder(_OnnxRuntimeModel, quantization.QuantizedTextEncoder):
    """``encode(texts)`` on ONNX Runtime."""


class OnnxPairScorer(_OnnxRuntimeModel, quantization.QuantizedPairScorer):
    """``score(pairs)`` (raw logits) on ONNX Runtime."""


def load_backend(backend: str, kind: str, path: str | Path, threads: int = 0, batch_size: int = 32, max_length: int = 0):
    """The model of a :func:`prepare`d ``backend``: ``encode(texts)`` for a bi-encoder, ``score(pairs)`` for a cross-encoder."""
    onnx_class, openvino_class = {
        "bi-encoder": (OnnxTextEncoder, quantization.QuantizedTextEncoder),
        "cross-encoder": (OnnxPairScorer, quantization.QuantizedPairScorer),
    }[kind]
    model_class = onnx_class if backend.startswith("onnx") else openvino_class
    return model_class(str(path), threads, batch_size, max_length)
