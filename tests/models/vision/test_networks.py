"""ResNets: the five taps sit at the named conv layers, have the right shapes, and match a manual forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from neureg.models.vision.networks import TAP_CONV_LAYERS, build_network, stem_channels, tap_feature_sizes

TINY_VONE = {"simple_channels": 6, "complex_channels": 4, "noise": False}


def main_path_convs(model) -> list[nn.Conv2d]:
    """The 3x3 convs Li et al. count (stem, then conv1 and conv2 of every block; shortcuts excluded)."""
    convs = [model.front[0]]
    for stage in (model.stages.layer1, model.stages.layer2, model.stages.layer3, model.stages.layer4):
        for block in stage:
            convs += [block.conv1, block.conv2]
    return convs


@pytest.mark.parametrize("arch, n_convs", [("resnet18", 17), ("resnet34", 33)])
def test_taps_follow_the_named_conv_layers(arch, n_convs):
    torch.manual_seed(0)
    model = build_network({"arch": arch, "width": 0.0625}).eval()
    convs = main_path_convs(model)
    assert len(convs) == n_convs
    assert all(c.kernel_size == (3, 3) for c in convs)
    stages = (model.stages.layer1, model.stages.layer2, model.stages.layer3, model.stages.layer4)
    # Tap 1 follows conv 1 (the stem); tap k+1 follows the conv that closes stage k.
    assert convs[TAP_CONV_LAYERS[arch][0] - 1] is model.front[0]
    for stage, layer in zip(stages, TAP_CONV_LAYERS[arch][1:]):
        assert convs[layer - 1] is stage[-1].conv2

    # The taps equal a forward written out by hand through the named layers.
    x = torch.rand(3, 1, 32, 32)
    stem = model.front[0]
    bn = model.front[1]
    expected = [F.relu(bn(stem(x)))]
    for stage in stages:
        h = expected[-1]
        for block in stage:
            out = F.relu(block.bn1(block.conv1(h)))
            out = block.bn2(block.conv2(out))
            h = F.relu(out + block.shortcut(h))
        expected.append(h)
    logits, taps = model(x, return_taps=True)
    assert len(taps) == 5
    for got, want in zip(taps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(logits, model.fc(expected[-1].mean(dim=(2, 3))), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "vone_resnet18"])
def test_tap_shapes_and_strides(arch):
    width = 0.125
    c = stem_channels(width)
    vone = TINY_VONE if arch == "vone_resnet18" else {}  # keys another architecture does not take are refused
    model = build_network({"arch": arch, "width": width, "n_classes": 7, **vone})
    logits, taps = model(torch.rand(2, 1, 32, 32), return_taps=True)
    assert logits.shape == (2, 7)
    first_channels = 10 if arch == "vone_resnet18" else c
    assert [tuple(t.shape) for t in taps] == [
        (2, first_channels, 32, 32),
        (2, c, 32, 32),
        (2, 2 * c, 16, 16),
        (2, 4 * c, 8, 8),
        (2, 8 * c, 4, 4),
    ]
    # Fully convolutional up to the pool: a 36x64 stimulus image goes through the same core.
    stim_taps = model.taps(torch.rand(2, 1, 36, 64))
    assert [tuple(t.shape[2:]) for t in stim_taps] == [(36, 64), (36, 64), (18, 32), (9, 16), (5, 8)]
    assert model(torch.rand(2, 1, 36, 64)).shape == (2, 7)


def test_vone_tap_one_is_the_vone_block_output():
    model = build_network({"arch": "vone_resnet18", "width": 0.0625, **TINY_VONE}).eval()
    x = torch.rand(2, 1, 32, 32)
    taps = model.taps(x)
    v1 = model.front(x)
    torch.testing.assert_close(taps[0], v1, rtol=0, atol=0)
    torch.testing.assert_close(taps[1], model.stages.layer1(model.adapter(v1)), rtol=0, atol=0)
    assert isinstance(model.adapter, nn.Conv2d) and model.adapter.kernel_size == (1, 1)
    # The Gabor bank is fixed: it is a buffer, not a parameter the optimizer could move.
    assert not any(name.startswith("front.") for name, _ in model.named_parameters())


def test_width_scales_channels_and_parameters():
    small = build_network({"width": 0.125})
    large = build_network({"width": 0.25})
    assert small.front[0].out_channels == 8 and large.front[0].out_channels == 16
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    assert 3.5 < n_large / n_small < 4.1  # conv weights scale with width squared


def test_width_one_resnet18_has_the_cifar_parameter_count():
    """The common RGB CIFAR ResNet18 has 11,173,962 parameters; one input channel drops 2 x 64 x 3 x 3."""
    model = build_network({"width": 1.0})
    assert sum(p.numel() for p in model.parameters()) == 11_173_962 - 2 * 64 * 9


def test_tap_feature_sizes_leave_batchnorm_alone():
    model = build_network({"width": 0.0625}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = tap_feature_sizes(model, (1, 36, 64))
    assert sizes == [4 * 36 * 64, 4 * 36 * 64, 8 * 18 * 32, 16 * 9 * 16, 32 * 5 * 8]
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch"):
        build_network({"arch": "vgg19"})
