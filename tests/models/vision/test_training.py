"""Training: schedule, augmentation, resume == uninterrupted, a CPU run that learns, alpha lowers L_sim."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from neureg.models.neural.rsa import centered_cosine
from neureg.models.runtime import Runtime, accuracy
from neureg.models.vision.datasets import ClassificationData, load_mnist_demo
from neureg.models.vision.group import train_network
from neureg.models.vision.networks import build_network
from neureg.models.vision.regularizer import PairSampler, SimilarityRegularizer, evaluate_similarity_loss
from neureg.models.vision.schedule import default_train_config, learning_rate
from neureg.models.vision.training import (
    PairBatch,
    augment_batch,
    build_run,
    frozen_bn_statistics,
    plan_epoch,
    training_step,
)


def quadrant_stimuli(n=96, seed=0):
    """Stimuli whose quadrant brightness carries the target similarity, under strong pixel noise."""
    rng = np.random.default_rng(seed)
    levels = rng.uniform(-1, 1, (n, 2, 2))
    images = 0.5 + 0.2 * np.kron(levels, np.ones((12, 12))) + 0.2 * rng.standard_normal((n, 24, 24))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), centered_cosine(levels.reshape(n, -1))


def tiny_dataset(n_train=96, n_test=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n_train + n_test, 1, 32, 32), dtype=np.float32)
    y = rng.integers(0, 4, n_train + n_test)
    return ClassificationData("tiny", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 4)


def test_paper_schedule():
    config = default_train_config()
    assert (config["epochs"], config["batch_size"], config["momentum"], config["weight_decay"]) == (40, 64, 0.9, 5e-4)
    lrs = [learning_rate(e, config) for e in range(40)]
    np.testing.assert_allclose(lrs[0:4], 0.1)
    np.testing.assert_allclose(lrs[4:8], 0.03)
    np.testing.assert_allclose(lrs[16:20], 0.1 * 0.3**4)
    np.testing.assert_allclose(lrs[20:24], 0.1)  # reset after epoch 20
    np.testing.assert_allclose(lrs[36:40], 0.1 * 0.3**4)
    assert learning_rate(24, {**config, "lr_reset_epochs": None}) == pytest.approx(0.1 * 0.3**6)


def test_augmentation_crops_and_flips_the_padded_image():
    x = torch.rand(6, 1, 32, 32)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    plan = plan_epoch(seed=3, epoch=0, n_train=6, batch_size=6, mode="crop_flip", sampler=None, device="cpu")
    out = augment_batch(x, plan.dy[0], plan.dx[0], plan.flip[0], "crop_flip")
    assert out.shape == x.shape
    assert out.stride() == x.stride()  # plain NCHW strides: NHWC ones send oneDNN to kernels that crash some CPUs
    for i in range(6):
        r, c = int(plan.dy[0, i]), int(plan.dx[0, i])
        window = padded[i, :, r : r + 32, c : c + 32]
        assert torch.equal(out[i], window.flip(-1) if plan.flip[0, i] else window)
    crop_plan = plan_epoch(3, 0, 6, 6, "crop", None, "cpu")
    assert not crop_plan.flip.any() and crop_plan.dy.max() <= 8
    crops = augment_batch(x, crop_plan.dy[0], crop_plan.dx[0], crop_plan.flip[0], "crop")
    for i in range(6):
        r, c = int(crop_plan.dy[0, i]), int(crop_plan.dx[0, i])
        assert torch.equal(crops[i], padded[i, :, r : r + 32, c : c + 32])
    assert augment_batch(x, plan.dy[0], plan.dx[0], plan.flip[0], "none") is x


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    """Resuming replays an epoch exactly only if its random numbers depend on (seed, epoch) alone."""
    sampler = PairSampler(40, 4, seed=9)
    a = plan_epoch(5, 2, 100, 16, "crop_flip", sampler, "cpu")
    sampler.sample()  # a used generator must not change the next plan
    b = plan_epoch(5, 2, 100, 16, "crop_flip", sampler, "cpu")
    c = plan_epoch(5, 3, 100, 16, "crop_flip", sampler, "cpu")
    for field in ("order", "dy", "dx", "flip", "pair_images"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.order, c.order)
    assert a.order.shape == (6, 16) and len(set(a.order.flatten().tolist())) == 96  # no image twice
    assert a.pair_images.shape == (6, 8) and all(len(set(row.tolist())) == 8 for row in a.pair_images)


def test_stimulus_pass_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    base = build_network({"width": 0.0625})
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))
    stimuli = PairBatch(torch.rand(4, 1, 12, 16), torch.tensor([[0, 1], [2, 3]]), torch.tensor([0.2, -0.3]))
    runs = {}
    for alpha in (0.0, 5.0):
        model = copy.deepcopy(base)
        reg = SimilarityRegularizer([4 * 12 * 16, 4 * 12 * 16, 8 * 6 * 8, 16 * 3 * 4, 32 * 2 * 2])
        optimizer = torch.optim.SGD([*model.parameters(), reg.gamma_logits], lr=0.1)
        training_step(model, optimizer, x, y, alpha, reg, stimuli if alpha else None)
        runs[alpha] = model
    stats = [k for k in base.state_dict() if "running" in k]
    assert stats
    for key in stats:
        assert torch.equal(runs[0.0].state_dict()[key], runs[5.0].state_dict()[key]), key
    # Inside the context BN still normalises with the batch statistics.
    bn = nn.BatchNorm2d(3).train()
    z = torch.randn(5, 3, 4, 4) * 3 + 2
    with frozen_bn_statistics(bn):
        inside = bn(z)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1
    torch.testing.assert_close(inside, bn(z))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("arch", ["resnet18", "vone_resnet18"])
def test_resume_equals_uninterrupted_run(tmp_path, arch, channels_last, nhwc_crashes):
    """Kill after epoch 2 of 3 (the checkpoint is written), rerun: the result is bitwise the same, in either
    memory layout (channels_last is opt-in on the CPU)."""
    if channels_last and nhwc_crashes:
        pytest.skip("this CPU's oneDNN crashes in NHWC weight gradients (why NHWC is opt-in: models/runtime.py)")
    data = tiny_dataset()
    stimuli, target = quadrant_stimuli(n=24)
    net = {
        "arch": arch,
        "width": 0.0625,
        **({"simple_channels": 4, "complex_channels": 4} if arch == "vone_resnet18" else {}),
    }
    train = {"epochs": 3, "batch_size": 32, "lr": 0.05, "lr_step_epochs": 1}
    reg = {"alpha": 2.0, "pairs_per_step": 4}
    args = (net, train, reg, data, stimuli, target)
    runtime = Runtime(channels_last=channels_last)

    whole = train_network(*args, seed=5, runtime=runtime, checkpoint_path=tmp_path / "whole.pt")

    class Killed(Exception):
        pass

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Killed

    path = tmp_path / "killed.pt"
    with pytest.raises(Killed):
        train_network(*args, seed=5, runtime=runtime, checkpoint_path=path, progress=kill_after_two)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    resumed = train_network(*args, seed=5, runtime=runtime, checkpoint_path=path)

    assert resumed.resumed_from_epoch == 2 and whole.resumed_from_epoch == 0
    assert whole.state_dict.keys() == resumed.state_dict.keys()
    for key, value in whole.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    assert resumed.gamma == whole.gamma and resumed.test_accuracy == whole.test_accuracy
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    assert [r["lr"] for r in whole.history] == pytest.approx([0.05, 0.015, 0.0045])
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files

    # A checkpoint from another run (another seed, or another target of the same shape, as the Shuffle
    # control has) is refused rather than silently mixed in.
    with pytest.raises(ValueError, match="different run"):
        train_network(*args, seed=6, checkpoint_path=path)
    shuffled = target[np.ix_(np.arange(24)[::-1], np.arange(24)[::-1])]
    with pytest.raises(ValueError, match="different run"):
        train_network(net, train, reg, data, stimuli, shuffled, seed=5, runtime=runtime, checkpoint_path=path)


def test_alpha_needs_a_target_and_zero_alpha_needs_none():
    data = tiny_dataset(n_train=32, n_test=8)
    with pytest.raises(ValueError, match="needs target"):
        train_network({"width": 0.0625}, {"epochs": 1, "batch_size": 16}, {"alpha": 1.0}, data)
    result = train_network({"width": 0.0625}, {"epochs": 1, "batch_size": 16}, {"alpha": 0.0}, data)
    assert result.gamma is None and result.history[0]["sim_loss"] is None


def test_evaluate_accuracy_batches_agree():
    torch.manual_seed(0)
    model = build_network({"width": 0.0625, "n_classes": 3}).eval()
    x, y = torch.rand(10, 1, 32, 32), torch.randint(0, 3, (10,))
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).float().mean())
    assert accuracy(model, x, y, batch_size=3) == pytest.approx(expected)
    assert accuracy(model, x.numpy(), y.numpy(), batch_size=10) == pytest.approx(expected)


@pytest.fixture(scope="module")
def mnist_runs():
    """The same small MNIST-demo run without (alpha 0) and with (alpha 4) the similarity loss."""
    torch.set_num_threads(1)
    data = load_mnist_demo()
    stimuli, target = quadrant_stimuli()
    train = {"epochs": 2, "batch_size": 32, "lr": 0.02, "max_train_images": 640, "augment": "none"}
    runs = {}
    for alpha in (0.0, 4.0):
        records = []
        result = train_network(
            {"width": 0.125},
            train,
            {"alpha": alpha, "pairs_per_step": 16},
            data,
            stimuli,
            target,
            seed=1,
            progress=records.append,
        )
        runs[alpha] = (result, records)
    return data, stimuli, target, runs


def test_tiny_mnist_run_learns_above_chance(mnist_runs):
    data, _, _, runs = mnist_runs
    result, records = runs[0.0]
    assert result.test_accuracy > 0.3  # chance is 0.1
    assert records == result.history and [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]) == {"epoch", "train_loss", "task_loss", "sim_loss", "train_acc", "lr", "gamma", "seconds"}
    assert records[1]["task_loss"] < records[0]["task_loss"]
    assert result.versions["torch"] == torch.__version__ and result.device.startswith("cpu")
    assert result.wall_seconds > 0
    model = build_network({"width": 0.125})
    model.load_state_dict(result.state_dict)
    assert accuracy(model, data.test_x, data.test_y) == pytest.approx(result.test_accuracy)


def test_alpha_lowers_the_similarity_loss(mnist_runs):
    _, stimuli, target, runs = mnist_runs
    n = len(stimuli)
    pairs = torch.tensor(np.stack(np.triu_indices(n, 1), axis=1))
    images = torch.from_numpy(stimuli[:, None].astype(np.float32) / 255)
    losses = {}
    for alpha, (result, _) in runs.items():
        model = build_network({"width": 0.125})
        model.load_state_dict(result.state_dict)
        logits = torch.tensor(result.gamma).log() if result.gamma else torch.zeros(5)
        losses[alpha] = evaluate_similarity_loss(model, logits, images, torch.from_numpy(target), pairs, eps=1e-3)
    assert losses[4.0] < 0.75 * losses[0.0], losses
    result, _ = runs[4.0]
    assert sum(result.gamma) == pytest.approx(1.0, abs=1e-6)
    assert all(r["sim_loss"] is not None and r["task_loss"] < r["train_loss"] for r in result.history)


def test_channels_last_is_opt_in_and_changes_only_the_layout(monkeypatch):
    """A worker's Runtime lays activations out NCHW unless NEUREG_CHANNELS_LAST=1 (oneDNN's NHWC weight
    gradient crashes on some CPUs: models/runtime.py), and the layout changes no logit beyond rounding."""
    monkeypatch.delenv("NEUREG_CHANNELS_LAST", raising=False)
    monkeypatch.setenv("NEUREG_DEVICE", "cpu")
    assert Runtime.from_env().memory_format == torch.contiguous_format
    monkeypatch.setenv("NEUREG_CHANNELS_LAST", "1")
    assert Runtime.from_env().memory_format == torch.channels_last
    monkeypatch.setenv("NEUREG_CHANNELS_LAST", "0")
    assert Runtime.from_env().memory_format == torch.contiguous_format
    monkeypatch.setenv("NEUREG_CHANNELS_LAST", "maybe")
    with pytest.raises(ValueError, match="NEUREG_CHANNELS_LAST"):
        Runtime.from_env()

    data = tiny_dataset()
    net = {"arch": "resnet18", "width": 0.0625}
    run = build_run(net, {"epochs": 1, "batch_size": 32}, {"alpha": 0.0}, data, runtime=Runtime(channels_last=True))
    conv = run.model.stages.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.from_numpy(data.test_x)
    nchw = build_network({**net, "n_classes": 4}).eval()
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-4, atol=1e-5)
