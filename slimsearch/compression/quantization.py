"""Per-channel weight quantization (symmetric or asymmetric) and its straight-through
fake-quant for QAT.

Symmetric: codes in ``[-qmax, qmax]`` (``qmax = 2**(b-1)-1``) and one float32 scale per output
channel. Asymmetric: the channel's [min, max] spread over all ``2**b`` levels, with an integer
zero point per channel; its codes are kept relative to the zero point, so in both schemes the
weight is ``codes * scale`` and an exact zero stays code 0 (sparsity survives quantization).
``dequantize`` is the only way codes become floats, used both when the trial finalises its
model and when ``load_float_model`` reads the file, so the two are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer ``codes`` (int16, the weight's shape, relative to the zero point) and
    per-output-channel float32 ``scale``; ``zero_point`` (int16 per channel) when asymmetric."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    zero_point: torch.Tensor | None = None

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def offsets(self) -> torch.Tensor:
        """Per channel, what turns a code into an unsigned ``bits``-bit integer for packing."""
        if self.zero_point is None:
            return torch.full((self.codes.shape[0],), self.qmax, dtype=torch.int64)
        return self.zero_point.to(torch.int64)


def quantize_per_channel(weight: torch.Tensor, bits: int, *,
                         symmetric: bool = True) -> QuantizedWeight:
    """Round ``weight`` to ``bits``-bit codes with one scale (and zero point) per output channel."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = flat.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows keep code 0
        codes = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
        return QuantizedWeight(codes.to(torch.int16).reshape(weight.shape), scale.contiguous(), bits)
    levels = (1 << bits) - 1
    # The range always includes 0, so an exact zero has an exact code (the zero point).
    low = flat.amin(dim=1).clamp(max=0.0)
    high = flat.amax(dim=1).clamp(min=0.0)
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-low / scale), 0, levels)
    unsigned = torch.clamp(torch.round(flat / scale[:, None]) + zero_point[:, None], 0, levels)
    codes = (unsigned - zero_point[:, None]).to(torch.int16).reshape(weight.shape)
    return QuantizedWeight(codes, scale.contiguous(), bits, zero_point.to(torch.int16))


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The float32 weight the codes stand for: ``codes * scale`` per output channel."""
    flat = q.codes.reshape(q.codes.shape[0], -1).float() * q.scale[:, None]
    return flat.reshape(q.codes.shape)


class FakeQuantize(nn.Module):
    """Parametrization: forward uses the quantized weight, gradients pass straight through."""

    def __init__(self, bits: int, symmetric: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = dequantize(quantize_per_channel(weight, self.bits, symmetric=self.symmetric))
        quantized = quantized.to(weight.dtype)
        return weight + (quantized - weight).detach()


def attach_fake_quant(layers: dict[str, nn.Module], bits: dict[str, int], *,
                      symmetric: bool = True) -> None:
    """Make every layer with ``bits < 32`` see its quantized weight in forward (for QAT)."""
    for name, layer in layers.items():
        if bits.get(name, 32) < 32:
            parametrize.register_parametrization(layer, "weight",
                                                 FakeQuantize(bits[name], symmetric))


def detach_fake_quant(layers: dict[str, nn.Module]) -> None:
    """Remove the fake-quant parametrizations, keeping the latent float weights."""
    for layer in layers.values():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


@torch.no_grad()
def quantize_layers_(layers: dict[str, nn.Module], bits: dict[str, int], *,
                     symmetric: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize each layer with ``bits < 32`` and replace its weight by the dequantized value,
    so the in-memory model computes exactly what the saved file will."""
    found = {}
    for name, layer in layers.items():
        if bits.get(name, 32) < 32:
            q = quantize_per_channel(layer.weight, bits[name], symmetric=symmetric)
            layer.weight.copy_(dequantize(q))
            found[name] = q
    return found
