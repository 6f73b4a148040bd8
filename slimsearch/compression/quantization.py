"""Per-channel symmetric weight quantization and its straight-through fake-quant for QAT.

A weight of ``bits`` bits is stored as integer codes in ``[-qmax, qmax]`` (``qmax = 2**(b-1)-1``)
and one float32 scale per output channel. ``dequantize`` is the only way codes become floats,
used both when the trial finalises its model and when ``load_model`` reads the file, so the two
are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer ``codes`` (int16, the weight's shape) and per-output-channel float32 ``scale``."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


def quantize_per_channel(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """Round ``weight`` to ``bits``-bit symmetric codes with one scale per output channel."""
    qmax = (1 << (bits - 1)) - 1
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows keep code 0
    codes = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
    return QuantizedWeight(codes.to(torch.int16).reshape(weight.shape), scale.contiguous(), bits)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The float32 weight the codes stand for: ``codes * scale`` per output channel."""
    flat = q.codes.reshape(q.codes.shape[0], -1).float() * q.scale[:, None]
    return flat.reshape(q.codes.shape)


class FakeQuantize(nn.Module):
    """Parametrization: forward uses the quantized weight, gradients pass straight through."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = dequantize(quantize_per_channel(weight, self.bits)).to(weight.dtype)
        return weight + (quantized - weight).detach()


def attach_fake_quant(layers: dict[str, nn.Module], bits: dict[str, int]) -> None:
    """Make every layer with ``bits < 32`` see its quantized weight in forward (for QAT)."""
    for name, layer in layers.items():
        if bits.get(name, 32) < 32:
            parametrize.register_parametrization(layer, "weight", FakeQuantize(bits[name]))


def detach_fake_quant(layers: dict[str, nn.Module]) -> None:
    """Remove the fake-quant parametrizations, keeping the latent float weights."""
    for layer in layers.values():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


@torch.no_grad()
def quantize_layers_(layers: dict[str, nn.Module], bits: dict[str, int]) -> dict[str, QuantizedWeight]:
    """Quantize each layer with ``bits < 32`` and replace its weight by the dequantized value,
    so the in-memory model computes exactly what the saved file will."""
    found = {}
    for name, layer in layers.items():
        if bits.get(name, 32) < 32:
            q = quantize_per_channel(layer.weight, bits[name])
            layer.weight.copy_(dequantize(q))
            found[name] = q
    return found
