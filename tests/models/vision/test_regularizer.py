"""Similarity loss: gradients against finite differences, gamma, centred cosine, running centres, pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neureg.models.neural.rsa import centered_cosine
from neureg.models.vision.networks import build_network, tap_feature_sizes
from neureg.models.vision.regularizer import (
    PairSampler,
    SimilarityRegularizer,
    evaluate_similarity_loss,
    layer_similarities,
    similarity_loss,
    stimulus_centres,
)


def _taps(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, 2, 3, 3), (n, 3, 2, 2), (n, 5)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def test_gradient_matches_finite_differences():
    """d L_sim / d features and d L_sim / d gamma logits, double precision, torch.autograd.gradcheck."""
    taps = [t.requires_grad_() for t in _taps()]
    centres = [t.detach().flatten(1).mean(0) * 0.7 for t in taps]
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4]])
    target = torch.tensor([0.3, -0.5, 0.8, 0.0], dtype=torch.float64)
    logits = torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64, requires_grad=True)

    def loss(a, b, c, gamma_logits):
        return similarity_loss([a, b, c], centres, pairs, target, gamma_logits, eps=1e-3)

    assert torch.autograd.gradcheck(loss, (*taps, logits), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_loss_is_the_squared_fisher_z_difference():
    taps = _taps()
    centres = [t.flatten(1).mean(0) for t in taps]
    pairs = torch.tensor([[0, 1], [2, 3]])
    target = torch.tensor([0.25, -0.6], dtype=torch.float64)
    logits = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    gamma = np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum()
    per_layer = [centered_cosine(t.flatten(1).numpy()) for t in taps]  # independent reference (numpy)
    s_cnn = [sum(g * s[i, j] for g, s in zip(gamma, per_layer)) for i, j in pairs.tolist()]
    expected = np.mean((np.arctanh(s_cnn) - np.arctanh(target.numpy())) ** 2)
    got = similarity_loss(taps, centres, pairs, target, logits, eps=1e-3)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_layer_similarity_is_centred_cosine():
    taps = _taps(n=8)
    centres = [t.flatten(1).mean(0) for t in taps]
    pairs = torch.tensor([[i, j] for i in range(8) for j in range(8)])
    sims = layer_similarities(taps, centres, pairs)
    for k, tap in enumerate(taps):
        np.testing.assert_allclose(sims[k].view(8, 8).numpy(), centered_cosine(tap.flatten(1).numpy()), atol=1e-12)


def test_clip_keeps_the_loss_finite_at_plus_minus_one():
    """Self-similarity is exactly 1 and thresholded pixel targets are +-1: clipping keeps arctanh finite."""
    taps = _taps()
    centres = [t.flatten(1).mean(0) for t in taps]
    pairs = torch.tensor([[0, 0], [1, 2]])
    target = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss = similarity_loss(taps, centres, pairs, target, torch.zeros(3, dtype=torch.float64), eps=1e-3)
    assert torch.isfinite(loss)
    # The self-pair contributes nothing: both sides clip to 1 - eps.
    only_self = similarity_loss(taps, centres, pairs[:1], target[:1], torch.zeros(3, dtype=torch.float64), 1e-3)
    assert float(only_self) == pytest.approx(0.0, abs=1e-12)


def test_gamma_is_a_probability_vector():
    reg = SimilarityRegularizer([4, 5, 6, 7, 8])
    torch.testing.assert_close(reg.gamma(), torch.full((5,), 0.2))
    with torch.no_grad():
        reg.gamma_logits.copy_(torch.tensor([3.0, -2.0, 0.5, 10.0, -7.0]))
    gamma = reg.gamma().detach()
    assert float(gamma.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(gamma > 0)


def test_running_centre_update():
    taps = [t.float() for t in _taps(n=4)]
    reg = SimilarityRegularizer([18, 12, 5], momentum=0.25)
    reg.update_centres(taps)
    for centre, tap in zip(reg.centres, taps):
        torch.testing.assert_close(centre, tap.flatten(1).mean(0))  # the first batch sets the centre
    second = [t * 2 + 1 for t in taps]
    reg.update_centres(second)
    for centre, tap, tap2 in zip(reg.centres, taps, second):
        expected = 0.75 * tap.flatten(1).mean(0) + 0.25 * tap2.flatten(1).mean(0)
        torch.testing.assert_close(centre, expected)
    # forward updates the centres in train mode only, and the centres are not part of the graph.
    pairs, target = torch.tensor([[0, 1]]), torch.tensor([0.1])
    reg.eval()
    before = [c.clone() for c in reg.centres]
    reg(second, pairs, target)
    assert all(torch.equal(a, b) for a, b in zip(before, reg.centres))
    reg.train()
    features = [t.clone().requires_grad_() for t in second]
    reg(features, pairs, target).backward()
    assert int(reg.centre_updates) == 3
    assert all(not c.requires_grad for c in reg.centres)
    assert reg.gamma_logits.grad is not None and all(f.grad is not None for f in features)


def test_regularizer_state_round_trips():
    reg = SimilarityRegularizer([3, 4], momentum=0.1)
    reg.update_centres([torch.randn(5, 3), torch.randn(5, 4)])
    copy = SimilarityRegularizer([3, 4], momentum=0.1)
    copy.load_state_dict(reg.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reg.centres, copy.centres))
    assert int(copy.centre_updates) == 1


def test_pair_sampler_is_seeded_and_never_pairs_an_image_with_itself():
    sampler = PairSampler(n_images=50, pairs_per_step=10, seed=7)
    images, pairs = sampler.sample()
    assert images.shape == (20,) and pairs.shape == (10, 2)
    assert len(set(images.tolist())) == 20 and int(images.max()) < 50
    assert sorted(pairs.flatten().tolist()) == list(range(20))
    again = PairSampler(50, 10, seed=7).sample()
    assert torch.equal(again[0], images)
    assert not torch.equal(sampler.sample()[0], images)
    sampler.reseed(7)
    assert torch.equal(sampler.sample()[0], images)
    with pytest.raises(ValueError):
        PairSampler(n_images=10, pairs_per_step=6, seed=0)


def test_evaluation_uses_exact_centres_over_all_stimuli():
    torch.manual_seed(0)
    model = build_network({"width": 0.0625}).eval()
    stimuli = torch.rand(10, 1, 12, 16)
    target = torch.from_numpy(centered_cosine(np.random.default_rng(0).standard_normal((10, 3))))
    pairs = torch.tensor([[0, 5], [3, 9], [2, 4]])
    logits = torch.tensor([0.5, 0.0, 0.0, -1.0, 0.2])
    with torch.no_grad():
        taps = [t.double() for t in model.taps(stimuli)]
    centres = stimulus_centres(model, stimuli, batch_size=3)
    for c, t in zip(centres, taps):
        torch.testing.assert_close(c, t.flatten(1).mean(0))
    expected = similarity_loss(taps, centres, pairs, target[pairs[:, 0], pairs[:, 1]], logits.double(), 1e-3)
    got = evaluate_similarity_loss(model, logits, stimuli, target, pairs, eps=1e-3, batch_size=4)
    assert got == pytest.approx(float(expected), rel=1e-6)
    assert len(tap_feature_sizes(model, (1, 12, 16))) == 5
    assert math.isfinite(got)
