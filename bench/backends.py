"""Exported transformer backends for CPU inference: ONNX Runtime and OpenVINO, fp32 and int8.

sentence-transformers' own ``backend="onnx"`` / ``backend="openvino"`` (and its quantization helpers
``export_dynamic_quantized_onnx_model`` / ``export_static_quantized_openvino_model``) go through
Optimum, and no release of it installs next to transformers 5.24 and torch 2.13: optimum-onnx 0.1.0
(``sentence-transformers[onnx]``) requires transformers < 4.58; optimum-intel 2.2.0
(``sentence-transformers[openvino]``) requires transformers < 5.6 and would replace torch. This module
does the same steps with the runtimes directly (packages ``onnx``, ``onnxruntime``, ``openvino``,
``nncf``, none of which touches torch or transformers):

1. export the model's transformer with ``torch.onnx.export`` (TorchScript exporter) with eager
   attention, so that ONNX Runtime's BERT optimizer can fuse attention, bias-GELU and layer norms;
   a bi-encoder's mean pooling and normalization are part of the graph;
2. fp32 ONNX Runtime runs the fused graph; int8 ONNX Runtime is its dynamic quantization (int8
   weights per output channel, activations quantized per batch), as Optimum's ``avx512_vnni`` config;
3. OpenVINO reads the plain ONNX graph; its int8 model is static post-training quantization with NNCF
   (``ModelType.TRANSFORMER``: SmoothQuant, fast bias correction) calibrated on texts the caller
   passes (a sample of the corpus: production would calibrate on its own documents).

Inputs are tokenized with the model's own tokenizer and batched like ``SentenceTransformer.encode``:
sorted by character length (longest first), padded per batch, truncated to ``max_length``.
Everything exported is cached under ``~/.cache/retrieval-pipelines/models/`` in a folder named by
a digest of the source weights, the export settings and the runtime versions; each file appears
whole (written under a temporary name, then renamed).

Example:
    >>> paths = prepare(source, "bi-encoder", ["onnx-int8"])                            # doctest: +SKIP
    >>> encoder = ExportedBiEncoder(source, paths["onnx-int8"], "onnx-int8", threads=2)  # doctest: +SKIP
    >>> encoder.encode(["a short text"]).shape                                       # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import CACHE, file_digest

EXPORT_VERSION = 1
MODELS = CACHE / "models"
KINDS = ("bi-encoder", "cross-encoder")
BACKENDS = ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8")
FILES = {
    "onnx": "model.onnx",
    "onnx-fp32": "model_fused.onnx",
    "onnx-int8": "model_fused_qint8.onnx",
    "openvino-fp32": "model.onnx",
    "openvino-int8": "openvino_qint8_{calibration}.xml",
}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _versions() -> dict[str, str | None]:
    versions = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def export_folder(source: str | Path, kind: str) -> Path:
    """The cache folder for ``source``'s exports (named by its weights, the export code and runtime versions)."""
    source = Path(source)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")
    weights = [source / name for name in ("model.safetensors", "pytorch_model.bin") if (source / name).exists()][:1]
    if not weights:
        raise FileNotFoundError(f"{source}: no model.safetensors or pytorch_model.bin")
    extra = {"kind": kind, "version": EXPORT_VERSION, "versions": _versions()}
    digest = file_digest(weights[0], source / "config.json", extra=extra)
    slug = source.name if source.name not in ("model", "") else source.parent.name
    return MODELS / f"{slug}-{kind}-{digest}"


def items_digest(items: Sequence, **settings) -> str:
    """sha256 (16 hex digits) of JSON-able items and settings: names a calibrated artifact."""
    import hashlib

    return hashlib.sha256(json.dumps([list(items), settings], sort_keys=True).encode()).hexdigest()[:16]


def _publish(temporary: Path, final: Path) -> None:
    """Move a finished file into place (atomic rename on the same disk)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temporary, final)


def _pooling_mode(source: Path) -> tuple[str, bool]:
    """(pooling mode, normalize) of a sentence-transformers folder; only mean/cls pooling is exported."""
    modules = json.loads((source / "modules.json").read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = json.loads((source / module["path"] / "config.json").read_text())
            modes = [name for name, on in config.items() if name.startswith("pooling_mode_") and on is True]
            pooling = config.get("pooling_mode") or (modes[0].removeprefix("pooling_mode_").removesuffix("_tokens") if modes else "mean")
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer",):
            raise ValueError(f"{source}: module {kind} is not supported by the exported backends")
    if pooling not in ("mean", "cls"):
        raise ValueError(f"{source}: pooling {pooling!r} is not supported by the exported backends (mean or cls)")
    return pooling, normalize


def export_onnx(source: str | Path, kind: str, folder: Path) -> Path:
    """fp32 ONNX graph of the transformer (plus pooling/normalize for a bi-encoder): ``model.onnx``."""
    final = folder / FILES["onnx"]
    if final.exists():
        return final
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    source = Path(source)
    if kind == "bi-encoder":
        pooling, normalize = _pooling_mode(source)
        backbone = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
                if pooling == "cls":
                    vectors = hidden[:, 0]
                else:
                    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                    vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(vectors, p=2, dim=1) if normalize else vectors

        module, output = Encoder().eval(), "sentence_embedding"
    else:
        classifier = AutoModelForSequenceClassification.from_pretrained(str(source), attn_implementation="eager").eval()

        class Scorer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.classifier = classifier

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.classifier(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

        module, output = Scorer().eval(), "logits"
    example = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {output: {0: "batch"}}
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{final.name}.tmp-{uuid.uuid4().hex}"
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example, mask, torch.zeros_like(example)), str(temporary), input_names=list(INPUT_NAMES),
                          output_names=[output], dynamic_axes=dynamic, opset_version=17, dynamo=False)
    _publish(temporary, final)
    (folder / "source.json").write_text(json.dumps({"source": str(source), "kind": kind, "versions": _versions()}, indent=2))
    return final


def fuse_onnx(source: str | Path, kind: str, folder: Path) -> Path:
    """ONNX Runtime's BERT fusions (attention, bias-GELU, skip layer norm) of ``model.onnx``: ``model_fused.onnx``."""
    final = folder / FILES["onnx-fp32"]
    if final.exists():
        return final
    from onnxruntime.transformers import optimizer

    plain = export_onnx(source, kind, folder)
    config = json.loads((Path(source) / "config.json").read_text())
    model = optimizer.optimize_model(str(plain), model_type="bert", num_heads=config["num_attention_heads"], hidden_size=config["hidden_size"], opt_level=1)
    temporary = folder / f"{final.name}.tmp-{uuid.uuid4().hex}"
    model.save_model_to_file(str(temporary))
    _publish(temporary, final)
    return final


def quantize_onnx(source: str | Path, kind: str, folder: Path) -> Path:
    """Dynamic int8 quantization of the fused graph (weights int8 per channel): ``model_fused_qint8.onnx``."""
    final = folder / FILES["onnx-int8"]
    if final.exists():
        return final
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused = fuse_onnx(source, kind, folder)
    temporary = folder / f"{final.name}.tmp-{uuid.uuid4().hex}.onnx"
    quantize_dynamic(str(fused), str(temporary), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    _publish(temporary, final)
    return final


def quantize_openvino(source: str | Path, kind: str, folder: Path, calibration: Sequence, max_length: int) -> Path:
    """Static int8 OpenVINO model (NNCF post-training quantization on ``calibration``): ``openvino_qint8_<digest>.xml``."""
    if not calibration:
        raise ValueError("OpenVINO int8 needs calibration texts (or (query, document) pairs)")
    final = folder / FILES["openvino-int8"].format(calibration=items_digest(calibration, max_length=max_length))
    if final.exists():
        return final
    import nncf
    import openvino as ov

    plain = export_onnx(source, kind, folder)
    tokenizer = load_tokenizer(source, max_length)
    items = [tokenize(tokenizer, [item]) for item in calibration]
    quantized = nncf.quantize(ov.Core().read_model(str(plain)), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        xml = Path(scratch) / final.name
        ov.save_model(quantized, str(xml))
        _publish(xml.with_suffix(".bin"), final.with_suffix(".bin"))
        _publish(xml, final)
    return final


def prepare(source: str | Path, kind: str, backends: Sequence[str], calibration: Sequence | None = None, max_length: int = 256) -> dict[str, Path]:
    """Export (or find cached) the model file of every backend in ``backends``: {backend: path}."""
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}: use {BACKENDS}")
    folder = export_folder(source, kind)
    paths = {}
    for backend in backends:
        if backend == "onnx-fp32":
            paths[backend] = fuse_onnx(source, kind, folder)
        elif backend == "onnx-int8":
            paths[backend] = quantize_onnx(source, kind, folder)
        elif backend == "openvino-fp32":
            paths[backend] = export_onnx(source, kind, folder)
        elif backend == "openvino-int8":
            paths[backend] = quantize_openvino(source, kind, folder, calibration or [], max_length)
    return paths


# --------------------------------------------------------------------------- inference


def load_tokenizer(source: str | Path, max_length: int):
    """The model's fast tokenizer (``tokenizers``, no torch), truncating to ``max_length``, padding to the batch's longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(source) / "tokenizer.json"))
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    tokenizer.enable_padding(pad_id=padding.get("pad_id", 0), pad_type_id=padding.get("pad_type_id", 0), pad_token=padding.get("pad_token", "[PAD]"))
    return tokenizer


def tokenize(tokenizer, items: Sequence) -> dict[str, np.ndarray]:
    """Texts, or (query, document) pairs (truncated longest-first), as int64 model inputs."""
    encodings = tokenizer.encode_batch([tuple(item) if isinstance(item, (tuple, list)) else item for item in items])
    return {
        "input_ids": np.array([encoding.ids for encoding in encodings], dtype=np.int64),
        "attention_mask": np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64),
        "token_type_ids": np.array([encoding.type_ids for encoding in encodings], dtype=np.int64),
    }


class OnnxRuntimeModel:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (not spinning when OMP_WAIT_POLICY=PASSIVE)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # same idle-thread policy as torch and faiss
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [item.name for item in self.session.get_inputs()]

    def __call__(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: features[name] for name in self.inputs})[0]


class OpenVinoModel:
    """An OpenVINO model compiled for the CPU: ``threads`` threads, latency mode, fp32 for what is not int8.

    Threads are not pinned to cores (OpenVINO pins by default on Linux; torch and ONNX Runtime do
    not): on a shared machine a pinned thread waits for its busy core, which made OpenVINO 2-4x
    slower in wall time here, at the same CPU time.
    """

    def __init__(self, path: Path, threads: int):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False,
        })
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]

    def __call__(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.compiled({name: features[name] for name in self.inputs})[0]


def load_runtime(path: str | Path, threads: int, runtime: str):
    """``runtime`` ``onnxruntime`` or ``openvino`` on a model file (OpenVINO also reads ``.onnx``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not exported; call bench.backends.prepare first")
    if runtime not in ("onnxruntime", "openvino"):
        raise ValueError(f"unknown runtime {runtime!r}: use onnxruntime or openvino")
    return OnnxRuntimeModel(path, threads) if runtime == "onnxruntime" else OpenVinoModel(path, threads)


def runtime_of(backend: str) -> str:
    return "onnxruntime" if backend.startswith("onnx") else "openvino"


class ExportedBiEncoder:
    """``encode(texts)`` like ``SentenceTransformer.encode`` (length-sorted batches) on an exported model."""

    def __init__(self, source: str | Path, path: str | Path, backend: str, threads: int, max_length: int = 256, batch_size: int = 32):
        self.model = load_runtime(path, threads, runtime_of(backend))
        self.tokenizer = load_tokenizer(source, max_length)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        order = np.argsort([-len(text) for text in texts], kind="stable")
        vectors: np.ndarray | None = None
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            output = self.model(tokenize(self.tokenizer, [texts[row] for row in rows]))
            if vectors is None:
                vectors = np.zeros((len(texts), output.shape[1]), dtype=np.float32)
            vectors[rows] = output
        return vectors if vectors is not None else np.zeros((0, 0), dtype=np.float32)


class ExportedCrossEncoder:
    """``score(pairs)``: raw logits of (query, document) pairs, batched like ``CrossEncoder.predict``."""

    def __init__(self, source: str | Path, path: str | Path, backend: str, threads: int, max_length: int = 256, batch_size: int = 32):
        self.model = load_runtime(path, threads, runtime_of(backend))
        self.tokenizer = load_tokenizer(source, max_length)
        self.batch_size = batch_size

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        order = np.argsort([-(len(query) + len(document)) for query, document in pairs], kind="stable")
        scores = np.zeros(len(pairs), dtype=np.float32)
        for start in range(0, len(pairs), self.batch_size):
            rows = order[start : start + self.batch_size]
            scores[rows] = self.model(tokenize(self.tokenizer, [pairs[row] for row in rows])).reshape(len(rows), -1)[:, 0]
        return scores


def remove_exports(folder: Path) -> None:
    """Delete one cached export folder (to force a fresh export)."""
    shutil.rmtree(folder, ignore_errors=True)
