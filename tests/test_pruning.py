"""Structured pruning shrinks real layers (through BatchNorm, residual adds and flatten);
magnitude pruning zeroes the smallest weights and the masks hold them at zero."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.compression.pruning import apply_masks, magnitude_masks, prune_structured
from slimsearch.compression.quantization import attach_fake_quant, detach_fake_quant
from slimsearch.tasks.digits import digits_cnn


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))

    @staticmethod
    def example_inputs(batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 10)


class TinyResNet(nn.Module):
    """stem conv+BN, then one residual block ``x + bn_b(conv_b(relu(bn_a(conv_a(x)))))``, then fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        x = F.adaptive_avg_pool2d(F.relu(x), 4)
        return self.fc(torch.flatten(x, 1))

    @staticmethod
    def example_inputs(batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, 8, 8)


def test_structured_pruning_shrinks_mlp_layers() -> None:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    before = n_params(model)
    record = prune_structured(model, {"fc1": 0.5, "fc2": 0.25}, TinyMLP.example_inputs())
    assert record["fc1"] == {"channels_before": 16, "channels_after": 8}
    assert record["fc2"] == {"channels_before": 12, "channels_after": 9}
    assert (model.fc1.in_features, model.fc1.out_features) == (10, 8)
    assert (model.fc2.in_features, model.fc2.out_features) == (8, 9)
    assert (model.out.in_features, model.out.out_features) == (9, 3)
    assert model.fc1.weight.shape == (8, 10) and model.fc1.bias.shape == (8,)
    assert model.fc2.weight.shape == (9, 8) and model.out.weight.shape == (3, 9)
    expected = (10 * 8 + 8) + (8 * 9 + 9) + (9 * 3 + 3)
    assert n_params(model) == expected < before
    assert model(TinyMLP.example_inputs(4)).shape == (4, 3)


def test_structured_pruning_removes_the_weakest_channels_and_keeps_the_rest_intact() -> None:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    strong = torch.tensor([1, 4, 6, 9, 10, 12, 13, 15])
    with torch.no_grad():
        scale = torch.full((16,), 1e-3)
        scale[strong] = 10.0
        model.fc1.weight.mul_(scale[:, None])
        model.fc1.bias.mul_(scale)
        model.fc2.weight.mul_(scale[None, :])
    fc1_w, fc1_b = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    fc2_w = model.fc2.weight.detach().clone()
    prune_structured(model, {"fc1": 0.5}, TinyMLP.example_inputs())
    assert torch.equal(model.fc1.weight.detach(), fc1_w[strong])
    assert torch.equal(model.fc1.bias.detach(), fc1_b[strong])
    assert torch.equal(model.fc2.weight.detach(), fc2_w[:, strong])


def test_structured_pruning_keeps_at_least_one_channel_and_skips_zero_fractions() -> None:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    record = prune_structured(model, {"fc1": 0.95, "fc2": 0.01}, TinyMLP.example_inputs())
    assert model.fc1.out_features == 1 and model.fc2.in_features == 1
    assert record["fc1"]["channels_after"] == 1
    assert model.fc2.out_features == 12 and "no channel" in record["fc2"]["note"]
    assert model(TinyMLP.example_inputs(2)).shape == (2, 3)
    assert prune_structured(model, {}, TinyMLP.example_inputs()) == {}


def test_structured_pruning_through_batchnorm_and_residual_add() -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    before = n_params(model)
    record = prune_structured(model, {"conv_a": 0.5, "stem": 0.25}, TinyResNet.example_inputs())
    assert record["conv_a"]["channels_after"] == 4 and record["stem"]["channels_after"] == 6
    # inside the block: conv_a's outputs, its BatchNorm and conv_b's inputs
    assert model.conv_a.out_channels == 4 and model.bn_a.num_features == 4
    assert model.bn_a.running_mean.shape == (4,) and model.conv_b.in_channels == 4
    # the stem is tied to the residual path: its outputs, conv_b's outputs, every BN on it, fc
    assert model.stem.out_channels == 6 and model.bn0.num_features == 6
    assert model.conv_a.in_channels == 6 and model.conv_b.out_channels == 6
    assert model.bn_b.num_features == 6 and model.bn_b.weight.shape == (6,)
    assert model.fc.in_features == 6 * 4 * 4
    expected = ((3 * 6 * 9 + 6) + 2 * 6 + (6 * 4 * 9 + 4) + 2 * 4 + (4 * 6 * 9 + 6) + 2 * 6
                + (6 * 16 * 5 + 5))
    assert n_params(model) == expected < before
    assert model(TinyResNet.example_inputs(3)).shape == (3, 5)


def test_structured_pruning_of_last_conv_shrinks_the_flattened_linear() -> None:
    torch.manual_seed(0)
    model = digits_cnn(width=0.25, fc_width=0.25).eval()  # convs 4-8-16, fc 256-32-10
    prune_structured(model, {"conv2": 0.5, "conv3": 0.5, "fc1": 0.5}, torch.randn(1, 1, 32, 32))
    assert (model.conv2.out_channels, model.conv3.in_channels) == (4, 4)
    assert model.conv3.out_channels == 8
    assert model.fc1.in_features == 8 * 4 * 4 and model.fc1.out_features == 16
    assert model.fc2.in_features == 16
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_magnitude_masks_zero_exactly_the_smallest_weights() -> None:
    torch.manual_seed(0)
    layers = {"lin": nn.Linear(20, 10), "conv": nn.Conv2d(3, 4, 3), "keep": nn.Linear(5, 5)}
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    fractions = {"lin": 0.3, "conv": 0.75, "keep": 0.0}
    masks = magnitude_masks(layers, fractions)
    assert set(masks) == {"lin", "conv"}
    for name in ("lin", "conv"):
        weight, original, mask = layers[name].weight.detach(), originals[name], masks[name]
        dropped = round(original.numel() * fractions[name])
        assert mask.dtype == torch.bool and mask.shape == original.shape
        assert int((~mask).sum()) == dropped
        assert int((weight == 0).sum()) == dropped
        assert torch.equal(weight, original * mask)
        assert float(original[~mask].abs().max()) <= float(original[mask].abs().min())
    assert torch.equal(layers["keep"].weight.detach(), originals["keep"])


def _train_steps(model: nn.Module, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                 steps: int) -> bool:
    """A few Adam steps with ``apply_masks`` after each; True if a step revived a pruned weight."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    revived = False
    for _ in range(steps):
        loss = model(torch.randn(8, 10)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        revived |= any(bool((m.weight.detach()[~masks[n]] != 0).any()) for n, m in layers.items())
        apply_masks(layers, masks)
    return revived


def test_apply_masks_keeps_zeros_after_optimizer_steps() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    masks = magnitude_masks(layers, {"fc1": 0.5, "fc2": 0.5})
    start = model.fc1.weight.detach().clone()
    assert _train_steps(model, layers, masks, steps=3), "the optimiser should move pruned weights"
    for name, layer in layers.items():
        assert bool((layer.weight.detach()[~masks[name]] == 0).all())
    assert not torch.equal(model.fc1.weight.detach(), start)  # the kept weights did train


def test_apply_masks_holds_the_latent_weight_during_qat() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    masks = magnitude_masks(layers, {"fc1": 0.5})
    attach_fake_quant(layers, {"fc1": 4, "fc2": 4})
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            model(torch.randn(8, 10)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            apply_masks(layers, masks)
        latent = model.fc1.parametrizations.weight.original.detach()
        assert bool((latent[~masks["fc1"]] == 0).all())
    finally:
        detach_fake_quant(layers)
    assert bool((model.fc1.weight.detach()[~masks["fc1"]] == 0).all())


def test_coupled_layers_do_not_compound_and_round_to_a_multiple() -> None:
    """digits-resnet: the stem and every block's second conv share channels through residual
    adds; asking 50% of each must leave that group at half, not 1/2^n, and counts kept are
    multiples of round_to."""
    from slimsearch.tasks.digits_resnet import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet().eval()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    record = prune_structured(model, dict.fromkeys(convs, 0.5), torch.randn(1, 1, 32, 32), round_to=8)
    assert model.stem.out_channels == 8
    assert model.stages[0][0].conv2.out_channels == model.stages[0][1].conv2.out_channels == 8
    assert model.stages[2][1].conv2.out_channels == 32
    assert all(m.out_channels % 8 == 0 for m in convs.values())
    assert "coupled" in record["stages.0.0.conv2"]["note"]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_a_graph_that_cannot_be_traced_fails_the_trial_with_the_reason() -> None:
    from slimsearch.errors import TrialError

    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x).detach())  # cuts the autograd graph Torch-Pruning follows

    model = NoGrad()
    with pytest.raises(TrialError, match="'fc'"):
        prune_structured(model, {"fc": 0.5}, torch.randn(1, 8))
    assert model.fc.out_features == 8  # nothing half-pruned
