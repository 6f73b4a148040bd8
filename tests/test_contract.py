"""Contract suite: every registered pruning criterion, sparsity pattern, bit width and storage
layout goes through the same checks, so a new one is tested the moment it is registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimsearch.compression import CompressedModel, load_float_model, save_artifact
from slimsearch.compression.artifact import STORAGE_LAYOUTS
from slimsearch.compression.pruning import IMPORTANCE, SPARSITY_PATTERNS, prune_structured
from slimsearch.compression.quantization import dequantize, quantize_layers_, quantize_per_channel
from slimsearch.experiment import ALLOWED_BITS, IMPORTANCE_CRITERIA, PRUNING_METHODS
from slimsearch.tasks import factory_path
from slimsearch.tasks.digits import digits_cnn, digits_mlp
from slimsearch.tasks.digits_resnet import digits_resnet

MODELS = {
    "mlp": (digits_mlp, {"width": 0.25}, (64,)),
    "cnn": (digits_cnn, {"width": 0.5}, (1, 32, 32)),
    "resnet": (digits_resnet, {"width": 0.5, "depth": 1}, (1, 32, 32)),
}


def _seeded(model_name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh, seeded instance of ``MODELS[model_name]`` in eval mode, and its input shape."""
    factory, kwargs, shape = MODELS[model_name]
    torch.manual_seed(0)
    return factory(**kwargs).eval(), shape


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def test_registries_match_the_names_experiments_accept() -> None:
    assert set(IMPORTANCE) == set(IMPORTANCE_CRITERIA)
    assert set(SPARSITY_PATTERNS) | {"structured"} == set(PRUNING_METHODS)


@pytest.mark.parametrize("criterion", sorted(IMPORTANCE))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_structured_criterion_shrinks_every_architecture(criterion: str, model_name: str) -> None:
    model, shape = _seeded(model_name)
    x = torch.randn(16, *shape)
    before = sum(p.numel() for p in model.parameters())
    prunable = [n for n in _layers(model) if n not in ("head", "fc2")]
    record = prune_structured(model, dict.fromkeys(prunable, 0.5), x[:1], importance=criterion,
                              gradient_batch=(x, torch.randint(0, 10, (16,))))
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    assert model(x).shape == (16, 10)
    assert all(r["channels_after"] <= r["channels_before"] for r in record.values())


@pytest.mark.parametrize("criterion", sorted(IMPORTANCE))
def test_pruning_exactly_zero_channels_leaves_the_output_unchanged(criterion: str) -> None:
    torch.manual_seed(0)
    model = digits_mlp(width=0.125, depth=2).eval()  # 64 -> 32 -> 32 -> 10
    dead = [3, 7, 11, 20, 29, 30, 31, 0]
    with torch.no_grad():
        model.hidden[0].weight[dead] = 0.0
        model.hidden[0].bias[dead] = 0.0
    x = torch.randn(32, 64)
    expected = model(x)
    prune_structured(model, {"hidden.0": len(dead) / 32}, x[:1], importance=criterion,
                     gradient_batch=(x, expected.argmax(1)))
    assert model.hidden[0].out_features == 32 - len(dead)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pattern", sorted(SPARSITY_PATTERNS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_sparsity_pattern_zeroes_what_it_promises(pattern: str, model_name: str) -> None:
    model, shape = _seeded(model_name)
    layers = {n: m for n, m in _layers(model).items() if m.weight[0].numel() % 4 == 0}
    masks = SPARSITY_PATTERNS[pattern](layers, dict.fromkeys(layers, 0.5))
    for name, mask in masks.items():
        weight = layers[name].weight
        assert bool((weight[~mask] == 0).all())
        if pattern != "global":  # global spreads the total unevenly, on purpose
            assert abs(1 - mask.float().mean().item() - 0.5) < 0.02
        if pattern == "2:4":
            groups = mask.reshape(mask.shape[0], -1, 4).sum(dim=2)
            assert bool((groups == 2).all())
    zeroed = sum(int((~m).sum()) for m in masks.values())
    assert abs(zeroed / sum(m.numel() for m in masks.values()) - 0.5) < 0.02
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [b for b in ALLOWED_BITS if b < 32])
def test_quantization_error_is_within_the_bound_of_its_bit_width(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    weight = torch.randn(24, 40, dtype=torch.float64) + (0.0 if symmetric else 0.7)
    weight[0, :5] = 0.0  # exact zeros (pruned weights) must stay exact
    q = quantize_per_channel(weight, bits, symmetric=symmetric)
    unsigned = q.codes.to(torch.int64) + q.offsets()[:, None]
    assert int(unsigned.min()) >= 0 and int(unsigned.max()) < 1 << bits
    assert bool((dequantize(q)[0, :5] == 0).all())
    error = (dequantize(q).double() - weight).abs()
    # half a quantization step per channel (plus float32 rounding of the scale)
    bound = q.scale.double()[:, None] / 2 * (1 + 1e-5) + 1e-7
    assert bool((error <= bound).all())


@pytest.mark.parametrize("layout", STORAGE_LAYOUTS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_storage_layout_round_trips_exactly_and_the_default_is_smallest(tmp_path: Path, layout: str,
                                                                 model_name: str) -> None:
    model, shape = _seeded(model_name)
    layers = _layers(model)
    SPARSITY_PATTERNS["unstructured"](layers, dict.fromkeys(layers, 0.6))
    bits = {n: b for n, b in zip(layers, [2, 4, 8, 32] * 8, strict=False)}
    quantized = quantize_layers_(layers, bits, symmetric=model_name != "cnn")  # cnn: asymmetric
    factory, kwargs, _ = MODELS[model_name]
    compressed = CompressedModel(model, factory_path(factory), kwargs, quantized=quantized)
    path = save_artifact(compressed, tmp_path / "model.safetensors", layout=layout)
    x = torch.randn(4, *shape)
    assert torch.equal(load_float_model(path)(x), model(x))
    smallest = save_artifact(compressed, tmp_path / "best.safetensors")
    assert smallest.stat().st_size <= path.stat().st_size + 64  # default picks per tensor
