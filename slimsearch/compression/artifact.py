"""The deployable model file, and ``load_float_model`` that rebuilds a model from it alone.

The file is a safetensors archive (no pickled code). Its metadata holds, as JSON, the model
factory (``"module:function"``, which must carry ``@slimsearch.model_factory``), its keyword
arguments, the shape of every Linear/Conv2d/BatchNorm/LayerNorm layer after pruning (and of attention:
each ``HeadAttention`` that replaced an ``nn.MultiheadAttention``, and the head count of every
attention block; and each token table whose vocabulary was pruned, a ``VocabularyEmbedding``
whose id-to-row mapping is one of the tensors), and how each tensor is encoded:

- ``float32``: as is;
- ``quant``: ``bits``-bit codes bit-packed (``<name>.codes``) + float32 scales per output
  channel (``<name>.scale``);
- either of them ``sparse``: a bitmap of the non-zeros (``<name>.bitmap``) and only the
  non-zero values or codes, chosen whenever that is smaller than the dense form;
- packed codes and bitmaps ``deflate``-compressed (zlib) where that is smaller still.

``STORAGE_LAYOUTS`` names these layouts; by default each tensor takes the smallest.

The size objective is the byte length of this file.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimsearch.atomic import write_with
from slimsearch.compression.packing import (
    pack_bits,
    pack_mask,
    packed_nbytes,
    unpack_bits,
    unpack_mask,
)
from slimsearch.compression.quantization import QuantizedWeight, dequantize
from slimsearch.compression.vocabulary import VocabularyEmbedding
from slimsearch.errors import ArtifactError
from slimsearch.manifest import MODEL_FILE, check_bundle, is_bundle
from slimsearch.tasks import resolve_factory
from slimsearch.tasks.attention import (
    HeadAttention,
    apply_settings,
    attention_block,
    keep_encoders_unfused,
)

FORMAT = "slimsearch.artifact"
FORMAT_VERSION = 1


@dataclass
class CompressedModel:
    """A compressed model in memory: float weights equal to what the file will hold, plus the
    integer codes of quantized layers and a record of what each stage did."""

    model: nn.Module
    factory: str
    kwargs: dict[str, Any]
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    #: How the model executes (``runtimes.ExecutionPlan.to_dict()``); None = float as stored.
    execution: dict[str, Any] | None = None


def _module_spec(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, HeadAttention):  # replaces the factory's nn.MultiheadAttention
        return {"type": "HeadAttention", "embed_dim": module.embed_dim,
                "num_heads": module.num_heads, "head_dim": module.head_dim,
                "kdim": module.kdim, "vdim": module.vdim, "bias": module.q_proj.bias is not None,
                "dropout": module.dropout, "batch_first": module.batch_first}
    if isinstance(module, VocabularyEmbedding):  # the token table, its vocabulary pruned
        return {"type": "VocabularyEmbedding", "vocabulary_size": module.vocabulary_size,
                "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx}
    if block := attention_block(module):  # the user's attention, of a known layout
        return {"type": "heads", "set": block.head_settings()}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride), "padding": module.padding
                if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups,
                "bias": module.bias is not None, "padding_mode": module.padding_mode}
    if isinstance(module, nn.LayerNorm):
        return {"type": "LayerNorm", "normalized_shape": list(module.normalized_shape),
                "eps": module.eps, "elementwise_affine": module.elementwise_affine,
                "bias": module.bias is not None}
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return {"type": type(module).__name__, "num_features": module.num_features,
                "eps": module.eps, "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    return None


def _module_from_spec(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Linear":
        return nn.Linear(**args)
    if kind == "Conv2d":
        for key in ("kernel_size", "stride", "dilation"):
            args[key] = tuple(args[key])
        if isinstance(args["padding"], list):
            args["padding"] = tuple(args["padding"])
        return nn.Conv2d(**args)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(**args)
    if kind == "LayerNorm":
        return nn.LayerNorm(**args)
    if kind == "VocabularyEmbedding":
        return VocabularyEmbedding(**args)
    if kind == "HeadAttention":
        return HeadAttention(args.pop("embed_dim"), args.pop("num_heads"), **args)
    raise ArtifactError(f"unknown layer type {kind!r} in the model file")


#: How a weight may be laid out in the file; ``save_artifact(layout=None)`` picks the smallest.
STORAGE_LAYOUTS = ("dense", "bitmap", "dense+deflate", "bitmap+deflate")


def _deflated(data: np.ndarray, allowed: bool | None) -> tuple[np.ndarray, bool]:
    """zlib-compress packed bytes when that is smaller (``allowed=None``) or when forced."""
    if allowed is False:
        return data, False
    packed = np.frombuffer(zlib.compress(data.tobytes(), 9), dtype=np.uint8)
    if allowed or len(packed) < len(data):
        return packed, True
    return data, False


def _inflated(data: torch.Tensor, deflated: bool) -> np.ndarray:
    raw = data.numpy()
    return np.frombuffer(zlib.decompress(raw.tobytes()), dtype=np.uint8) if deflated else raw


def _encode(name: str, value: torch.Tensor, quant: QuantizedWeight | None,
            tensors: dict[str, torch.Tensor], layout: str | None = None) -> dict[str, Any]:
    """Add the smallest encoding of one tensor (or the forced ``layout``) to ``tensors``;
    return its metadata entry."""
    count = value.numel()
    entry: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1]}
    if quant is None and not value.is_floating_point():
        tensors[name] = value.contiguous()
        entry["encoding"] = "raw"
        return entry
    flat = (quant.codes if quant is not None else value).reshape(-1)
    nonzero = (flat != 0).numpy()
    nnz = int(nonzero.sum())
    bits = quant.bits if quant is not None else 32
    sparse = packed_nbytes(count, 1) + packed_nbytes(nnz, bits) < packed_nbytes(count, bits)
    deflate: bool | None = None
    if layout is not None:
        sparse, deflate = layout.startswith("bitmap"), layout.endswith("+deflate")
    kept = flat[torch.from_numpy(nonzero)] if sparse else flat
    entry["deflate"] = []
    if sparse:
        bitmap, squeezed = _deflated(pack_mask(nonzero), deflate)
        tensors[f"{name}.bitmap"] = torch.from_numpy(bitmap.copy())
        entry["deflate"] += ["bitmap"] if squeezed else []
    if quant is None:
        tensors[f"{name}.values"] = kept.float().contiguous()
        entry["encoding"] = "float32"
    else:
        offsets = quant.offsets().repeat_interleave(count // quant.codes.shape[0])
        kept_offsets = offsets[torch.from_numpy(nonzero)] if sparse else offsets
        unsigned = (kept.to(torch.int64) + kept_offsets).numpy()
        codes, squeezed = _deflated(pack_bits(unsigned, bits), deflate)
        tensors[f"{name}.codes"] = torch.from_numpy(codes.copy())
        tensors[f"{name}.scale"] = quant.scale.float().contiguous()
        entry.update(encoding="quant", bits=bits, asymmetric=quant.zero_point is not None)
        if quant.zero_point is not None:
            tensors[f"{name}.zero_point"] = quant.zero_point.to(torch.uint8).contiguous()
        entry["deflate"] += ["codes"] if squeezed else []
    entry["sparse"] = bool(sparse)
    entry["nnz"] = nnz
    return entry


def _decode(name: str, entry: dict[str, Any], reader: Any) -> torch.Tensor:
    shape = entry["shape"]
    zero_point = None
    if entry["encoding"] == "raw":
        return reader.get_tensor(name)
    count = int(np.prod(shape)) if shape else 1
    deflated = entry.get("deflate", [])
    nonzero = unpack_mask(_inflated(reader.get_tensor(f"{name}.bitmap"), "bitmap" in deflated),
                          count) if entry["sparse"] else None
    stored = entry["nnz"] if entry["sparse"] else count
    if entry["encoding"] == "float32":
        values = reader.get_tensor(f"{name}.values")
    else:
        channels = shape[0]
        zero_point = reader.get_tensor(f"{name}.zero_point").to(torch.int64) \
            if entry.get("asymmetric") else None
        offsets = (zero_point if zero_point is not None else torch.full(
            (channels,), (1 << (entry["bits"] - 1)) - 1, dtype=torch.int64))
        offsets = offsets.repeat_interleave(count // channels)
        if nonzero is not None:
            offsets = offsets[torch.from_numpy(nonzero)]
        codes = _inflated(reader.get_tensor(f"{name}.codes"), "codes" in deflated)
        values = torch.from_numpy(unpack_bits(codes, entry["bits"], stored)) - offsets
    dense = values
    if nonzero is not None:
        dense = torch.zeros(count, dtype=values.dtype)
        dense[torch.from_numpy(nonzero)] = values
    dense = dense.reshape(shape)
    if entry["encoding"] == "quant":
        return dequantize(QuantizedWeight(dense.to(torch.int16), reader.get_tensor(f"{name}.scale"),
                                          entry["bits"], zero_point))
    return dense


def save_artifact(compressed: CompressedModel, path: str | Path, *,
                  layout: str | None = None) -> Path:
    """Write the deployable file for ``compressed`` atomically; return its path.

    ``layout`` forces one of ``STORAGE_LAYOUTS`` on every compressed weight (for tests and
    benchmarks); by default each weight takes whichever is smallest."""
    if layout is not None and layout not in STORAGE_LAYOUTS:
        raise ValueError(f"layout = {layout!r}: expected one of {STORAGE_LAYOUTS}")
    model = compressed.model
    specs = {name: spec for name, m in model.named_modules() if (spec := _module_spec(m))}
    quant_by_param = {f"{layer}.weight": q for layer, q in compressed.quantized.items()}
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name, value in model.state_dict().items():
        quant = quant_by_param.get(name)
        forced = layout if (quant is not None or name.endswith("weight")) else None
        entries[name] = _encode(name, value.detach().cpu(), quant, tensors, forced)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "factory": compressed.factory,
              "kwargs": compressed.kwargs, "modules": specs, "tensors": entries,
              "execution": runnable_plan(compressed.execution)}
    metadata = {"slimsearch": json.dumps(header, separators=(",", ":"))}
    return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def runnable_plan(execution: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of an execution plan the model file stores: what runs and how, without the
    plan's ``decisions`` (the timings that chose it, and notes such as a decision reused
    from an earlier model of the same form). Those are the trial's record (build.json). In
    the file they would add bytes that vary with the timings' digits and the process's
    history to a size that is the model's."""
    if execution is None:
        return None
    return {key: value for key, value in execution.items() if key != "decisions"}


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a model file (factory, shapes, encodings) without loading tensors."""
    path = resolve_model_file(path)
    try:
        with safe_open(str(path), framework="pt") as reader:
            meta = reader.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "slimsearch" not in meta:
        raise ArtifactError(f"{path} is a safetensors file but not a slimsearch model")
    header = json.loads(meta["slimsearch"])
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported model format {header.get('format')!r} "
                            f"v{header.get('version')!r}; this slimsearch reads {FORMAT} "
                            f"v{FORMAT_VERSION}")
    return header


def resolve_model_file(path: str | Path) -> Path:
    """Accept a model file, a trial folder or an export bundle; return the model file.

    In a bundle (a folder with ``manifest.json``) every file the manifest lists must match
    its sha256: a bundle whose model, recipe, metrics or verification were changed is refused."""
    path = Path(path)
    if path.is_dir():
        if is_bundle(path):
            check_bundle(path)
        path = path / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"no model file at {path}")
    return path


def _resize_parameters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each parameter outside the layers with a spec (a position embedding, say, which
    Torch-Pruning narrows with the width it is added to) the shape stored in the file."""
    for name, param in list(model.named_parameters()):
        stored = state.get(name)
        if stored is not None and stored.shape != param.shape:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf,
                    nn.Parameter(torch.empty(stored.shape, dtype=param.dtype),
                                 requires_grad=param.requires_grad))


def load_float_model(path: str | Path) -> nn.Module:
    """Rebuild the model (eval mode, CPU, every layer float) from a slimsearch model file,
    trial folder or bundle.

    Nothing pickled is read: the factory named in the file is imported (and must carry
    ``@slimsearch.model_factory``), layers are resized to the stored shapes, and weights are
    decoded (bit-unpacked and dequantized) from the file. Which layers run on which kernels
    (the file's execution plan, plain data) is the runtime's business: ``slimsearch.load_model``
    (``runtimes.load_model``) applies it; float is what ONNX export and evaluation start from.
    """
    path = resolve_model_file(path)
    header = read_header(path)
    # a module found in the current directory or beside the file is not imported (see there)
    factory = resolve_factory(header["factory"], untrusted=(Path.cwd(), path.parent))
    model = factory(**header["kwargs"])
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"the factory {header['factory']!r} returned {type(model).__name__}, "
                            "not a torch.nn.Module")
    for name, spec in header["modules"].items():  # parents before their children
        module = model.get_submodule(name)
        if _module_spec(module) == spec:
            continue
        if spec["type"] == "heads":  # the user's attention module, with heads removed
            apply_settings(module, spec["set"])
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, _module_from_spec(spec))
    keep_encoders_unfused(model)
    with safe_open(str(path), framework="pt") as reader:
        state = {name: _decode(name, entry, reader) for name, entry in header["tensors"].items()}
    _resize_parameters(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
