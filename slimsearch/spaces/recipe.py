"""A Recipe: everything needed to build one compressed model, as plain validated data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from slimsearch.experiment import (
    ACTIVATION_BITS,
    ALLOWED_BITS,
    DISTILLATION_KEYS,
    IMPORTANCE_CRITERIA,
    PRUNING_METHODS,
    STUDENT_INITS,
    VOCABULARIES,
    WEIGHT_SCHEMES,
)

RECIPE_TYPE = "slimsearch.Recipe"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class LayerRecipe:
    """How one Linear/Conv layer is compressed.

    ``sparsity`` is the fraction (0-0.95) of output channels removed (``structured``) or of
    weights zeroed by magnitude (``unstructured``); ``bits`` is the stored weight width
    (2-8 = per-channel symmetric integers, 32 = float32).
    """

    sparsity: float = 0.0
    pruning: str = "unstructured"
    bits: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity <= 0.95:
            raise ValueError(f"sparsity = {self.sparsity!r}: expected a fraction from 0.0 to 0.95")
        if self.pruning not in PRUNING_METHODS:
            raise ValueError(f"pruning = {self.pruning!r}: expected one of {PRUNING_METHODS}")
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits = {self.bits!r}: expected one of {ALLOWED_BITS}")
        if self.pruning == "2:4" and self.sparsity not in (0.0, 0.5):
            raise ValueError(f"sparsity = {self.sparsity!r} with pruning = '2:4': that pattern "
                             "removes exactly half the weights, so sparsity must be 0.5 (or 0)")


@dataclass(frozen=True)
class Recipe:
    """Student knobs, how the student starts, and one ``LayerRecipe`` per compressible layer.

    ``student_init = "slice"`` starts from the teacher's weights (a leading slice where the
    student is narrower); ``"scratch"`` starts from a fresh initialisation. Layers missing
    from ``layers`` are left uncompressed.
    """

    student: dict[str, Any] = field(default_factory=dict)
    student_init: str = "slice"
    layers: dict[str, LayerRecipe] = field(default_factory=dict)
    #: 8 = int8 activations (static int8 kernels, calibrated); 32 = float activations.
    activation_bits: int = 32
    #: How structured pruning ranks channels: one of IMPORTANCE_CRITERIA.
    importance: str = "l2"
    #: Per-channel weight quantization scheme for every quantized layer: WEIGHT_SCHEMES.
    weight_scheme: str = "symmetric"
    #: Distillation settings chosen by the search (temperature, alpha, epochs); the rest
    #: come from the experiment's [train] table.
    distillation: dict[str, float] = field(default_factory=dict)
    #: "all": the token tables as they are; "seen": only the rows of the tokens the training
    #: split uses, and the special tokens (``compression.vocabulary``).
    vocabulary: str = "all"
    #: Stored bit width of every embedding table (``nn.Embedding``): 2-8 or 32 (float32).
    #: They run in float either way: this is the size of the file.
    embedding_bits: int = 32

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary = {self.vocabulary!r}: expected one of {VOCABULARIES}")
        if self.embedding_bits not in ALLOWED_BITS:
            raise ValueError(f"embedding_bits = {self.embedding_bits!r}: expected one of "
                             f"{ALLOWED_BITS}")
        unknown = set(self.distillation) - set(DISTILLATION_KEYS)
        if unknown:
            raise ValueError(f"distillation keys {sorted(unknown)}: expected some of {DISTILLATION_KEYS}")
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"weight_scheme = {self.weight_scheme!r}: expected one of {WEIGHT_SCHEMES}")
        if self.importance not in IMPORTANCE_CRITERIA:
            raise ValueError(f"importance = {self.importance!r}: expected one of "
                             f"{IMPORTANCE_CRITERIA}")
        if self.activation_bits not in ACTIVATION_BITS:
            raise ValueError(f"activation_bits = {self.activation_bits!r}: expected one of "
                             f"{ACTIVATION_BITS}")
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"student_init = {self.student_init!r}: expected one of {STUDENT_INITS}")
        for name, layer in self.layers.items():
            if not isinstance(layer, LayerRecipe):
                raise ValueError(f"layers[{name!r}] = {layer!r}: expected a LayerRecipe")

    def layer(self, name: str) -> LayerRecipe:
        """The recipe of layer ``name``; uncompressed when the recipe does not mention it."""
        return self.layers.get(name, LayerRecipe())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict tagged with the recipe type and version (the embedding choices
        only where they differ from the defaults, so earlier recipes read the same)."""
        data = {"type": RECIPE_TYPE, "version": RECIPE_VERSION, "student": dict(self.student),
                "student_init": self.student_init, "activation_bits": self.activation_bits,
                "importance": self.importance, "distillation": dict(self.distillation),
                "weight_scheme": self.weight_scheme,
                "layers": {name: asdict(layer) for name, layer in self.layers.items()}}
        if self.vocabulary != "all":
            data["vocabulary"] = self.vocabulary
        if self.embedding_bits != 32:
            data["embedding_bits"] = self.embedding_bits
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of ``to_dict``; rejects other types and unknown versions."""
        if data.get("type") != RECIPE_TYPE or data.get("version") != RECIPE_VERSION:
            raise ValueError(f"not a {RECIPE_TYPE} v{RECIPE_VERSION}: type={data.get('type')!r}, "
                             f"version={data.get('version')!r}")
        return cls(student=dict(data["student"]), student_init=data["student_init"],
                   activation_bits=data.get("activation_bits", 32),
                   importance=data.get("importance", "l2"),
                   weight_scheme=data.get("weight_scheme", "symmetric"),
                   distillation=dict(data.get("distillation", {})),
                   vocabulary=data.get("vocabulary", "all"),
                   embedding_bits=data.get("embedding_bits", 32),
                   layers={k: LayerRecipe(**v) for k, v in data["layers"].items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """One line for progress output and report hovers, e.g. ``width=0.5 | bits 4,8,8 | ...``."""
        knobs = " ".join(f"{k}={v}" for k, v in self.student.items())
        bits = ",".join(str(v.bits) for v in self.layers.values())
        sparsity = ",".join(
            "0" if v.sparsity == 0 else "2:4" if v.pruning == "2:4" else f"{v.pruning[0]}{v.sparsity:g}"
            for v in self.layers.values())
        acts = " | int8 activations" if self.activation_bits == 8 else ""
        acts += " | asymmetric" if self.weight_scheme == "asymmetric" else ""
        acts += " | seen vocabulary" if self.vocabulary == "seen" else ""
        acts += f" | embeddings {self.embedding_bits} bits" if self.embedding_bits != 32 else ""
        return f"{knobs} init={self.student_init} | bits {bits} | sparsity {sparsity}{acts}"
