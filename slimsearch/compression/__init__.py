"""Compression: student, distillation, pruning, quantization and the model file they produce."""

from slimsearch.compression.artifact import (
    MODEL_FILE,
    CompressedModel,
    load_float_model,
    read_header,
    resolve_model_file,
    save_artifact,
)
from slimsearch.compression.pipeline import build
from slimsearch.compression.quantization import QuantizedWeight, dequantize, quantize_per_channel

__all__ = [
    "MODEL_FILE",
    "CompressedModel",
    "QuantizedWeight",
    "build",
    "dequantize",
    "load_float_model",
    "quantize_per_channel",
    "read_header",
    "resolve_model_file",
    "save_artifact",
]
