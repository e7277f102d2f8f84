"""Noise ladder, EoT and fixed-epsilon robust accuracy on tiny models with known answers."""

import numpy as np
import pytest
import torch
from torch import nn

from neureg.models.robustness.evaluation import (
    ExpectationOverTransformation,
    default_noise_ladder,
    is_stochastic,
    noise_accuracy,
    robust_accuracy,
)
from neureg.models.runtime import accuracy, predict_labels

N_CLASSES = 4


def template_images(n, seed, amplitude=0.08):
    """A 4-class toy task: a faint class template on a mid-gray background plus a little jitter."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.sign(torch.randn(N_CLASSES, 1, 32, 32, generator=g))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    jitter = 0.02 * torch.randn(n, 1, 32, 32, generator=g)
    return (0.5 + amplitude * templates[labels] + jitter).clamp(0, 1), labels


class TinyCNN(nn.Module):
    def __init__(self, n_classes=N_CLASSES):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(8))
        self.head = nn.Linear(8 * 8 * 8, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class NoisyLogits(nn.Module):
    """A stochastic network: the wrapped model's logits plus N(0, scale^2) noise on every call."""

    def __init__(self, model, scale=1.0):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        logits = self.model(x)
        return logits + self.scale * torch.randn_like(logits)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = template_images(512, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    test_x, test_y = template_images(200, seed=2)
    return model.eval(), test_x, test_y


def linear_two_class(margins_l2, seed=0):
    """A 2-class linear model with logit difference w.x + b and images at known signed L2 margins.

    Images sit at 0.5 + (orthogonal jitter) + margin * w/||w||, far from the [0, 1] box walls, so
    the true minimal perturbations are |w.x + b| / ||w||_p* with no clipping in the way.
    """
    g = torch.Generator().manual_seed(seed)
    d = 32 * 32
    w = torch.randn(d, generator=g)
    model = nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([w, -w]) / 2)
        bias = -0.5 * w.sum()
        model.bias.copy_(torch.stack([bias, -bias]) / 2)
    margins = torch.as_tensor(margins_l2, dtype=torch.float32)
    jitter = 0.1 * (torch.rand(len(margins), d, generator=g) - 0.5)
    jitter -= (jitter @ w)[:, None] * w[None] / (w @ w)
    x = 0.5 + jitter + margins[:, None] * w[None] / w.norm()
    labels = (margins < 0).long()
    flat = nn.Sequential(nn.Flatten(), model)
    return flat, x.view(-1, 1, 32, 32), labels, w


# ---------------------------------------------------------------------------------------------------


def test_noise_ladder_is_increasing_from_zero():
    ladder = default_noise_ladder()
    assert ladder[0] == 0
    assert np.all(np.diff(ladder) > 0)
    assert ladder[-1] <= 1


def test_noise_accuracy_at_zero_is_clean_accuracy_and_falls_with_sigma(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.95, "the toy model should have learned the toy task"
    sigmas = [0.0, 0.1, 0.3, 0.6, 1.5]
    curve = noise_accuracy(model, x, y, sigmas, seed=0, batch_size=64)
    assert curve.shape == (len(sigmas),)
    assert curve[0] == clean
    assert np.all(np.diff(curve) <= 0), curve
    assert curve[-1] < 0.5, "at sigma 1.5 the template is buried: close to chance (0.25)"


def test_noise_accuracy_is_seeded_and_batch_size_free(trained):
    model, x, y = trained
    a = noise_accuracy(model, x, y, [0.3, 0.6], seed=5, batch_size=64)
    b = noise_accuracy(model, x, y, [0.3, 0.6], seed=5, batch_size=200)
    np.testing.assert_array_equal(a, b)


def test_noise_accuracy_rejects_negative_sigma(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="sigmas"):
        noise_accuracy(model, x, y, [0.1, -0.1], seed=0)


def test_eot_of_deterministic_model_is_the_model(trained):
    model, x, _ = trained
    with torch.no_grad():
        torch.testing.assert_close(ExpectationOverTransformation(model, 5)(x), model(x))
        softmax_average = ExpectationOverTransformation(model, 3, average="softmax")(x)
        torch.testing.assert_close(softmax_average, torch.log_softmax(model(x), dim=1))


def test_eot_averages_out_the_noise(trained):
    model, x, _ = trained
    noisy = NoisyLogits(model)
    torch.manual_seed(0)
    with torch.no_grad():
        clean = model(x)
        one_draw = (noisy(x) - clean).std().item()
        averaged = (ExpectationOverTransformation(noisy, 100)(x) - clean).std().item()
    assert one_draw == pytest.approx(1.0, abs=0.1)
    assert averaged == pytest.approx(0.1, abs=0.03), "std of a mean of 100 N(0, 1) is 0.1"


class RowOffset(nn.Module):
    """A 'noise' that is the row's position in its batch: it shows which copy of which image each row was."""

    def forward(self, x):
        rows = torch.arange(len(x), dtype=torch.float32)
        return torch.stack([rows, -rows], dim=1)


def test_eot_draws_run_as_one_batch():
    """One forward over n copies of the B images: image i's draws are rows i, B + i, ..., (n - 1) B + i."""
    calls = []
    model = RowOffset()
    model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    b, n = 5, 4
    out = ExpectationOverTransformation(model, n)(torch.zeros(b, 1, 2, 2))
    assert calls == [n * b]
    expected = torch.arange(b, dtype=torch.float32) + b * (n - 1) / 2
    torch.testing.assert_close(out, torch.stack([expected, -expected], dim=1))
    soft = ExpectationOverTransformation(model, n, average="softmax")(torch.zeros(b, 1, 2, 2))
    rows = torch.arange(n * b, dtype=torch.float32).view(n, b)
    mean_probs = torch.softmax(torch.stack([rows, -rows], dim=2), dim=2).mean(dim=0)
    torch.testing.assert_close(soft, mean_probs.log())


def test_eot_validates_arguments(trained):
    model = trained[0]
    with pytest.raises(ValueError):
        ExpectationOverTransformation(model, 0)
    with pytest.raises(ValueError):
        ExpectationOverTransformation(model, 2, average="median")


def test_is_stochastic(trained):
    model, x, _ = trained
    assert not is_stochastic(model, x[:4])
    assert is_stochastic(NoisyLogits(model), x[:4])


def test_evaluation_restores_training_mode(trained):
    model, x, y = trained
    model.train()
    try:
        predict_labels(model, x[:4])
        assert model.training
    finally:
        model.eval()


def test_robust_accuracy_bounded_by_clean_and_equal_at_zero(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    clean = accuracy(model, x, y)
    for norm in ("linf", "l2"):
        assert robust_accuracy(model, x, y, norm, epsilon=0.0) == clean
        attacked = robust_accuracy(model, x, y, norm, steps=10)
        assert attacked <= clean
    assert robust_accuracy(model, x, y, "linf", epsilon=0.1, steps=10) < clean


def test_robust_accuracy_of_linear_model_matches_margins():
    """For a linear model PGD is exact: robust iff the dual-norm margin exceeds epsilon."""
    rng = np.random.default_rng(0)
    margins = rng.choice([-1, 1], 40) * rng.uniform(0.2, 1.0, 40)
    model, x, y, w = linear_two_class(margins)
    linf_margin = np.abs(margins) * w.norm().item() / w.abs().sum().item()
    eps = float(np.median(linf_margin))
    eps_gap = np.abs(linf_margin - eps) > 0.05 * eps  # leave out images right at the threshold
    expected = np.mean((linf_margin > eps)[eps_gap])
    measured = robust_accuracy(model, x[eps_gap], y[eps_gap], "linf", epsilon=eps, steps=20)
    assert measured == pytest.approx(expected)
    l2_eps = 0.6
    l2_gap = np.abs(np.abs(margins) - l2_eps) > 0.05
    expected = np.mean((np.abs(margins) > l2_eps)[l2_gap])
    measured = robust_accuracy(model, x[l2_gap], y[l2_gap], "l2", epsilon=l2_eps, steps=20)
    assert measured == pytest.approx(expected)


def test_robust_accuracy_refuses_stochastic_model_without_eot(trained):
    model, x, y = trained
    noisy = NoisyLogits(model)
    with pytest.raises(ValueError, match="eot_samples"):
        robust_accuracy(noisy, x[:8], y[:8], "linf")
    value = robust_accuracy(noisy, x[:16], y[:16], "linf", steps=5, eot_samples=4)
    assert 0.0 <= value <= 1.0


def test_robust_accuracy_is_seeded(trained):
    model, x, y = trained
    a = robust_accuracy(model, x[:32], y[:32], "l2", epsilon=0.5, steps=5, seed=3)
    b = robust_accuracy(model, x[:32], y[:32], "l2", epsilon=0.5, steps=5, seed=3)
    assert a == b


def test_inputs_outside_unit_box_are_refused(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noise_accuracy(model, x * 3, y, [0.0], seed=0)


def test_a_stochastic_networks_noise_and_corruption_rows_do_not_depend_on_earlier_work(trained):
    """The protocols seed the network's own noise from the config's seed: whatever the worker drew before
    (another network, another table), the same row; another seed, another draw."""
    from neureg.models.robustness import protocols

    model, x, y = trained
    noisy = NoisyLogits(model).eval()
    sigmas = [0.0, 0.2, 0.4]

    def rows(seed):
        noise = protocols.noise_evaluation(
            noisy, x[:64], y[:64], sigmas=sigmas, n_images=64, noise_seed=seed, device="cpu", batch_size=None
        )
        corrupted = protocols.corruption_evaluation(
            noisy,
            x[:64],
            y[:64],
            source="builtin",
            path="",
            corruptions=["gaussian_noise"],
            severities=[3],
            n_images=64,
            image_seed=0,
            corruption_seed=seed,
            device="cpu",
            batch_size=None,
        )
        return noise, corrupted

    first = rows(1)
    torch.randn(1000)  # earlier work on this worker
    assert rows(1) == first
    assert rows(2) != first


def test_batches_are_an_execution_setting(trained, monkeypatch):
    """On the CPU the batch every CPU row was computed with; on CUDA a share of the free memory (arithmetic
    checked here, the probe on a device in tests/models/test_cuda_paths.py); NEUREG_ATTACK_BATCH and
    NEUREG_EVAL_BATCH override, 0 or unset is automatic, anything else is refused by name."""
    from neureg.models.runtime import MEMORY_SHARE, Runtime, batch_from_memory, memory_batch_size

    model, x, _ = trained
    assert memory_batch_size(model, x.shape[1:], 1000, "cpu", cpu_batch=128, gradient=True) == 128
    assert memory_batch_size(model, x.shape[1:], 40, "cpu", cpu_batch=256, gradient=False) == 40
    assert batch_from_memory(80e9, 20e6, 1000) == 1000  # the standard evaluation in one call
    assert batch_from_memory(8e9, 20e6, 1000) == int(MEMORY_SHARE * 8e9 // 20e6) == 200
    assert batch_from_memory(1e6, 20e6, 1000) == 1
    for name, field in (("NEUREG_ATTACK_BATCH", "attack_batch"), ("NEUREG_EVAL_BATCH", "eval_batch_size")):
        monkeypatch.delenv(name, raising=False)
        assert getattr(Runtime.from_env(), field) == 0
        monkeypatch.setenv(name, "64")
        assert getattr(Runtime.from_env(), field) == 64
        monkeypatch.setenv(name, "-1")
        with pytest.raises(ValueError, match=f"{name}='-1'"):
            Runtime.from_env()
        monkeypatch.delenv(name)


def test_noise_and_corruption_forwards_take_the_batch_they_are_given(trained):
    """Unset on the CPU: 256 images per forward, as every CPU row was computed; a given batch is what each
    forward holds; a deterministic network's accuracies do not depend on it (each image is scored alone)."""
    from neureg.models.robustness import protocols

    model = trained[0]
    x, y = template_images(300, seed=3)
    sizes = []
    hook = model.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    settings = dict(device="cpu", sigmas=[0.0, 0.1, 0.3], n_images=300)
    try:
        automatic = protocols.noise_evaluation(model, x, y, batch_size=None, **settings)
        assert sorted(set(sizes)) == [300 - 256, 256]
        sizes.clear()
        given = protocols.noise_evaluation(model, x, y, batch_size=70, **settings)
        assert max(sizes) == 70 and sum(sizes) == 300 * 4  # three sigmas and the clean pass
        assert given == automatic
        sizes.clear()
        kinds = dict(corruptions=["contrast"], severities=[2], n_images=300)
        corrupted = protocols.corruption_evaluation(model, x, y, device="cpu", batch_size=300, **kinds)
        assert set(sizes) == {300}
        assert corrupted == protocols.corruption_evaluation(model, x, y, device="cpu", batch_size=None, **kinds)
    finally:
        hook.remove()


def test_noise_and_corruption_accuracy_of_a_stochastic_network_by_its_eot_average(trained):
    """eot_samples 1 scores one draw per image; 64 scores the EoT average, its 64 draws in one forward per
    batch. With logit noise of standard deviation 6 against margins near 6, one draw errs on about a quarter
    of the images; the average of 64 (standard deviation 0.75) comes out at the noiseless network's accuracy."""
    from neureg.models.robustness import protocols

    model, x, y = trained
    noisy = NoisyLogits(model, 6.0).eval()
    sizes = []
    noisy.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    common = dict(device="cpu", batch_size=None, sigmas=[0.0, 0.05], n_images=100)
    exact = protocols.noise_evaluation(model, x, y, **common)
    one = protocols.noise_evaluation(noisy, x, y, **common)
    sizes.clear()
    averaged = protocols.noise_evaluation(noisy, x, y, eot_samples=64, **common)
    assert 64 * 100 in sizes and set(sizes) <= {8, 64 * 100}  # all 64 draws of the 100 images at once (8: the probe)
    assert abs(averaged["clean_accuracy"] - exact["clean_accuracy"]) < abs(
        one["clean_accuracy"] - exact["clean_accuracy"]
    )
    assert averaged["clean_accuracy"] == pytest.approx(exact["clean_accuracy"], abs=0.02)
    settings = dict(device="cpu", batch_size=None, corruptions=["contrast"], severities=[1], n_images=100)
    corrupted = protocols.corruption_evaluation(noisy, x, y, eot_samples=64, **settings)
    assert corrupted["mean_accuracy"] == pytest.approx(
        protocols.corruption_evaluation(model, x, y, **settings)["mean_accuracy"], abs=0.02
    )


class Scripted(nn.Module):
    """Pass k calls point i (its image holds i) wrong when ``script[k, i]``; records the points it saw."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls = script, []

    def forward(self, x):
        ids = x.flatten(1)[:, 0].long()
        self.calls.append(ids.tolist())
        wrong = torch.as_tensor(self.script[len(self.calls) - 1][ids.numpy()])
        return torch.stack([(~wrong).float(), wrong.float()], dim=1)  # label 0 is right


def test_a_vote_stops_for_a_point_once_its_majority_is_settled():
    from neureg.models.robustness.evaluation import VOTES, misclassified

    rng = np.random.default_rng(0)
    rates = np.array([0.0, 1.0, 0.5, 0.45, 0.55, 0.1, 0.9, 0.5])
    script = rng.random((VOTES, len(rates))) < rates
    model = Scripted(script)
    x = torch.arange(len(rates), dtype=torch.float32).view(-1, 1, 1, 1)
    out = misclassified(model, x, torch.zeros(len(rates), dtype=torch.long), VOTES)
    full_majority = script.sum(axis=0) > VOTES // 2
    np.testing.assert_array_equal(out.numpy(), full_majority)  # the outcome of all 25 passes
    assert len(model.calls[12]) == len(rates) and model.calls[13] == [i for i in model.calls[13] if i >= 2]
    assert sum(len(c) for c in model.calls) < VOTES * len(rates)  # settled points left the vote
    assert misclassified(Scripted(script), x, torch.zeros(8, dtype=torch.long)).tolist() == script[0].tolist()
