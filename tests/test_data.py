"""Data as users have it: Splits, Datasets, DataLoaders and callables of (inputs, targets)
batches with tensor, tuple or dict inputs, and model outputs in every form (tasks.data)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimsearch.cli import main
from slimsearch.compression import MODEL_FILE, CompressedModel, save_artifact
from slimsearch.compression.distill import FeatureHint
from slimsearch.errors import ConfigError
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes import RUNTIMES
from slimsearch.tasks import Split, Task, factory_path, model_factory
from slimsearch.tasks.data import Data, as_data, call_model, output_tensor
from slimsearch.training import TeacherTargets, accuracy, fit, predict

CPU = torch.device("cpu")


class DictNet(nn.Module):
    """Takes keyword tensors (as a Hugging Face model does) and returns a dict of logits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, width)
        self.head = nn.Linear(width, 10)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.hidden(pixels * mask)))}


@model_factory
def dict_net(*, width: int = 32) -> DictNet:
    return DictNet(width)


class DictSamples(torch.utils.data.Dataset):
    """A map-style Dataset of ({"pixels", "mask"}, label) samples."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = self.split.x[i]
        return {"pixels": x, "mask": torch.ones_like(x)}, self.split.y[i]


def test_every_form_of_a_split_reads_the_same_samples(digits_mlp_task: Task) -> None:
    split = digits_mlp_task.val
    loader = DataLoader(TensorDataset(split.x, split.y), batch_size=50)
    forms = {"split": split, "dataset": TensorDataset(split.x, split.y), "loader": loader,
             "callable": lambda: iter(loader), "list": list(loader)}
    for name, source in forms.items():
        data = as_data(source, "val")
        assert torch.equal(data.targets(), split.y), name
        inputs, targets = data.head(70)
        assert torch.equal(inputs, split.x[:70]) and torch.equal(targets, split.y[:70]), name
        example = data.example(len(split) + 5)  # repeated past the split's end
        assert torch.equal(example[len(split):], split.x[:5]), name


def test_the_fingerprint_ignores_the_order_a_loader_gives(digits_mlp_task: Task) -> None:
    split = digits_mlp_task.val
    dataset = TensorDataset(split.x, split.y)
    ordered = as_data(DataLoader(dataset, batch_size=64), "val").fingerprint()
    shuffled = as_data(DataLoader(dataset, batch_size=17, shuffle=True), "val").fingerprint()
    assert ordered == shuffled
    other = TensorDataset(split.x + 1, split.y)
    assert as_data(DataLoader(other, batch_size=64), "val").fingerprint() != ordered


@pytest.mark.parametrize(("batch", "message"), [
    ([torch.zeros(2, 3)], "a list of 1, not (inputs, targets)"),
    (torch.zeros(2, 3), "a Tensor, not (inputs, targets)"),
    (("text", torch.zeros(2)), "inputs of type str"),
    (({"a": torch.zeros(2, 3), "b": "mask"}, torch.zeros(2)), "holding non-tensors"),
    ((torch.zeros(2, 3), [0, 1]), "targets of type list"),
    ((torch.zeros(2, 3), torch.zeros(3)), "do not hold the same number of samples"),
])
def test_a_batch_that_is_not_inputs_and_targets_is_named_with_the_fix(batch, message: str) -> None:
    with pytest.raises(ConfigError, match="the train split's batch 0") as caught:
        next(as_data([batch], "train").batches())
    assert message in str(caught.value)


def test_a_split_that_can_be_read_only_once_is_refused() -> None:
    batches = iter([(torch.zeros(2, 3), torch.zeros(2))])
    with pytest.raises(ConfigError, match="iterated only once.*function that returns"):
        as_data(batches, "train")
    with pytest.raises(ConfigError, match="the task's val split is a Tensor"):
        as_data(torch.zeros(3), "val")


def test_batches_padded_to_different_lengths_are_named_with_the_fix() -> None:
    batches = [(torch.zeros(4, 7, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
               (torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long))]
    data = as_data(batches, "train")
    assert data.head(4)[0].shape == (4, 7)  # within one batch: fine
    with pytest.raises(ConfigError, match="different shapes.*padding='max_length'"):
        data.head(6)


def test_a_shuffling_loader_is_read_in_a_fixed_order_for_examples_and_digests(
        digits_mlp_task: Task) -> None:
    split = digits_mlp_task.val
    loader = DataLoader(TensorDataset(split.x, split.y), batch_size=32, shuffle=True)
    first, again = as_data(loader, "val"), as_data(loader, "val")
    assert torch.equal(first.example(40), split.x[:40])
    assert torch.equal(first.targets(), again.targets())
    assert first.fingerprint() == again.fingerprint()


@pytest.mark.parametrize(("targets", "message"), [
    (lambda y: y.float(), "float32"),
    (lambda y: y[:, None], "squeeze"),
    (lambda y: y.bool(), "bool"),
])
def test_targets_that_are_not_class_indices_stop_before_training(digits_mlp_task: Task,
                                                                 targets, message: str) -> None:
    base = digits_mlp_task
    bad = [(base.val.x[:50], targets(base.val.y[:50]))]
    task = Task(name="bad", make_model=base.make_model, teacher_kwargs=base.teacher_kwargs,
                student_choices=base.student_choices, train=base.train, val=bad, test=base.test)
    with pytest.raises(ConfigError, match="the val split's targets") as caught:
        task.check_data()
    assert message in str(caught.value) and "dtype=torch.long" in str(caught.value)


def test_inputs_are_passed_as_the_model_takes_them() -> None:
    class OneDict(nn.Module):
        def forward(self, batch):
            return batch["a"] * 2

    class Pair(nn.Module):
        def forward(self, a, b):
            return a - b

    a, b = torch.ones(2), torch.full((2,), 3.0)
    assert torch.equal(call_model(OneDict(), {"a": a}), a * 2)  # the dict as its one argument
    assert torch.equal(call_model(Pair(), {"b": b, "a": a}), a - b)  # keywords
    assert torch.equal(call_model(Pair(), (a, b)), a - b)  # positional


def test_outputs_in_every_form_give_the_logits() -> None:
    logits = torch.randn(2, 3)
    assert output_tensor(logits) is logits
    assert output_tensor((logits, torch.zeros(1))) is logits
    assert output_tensor({"loss": torch.zeros(()), "logits": logits}) is logits
    assert output_tensor({"scores": logits}) is logits
    assert output_tensor(SimpleNamespace(logits=logits)) is logits
    with pytest.raises(TypeError, match="returned str"):
        output_tensor("logits")


def test_training_on_a_dict_loader_with_the_teacher_run_per_batch(digits_mlp_task: Task) -> None:
    """A user's DataLoader: slimsearch does not know its order, so the teacher runs on each
    batch; its targets match the ones computed once on the same samples."""
    torch.manual_seed(0)
    train = DataLoader(DictSamples(digits_mlp_task.train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = as_data(DictSamples(digits_mlp_task.val), "val")
    teacher = dict_net(width=64)
    fit(teacher, train, epochs=6, lr=1e-2, batch_size=64, seed=0, device=CPU)
    assert accuracy(teacher, val, device=CPU) > 0.85
    online = TeacherTargets(model=teacher, head="head")
    inputs, _ = val.head(8)
    logits, features = online.on(inputs, None, CPU)
    assert torch.allclose(logits, output_tensor(teacher(**inputs)))
    assert features.shape == (8, 64) and online.head_width == 64
    student = dict_net(width=16)
    fit(student, train, epochs=6, lr=1e-2, batch_size=64, seed=0, device=CPU, teacher=online)
    outputs, targets = predict(student, val, device=CPU)
    assert outputs.shape == (len(targets), 10)
    assert float((outputs.argmax(1) == targets).float().mean()) > 0.8
    # the hint's target, the teacher's head inputs, comes from the same per-batch run
    hinted = dict_net(width=16)
    hint = FeatureHint(hinted, "head", online.head_width, weight=1.0)
    fit(hinted, train, epochs=2, lr=1e-2, batch_size=64, seed=0, device=CPU, teacher=online,
        hint=hint)
    hint.detach()
    assert accuracy(hinted, val, device=CPU) > 0.5


def test_a_dataset_is_batched_here_so_the_teacher_runs_on_it_once(tmp_path: Path,
                                                                   digits_mlp_task: Task) -> None:
    """A map-style Dataset with a length is batched by positions slimsearch draws, so the
    teacher's outputs are computed once per run and looked up by sample, as on a Split; a
    DataLoader's order is the user's, so there the teacher runs on each batch."""
    from slimsearch.experiment import TrainConfig
    from slimsearch.search.teacher import prepare_teacher

    dataset = DictSamples(digits_mlp_task.train)
    data = as_data(dataset, "train")
    assert data.indexed and not as_data(DataLoader(dataset, batch_size=8), "train").indexed
    seen = []
    for inputs, y, index in data.batches(batch_size=64, shuffle=torch.Generator().manual_seed(0)):
        assert torch.equal(y, digits_mlp_task.train.y[index])
        assert torch.equal(inputs["pixels"], digits_mlp_task.train.x[index])
        seen.append(index)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(dataset)))
    task = Task(name="dict", make_model=dict_net, teacher_kwargs={"width": 32},
                student_choices={"width": (16,)}, train=dataset,
                val=DictSamples(digits_mlp_task.val), test=DictSamples(digits_mlp_task.test))
    train = TrainConfig(teacher_epochs=2, batch_size=64, lr=1e-2)
    teacher = prepare_teacher(task, train, seed=0, cache_dir=tmp_path / "teacher", device=CPU)
    targets = teacher.targets
    assert targets.model is None and targets.logits.shape == (len(dataset), 10)
    inputs, _ = as_data(dataset, "train").head(5)
    assert torch.allclose(targets.logits[:5], teacher.model(**inputs)["logits"], atol=1e-5)
    again = prepare_teacher(task, train, seed=0, cache_dir=tmp_path / "teacher", device=CPU)
    assert not again.trained_here and torch.equal(again.targets.logits, targets.logits)


class TokenNet(nn.Module):
    """Token ids and a mask in, as a text classifier takes them."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(torch.relu(self.hidden(pooled)))


@model_factory
def token_net(*, width: int = 16) -> TokenNet:
    return TokenNet(width)


class PairNet(nn.Module):
    """Two positional tensors in (a tuple batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(64, 16), nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.left(a) + self.right(b)))


@model_factory
def pair_net() -> PairNet:
    return PairNet()


def _token_batches(samples: int = 40, length: int = 12) -> list:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (samples, length), generator=generator)
    mask = (torch.rand(samples, length, generator=generator) > 0.2).long()
    labels = torch.randint(0, 3, (samples,), generator=generator)
    return [({"input_ids": ids[i:i + 10], "attention_mask": mask[i:i + 10]}, labels[i:i + 10])
            for i in range(0, samples, 10)]


@pytest.mark.parametrize(("runtime", "dtype"), [("torch", "fp32"), ("torch", "bf16"),
                                                ("torchscript", "fp32"), ("onnxruntime", "fp32")])
def test_token_ids_stay_integers_in_every_runtime(runtime: str, dtype: str,
                                                  tmp_path: Path) -> None:
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    data = as_data(_token_batches(), "val")
    model = token_net()
    fit(model, data, epochs=2, lr=1e-2, batch_size=10, seed=0, device=CPU)  # ids as ids
    path = save_artifact(CompressedModel(model=model, factory=factory_path(token_net),
                                         kwargs={"width": 16}), tmp_path / MODEL_FILE)
    executable = RUNTIMES[runtime].materialize(path, target=TargetConfig(device="cpu",
                                                                         dtype=dtype),
                                               device=CPU, out_dir=tmp_path,
                                               example=data.example(4))
    native = executable.native(data.example(4))
    ids = native["input_ids"]
    assert str(ids.dtype) in ("torch.int64", "int64")  # never cast to the float dtype
    outputs, _ = executable.predict(data)
    expected, _ = predict(model, data, device=CPU)
    assert torch.allclose(outputs, expected, atol=0.05 if dtype == "bf16" else 1e-5)
    assert executable.form["inputs"].startswith("{input_ids: int64[1, 12]")


@pytest.mark.parametrize("runtime", ["torch", "torchscript", "onnxruntime"])
def test_every_runtime_runs_a_tuple_input_model(runtime: str, tmp_path: Path,
                                                digits_mlp_task: Task) -> None:
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = pair_net().eval()
    path = save_artifact(CompressedModel(model=model, factory=factory_path(pair_net), kwargs={}),
                         tmp_path / MODEL_FILE)
    x, y = digits_mlp_task.val.x[:64], digits_mlp_task.val.y[:64]
    data = as_data([((x, x.flip(1)), y)], "val")
    executable = RUNTIMES[runtime].materialize(path, target=TargetConfig(device="cpu"),
                                               device=CPU, out_dir=tmp_path,
                                               example=data.example(4))
    outputs, _ = executable.predict(data)
    assert torch.allclose(outputs, model(x, x.flip(1)), atol=1e-5)


def test_static_int8_of_a_dict_input_model_runs_dynamic_and_says_why(
        digits_mlp_task: Task) -> None:
    from slimsearch.runtimes.int8 import engine, plan_execution

    if engine() is None:
        pytest.skip("this torch build has no int8 engine")
    data = as_data(DictSamples(digits_mlp_task.val), "val")
    model = dict_net(width=256).eval()
    plan = plan_execution(model, {"hidden": 8, "head": 8}, batch=data.example(64),
                          calibration=lambda: pytest.fail("a dynamic plan needs no calibration"),
                          activation_bits=8, threads=1)
    assert plan is not None and plan.mode == "dynamic"
    assert "not one tensor" in plan.decisions["static"]


def test_structured_pruning_of_a_dict_input_model(digits_mlp_task: Task) -> None:
    from slimsearch.compression.pruning import prune_structured

    data = as_data(DictSamples(digits_mlp_task.val), "val")
    model = dict_net(width=32).eval()
    record = prune_structured(model, {"hidden": 0.5}, data.example(1), importance="taylor",
                              gradient_batch=data.head(16))
    assert record["hidden"]["channels_after"] == 16
    assert model.head.in_features == 16
    assert output_tensor(call_model(model, data.example(3))).shape == (3, 10)


@pytest.mark.parametrize("runtime", ["torch", "torchscript", "onnxruntime"])
def test_every_runtime_runs_a_dict_input_model(runtime: str, tmp_path: Path,
                                               digits_mlp_task: Task) -> None:
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = dict_net(width=16).eval()
    path = save_artifact(CompressedModel(model=model, factory=factory_path(dict_net),
                                         kwargs={"width": 16}), tmp_path / MODEL_FILE)
    data = as_data(DictSamples(digits_mlp_task.val), "val")
    example = data.example(4)
    executable = RUNTIMES[runtime].materialize(path, target=TargetConfig(device="cpu"),
                                               device=CPU, out_dir=tmp_path, example=example)
    outputs, targets = executable.predict(data)
    expected, _ = predict(model, data, device=CPU)
    assert torch.allclose(outputs, expected, atol=1e-5) and len(targets) == len(expected)
    executable.run(executable.native(example))  # the form latency is timed in


DICT_TASK = '''
import torch
from torch import nn
from torch.utils.data import DataLoader
import slimsearch
from slimsearch.tasks.digits import make_digits_mlp_task


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 64))  # a weight no method reaches
        self.hidden = nn.Linear(64, int(64 * width))
        self.head = nn.Linear(int(64 * width), 10)

    def forward(self, pixels, mask):
        return {"logits": self.head(torch.relu(self.hidden(pixels * mask * self.scale)))}


@slimsearch.model_factory
def net(*, width=1.0):
    return Net(width)


class Samples(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        x = self.split.x[i]
        return {"pixels": x, "mask": torch.ones_like(x)}, self.split.y[i]


def make_task(seed):
    base = make_digits_mlp_task(seed)
    train = DataLoader(Samples(base.train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(Samples(base.test), batch_size=100)
    return slimsearch.Task(name="dict-inputs", make_model=net, teacher_kwargs={"width": 1.0},
                           student_choices={"width": (0.5, 1.0)}, train=train,
                           val=Samples(base.val), test=lambda: iter(test),
                           metrics=("f1_macro", "accuracy"))
'''

EXPERIMENT = """\
name = "dict"
task = "dict_task:make_task"
seed = 0

[search]
trials = 6
sampler = "random"

[space]
bits = [4, 8, 32]
sparsity = [0.0, 0.5]

[train]
teacher_epochs = 8
distill_epochs = 2
finetune_epochs = 1
qat_epochs = 1

[target]
device = "cpu"
"""


@pytest.mark.slow
def test_a_dataloader_task_with_dict_inputs_end_to_end(tmp_path: Path) -> None:
    """search, report, pick, export, and load_model in a fresh process reproduces the
    exported trial's test score (macro-F1, the task's first metric) exactly."""
    (tmp_path / "dict_task.py").write_text(DICT_TASK)
    experiment = tmp_path / "dict.toml"
    experiment.write_text(EXPERIMENT)
    run_dir = tmp_path / "run"
    assert main(["run", str(experiment), "--run-dir", str(run_dir)]) == 0
    pareto = json.loads((run_dir / "pareto.json").read_text())
    teacher = pareto["teacher"]
    assert teacher["metric"] == "f1_macro" and teacher["val_samples"] == 359
    assert teacher["val_accuracy"] == teacher["val_score_f1_macro"] > 0.85  # the objective
    assert teacher["val_score_accuracy"] > 0.85  # the second metric, reported
    completed = [json.loads(p.read_text()) for p in sorted(run_dir.glob("trials/*/metrics.json"))]
    assert len(completed) == 6
    assert main(["report", str(run_dir)]) == 0
    assert "Left float: 64 weights of trial" in (run_dir / "report.html").read_text()
    assert all(m["left_float_weights"] == 64 for m in completed)
    assert main(["pick", str(run_dir), "--max-accuracy-drop", "0.05"]) == 0
    entry = min(pareto["trials"], key=lambda t: t["metrics"]["size_bytes"])
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--trial", str(entry["number"]), "--out", str(bundle),
                 "--tolerance", "1.0"]) == 0
    assert json.loads((bundle / "verification.json").read_text())["passed"]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        import slimsearch
        from dict_task import make_task
        from slimsearch.training import score
        model = slimsearch.load_model({str(bundle)!r})
        task = make_task(0)
        print(repr(score(model, task.data("test"), task.metric, device=torch.device("cpu"))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=tmp_path.parent)
    assert float(out.stdout.strip()) == entry["metrics"]["test_accuracy"]


def test_data_wraps_itself() -> None:
    data = Data("val", [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))])
    assert as_data(data, "val") is data and data.in_memory is None


def test_weights_no_method_reaches_are_named_as_left_float() -> None:
    """nn.MultiheadAttention computes with its packed in_proj and its out_proj's weight
    without calling out_proj: no Linear layer of the space holds them, and they are said so."""
    from slimsearch.compression.pipeline import left_float
    from slimsearch.spaces import LayerRecipe, Recipe, compressible_layers
    from slimsearch.tasks.attention import unpack_attention

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))

    model = Attention().eval()
    ids = torch.randint(0, 20, (1, 5))
    layers = [info.name for info in compressible_layers(model, ids)]
    assert layers == ["head"]  # out_proj is a Linear, but never called as one
    recipe = Recipe(student={}, layers=dict.fromkeys(layers, LayerRecipe(bits=8)))
    assert left_float(model, recipe) == {"embed.weight": 320, "attention.in_proj_weight": 768,
                                         "attention.out_proj.weight": 256}
    # as students are built (Task.build_model), attention is four Linear layers: only the
    # embedding table stays out of reach
    unpack_attention(model)
    layers = [info.name for info in compressible_layers(model, ids)]
    assert layers == [f"attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                      ] + ["head"]
    recipe = Recipe(student={}, layers=dict.fromkeys(layers, LayerRecipe(bits=8)))
    assert left_float(model, recipe) == {"embed.weight": 320}
