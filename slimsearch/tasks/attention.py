"""Attention as separate Linear layers, so that every method can reach it and heads can go.

``nn.MultiheadAttention`` keeps q, k and v in one packed ``in_proj_weight`` and uses its
``out_proj`` as a weight, never calling it: no Linear-level method (pruning, quantization,
PyTorch's dynamic int8) sees them, and no head can be removed, since its embedding width is
both the model's width and the heads' total width. ``unpack_attention`` replaces each one by
a ``HeadAttention`` holding the same weights as four ``nn.Linear`` layers (``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``), which computes the same function.

Attention modules of a known layout (``CONVENTIONS``: ``HeadAttention``'s own, which any
module with an integer ``num_heads`` and Linear ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj`` shares, and Hugging Face BERT's) have whole heads removed by structured pruning
(``compression.pruning.prune_heads``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The projections of an attention block, in the order heads are read: q, k, v, output.
ROLES = ("q", "k", "v", "out")


class HeadAttention(nn.Module):
    """Multi-head attention with one ``nn.Linear`` per projection; a drop-in for
    ``nn.MultiheadAttention`` (same call, same outputs) whose heads can be removed.

    ``num_heads * head_dim`` is the attention's inner width, independent of ``embed_dim`` (the
    model's width, ``out_proj``'s output), so fewer heads leave the model's width unchanged."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, *,
                 kdim: int | None = None, vdim: int | None = None, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        # nn.TransformerEncoderLayer reads these two to choose its fused kernel, which needs
        # packed weights: no packed bias and unequal q/k/v widths send it to its plain path,
        # which calls this module.
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    # Widths are read off the layers: pruning the model's width (Torch-Pruning, through the
    # residual stream) resizes the layers and nothing else.
    @property
    def embed_dim(self) -> int:
        return self.out_proj.out_features

    @property
    def kdim(self) -> int:
        return self.k_proj.in_features

    @property
    def vdim(self) -> int:
        return self.v_proj.in_features

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]

        def heads(x: torch.Tensor, steps: int) -> torch.Tensor:  # (N, L, H*D) -> (N, H, L, D)
            return x.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), length)
        k, v = heads(self.k_proj(key), source), heads(self.v_proj(value), source)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, self.num_heads, length, source,
                              q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if causal:
                scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool,
                                                       device=q.device).triu(1), float("-inf"))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                   batch: int, heads: int, length: int, source: int,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s two masks (boolean: True = masked; or float: added) as
    one float mask that broadcasts to (N, H, L, S), or None."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        merged = (merged.view(batch, heads, length, source) if merged.dim() == 3
                  else merged.view(1, 1, length, source))
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, source)
        merged = padding if merged is None else merged + padding
    return merged


def can_unpack(attention: nn.MultiheadAttention) -> bool:
    """Whether ``attention`` has an exact ``HeadAttention`` equivalent (no learned key/value
    bias rows, no appended zero attention)."""
    return attention.bias_k is None and attention.bias_v is None and not attention.add_zero_attn


@torch.no_grad()
def head_attention_from(attention: nn.MultiheadAttention) -> HeadAttention:
    """A ``HeadAttention`` that computes what ``attention`` computes, from its weights."""
    embed = attention.embed_dim
    out = HeadAttention(embed, attention.num_heads, kdim=attention.kdim, vdim=attention.vdim,
                        bias=attention.in_proj_bias is not None, dropout=attention.dropout,
                        batch_first=attention.batch_first)
    if attention._qkv_same_embed_dim:
        weights = attention.in_proj_weight.split(embed)
    else:
        weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    biases = (attention.in_proj_bias.split(embed) if attention.in_proj_bias is not None
              else (None,) * 3)
    for layer, weight, bias in zip((out.q_proj, out.k_proj, out.v_proj), weights, biases,
                                   strict=True):
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    out.out_proj.weight.copy_(attention.out_proj.weight)
    if attention.out_proj.bias is not None:
        out.out_proj.bias.copy_(attention.out_proj.bias)
    return out.to(attention.out_proj.weight.device).train(attention.training)


def unpack_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` that has an exact
    equivalent by a ``HeadAttention`` with the same weights; return the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and can_unpack(module):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, head_attention_from(module))
            replaced.append(name)
    if replaced:
        keep_encoders_unfused(model)
    return replaced


def keep_encoders_unfused(model: nn.Module) -> None:
    """Turn off ``nn.TransformerEncoder``'s nested-tensor path where a layer's attention is
    a ``HeadAttention``: that path reads the packed weights, which no longer exist."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, HeadAttention) for m in module.modules()):
            module.use_nested_tensor = False


@dataclass(frozen=True)
class Convention:
    """Where an attention module keeps its q, k, v and output projections (Linear layers)
    and its head count, as attribute paths below it; heads are consecutive blocks of the q
    projection's outputs. ``inner``: attributes holding heads x head width, kept equal."""

    q: str
    k: str
    v: str
    out: str
    heads: str
    inner: tuple[str, ...] = ()


#: The conventions whose heads structured pruning removes, first match wins.
CONVENTIONS = (
    # HeadAttention (every nn.MultiheadAttention of a student), and modules written the same way
    Convention("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"),
    # Hugging Face BERT and its kin: BertAttention holds self.{query,key,value} and
    # output.dense; its forward takes the head count from the shapes
    Convention("self.query", "self.key", "self.value", "output.dense",
               "self.num_attention_heads", inner=("self.all_head_size",)),
)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class AttentionBlock:
    """One attention module whose heads can be removed: its name, the module, the convention."""

    name: str
    module: nn.Module
    convention: Convention

    def projection(self, role: str) -> nn.Linear:
        """``role``: ``"q"``, ``"k"``, ``"v"`` or ``"out"``."""
        return _get(self.module, getattr(self.convention, role))

    def layer_name(self, role: str) -> str:
        return f"{self.name}.{getattr(self.convention, role)}" if self.name else getattr(
            self.convention, role)

    @property
    def heads(self) -> int:
        return _get(self.module, self.convention.heads)

    def head_settings(self) -> dict[str, int]:
        """The attributes that say how many heads there are, by path, as they are now."""
        return {path: _get(self.module, path)
                for path in (self.convention.heads, *self.convention.inner)}

    def set_heads(self, count: int, width: int) -> None:
        """Set the head count to ``count`` (each ``width`` wide) and the inner widths to match."""
        apply_settings(self.module, {self.convention.heads: count,
                                     **{p: count * width for p in self.convention.inner}})


def apply_settings(module: nn.Module, settings: dict[str, int]) -> None:
    """Set each attribute path of ``settings`` below ``module`` (a model file's head counts)."""
    for path, value in settings.items():
        owner, _, leaf = path.rpartition(".")
        setattr(_get(module, owner) if owner else module, leaf, value)


def attention_block(module: nn.Module, name: str = "") -> AttentionBlock | None:
    """``module`` as an attention block whose heads can be removed, or None: it follows a
    convention of ``CONVENTIONS``, its projections are Linear layers and their widths fit its
    head count."""
    for convention in CONVENTIONS:
        heads = _get(module, convention.heads)
        layers = [_get(module, getattr(convention, role)) for role in ROLES]
        if not isinstance(heads, int) or heads < 1 or not all(
                isinstance(layer, nn.Linear) for layer in layers):
            continue
        q, k, v, out = layers
        inner = q.out_features
        if inner % heads == 0 and k.out_features == v.out_features == out.in_features == inner:
            return AttentionBlock(name, module, convention)
    return None


def attention_blocks(model: nn.Module) -> dict[str, AttentionBlock]:
    """The attention blocks of ``model`` (``attention_block``), by module name."""
    return {name: block for name, module in model.named_modules()
            if (block := attention_block(module, name)) is not None}
