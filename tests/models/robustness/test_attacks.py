"""Minimal adversarial perturbations: analytic margins of a linear classifier, verification, configs."""

import numpy as np
import pytest
import torch
from torch import nn

from neureg.models.robustness.attacks import (
    ATTACKS,
    DISTANCE_TOLERANCE,
    MinimalPerturbations,
    attack_norm,
    default_attack_configs,
    median_perturbation,
    minimal_perturbations,
    perturbation_norm,
    validate_attack_config,
    with_cross_checks,
)
from neureg.models.robustness.evaluation import ExpectationOverTransformation

D = 32 * 32


class LinearTwoClass(nn.Module):
    """Logit difference (class 0 minus class 1) is w.x + b with b = -w.(0.5, ..., 0.5)."""

    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(D, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.stack([w, -w]) / 2)
            bias = -0.5 * w.sum()
            self.fc.bias.copy_(torch.stack([bias, -bias]) / 2)

    def forward(self, x):
        # The dot product in float64: summed in float32 over 1024 pixels its rounding (~1e-6) exceeds the
        # margin by which Brendel-Bethge oversteps the boundary near convergence, so whether BB ends
        # on the adversarial side depended on the CPU's GEMV rounding (see docs/attacks.md).
        weight, bias = self.fc.weight.double(), self.fc.bias.double()
        return (x.flatten(1).double() @ weight.T + bias).float()


class NoisyLogits(nn.Module):
    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        logits = self.model(x)
        return logits + self.scale * torch.randn_like(logits)


@pytest.fixture(scope="module")
def linear():
    """Images at known signed L2 margins 0.3 .. 1 from the boundary, 0.3 or more from the box walls.

    Analytic minimal perturbations: L2 = |w.x + b| / ||w||_2, Linf = |w.x + b| / ||w||_1.
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g)
    n = 6
    margins = (0.3 + 0.7 * torch.rand(n, generator=g)) * torch.tensor([1.0, -1.0] * (n // 2))
    jitter = 0.1 * (torch.rand(n, D, generator=g) - 0.5)
    jitter -= (jitter @ w)[:, None] * w[None] / (w @ w)
    x = (0.5 + jitter + margins[:, None] * w[None] / w.norm()).view(n, 1, 32, 32)
    y = (margins < 0).long()
    model = LinearTwoClass(w).eval()
    assert (model(x).argmax(1) == y).all()
    assert x.min() > 0.25 and x.max() < 0.75
    signed = (x.flatten(1) @ w - 0.5 * w.sum()).numpy().astype(np.float64)
    analytic = {"l2": np.abs(signed) / w.norm().item(), "linf": np.abs(signed) / w.abs().sum().item()}
    # Starting-point pool: the images mirrored across the boundary (opposite labels), then moved
    # off the normal line, so that no start lies on the optimal direction by construction.
    off_line = 0.1 * (torch.rand(n, D, generator=g) - 0.5)
    off_line -= (off_line @ w)[:, None] * w[None] / (w @ w)
    mirrored = x - 2 * (margins[:, None] * w[None] / w.norm()).view(n, 1, 32, 32)
    mirrored = mirrored + off_line.view(n, 1, 32, 32)
    return model, x, y, analytic, (mirrored, 1 - y)


def assert_verified(model, x, y, result):
    """Every finite distance comes with an in-box, misclassified adversarial within that distance."""
    for c, norm in enumerate(result.norms):
        found = np.isfinite(result.distances[c])
        adv = result.adversarials[c][found]
        assert np.isnan(result.adversarials[c][~found]).all()
        if not found.any():
            continue
        assert adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            predicted = model(torch.from_numpy(adv)).argmax(1).numpy()
        assert (predicted != y.numpy()[found]).all()
        recomputed = perturbation_norm(adv, x.numpy()[found], norm)
        assert np.all(recomputed <= result.distances[c][found] + DISTANCE_TOLERANCE)


# ---------------------------------------------------------------------------------------------------
# the analytic margin
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, tolerance",
    [
        ({"attack": "l2_ddn", "steps": 100}, 0.01),
        ({"attack": "l2_cw", "steps": 100, "binary_search_steps": 5}, 0.02),
        ({"attack": "linf_pgd", "steps": 20, "search_steps": 8}, 0.01),
    ],
)
def test_minimal_distance_matches_analytic_margin(linear, config, tolerance):
    """No attack may beat the true minimum (beyond float noise); good ones come within ``tolerance``."""
    model, x, y, analytic, _ = linear
    result = minimal_perturbations(model, x, y, [config], batch_size=4)
    truth = analytic[result.norms[0]]
    ratio = result.distances[0] / truth
    assert np.all(ratio >= 1 - 1e-3), ratio
    assert np.all(ratio <= 1 + tolerance), ratio
    assert_verified(model, x, y, result)


def test_boundary_attack_is_verified_and_bounded_below(linear):
    """The decision-based attack converges slowly: only check it is valid and improves on its start."""
    model, x, y, analytic, pool = linear
    result = minimal_perturbations(model, x, y, [{"attack": "boundary", "steps": 300}], starting_pool=pool)
    start_distance = perturbation_norm(pool[0].numpy(), x.numpy(), "l2")
    assert np.all(np.isfinite(result.distances[0]))
    assert np.all(result.distances[0] >= analytic["l2"] * (1 - 1e-3))
    assert np.all(result.distances[0] < start_distance)
    assert_verified(model, x, y, result)


@pytest.mark.slow
def test_brendel_bethge_matches_analytic_margin(linear):
    """Compiles foolbox's numba optimizers (tens of seconds each, once per process)."""
    model, x, y, analytic, pool = linear
    configs = [
        {"attack": "l2_bb", "steps": 100, "lr_num_decay": 10},
        {"attack": "linf_bb", "steps": 100, "lr_num_decay": 10},
        {"attack": "l2_ddn", "steps": 100},
        {"attack": "linf_pgd", "steps": 20, "search_steps": 8},
    ]
    result = minimal_perturbations(model, x, y, configs, starting_pool=pool)
    for c, norm in enumerate(result.norms[:2]):
        ratio = result.distances[c] / analytic[norm]
        # Never below the true minimum (that would be a verification bug), and within 1% on most images.
        # BB alone can stall for good on the clean side of the boundary once its correction per pixel
        # falls below float32 spacing (docs/attacks.md); how many of the 6 images stall depends on the
        # CPU's float rounding (one on earlier sessions' machines, two on another), so BB alone is held to
        # a majority, and what the pipeline reports, the minimum over the attacks of a norm, to all six.
        assert np.all(ratio >= 1 - 1e-3), (norm, ratio)
        assert np.sum(ratio <= 1.01) >= 4, (norm, ratio)
    for norm in ("l2", "linf"):
        best, _ = result.best(norm)
        ratio = best / analytic[norm]
        assert np.all(ratio >= 1 - 1e-3) and np.all(ratio <= 1.01), (norm, ratio)
    assert_verified(model, x, y, result)


# ---------------------------------------------------------------------------------------------------
# conventions: misclassified images, failures, minimum over configs, stochastic models
# ---------------------------------------------------------------------------------------------------


def test_misclassified_images_have_distance_zero(linear):
    model, x, y, _, _ = linear
    wrong = y.clone()
    wrong[:2] = 1 - wrong[:2]
    result = minimal_perturbations(model, x, wrong, [{"attack": "l2_ddn", "steps": 20}])
    assert result.clean_correct.tolist() == [False, False] + [True] * (len(y) - 2)
    assert np.all(result.distances[0, :2] == 0)
    np.testing.assert_array_equal(result.adversarials[0, :2], x[:2].numpy())
    assert np.all(result.distances[0, 2:] > 0)


def test_misclassified_images_are_credited_to_no_attack(linear):
    """An image wrong before any attack names no attack as its best, though every attack 'found' 0."""
    model, x, y, _, _ = linear
    wrong = y.clone()
    wrong[:2] = 1 - wrong[:2]
    result = minimal_perturbations(
        model, x, wrong, [{"attack": "l2_ddn", "steps": 20}, {"attack": "l2_fmn", "steps": 20}]
    )
    best, index = result.best("l2")
    assert np.all(best[:2] == 0) and np.all(index[:2] == -1)
    assert np.all(index[2:] >= 0)
    np.testing.assert_array_equal(result.best_adversarials("l2")[:2], x[:2].numpy())


def test_failed_attacks_give_inf(linear):
    model, x, y, _, pool = linear
    configs = [
        # an epsilon ceiling below every margin: PGD cannot succeed
        {"attack": "linf_pgd", "steps": 5, "init_epsilon": 1e-4, "max_epsilon": 2e-4, "search_steps": 2},
        # a pool whose every image the model puts in its labelled image's class: no starting point
        {"attack": "boundary", "steps": 10},
    ]
    result = minimal_perturbations(model, x, y, configs, starting_pool=(x, 1 - y))
    assert np.all(np.isinf(result.distances))
    assert np.isnan(result.adversarials).all()
    best, index = result.best("l2")
    assert np.all(np.isinf(best)) and np.all(index == -1)
    assert result.median("linf") == np.inf


def test_best_takes_the_minimum_per_norm(linear):
    model, x, y, analytic, _ = linear
    configs = [
        {"attack": "l2_ddn", "steps": 5},
        {"attack": "l2_ddn", "steps": 100},
        {"attack": "linf_pgd", "steps": 10, "search_steps": 4},
    ]
    result = minimal_perturbations(model, x, y, configs)
    best, index = result.best("l2")
    np.testing.assert_array_equal(best, np.minimum(result.distances[0], result.distances[1]))
    assert set(index.tolist()) <= {0, 1}
    np.testing.assert_array_equal(result.best("linf")[0], result.distances[2])
    adv = result.best_adversarials("l2")
    np.testing.assert_allclose(perturbation_norm(adv, x.numpy(), "l2"), best, rtol=0, atol=1e-6)
    assert result.median("l2") == pytest.approx(np.median(best))


def test_conv_model_batches_are_verified():
    """A small CNN, more images than one batch: every attack's output still verifies."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    x = torch.rand(10, 1, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one clean error
    configs = [
        {"attack": "linf_pgd", "steps": 10, "search_steps": 5},
        {"attack": "l2_ddn", "steps": 30},
        {"attack": "l2_cw", "steps": 30, "binary_search_steps": 3, "initial_const": 1.0},
    ]
    messages = []
    result = minimal_perturbations(model, x, y, configs, batch_size=4, progress=messages.append)
    assert result.distances.shape == (3, 10) and result.adversarials.shape == (3, 10, 1, 32, 32)
    assert np.all(result.distances[:, 0] == 0)
    assert np.isfinite(result.distances).mean() > 0.9
    assert_verified(model, x, y, result)
    assert len(messages) == 3 * 3  # 9 correctly classified images in batches of 4, per config


def test_stochastic_model_needs_eot(linear):
    model, x, y, analytic, _ = linear
    noisy = NoisyLogits(model, scale=0.01).eval()
    with pytest.raises(ValueError, match="eot_samples"):
        minimal_perturbations(noisy, x, y, [{"attack": "l2_ddn", "steps": 10}])
    result = minimal_perturbations(noisy, x, y, [{"attack": "l2_ddn", "steps": 50}], eot_samples=4)
    found = np.isfinite(result.distances[0])
    assert found.mean() > 0.5
    # the noise is tiny next to the logit margins, so the EoT boundary is the linear one
    np.testing.assert_allclose(result.distances[0][found], analytic["l2"][found], rtol=0.05)


def test_a_stochastic_networks_end_points_are_pushed_until_a_majority_misclassifies(linear):
    """Noise of 1 logit on a margin of ~32 logits per unit L2: an attack's end point sits on the EoT
    boundary, where one draw calls it adversarial half the time. Pushed outward along its own direction
    until 13 of 25 draws misclassify it, every image gets a distance between the analytic boundary's
    (less the vote's slack, ~0.02 here) and twice it, and each stored adversarial is misclassified by
    most fresh draws of the EoT average."""
    model, x, y, analytic, _ = linear
    noisy = NoisyLogits(model, scale=1.0).eval()
    torch.manual_seed(0)
    result = minimal_perturbations(noisy, x, y, [{"attack": "l2_ddn", "steps": 100}], eot_samples=2)
    distance = result.distances[0]
    assert np.isfinite(distance).all()
    assert np.all(distance >= 0.9 * analytic["l2"]) and np.all(distance <= 2.0 * analytic["l2"] + 1e-6)
    adversarials = torch.from_numpy(result.adversarials[0])
    np.testing.assert_allclose(perturbation_norm(adversarials.numpy(), x.numpy(), "l2"), distance, atol=1e-6)
    eot = ExpectationOverTransformation(noisy, 2)
    with torch.no_grad():
        wrong = torch.stack([eot(adversarials).argmax(1) != y for _ in range(200)]).float().mean(0)
    assert (wrong > 0.25).all(), wrong


def test_seeded_runs_repeat(linear):
    model, x, y, _, _ = linear
    config = [{"attack": "linf_pgd", "steps": 5, "search_steps": 3}]
    a = minimal_perturbations(model, x, y, config, seed=1)
    b = minimal_perturbations(model, x, y, config, seed=1)
    np.testing.assert_array_equal(a.distances, b.distances)


# ---------------------------------------------------------------------------------------------------
# configs and medians
# ---------------------------------------------------------------------------------------------------


def test_default_configs_cover_every_attack_and_validate():
    full = default_attack_configs()
    assert {c["attack"] for c in full} == set(ATTACKS)
    for config in full + default_attack_configs(quick=True):
        assert validate_attack_config(config) == config  # already normalized: stable hashes
    assert {attack_norm(c) for c in full} == {"linf", "l2"}


def test_validation_fills_defaults():
    config = validate_attack_config({"attack": "l2_ddn"})
    assert config == {"attack": "l2_ddn", "steps": 300, "init_epsilon": 1.0, "gamma": 0.05}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"steps": 10}, "no 'attack' given"),
        ({"attack": "l3_magic"}, "unknown attack"),
        ({"attack": "l2_ddn", "stepz": 10}, "unknown config key"),
        ({"attack": "l2_ddn", "steps": 0}, "steps"),
        ({"attack": "l2_ddn", "steps": 2.5}, "steps"),
        ({"attack": "l2_ddn", "steps": True}, "steps"),
        ({"attack": "l2_cw", "confidence": -1}, "confidence"),
        ({"attack": "linf_pgd", "max_epsilon": 1.5}, "max_epsilon"),
        ({"attack": "linf_pgd", "init_epsilon": 0.2, "max_epsilon": 0.1}, "init_epsilon"),
        ({"attack": "linf_pgd", "random_start": "yes"}, "random_start"),
        ({"attack": "l2_bb", "steps": 10, "lr_num_decay": 20}, "lr_num_decay"),
        ({"attack": "linf_bb", "momentum": 1.0}, "momentum"),
        ({"attack": "boundary", "spherical_step": float("nan")}, "spherical_step"),
        (["l2_ddn"], "dict"),
    ],
)
def test_invalid_configs_raise(config, message):
    with pytest.raises(ValueError, match=message):
        validate_attack_config(config)


def test_median_perturbation():
    assert median_perturbation([0.0, 0.1, 0.3]) == 0.1
    assert median_perturbation([0.1, np.inf, np.inf]) == np.inf
    assert median_perturbation([0.0, 0.0, 0.2, np.inf, np.inf]) == 0.2
    for bad in ([], [0.1, np.nan], [-0.1]):
        with pytest.raises(ValueError):
            median_perturbation(bad)


def test_cross_checks_join_the_primary_result_on_their_subset():
    """Primary Linf and L2 attacks on 4 images, a Linf cross-check on the first 3: image 0 it wins (1% or
    more below the primary), image 1 it ties, image 2 its own run saw misclassified (not attacked by it),
    image 3 is outside its subset; image 1 is misclassified in the primary run (distance 0 everywhere)."""
    inf = np.inf
    images = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    primary = MinimalPerturbations(
        [{"attack": "linf_fmn"}, {"attack": "l2_ddn"}],
        ["linf", "l2"],
        np.array([[0.5, 0.0, 0.3, 0.2], [1.0, 0.0, inf, 2.0]]),
        np.stack([images, images]),
        np.array([True, False, True, True]),
    )
    checks = MinimalPerturbations(
        [{"attack": "linf_pgd"}],
        ["linf"],
        np.array([[0.4, 0.0, 0.0]]),
        images[None, :3] + 0.5,
        np.array([True, False, False]),
    )
    joined = with_cross_checks(primary, checks)
    np.testing.assert_array_equal(joined.distances[2], [0.4, 0.0, inf, inf])
    assert np.isnan(joined.adversarials[2, 2:]).all() and joined.adversarials[2, 1] == images[1]
    np.testing.assert_array_equal(joined.best("linf")[0], [0.4, 0.0, 0.3, 0.2])
    assert joined.best("linf")[1].tolist() == [2, -1, 0, 0]  # the cross-check is credited with image 0
    assert joined.beat_primary() == [None, None, 1]
    summary = joined.summary(["fmn", "ddn", "pgd"])
    assert [a["n_images"] for a in summary["attacks"]] == [4, 4, 2]
    assert summary["attacks"][2]["success_rate"] == 1.0  # its one correctly classified image, broken
    assert summary["images"][0]["linf_attack"] == "pgd"
