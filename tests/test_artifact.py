"""The model file: exact rebuild by ``load_model`` (here and in a fresh process), sizes that
follow the encoding, and refusal of files, factories and bundles that are not what they claim."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimsearch.compression import (
    MODEL_FILE,
    CompressedModel,
    load_float_model,
    read_header,
    save_artifact,
)
from slimsearch.compression.packing import packed_nbytes
from slimsearch.compression.pruning import magnitude_masks, prune_structured
from slimsearch.compression.quantization import quantize_layers_
from slimsearch.errors import ArtifactError
from slimsearch.evaluators import EvalContext, SizeEvaluator, evaluate
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes.torch_runtimes import TorchRuntime
from slimsearch.tasks import Task, factory_path, model_factory
from slimsearch.tasks.digits import digits_cnn, digits_mlp


class TinyResNet(nn.Module):
    """conv+BN stem, one residual block with two conv+BN, then a Linear head on 1x8x8 inputs.

    The BatchNorms have a non-default ``eps``: a pruned BN rebuilt from the file must keep it."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(channels, eps=0.1)
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(channels, eps=0.1)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(channels, eps=0.1)
        self.fc = nn.Linear(channels * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 2), 1))


@model_factory
def tiny_resnet(*, channels: int = 8) -> nn.Module:
    """A module-level factory, so ``load_model`` may rebuild it (in this process)."""
    return TinyResNet(channels=channels)


def compress(factory: Callable[..., nn.Module], kwargs: dict, example: torch.Tensor, *,
             structured: dict[str, float] | None = None, unstructured: dict[str, float] | None = None,
             bits: dict[str, int] | None = None, seed: int = 0) -> CompressedModel:
    """Build ``factory(**kwargs)`` and compress it by hand, in the pipeline's order."""
    torch.manual_seed(seed)
    model = factory(**kwargs)
    for module in model.modules():  # non-trivial BatchNorm statistics, so they must round-trip
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    model.eval()
    prune_structured(model, structured or {}, example)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    magnitude_masks(layers, unstructured or {})
    quantized = quantize_layers_(layers, bits or {})
    return CompressedModel(model=model, factory=factory_path(factory), kwargs=dict(kwargs),
                           quantized=quantized)


def mixed_mlp() -> CompressedModel:
    """digits_mlp 64-64-64-10: a structurally pruned 4-bit layer, a sparse 2-bit one, sparse 8-bit head."""
    return compress(digits_mlp, {"width": 0.25, "depth": 2}, torch.randn(1, 64),
                    structured={"hidden.0": 0.5}, unstructured={"hidden.1": 0.5, "head": 0.25},
                    bits={"hidden.0": 4, "hidden.1": 2, "head": 8})


def mixed_cnn() -> CompressedModel:
    return compress(digits_cnn, {"width": 0.25, "fc_width": 0.25}, torch.randn(1, 1, 32, 32),
                    structured={"conv2": 0.5}, unstructured={"conv3": 0.6, "fc1": 0.8},
                    bits={"conv1": 8, "conv3": 3, "fc1": 5})


def mixed_resnet() -> CompressedModel:
    return compress(tiny_resnet, {"channels": 8}, torch.randn(1, 1, 8, 8),
                    structured={"stem": 0.25, "conv_a": 0.5}, unstructured={"conv_b": 0.5},
                    bits={"conv_a": 4, "fc": 6})


def float_mlp() -> CompressedModel:
    return compress(digits_mlp, {"width": 0.25, "depth": 1}, torch.randn(1, 64))


CASES: dict[str, tuple[Callable[[], CompressedModel], tuple[int, ...]]] = {
    "mixed-mlp": (mixed_mlp, (64,)),
    "mixed-cnn": (mixed_cnn, (1, 32, 32)),
    "mixed-resnet": (mixed_resnet, (1, 8, 8)),
    "float-mlp": (float_mlp, (64,)),
}


def file_size(compressed: CompressedModel, folder: Path, name: str) -> int:
    return save_artifact(compressed, folder / name).stat().st_size


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_model_rebuilds_the_model_bit_for_bit(case: str, tmp_path: Path) -> None:
    make, input_shape = CASES[case]
    compressed = make()
    path = save_artifact(compressed, tmp_path / MODEL_FILE)
    loaded = load_float_model(path)
    assert not loaded.training
    expected_state = compressed.model.state_dict()
    loaded_state = loaded.state_dict()
    assert list(loaded_state) == list(expected_state)
    for name, value in expected_state.items():
        assert loaded_state[name].shape == value.shape, name
        assert torch.equal(loaded_state[name], value), name
    torch.manual_seed(1)
    x = torch.randn(16, *input_shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed.model(x))


def test_pruned_shapes_are_rebuilt(tmp_path: Path) -> None:
    loaded = load_float_model(save_artifact(mixed_mlp(), tmp_path / MODEL_FILE))
    assert (loaded.hidden[0].out_features, loaded.hidden[1].in_features) == (32, 32)
    loaded = load_float_model(save_artifact(mixed_resnet(), tmp_path / "resnet.safetensors"))
    assert loaded.stem.out_channels == 6 and loaded.bn0.num_features == 6
    assert loaded.conv_a.out_channels == 4 and loaded.bn_a.running_var.shape == (4,)
    assert loaded.bn_a.eps == loaded.bn0.eps == 0.1
    assert loaded.fc.in_features == 6 * 2 * 2


def test_file_size_is_what_the_size_metric_reports(tmp_path: Path, digits_mlp_task: Task) -> None:
    compressed = mixed_mlp()
    path = save_artifact(compressed, tmp_path / MODEL_FILE)
    target, cpu = TargetConfig(device="cpu"), torch.device("cpu")
    executable = TorchRuntime().materialize(path, target=target, device=cpu, out_dir=tmp_path,
                                            example=digits_mlp_task.example_inputs(1))
    context = EvalContext(task=digits_mlp_task, executable=executable, model=load_float_model(path),
                          target=target, device=cpu)
    metrics = evaluate(context, [SizeEvaluator()])
    assert metrics["size_bytes"] == os.path.getsize(path)
    assert metrics["parameters"] == sum(p.numel() for p in compressed.model.parameters())


def test_quantized_weights_are_stored_bit_packed(tmp_path: Path) -> None:
    compressed = mixed_mlp()
    path = save_artifact(compressed, tmp_path / MODEL_FILE)
    entries = read_header(path)["tensors"]
    with safe_open(str(path), framework="pt") as reader:
        keys = set(reader.keys())
        for layer, q in compressed.quantized.items():
            entry = entries[f"{layer}.weight"]
            assert entry["encoding"] == "quant" and entry["bits"] == q.bits
            assert f"{layer}.weight.values" not in keys  # no float copy of a quantized weight
            stored = entry["nnz"] if entry["sparse"] else q.codes.numel()
            codes = reader.get_tensor(f"{layer}.weight.codes")
            assert codes.dtype == torch.uint8
            if "codes" in entry["deflate"]:  # zlib made the packed codes smaller still
                assert len(zlib.decompress(codes.numpy().tobytes())) == packed_nbytes(stored, q.bits)
                assert codes.numel() < packed_nbytes(stored, q.bits)
            else:
                assert codes.numel() == packed_nbytes(stored, q.bits)
            assert entry["nnz"] == int((q.codes != 0).sum())
    assert entries["hidden.0.bias"]["encoding"] == "float32"


def test_saving_twice_gives_identical_bytes(tmp_path: Path) -> None:
    first = save_artifact(mixed_cnn(), tmp_path / "a.safetensors").read_bytes()
    second = save_artifact(mixed_cnn(), tmp_path / "b.safetensors").read_bytes()
    assert first == second


def test_sparse_layers_make_the_file_smaller(tmp_path: Path) -> None:
    kwargs, example = {"width": 0.5, "depth": 2}, torch.randn(1, 64)
    dense = file_size(compress(digits_mlp, kwargs, example), tmp_path, "dense.safetensors")
    sparse_model = compress(digits_mlp, kwargs, example,
                            unstructured={"hidden.0": 0.75, "hidden.1": 0.75, "head": 0.75})
    sparse = file_size(sparse_model, tmp_path, "sparse.safetensors")
    # 75% zeros: a 1-bit bitmap + a quarter of the float32 values, about 0.28 of dense
    assert sparse < 0.4 * dense
    entries = read_header(tmp_path / "sparse.safetensors")["tensors"]
    assert entries["hidden.1.weight"]["sparse"] and entries["hidden.1.weight"]["nnz"] == 128 * 128 // 4
    assert not entries["hidden.1.bias"]["sparse"]


def test_fewer_bits_make_the_file_smaller(tmp_path: Path) -> None:
    kwargs, example = {"width": 0.5, "depth": 2}, torch.randn(1, 64)
    names = ("hidden.0", "hidden.1", "head")
    sizes = {b: file_size(compress(digits_mlp, kwargs, example, bits=dict.fromkeys(names, b)),
                          tmp_path, f"{b}.safetensors") for b in (2, 4, 8)}
    dense = file_size(compress(digits_mlp, kwargs, example), tmp_path, "32.safetensors")
    assert sizes[2] < sizes[4] < sizes[8] < dense
    weights = 64 * 128 + 128 * 128 + 128 * 10
    # 8 -> 4 bits saves half a byte per weight (scales, biases and header do not change)
    assert sizes[8] - sizes[4] >= weights // 2 - 64


def test_load_model_refuses_a_factory_without_the_mark(tmp_path: Path) -> None:
    model = digits_mlp(width=0.25, depth=1)
    path = save_artifact(CompressedModel(model=model, factory="os:getcwd", kwargs={}), tmp_path / "x")
    with pytest.raises(ArtifactError, match="model_factory"):
        load_float_model(path)
    path = save_artifact(CompressedModel(model=model, factory="no_such_module_4711:make", kwargs={}),
                         tmp_path / "y")
    with pytest.raises(ArtifactError, match="no_such_module_4711"):
        load_float_model(path)


def test_load_model_refuses_an_object_that_only_pretends_to_carry_the_mark(tmp_path: Path) -> None:
    model = digits_mlp(width=0.25, depth=1)
    path = save_artifact(CompressedModel(model=model, factory="unittest.mock:call", kwargs={}),
                         tmp_path / "x")
    with pytest.raises(ArtifactError):
        load_float_model(path)


def test_load_model_refuses_files_that_are_not_slimsearch_models(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not a slimsearch model"):
        load_float_model(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(ArtifactError):
        load_float_model(garbage)
    with pytest.raises(ArtifactError):
        load_float_model(tmp_path / "missing.safetensors")


def _bundle(folder: Path, compressed: CompressedModel, *, digest: str | None = None) -> Path:
    path = save_artifact(compressed, folder / MODEL_FILE)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"files": {MODEL_FILE: digest or actual}}))
    return folder


def test_load_model_accepts_a_bundle_and_a_trial_folder(tmp_path: Path) -> None:
    compressed = mixed_mlp()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = compressed.model(x)
        assert torch.equal(load_float_model(_bundle(tmp_path / "bundle", compressed))(x), expected)
        trial = tmp_path / "trial"
        save_artifact(compressed, trial / MODEL_FILE)
        assert torch.equal(load_float_model(trial)(x), expected)


def test_load_model_refuses_a_bundle_whose_sha256_does_not_match(tmp_path: Path) -> None:
    compressed = mixed_mlp()
    bundle = _bundle(tmp_path / "wrong-digest", compressed, digest="0" * 64)
    with pytest.raises(ArtifactError, match="sha256"):
        load_float_model(bundle)
    bundle = _bundle(tmp_path / "tampered", compressed)
    data = bytearray((bundle / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor: still a readable file, but not the same one
    (bundle / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_float_model(bundle)


def test_load_model_reproduces_outputs_in_a_fresh_process(tmp_path: Path) -> None:
    compressed = mixed_cnn()
    path = save_artifact(compressed, tmp_path / MODEL_FILE)
    torch.manual_seed(2)
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        expected = compressed.model(x)
    torch.save({"x": x, "y": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent("""
        import sys
        import torch
        from slimsearch import load_model
        model = load_model(sys.argv[1])
        data = torch.load(sys.argv[2])
        with torch.no_grad():
            out = model(data["x"])
        print("MAX_DIFF", float((out - data["y"]).abs().max()))
        sys.exit(0 if torch.equal(out, data["y"]) else 3)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "expected.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MAX_DIFF 0.0" in done.stdout
