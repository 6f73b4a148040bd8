"""benchmarks/fast_end.py: each variant changes what its label says of its hand-made recipe,
and nothing else."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from slimsearch.compression.pruning import kept_channels
from slimsearch.experiment import load_experiment
from slimsearch.spaces import SearchSpace
from slimsearch.spaces.recipe import LayerRecipe
from slimsearch.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fast_end(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    return importlib.import_module("fast_end")


def test_each_variant_changes_what_its_label_says_and_nothing_else(fast_end) -> None:
    task = make_task("digits-cnn", seed=0)
    space = SearchSpace(task, load_experiment(ROOT / "experiments" / "digits_cnn.toml").space)
    made = importlib.import_module("compression").recipes(task, space)
    found = fast_end.variants(made)
    assert set(found) == {fast_end.HALF, fast_end.QUARTER}
    for target, forms in found.items():
        hand_made = made[target]
        assert forms["hand-made"] == hand_made
        for label, recipe in forms.items():
            if label == "hand-made":
                continue
            if "conv1 kept whole" in label:  # the teacher's first convolution, unpruned
                assert recipe.student == {**hand_made.student, "width1": 1.0}
                assert recipe.layers["conv1"] == LayerRecipe(
                    sparsity=0.0, pruning="unstructured", bits=hand_made.layers["conv1"].bits)
            else:
                assert recipe.student == hand_made.student
                assert recipe.layers["conv1"] == hand_made.layers["conv1"]
            four_bit = {n for n in recipe.layers if f"{n}" in label and "4 bits" in label}
            for name, layer in recipe.layers.items():
                if name == "conv1":
                    continue
                expected = hand_made.layers[name]
                if name in four_bit:
                    expected = LayerRecipe(sparsity=expected.sparsity, pruning=expected.pruning,
                                           bits=4)
                assert layer == expected, (label, name)
            lr = {"lr": fast_end.HIGHER_LR} if "distilled at lr" in label else {}
            assert recipe.distillation == {**hand_made.distillation, **lr}
    # the labels name the 4-bit layers the test reads
    assert "conv1 kept whole; conv2, conv3, fc2 in 4 bits" in found[fast_end.HALF]
    assert "conv1 kept whole; fc1 in 4 bits" in found[fast_end.QUARTER]


def test_the_first_convolution_kept_whole_has_the_teachers_16_channels(fast_end) -> None:
    task = make_task("digits-cnn", seed=0)
    space = SearchSpace(task, load_experiment(ROOT / "experiments" / "digits_cnn.toml").space)
    made = importlib.import_module("compression").recipes(task, space)
    for forms in fast_end.variants(made).values():
        recipe = forms["conv1 kept whole"]
        model = task.make_model(**recipe.student)
        assert model.conv1.out_channels == 16
        # the hand-made recipe keeps 8: structured pruning (of a half-width student, 8
        # channels pruned by half, in multiples of 8) or 75% of 16 (in multiples of 8)
        hand_made = forms["hand-made"]
        outputs = task.make_model(**hand_made.student).conv1.out_channels
        layer = hand_made.layers["conv1"]
        assert layer.pruning == "structured" and layer.sparsity > 0
        assert min(outputs, kept_channels(outputs, layer.sparsity,
                                          space.config.channel_multiple)) == 8
