"""Int8 CPU inference: OpenVINO models statically quantized with NNCF, calibrated on in-domain text.

Measured by ``bench/`` on a 2-core AMD EPYC (AVX-512 VNNI and BF16, no AMX), in one run each:
OpenVINO int8 embeds 5.2x the docs/s of plain ``SentenceTransformer.encode`` (torch bf16 autocast
2.4x) with SciFact nDCG@10 +0.0025, and scores 5.5x the pairs/s of ``CrossEncoder.predict`` (bf16
2.0x). sentence-transformers' own ``backend="openvino"`` goes through optimum-intel, which does not
install beside transformers 5, so this module does the same steps with ``openvino`` and ``nncf``:

1. export the loaded sentence-transformers model (all its modules: transformer, pooling,
   normalization, or a cross-encoder's head) to ONNX with ``torch.onnx.export``;
2. read it with OpenVINO and quantize it with NNCF post-training quantization
   (``ModelType.TRANSFORMER``) on calibration items: a seeded sample of the corpus for a
   bi-encoder, (query, candidate) pairs for a cross-encoder;
3. save ``openvino_model.xml``/``.bin`` and the tokenizer into a folder (any fsspec URL), with
   ``quantization.json`` written last: a folder without it is unfinished and is redone.

Inference tokenizes with the model's own fast tokenizer and batches by length bucket
(:mod:`pipelines.token_batches`), so that a text's result does not depend on its batch neighbours.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import storage

FORMAT = 1
QUANTIZATION_FILE = "quantization.json"
MODEL_FILE = "openvino_model.xml"
KINDS = ("bi-encoder", "cross-encoder")
OUTPUTS = {"bi-encoder": "sentence_embedding", "cross-encoder": "scores"}


def int8_available() -> bool:
    """True where the OpenVINO runtime and NNCF are installed (both are dependencies of the package)."""
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


def runtime_versions() -> dict[str, str | None]:
    versions = {}
    for package in ("torch", "transformers", "sentence-transformers", "openvino", "nncf"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def calibration_digest(items: Sequence) -> str:
    """sha256 (16 hex digits) of the calibration items: names what a quantized model was calibrated on."""
    return hashlib.sha256(json.dumps([list(item) if isinstance(item, (tuple, list)) else item for item in items]).encode()).hexdigest()[:16]


def is_complete(url: str) -> bool:
    return storage.exists(storage.join_url(url, QUANTIZATION_FILE))


def read_settings(url: str) -> dict[str, Any]:
    """``quantization.json`` of a finished quantized model folder."""
    settings_url = storage.join_url(url, QUANTIZATION_FILE)
    if not storage.exists(settings_url):
        raise FileNotFoundError(f"{url}: not a finished quantized model (no {QUANTIZATION_FILE})")
    return storage.read_json(settings_url)


def model_input_names(tokenizer) -> list[str]:
    """The inputs the exported graph takes: input ids, attention mask, and token types where the model uses them."""
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in tokenizer.model_input_names]
    return names if "input_ids" in names and "attention_mask" in names else ["input_ids", "attention_mask"]


def export_onnx(model, kind: str, input_names: list[str], path: str) -> None:
    """``model`` (a SentenceTransformer or CrossEncoder on CPU) as an ONNX graph with dynamic batch and length."""
    import warnings

    import torch

    output = OUTPUTS[kind]

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *tensors):
            return self.inner(dict(zip(input_names, tensors)))[output]

    for module in model.modules():  # the eager attention path exports to plain matrix products everywhere
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            try:
                module.set_attn_implementation("eager")
            except (ValueError, AttributeError, NotImplementedError):
                pass
    example = {name: torch.ones(2, 8, dtype=torch.long) for name in input_names}
    example["attention_mask"][1, 5:] = 0
    if "token_type_ids" in example:
        example["token_type_ids"].zero_()
    dynamic = {name: {0: "batch", 1: "sequence"} for name in input_names} | {output: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Exported().eval(), tuple(example[name] for name in input_names), path, input_names=input_names,
                          output_names=[output], dynamic_axes=dynamic, opset_version=17, dynamo=False)


def quantize_model(model, kind: str, calibration: Sequence, max_length: int, destination_url: str, source: str) -> dict[str, Any]:
    """Export ``model`` to OpenVINO, quantize it to int8 on ``calibration`` and write it to ``destination_url``.

    ``calibration`` is a list of texts (bi-encoder) or (query, document) pairs (cross-encoder).
    Returns the settings also written as ``quantization.json`` (last).
    """
    import nncf
    import openvino as ov

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {KINDS}")
    if not calibration:
        raise ValueError("int8 quantization needs calibration items (texts or (query, document) pairs)")
    model = model.to("cpu").eval()
    tokenizer = model.tokenizer
    input_names = model_input_names(tokenizer)
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        onnx_path = os.path.join(scratch, "model.onnx")
        export_onnx(model, kind, input_names, onnx_path)
        items = [tokenize(tokenizer, [item], max_length, input_names) for item in calibration]
        quantized = nncf.quantize(ov.Core().read_model(onnx_path), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        out = os.path.join(scratch, "out")
        ov.save_model(quantized, os.path.join(out, MODEL_FILE))
        tokenizer.save_pretrained(out)
        sample = tokenize(tokenizer, [calibration[0]], max_length, input_names)
        dimension = int(ov.Core().compile_model(quantized, "CPU")({name: sample[name] for name in input_names})[0].shape[-1])
        files = sorted(name for name in os.listdir(out) if os.path.isfile(os.path.join(out, name)))
        for name in files:
            storage.write_bytes_atomically(storage.join_url(destination_url, name), Path(out, name).read_bytes())
    settings = {
        "format": FORMAT,
        "kind": kind,
        "source": source,
        "precision": "int8",
        "max_length": max_length,
        "input_names": input_names,
        "dimension": dimension,
        "calibration_items": len(calibration),
        "calibration_digest": calibration_digest(calibration),
        "files": files,
        "versions": runtime_versions(),
    }
    storage.write_json_atomically(storage.join_url(destination_url, QUANTIZATION_FILE), settings)
    return settings


def tokenize(tokenizer, items: Sequence, max_length: int, input_names: list[str]) -> dict[str, np.ndarray]:
    """Texts, or (query, document) pairs truncated longest-first, as int64 model inputs padded to the longest."""
    if items and isinstance(items[0], (tuple, list)):
        encoded = tokenizer([item[0] for item in items], [item[1] for item in items], padding=True, truncation="longest_first", max_length=max_length, return_tensors="np")
    else:
        encoded = tokenizer(list(items), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in input_names}


_LOCAL_COPIES: dict[str, str] = {}


def local_folder(url: str) -> str:
    """A local path holding the quantized model at ``url`` (downloaded once per process when remote)."""
    filesystem, path = storage.filesystem_and_path(url)
    if storage.is_local(filesystem):
        return path
    if url not in _LOCAL_COPIES:
        folder = tempfile.mkdtemp(prefix="quantized-model-")
        for name in read_settings(url)["files"] + [QUANTIZATION_FILE]:
            Path(folder, name).write_bytes(storage.read_bytes(storage.join_url(url, name)))
        _LOCAL_COPIES[url] = folder
    return _LOCAL_COPIES[url]


class QuantizedModel:
    """A quantized model folder compiled for the CPU with ``threads`` threads, batched like sentence-transformers.

    Threads are not pinned to cores (OpenVINO pins by default on Linux; torch does not): on a shared
    machine a pinned thread waits for its busy core, which made OpenVINO 2-4x slower in wall time.
    """

    kind = ""

    def __init__(self, url: str, threads: int = 0, batch_size: int = 32, max_length: int = 0):
        import openvino as ov
        from transformers import AutoTokenizer

        folder = local_folder(url)
        self.settings = read_settings(folder)
        if self.settings["kind"] != self.kind:
            raise ValueError(f"{url}: a quantized {self.settings['kind']}, not a {self.kind}")
        core = ov.Core()
        properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(os.path.join(folder, MODEL_FILE)), "CPU", properties)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.input_names = self.settings["input_names"]
        self.batch_size = batch_size
        self.max_length = max_length or int(self.settings["max_length"])

    def _run(self, items: Sequence) -> np.ndarray:
        """Model outputs for ``items`` in their order, each independent of its batch neighbours
        (see :mod:`pipelines.token_batches`)."""
        from pipelines.token_batches import run_bucketed

        if not len(items):
            return np.zeros((0, int(self.settings["dimension"])), dtype=np.float32)
        outputs = run_bucketed(
            self.tokenizer, items, self.max_length, self.batch_size, lambda features: np.asarray(self.compiled(features)[0]).reshape(len(features["input_ids"]), -1), self.input_names
        )
        return outputs


class QuantizedTextEncoder(QuantizedModel):
    """``encode(texts)`` → float32 vectors, as the bi-encoder's own modules (pooling, normalization) compute them."""

    kind = "bi-encoder"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(list(texts))

    @property
    def dimension(self) -> int:
        return int(self.settings["dimension"])


class QuantizedPairScorer(QuantizedModel):
    """``score(pairs)`` → the cross-encoder's raw logits (no sigmoid), one per (query, document) pair."""

    kind = "cross-encoder"

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return self._run(list(pairs))[:, 0].copy()
