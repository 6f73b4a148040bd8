"""Which compression method reaches which layers of the architectures users bring.

For each model of the contract suite (``tests/test_architectures.py``, whose definitions this
imports so that the two never differ), built as slimsearch compresses it, print:

- its Linear and Conv2d layers by kind (depthwise and grouped convolutions apart, attention
  projections apart) and their weights;
- structured pruning: the layers whose output channels may go (attention: whole heads,
  through ``q_proj``), less those a run finds it cannot shrink before its first trial
  (``structured_blockers``), and whether all of them at once still make a working model;
- unstructured / global and 2:4 sparsity, and quantization: the layers they reach (2:4 needs
  a fan-in that is a multiple of 4);
- PyTorch's int8 kernels: dynamic (Linear) always, static (Conv2d and Linear) when torch.fx
  traces the model with one input tensor and the int8 graph runs;
- what stays float: weight tensors no method reaches, and the rest (biases, norms) by count.

    python benchmarks/architectures.py
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from datetime import date
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slimsearch.compression.pipeline import left_float  # noqa: E402
from slimsearch.compression.pruning import prune_structured, structured_blockers  # noqa: E402
from slimsearch.runtimes.int8 import _static_int8_or_why  # noqa: E402
from slimsearch.spaces import LayerRecipe, Recipe, compressible_layers  # noqa: E402
from slimsearch.tasks.attention import ROLES, attention_blocks  # noqa: E402
from tests.test_architectures import ARCHITECTURES  # noqa: E402


def kind(name: str, module: nn.Module, attention: set[str], parent: nn.Module) -> str:
    if name in attention:
        return "attention projection"
    if type(parent).__name__ == "SqueezeExcitation":
        return "squeeze-excitation conv"
    if isinstance(module, nn.Conv2d):
        if module.groups == module.in_channels == module.out_channels and module.groups > 1:
            return "depthwise conv"
        return "grouped conv" if module.groups > 1 else "conv"
    return "linear"


def summarise(name: str) -> dict[str, str]:
    package = ARCHITECTURES[name][3]
    if package and importlib.util.find_spec(package) is None:
        return {"model": name, "skipped": f"{package} is not installed"}
    from tests.test_architectures import built
    model, inputs = built(name)
    example = inputs(1)
    infos = compressible_layers(model, example)
    modules = dict(model.named_modules())
    attention = {b.layer_name(role) for b in attention_blocks(model).values() for role in ROLES}
    kinds: dict[str, list[str]] = {}
    for info in infos:
        parent = modules[info.name.rpartition(".")[0]]
        kinds.setdefault(kind(info.name, modules[info.name], attention, parent), []).append(info.name)
    structured = [i.name for i in infos if i.structured_ok]
    heads = [n for n in structured if n in attention]
    # what a run finds before its first trial: layers structured pruning cannot shrink
    blocked = structured_blockers(model, example, structured)
    try:
        prune_structured(model, dict.fromkeys(set(structured) - set(blocked), 0.25), example)
        together = "yes"
    except Exception as exc:  # what a user would see in the trial's record
        together = f"no ({type(exc).__name__})"
    model, _ = built(name)  # unpruned again
    fits_24 = [i.name for i in infos if i.fan_in % 4 == 0]
    linear = [i.name for i in infos if isinstance(modules[i.name], nn.Linear)]
    static = "one tensor input needed"
    if isinstance(example, torch.Tensor):
        form, why = _static_int8_or_why(model, [i.name for i in infos], list(example.shape[1:]),
                                        batch=inputs(8), calibration=inputs(8))
        static = "yes" if form is not None else f"no, dynamic instead ({why[:110]})"
    recipe = Recipe(student={}, layers={i.name: LayerRecipe(bits=8) for i in infos})
    untouched = left_float(model, recipe)
    reached = {f"{i.name}.weight" for i in infos}
    other = sum(p.numel() for n, p in model.named_parameters()
                if n not in reached and n not in untouched)
    total = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "layers": ", ".join(f"{len(v)} {k}" for k, v in kinds.items()),
        "structured": f"{len(structured) - len(blocked)} of {len(infos)} layers ({len(heads)} by "
                      f"whole heads), all at once: {together}; left to the other methods: "
                      + (", ".join(f"{n} ({why[:60]})" for n, why in blocked.items()) or "none"),
        "unstructured, global, quantization": f"all {len(infos)}",
        "2:4": f"{len(fits_24)} of {len(infos)}",
        "int8 dynamic": f"{len(linear)} Linear",
        "int8 static": static,
        "left float": (", ".join(f"{n} ({c})" for n, c in untouched.items()) or "none")
        + f"; biases and norms {other} of {total} parameters",
    }


def main() -> None:
    print(f"# {date.today()}, {platform.machine()}, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    for name in ARCHITECTURES:
        row = summarise(name)
        print(f"\n## {row.pop('model')}")
        for key, value in row.items():
            print(f"- {key}: {value}")


if __name__ == "__main__":
    main()
