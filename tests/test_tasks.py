"""Built-in digits tasks: splits that partition the data, determinism from the seed, and the
teacher architectures' parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from slimsearch.tasks import Split, Task, list_tasks, make_task
from slimsearch.tasks.digits import digits_cnn, digits_mlp, make_digits_32x32

N_DIGITS = 1797


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def splits(task: Task) -> list[Split]:
    return [task.train, task.val, task.test]


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


def test_builtin_tasks_are_listed() -> None:
    assert {"digits-mlp", "digits-cnn"} <= set(list_tasks())


def test_digits_mlp_splits_partition_the_dataset(digits_mlp_task: Task) -> None:
    task = digits_mlp_task
    assert [len(s) for s in splits(task)] == [1078, 359, 360]
    assert sum(len(s) for s in splits(task)) == N_DIGITS
    assert task.input_shape == (64,) and int(task.data("train").targets().max()) == 9
    for split in splits(task):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.long
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    # every sample exactly once: the three splits together are the dataset, as a multiset of rows
    digits = load_digits()
    everything = np.concatenate([np.column_stack([s.x.numpy() * 16, s.y.numpy()]) for s in splits(task)])
    original = np.column_stack([digits.data, digits.target]).astype(np.float32)
    np.testing.assert_array_equal(sorted_rows(everything), sorted_rows(original))


def test_digits_mlp_splits_are_stratified(digits_mlp_task: Task) -> None:
    for split in splits(digits_mlp_task):
        counts = torch.bincount(split.y, minlength=10).float()
        assert float(counts.min()) >= 0.85 * float(counts.mean())


def test_digits_mlp_is_deterministic_from_the_seed(digits_mlp_task: Task) -> None:
    again = make_task("digits-mlp", seed=0)
    for a, b in zip(splits(digits_mlp_task), splits(again), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = make_task("digits-mlp", seed=1)
    assert [len(s) for s in splits(other)] == [1078, 359, 360]
    assert not torch.equal(other.train.x, digits_mlp_task.train.x)
    assert not torch.equal(other.val.y, digits_mlp_task.val.y)


def test_digits_32x32_images_are_deterministic_from_the_seed() -> None:
    x, y = make_digits_32x32(0)
    assert x.shape == (N_DIGITS, 1, 32, 32) and x.dtype == np.float32 and len(y) == N_DIGITS
    again, _ = make_digits_32x32(0)
    np.testing.assert_array_equal(x, again)
    other, _ = make_digits_32x32(1)
    assert not np.array_equal(x, other)
    # the digit is placed on the canvas: somewhere bright, mostly dark (noise only)
    assert float(np.median(x)) < 0.2 and float(x.max()) > 0.5


def test_digits_cnn_task_images_and_determinism() -> None:
    task = make_task("digits-cnn", seed=0)
    assert task.input_shape == (1, 32, 32)
    assert [len(s) for s in splits(task)] == [1078, 359, 360]
    assert task.example_inputs(3).shape == (3, 1, 32, 32)
    again = make_task("digits-cnn", seed=0)
    for a, b in zip(splits(task), splits(again), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(make_task("digits-cnn", seed=3).train.x[:50], task.train.x[:50])


def test_teacher_parameter_counts() -> None:
    assert n_params(digits_mlp()) == 85002  # 64-256-256-10
    assert n_params(digits_cnn()) == 155786  # conv 16-32-64, fc 1024-128-10


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"width": 0.25, "depth": 1}, 64 * 64 + 64 + 64 * 10 + 10),
    ({"width": 0.5, "depth": 2}, 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10),
])
def test_student_knobs_change_the_mlp(kwargs: dict, expected: int) -> None:
    model = digits_mlp(**kwargs)
    assert n_params(model) == expected
    assert model(torch.randn(2, 64)).shape == (2, 10)


def test_student_knobs_change_the_cnn() -> None:
    model = digits_cnn(width=0.5, fc_width=0.5)  # convs 8-16-32, fc 512-64-10
    expected = (1 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (512 * 64 + 64) + (64 * 10 + 10)
    assert n_params(model) == expected
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_example_inputs_repeat_real_training_data(digits_mlp_task: Task) -> None:
    x = digits_mlp_task.example_inputs(2000)
    assert x.shape == (2000, 64)
    assert torch.equal(x[:1078], digits_mlp_task.train.x) and torch.equal(x[1078:], x[:922])


def test_built_in_image_tasks_search_width_and_depth_per_stage() -> None:
    from slimsearch.compression.student import copy_leading_slices
    from slimsearch.tasks import make_task
    from slimsearch.tasks.digits_resnet import digits_resnet

    assert set(make_task("digits-cnn", seed=0).student_choices) == {"width1", "width2", "width3",
                                                                    "fc_width"}
    resnet = make_task("digits-resnet", seed=0)
    assert set(resnet.student_choices) == {"width1", "width2", "width3", "depth1", "depth2", "depth3"}
    torch.manual_seed(0)
    teacher = digits_resnet()
    student = digits_resnet(depth1=1, width3=0.5)
    assert [len(s) for s in student.stages] == [1, 2, 2]
    assert student.stages[2][0].conv1.out_channels == 32
    copy_leading_slices(student, teacher)
    # stage 2's first block starts from the teacher's stage 2 first block, not a shifted one
    assert torch.equal(student.stages[1][0].conv1.weight, teacher.stages[1][0].conv1.weight)
    assert torch.equal(student.stages[2][0].conv1.weight, teacher.stages[2][0].conv1.weight[:32])
