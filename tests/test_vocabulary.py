"""Vocabulary pruning and embedding tables stored in fewer bits (compression.vocabulary):
the token table keeps the rows of the tokens training uses, the model still takes the
tokenizer's ids, a token that was not kept reads the unknown token's row, and the model file
carries the mapping (every runtime, load_model, a search end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from slimsearch.cli import main
from slimsearch.compression import MODEL_FILE, CompressedModel, build, save_artifact
from slimsearch.compression.artifact import load_float_model
from slimsearch.compression.vocabulary import VocabularyEmbedding, prune_vocabulary
from slimsearch.errors import ConfigError
from slimsearch.experiment import SpaceConfig, TargetConfig, TrainConfig
from slimsearch.runtimes import RUNTIMES
from slimsearch.spaces import Recipe, SearchSpace
from slimsearch.tasks import Task, Vocabulary, factory_path, model_factory
from slimsearch.tasks.data import as_data
from slimsearch.tasks.tokens import token_embeddings, tokens_seen
from slimsearch.training import TeacherTargets, fit, predict

CPU = torch.device("cpu")
PAD, UNK, CLS, SEP = 0, 1, 2, 3
TOKENS, LENGTH = 60, 12
#: Training uses ids below this; val and test also hold ids from here to TOKENS (unseen).
SEEN_BELOW = 40


class TextNet(nn.Module):
    """Token ids and a mask in: token + position tables, mean over the mask, two Linears."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.tokens = nn.Embedding(TOKENS, 16, padding_idx=PAD)
        self.positions = nn.Embedding(LENGTH, 16)
        self.hidden = nn.Linear(16, width)
        self.head = nn.Linear(width, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        places = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.tokens(input_ids) + self.positions(places)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.relu(self.hidden(pooled)))


@model_factory
def text_net(*, width: int = 32) -> TextNet:
    return TextNet(width)


class TokenSamples(torch.utils.data.Dataset):
    """``({"input_ids", "attention_mask"}, label)`` samples, as a tokenizer's Dataset gives."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.x = {"input_ids": ids, "attention_mask": mask}
        self.y = labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v[i] for k, v in self.x.items()}, self.y[i]


def token_split(samples: int, seed: int, *, unseen: bool) -> TokenSamples:
    """Class c is told by tokens 4 + 12c .. 15 + 12c; the others are noise. With ``unseen``,
    a quarter of the tokens come from ids the training split never uses."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (samples,), generator=g)
    ids = torch.randint(4, SEEN_BELOW, (samples, LENGTH), generator=g)
    telling = 4 + 12 * labels[:, None] + torch.randint(0, 12, (samples, 4), generator=g)
    ids[:, 1:5] = telling
    if unseen:
        ids[:, 5:8] = torch.randint(SEEN_BELOW, TOKENS, (samples, 3), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(8, LENGTH + 1, (samples,), generator=g)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    ids[torch.arange(samples), lengths - 1] = SEP
    return TokenSamples(ids, mask, labels)


VOCABULARY = Vocabulary(input="input_ids", unknown=UNK, keep=(PAD, UNK, CLS, SEP))


def make_text_task(seed: int = 0, *, vocabulary: bool = True) -> Task:
    return Task(name="tokens", make_model=text_net, teacher_kwargs={"width": 32},
                student_choices={"width": (16, 32)}, train=token_split(300, seed, unseen=False),
                val=token_split(150, seed + 1, unseen=True),
                test=token_split(150, seed + 2, unseen=True),
                vocabulary=VOCABULARY if vocabulary else None)


def test_the_token_table_keeps_the_rows_training_uses_and_unseen_tokens_read_unk() -> None:
    task = make_text_task()
    torch.manual_seed(0)
    model = text_net().eval()
    example = task.example_inputs(2)
    assert token_embeddings(model, example, "input_ids") == ["tokens"]  # not the positions
    seen = tokens_seen(task.data("train"), "input_ids").tolist()
    assert seen == [PAD, CLS, SEP, *range(4, SEEN_BELOW)]  # [UNK] never occurs in training
    original = TextNet()
    original.load_state_dict(model.state_dict())
    original.eval()
    kept = prune_vocabulary(model, VOCABULARY, task.data("train"), example)
    assert kept == {"tokens": {"tokens": SEEN_BELOW, "of": TOKENS}}
    table = model.tokens
    assert isinstance(table, VocabularyEmbedding) and table.weight.shape == (SEEN_BELOW, 16)
    assert table.padding_idx == PAD and model.positions.num_embeddings == LENGTH
    train_inputs = task.train.x  # every id of it kept
    with torch.no_grad():
        assert torch.equal(model(**train_inputs), original(**train_inputs))  # the same there
        val = task.val.x
        as_unk = dict(val, input_ids=torch.where(val["input_ids"] >= SEEN_BELOW, UNK,
                                                 val["input_ids"]))
        assert torch.equal(model(**val), original(**as_unk))  # what [UNK] would have given


def test_the_model_file_carries_the_mapping_to_every_runtime(tmp_path: Path) -> None:
    task = make_text_task()
    torch.manual_seed(0)
    model = text_net().eval()
    full = save_artifact(CompressedModel(model, factory_path(text_net), {"width": 32}),
                         tmp_path / "full.safetensors")
    prune_vocabulary(model, VOCABULARY, task.data("train"), task.example_inputs(1))
    path = save_artifact(CompressedModel(model, factory_path(text_net), {"width": 32}),
                         tmp_path / MODEL_FILE)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as stored:  # the kept rows, and one int32 row per token
        assert stored.get_tensor("tokens.weight.values").numel() == SEEN_BELOW * 16
        assert stored.get_tensor("tokens.rows").dtype == torch.int32
        assert stored.get_tensor("tokens.rows").numel() == TOKENS
    assert path.stat().st_size < full.stat().st_size
    loaded = load_float_model(path)
    assert isinstance(loaded.tokens, VocabularyEmbedding)
    expected, _ = predict(model, task.data("val"), device=CPU)
    for runtime in ("torch", "torchscript", "onnxruntime"):
        if runtime == "onnxruntime":
            pytest.importorskip("onnxruntime")
        executable = RUNTIMES[runtime].materialize(
            path, target=TargetConfig(device="cpu"), device=CPU, out_dir=tmp_path / runtime,
            example=task.example_inputs(4))
        outputs, _ = executable.predict(task.data("val"))
        assert torch.allclose(outputs, expected, atol=1e-5), runtime


def test_a_recipe_prunes_the_vocabulary_and_stores_embeddings_in_fewer_bits(
        tmp_path: Path) -> None:
    task = make_text_task()
    torch.manual_seed(0)
    teacher = text_net()
    fit(teacher, task.data("train"), epochs=3, lr=1e-2, batch_size=32, seed=0, device=CPU)
    targets = TeacherTargets(model=teacher.eval(), head="head")
    space = SearchSpace(task, SpaceConfig(bits=[8, 32], vocabulary=("seen", "all"),
                                          embedding_bits=(4, 32)))
    recipe = Recipe.from_dict({**space.baselines()["teacher"].to_dict(), "vocabulary": "seen",
                               "embedding_bits": 4})
    assert space.contains(recipe) and space.params_of(recipe)["embedding_bits"] == 4
    assert Recipe.from_json(recipe.to_json()) == recipe
    compressed = build(task, teacher, targets, recipe, seed=0, device=CPU,
                       train=TrainConfig(distill_epochs=1, finetune_epochs=1, qat_epochs=1,
                                         batch_size=32, lr=1e-2))
    record = compressed.record
    assert record["stages"]["student"]["vocabulary"] == {"tokens": {"tokens": SEEN_BELOW,
                                                                    "of": TOKENS}}
    assert "qat" in record["stages"] and set(compressed.quantized) == {"tokens", "positions"}
    assert "left_float" not in record  # the tables are reached now
    assert compressed.quantized["tokens"].bits == 4
    path = save_artifact(compressed, tmp_path / MODEL_FILE)
    from slimsearch.compression.artifact import read_header

    header = read_header(path)
    assert header["tensors"]["tokens.weight"]["bits"] == 4
    assert header["modules"]["tokens"]["type"] == "VocabularyEmbedding"
    loaded = load_float_model(path)
    expected, _ = predict(compressed.model, task.data("test"), device=CPU)
    assert torch.equal(predict(loaded, task.data("test"), device=CPU)[0], expected)


def test_vocabulary_choices_the_task_cannot_take_stop_before_training() -> None:
    with pytest.raises(ConfigError, match=r"space.vocabulary = \['seen'\]: task 'tokens' does "
                                          r"not say where its model reads token ids"):
        SearchSpace(make_text_task(vocabulary=False), SpaceConfig(vocabulary=("seen",)))
    wrong = Task(**{**make_text_task().__dict__,
                    "vocabulary": Vocabulary(input="token_ids", unknown=UNK)})
    with pytest.raises(ConfigError, match="looks up its input 'token_ids'.*no 'token_ids'"):
        SearchSpace(wrong, SpaceConfig(vocabulary=("seen", "all")))
    with pytest.raises(ConfigError, match="space.vocabulary"):
        SpaceConfig(vocabulary=("used",))
    with pytest.raises(ConfigError, match="space.embedding_bits"):
        SpaceConfig(embedding_bits=(16,))


TEXT_TASK = '''
import sys
sys.path.insert(0, {tests!r})
from test_vocabulary import make_text_task


def make_task(seed):
    return make_text_task(seed)
'''

EXPERIMENT = """\
name = "tokens"
task = "text_task:make_task"
seed = 0

[search]
trials = 6
sampler = "random"

[space]
bits = [8, 32]
sparsity = [0.0, 0.5]
vocabulary = ["seen", "all"]
embedding_bits = [4, 8, 32]

[train]
teacher_epochs = 6
distill_epochs = 2
finetune_epochs = 1
qat_epochs = 1
batch_size = 32
lr = 0.01

[target]
device = "cpu"
"""


@pytest.mark.slow
def test_a_search_over_the_vocabulary_end_to_end(tmp_path: Path) -> None:
    """search, report, export the smallest trial; load_model in a fresh process reproduces
    its test accuracy exactly, unseen test tokens read [UNK] there too."""
    (tmp_path / "text_task.py").write_text(TEXT_TASK.format(tests=str(Path(__file__).parent)))
    experiment = tmp_path / "tokens.toml"
    experiment.write_text(EXPERIMENT)
    run_dir = tmp_path / "run"
    assert main(["run", str(experiment), "--run-dir", str(run_dir)]) == 0
    assert main(["report", str(run_dir)]) == 0
    pareto = json.loads((run_dir / "pareto.json").read_text())
    recipes = [json.loads(p.read_text()) for p in sorted(run_dir.glob("trials/*/recipe.json"))]
    assert {r.get("vocabulary", "all") for r in recipes} >= {"seen"}
    entry = min(pareto["trials"], key=lambda t: t["metrics"]["size_bytes"])
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--trial", str(entry["number"]), "--out", str(bundle),
                 "--tolerance", "1.0"]) == 0
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        import slimsearch
        from text_task import make_task
        from slimsearch.training import score
        model = slimsearch.load_model({str(bundle)!r})
        task = make_task(0)
        print(repr(score(model, task.data("test"), task.metric, device=torch.device("cpu"))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=tmp_path.parent)
    assert float(out.stdout.strip()) == entry["metrics"]["test_accuracy"]


def test_the_data_form_of_a_token_split() -> None:
    data = as_data(token_split(20, 0, unseen=True), "val")
    inputs, _ = data.head(3)
    assert inputs["input_ids"].dtype == torch.long and inputs["input_ids"].shape == (3, LENGTH)
