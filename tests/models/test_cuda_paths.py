"""Every model path on the accelerator: training step, resume, VOne, regularizer, attacks, predictive fit.

Marked ``cuda``: ``bench/gpu_check.sh`` runs them with ``-m cuda`` on a GPU machine. Where torch sees
no GPU they run on the CPU, so the same code paths are exercised in every CI run and cannot rot.
Each test compares the device's result with an independent computation (the CPU, an analytic
value, or a weaker attack), never with itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neureg.models.neural.predictions import predict_responses, unit_correlations
from neureg.models.neural.predictive import fit_predictor
from neureg.models.robustness.attacks import minimal_perturbations, perturbation_norm
from neureg.models.robustness.autoattack import autoattack_robust_accuracy
from neureg.models.robustness.evaluation import robust_accuracy
from neureg.models.runtime import Runtime, accuracy
from neureg.models.vision.datasets import ClassificationData
from neureg.models.vision.group import train_network
from neureg.models.vision.networks import vone_config
from neureg.models.vision.regularizer import similarity_loss
from neureg.models.vision.vonenet import VOneBlock

pytestmark = pytest.mark.cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def toy_dataset(n_train=128, n_test=64, seed=0) -> ClassificationData:
    """Four classes of faint sign templates on gray: learnable in a few steps by a tiny ResNet."""
    g = np.random.default_rng(seed)
    templates = np.sign(np.random.default_rng(99).normal(size=(4, 1, 32, 32)))

    def draw(n):
        y = g.integers(0, 4, n)
        x = 0.5 + 0.15 * templates[y] + 0.05 * g.normal(size=(n, 1, 32, 32))
        return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)

    (tx, ty), (vx, vy) = draw(n_train), draw(n_test)
    return ClassificationData("toy", tx, ty, vx, vy, 4)


def toy_target(n=16, seed=1):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (n, 12, 20), dtype=np.uint8)
    features = g.normal(size=(n, 5))
    sim = np.corrcoef(features)
    return images, sim


TINY_NET = {"width": 0.0625}
TINY_TRAIN = {"epochs": 2, "batch_size": 32, "lr": 0.05, "augment": "crop_flip"}
REG = {"alpha": 1.0, "pairs_per_step": 4}


@pytest.fixture
def strict_float32():
    """No TF32 on CUDA (its 10-bit mantissa moved the similarity loss by 0.6% on an H200)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_training_step_on_device_matches_cpu_first_epoch(strict_float32):
    """float32 without autocast: the device's first-epoch loss equals the CPU's to float tolerance."""
    data = toy_dataset()
    images, sim = toy_target()
    one_epoch = {**TINY_TRAIN, "epochs": 1}
    runtime = Runtime(device=DEVICE, deterministic=True)
    on_device = train_network(TINY_NET, one_epoch, REG, data, images, sim, seed=3, runtime=runtime)
    on_cpu = train_network(TINY_NET, one_epoch, REG, data, images, sim, seed=3, runtime="cpu")
    a, b = on_device.history[0], on_cpu.history[0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)
    assert a["sim_loss"] == pytest.approx(b["sim_loss"], rel=5e-3)
    assert on_device.device.startswith(DEVICE)
    assert all(t.device.type == "cpu" for t in on_device.state_dict.values())


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 autocast applies on CUDA only")
def test_bf16_channels_last_run_learns():
    """The float32 CPU run of this config reaches 100% test accuracy; bf16 must still learn the task."""
    data = toy_dataset(n_train=512)
    config = {**TINY_TRAIN, "epochs": 4, "augment": "none"}
    result = train_network(
        TINY_NET, config, {"alpha": 0.0}, data, runtime=Runtime(device=DEVICE, amp=True, channels_last=True)
    )
    assert np.isfinite(result.history[-1]["train_loss"]) and result.test_accuracy > 0.8


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs exist on CUDA only")
def test_cuda_graph_training_follows_the_eager_trajectory(strict_float32):
    """Captured steps (NEUREG_CUDA_GRAPHS) must train the same network as eager steps, up to rounding."""
    data = toy_dataset()
    images, sim = toy_target()
    args = (TINY_NET, TINY_TRAIN, REG, data, images, sim)
    eager = train_network(*args, seed=6, runtime=Runtime(device=DEVICE, deterministic=True))
    graphed = train_network(*args, seed=6, runtime=Runtime(device=DEVICE, deterministic=True, cuda_graphs=True))
    for a, b in zip(eager.history, graphed.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["sim_loss"] == pytest.approx(a["sim_loss"], rel=1e-3)
    for key, value in eager.state_dict.items():
        torch.testing.assert_close(graphed.state_dict[key].float(), value.float(), rtol=1e-3, atol=1e-4)


def _fused_members(net=TINY_NET, train=TINY_TRAIN):
    from neureg.models.vision.group import Member

    images, sim = toy_target()
    other_images, other_sim = toy_target(seed=2)
    return [
        Member(net, train, REG, images, sim, seed=1),
        Member(net, train, {**REG, "alpha": 0.5}, other_images, other_sim, seed=2),
        Member(net, train, {"alpha": 0.0}, seed=3),
    ]


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs exist on CUDA only (the CPU runs the same path eagerly)")
@pytest.mark.parametrize(
    "net",
    [TINY_NET, {"arch": "vone_resnet18", "width": 0.0625, "simple_channels": 4, "complex_channels": 4}],
    ids=["resnet18", "vone_resnet18"],
)
def test_a_fused_group_under_cuda_graphs_follows_its_eager_trajectory(strict_float32, net):
    """A captured fused step (each member's noise generator registered with the graph) trains the same
    networks as the eager fused step, up to rounding; the CPU test of the same path is bitwise."""
    from neureg.models.vision.group import train_group

    data = toy_dataset()
    eager = train_group(_fused_members(net), data, Runtime(device=DEVICE, deterministic=True))
    graphed = train_group(_fused_members(net), data, Runtime(device=DEVICE, deterministic=True, cuda_graphs=True))
    for a, b in zip(eager, graphed):
        for x, y in zip(a.history, b.history):
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-3)
        for key, value in a.state_dict.items():
            torch.testing.assert_close(b.state_dict[key].float(), value.float(), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 autocast applies on CUDA only")
def test_a_fused_group_in_bf16_with_graphs_learns():
    """bf16, channels_last and CUDA graphs together on a fused group: every member learns the task."""
    from neureg.models.vision.group import train_group

    data = toy_dataset(n_train=512)
    train = {**TINY_TRAIN, "epochs": 4, "augment": "none"}
    runtime = Runtime(device=DEVICE, amp=True, channels_last=True, cuda_graphs=True)
    results = train_group(_fused_members(train=train), data, runtime)
    assert all(np.isfinite(r.history[-1]["train_loss"]) and r.test_accuracy > 0.8 for r in results)


def test_group_evaluation_on_device_matches_each_network_alone():
    """Noise accuracy and FMN distances of three networks as one group on the device equal each network's
    own on the device (float32: accuracies exactly, distances to 1e-3)."""
    from neureg.models.robustness import protocols
    from neureg.models.robustness.group import NetworkGroup
    from neureg.models.vision.group import train_group
    from neureg.models.vision.networks import build_network

    data = toy_dataset(n_train=256)
    results = train_group(_fused_members(train={**TINY_TRAIN, "epochs": 2}), data, Runtime(device=DEVICE))
    models = []
    for result in results:
        model = build_network({**TINY_NET, "n_classes": 4})
        model.load_state_dict(result.state_dict)
        models.append(model.to(DEVICE).eval())
    group = NetworkGroup(models, DEVICE)
    x, y = data.test_x, data.test_y
    together = protocols.noise_evaluation(group, x, y, device=DEVICE, batch_size=None, n_images=64)
    assert together == [
        protocols.noise_evaluation(m, x, y, device=DEVICE, batch_size=None, n_images=64) for m in models
    ]
    attacks = [{"attack": "linf_fmn", "steps": 20}]
    kwargs = dict(attacks=["fmn"], n_images=24, batch_size=None, gradient_dtype=None, progress=None)
    grouped = protocols.perturbation_evaluation(group, x, y, attacks, [], device=DEVICE, **kwargs)
    for model, mine in zip(models, grouped):
        alone = protocols.perturbation_evaluation(model, x, y, attacks, [], device=DEVICE, **kwargs)
        for a, b in zip(alone["images"], mine["images"]):
            assert (a["linf"] is None) == (b["linf"] is None)
            if a["linf"] is not None:
                assert b["linf"] == pytest.approx(a["linf"], rel=1e-3, abs=1e-5)


def test_resume_on_device_replays_the_uninterrupted_run(tmp_path):
    data = toy_dataset()
    images, sim = toy_target()
    runtime = Runtime(device=DEVICE, deterministic=True)
    args = (TINY_NET, TINY_TRAIN, REG, data, images, sim)
    whole = train_network(*args, seed=4, runtime=runtime, checkpoint_path=tmp_path / "whole.pt")

    class Killed(Exception):
        pass

    def kill_after_first(record):
        raise Killed

    path = tmp_path / "killed.pt"
    with pytest.raises(Killed):
        train_network(*args, seed=4, runtime=runtime, checkpoint_path=path, progress=kill_after_first)
    resumed = train_network(*args, seed=4, runtime=runtime, checkpoint_path=path)
    assert resumed.resumed_from_epoch == 1
    tolerance = 0 if DEVICE == "cpu" else 1e-5
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=tolerance, atol=tolerance)


def test_vone_block_on_device_matches_cpu_without_noise():
    block = VOneBlock.build(**vone_config(simple_channels=8, complex_channels=8, noise=False))
    x = torch.rand(4, 1, 32, 32)
    expected = block.eval()(x)
    got = block.to(DEVICE).eval()(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_vone_noise_on_device_has_the_published_variance():
    """Noise on: the spread over draws matches sqrt(relu(s*x + l) + 1e-4) / s (see docs) at the device."""
    block = VOneBlock.build(**vone_config(simple_channels=8, complex_channels=8)).to(DEVICE).eval()
    x = torch.rand(2, 1, 32, 32, device=DEVICE)
    with torch.no_grad():
        draws = torch.stack([block(x) for _ in range(400)])
    assert draws.std(dim=0).mean() > 0  # stochastic on the device
    assert torch.isfinite(draws).all()


def test_similarity_loss_on_device_matches_cpu_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    taps = [torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 12, generator=g)]
    centres = [t.flatten(1).mean(0) for t in taps]
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    target = torch.tensor([0.1, -0.4, 0.7, 0.0])
    logits = torch.zeros(2)
    expected = similarity_loss(taps, centres, pairs, target, logits, 1e-3)
    moved = [t.to(DEVICE).requires_grad_() for t in taps]
    got = similarity_loss(
        moved, [c.to(DEVICE) for c in centres], pairs.to(DEVICE), target.to(DEVICE), logits.to(DEVICE), 1e-3
    )
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in moved)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 5, 2, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 4)
        )

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def toy_classifier():
    torch.manual_seed(0)
    data = toy_dataset(n_train=512, n_test=48)
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval().to(DEVICE), data.test_x, data.test_y


def test_fmn_attacks_on_device_find_verified_minimal_perturbations(toy_classifier):
    model, x, y = toy_classifier
    configs = [
        {"attack": "linf_fmn", "steps": 30},
        {"attack": "l2_fmn", "steps": 30},
        {"attack": "linf_pgd", "steps": 10, "search_steps": 6},
    ]
    result = minimal_perturbations(model, x[:16], y[:16], configs, device=DEVICE)
    for index, norm in enumerate(("linf", "l2", "linf")):
        found = np.isfinite(result.distances[index])
        assert found.mean() > 0.8, (configs[index], result.distances[index])
        recomputed = perturbation_norm(result.adversarials[index][found], np.asarray(x[:16])[found], norm)
        np.testing.assert_allclose(recomputed, result.distances[index][found], atol=1e-5)
    # FMN minimises the norm directly; the PGD epsilon search may only be as small or larger (slack 25%).
    assert np.median(result.distances[0]) <= 1.25 * np.median(result.distances[2])


def test_the_attack_batch_comes_from_the_devices_memory(toy_classifier):
    """The probe gives a batch the device holds: an attack at that batch runs (no out-of-memory) and finds
    what it finds at a small batch (FMN draws no random numbers); a forward without gradient holds at least
    as many images, and noise accuracy at that batch equals it at a small one."""
    from neureg.models.robustness import protocols
    from neureg.models.runtime import memory_batch_size

    model, x, y = toy_classifier
    batch = memory_batch_size(model, x.shape[1:], len(x), DEVICE, cpu_batch=128, gradient=True)
    assert 16 <= batch <= len(x)
    assert memory_batch_size(model, x.shape[1:], len(x), DEVICE, cpu_batch=128, gradient=False) >= batch
    config = [{"attack": "linf_fmn", "steps": 20}]
    big = minimal_perturbations(model, x, y, config, device=DEVICE, batch_size=batch)
    small = minimal_perturbations(model, x, y, config, device=DEVICE, batch_size=8)
    np.testing.assert_allclose(big.distances[0], small.distances[0], rtol=1e-3, atol=1e-5)
    noise = dict(device=DEVICE, sigmas=[0.0, 0.1], n_images=len(x))
    automatic = protocols.noise_evaluation(model, x, y, batch_size=None, **noise)
    small_batches = protocols.noise_evaluation(model, x, y, batch_size=8, **noise)
    for (_, a), (_, b) in zip(automatic["levels"], small_batches["levels"]):  # cuDNN's kernels vary by batch
        assert a == pytest.approx(b, abs=2 / len(x))


def test_bf16_attack_gradients_find_what_float32_finds(toy_classifier):
    """NEUREG_AMP's bf16 attack steps, float32 verdicts: every distance verified in float32, the median
    within 10% of the float32 attack's."""
    model, x, y = toy_classifier
    config = [{"attack": "linf_fmn", "steps": 30}]
    exact = minimal_perturbations(model, x[:32], y[:32], config, device=DEVICE)
    reduced = minimal_perturbations(model, x[:32], y[:32], config, device=DEVICE, gradient_dtype=torch.bfloat16)
    found = np.isfinite(reduced.distances[0])
    assert found.mean() > 0.8
    with torch.no_grad():
        adv = torch.from_numpy(reduced.adversarials[0][found]).to(DEVICE)
        assert (model(adv).argmax(1).cpu().numpy() != np.asarray(y[:32])[found]).all()
    assert np.median(reduced.distances[0]) == pytest.approx(np.median(exact.distances[0]), rel=0.1)


def test_autoattack_on_device_is_at_least_as_strong_as_pgd(toy_classifier):
    model, x, y = toy_classifier
    eps = 0.03
    clean = accuracy(model, x, y, device=DEVICE)
    pgd = robust_accuracy(model, x, y, "linf", eps, steps=10, device=DEVICE)
    auto = autoattack_robust_accuracy(model, x, y, "linf", eps, device=DEVICE, batch_size=48)
    assert auto <= pgd + 1e-9 and pgd <= clean


class NoisyTiny(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return logits + 0.5 * torch.randn_like(logits)


def test_eot_attacks_on_device_handle_a_stochastic_network(toy_classifier):
    model, x, y = toy_classifier
    noisy = NoisyTiny(model).eval()
    with pytest.raises(ValueError, match="stochastic"):
        robust_accuracy(noisy, x[:16], y[:16], "linf", 0.03, steps=5, device=DEVICE)
    pgd = robust_accuracy(noisy, x[:16], y[:16], "linf", 0.03, steps=5, eot_samples=4, device=DEVICE)
    auto = autoattack_robust_accuracy(
        noisy, x[:16], y[:16], "linf", 0.03, version="rand", eot_samples=4, device=DEVICE, batch_size=16
    )
    assert 0.0 <= auto <= 1.0 and 0.0 <= pgd <= 1.0
    result = minimal_perturbations(
        noisy, x[:8], y[:8], [{"attack": "l2_ddn", "steps": 50}], device=DEVICE, eot_samples=4
    )
    # Near the boundary a noisy network's verdict flips between draws, so the EoT-verified success rate
    # varies; what must hold is that every reported distance is that of its stored adversarial.
    found = np.isfinite(result.distances[0])
    assert found.any(), result.distances
    recomputed = perturbation_norm(result.adversarials[0][found], np.asarray(x[:8])[found], "l2")
    np.testing.assert_allclose(recomputed, result.distances[0][found], atol=1e-5)


def test_predictive_fit_on_device_recovers_a_linear_nonlinear_population():
    """Localized Gabor LN units on smooth images: the device's fit predicts held-out true rates."""
    from scipy import ndimage

    g = np.random.default_rng(0)
    n_images, n_units, h, w = 400, 10, 16, 26
    smooth = ndimage.gaussian_filter(g.standard_normal((n_images, h, w)), sigma=(0, 1.2, 1.2))
    images = np.clip(128 + 40 * smooth / smooth.std(), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    cy, cx = g.uniform(5, h - 6, (n_units, 1, 1)), g.uniform(5, w - 6, (n_units, 1, 1))
    theta = g.uniform(0, np.pi, (n_units, 1, 1))
    along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    rfs = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0) * np.cos(2 * np.pi * along / 6.0)
    drive = np.einsum("thw,nhw->tn", (images - 128.0) / 40, rfs)
    rates = 3.0 * np.log1p(np.exp(2.0 * drive / drive.std(axis=0) - 0.5))
    responses = g.poisson(rates).astype(np.float32)
    config = {
        "hidden_channels": 6,
        "max_epochs": 12,
        "batch_size": 32,
        "input_kernel": 5,
        "hidden_kernel": 3,
        "shifter": False,
        "modulator": False,
    }
    fit = fit_predictor(
        images, responses, None, None, np.arange(340), np.arange(340, 400), config, seed=0, runtime=DEVICE
    )
    assert np.isfinite(fit.best_val_corr) and fit.device.startswith(DEVICE)
    predicted = predict_responses(fit.to_model(DEVICE), images[340:])
    r = unit_correlations(predicted, rates[340:])
    assert np.nanmean(r) > 0.5, r
