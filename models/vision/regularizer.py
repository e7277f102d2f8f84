"""The similarity loss (docs/science.md §6): make the network's image-pair similarities match a target.

S^CNN-k_ij is the cosine similarity of the *centred*, flattened layer-k features of images i and j; the
centre is the mean feature over the target's images. During training that mean is a running mean over
the stimulus batches (``momentum``, a buffer like BatchNorm's), updated from each batch *before* the
batch's similarities are computed and detached from the graph: it is a statistic of the image set, not
something the loss should move. S^CNN = sum_k gamma_k S^CNN-k with gamma = softmax(trainable logits),
initialised uniform (gamma_k = 1/K, as Li et al.'s supplement). The loss over sampled pairs is

    L_sim = mean_pairs [arctanh(clip(S^CNN_ij)) - arctanh(clip(S^target_ij))]^2,

clip(s) = clamp(s, -1 + eps, 1 - eps): S^CNN of an image with itself, or a thresholded pixel target of
+-1 (Attias et al.), would otherwise be infinite.

``similarity_loss`` is the pure function (what the gradient test checks); ``SimilarityRegularizer`` holds
the gamma logits and the running centres; ``PairSampler`` draws the pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import evaluation_mode


def layer_similarities(taps: list[torch.Tensor], centres: list[torch.Tensor], pairs: torch.Tensor) -> torch.Tensor:
    """(K, P) centred cosine similarity per tap of the image pairs ``pairs`` (P, 2), rows into the taps.

    Computed through the Gram matrix of the centred features, G = D D^T (n x n for the n images of the
    step): one matrix product forward and one backward, instead of normalising, gathering and multiplying
    n x D arrays element by element (faster on a CPU, and the similarity term's main own cost).
    """
    rows = []
    for features, centre in zip(taps, centres, strict=True):
        centred = features.flatten(1).to(centre.dtype) - centre
        gram = centred @ centred.T
        norms = gram.diagonal().clamp_min(1e-24).sqrt()  # ||d_i||, floored like F.normalize's eps 1e-12
        cosine = gram / (norms[:, None] * norms[None, :])
        rows.append(cosine[pairs[:, 0], pairs[:, 1]])
    return torch.stack(rows)


def fisher_z(similarity: torch.Tensor, eps: float) -> torch.Tensor:
    """arctanh of a similarity clipped to [-1 + eps, 1 - eps]."""
    return torch.atanh(similarity.clamp(-1.0 + eps, 1.0 - eps))


def similarity_loss(
    taps: list[torch.Tensor],
    centres: list[torch.Tensor],
    pairs: torch.Tensor,
    target: torch.Tensor,
    gamma_logits: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """L_sim for the pairs: mean of squared Fisher-z differences between S^CNN and the target (P,)."""
    model_similarity = torch.softmax(gamma_logits, dim=0) @ layer_similarities(taps, centres, pairs)
    return (fisher_z(model_similarity, eps) - fisher_z(target.to(model_similarity.dtype), eps)).pow(2).mean()


class SimilarityRegularizer(nn.Module):
    """gamma logits (trainable) and the running feature centres of the K taps.

    ``feature_sizes`` are the flattened tap lengths for one stimulus image (``tap_feature_sizes``). In
    train mode ``forward`` first folds the batch into the running centres; in eval mode it only reads them.
    """

    def __init__(self, feature_sizes: list[int], momentum: float = 0.05, eps: float = 1e-3):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum, self.eps = momentum, eps
        self.gamma_logits = nn.Parameter(torch.zeros(len(feature_sizes)))
        for k, size in enumerate(feature_sizes):
            self.register_buffer(f"centre_{k}", torch.zeros(size))
        self.register_buffer("centre_updates", torch.zeros((), dtype=torch.long))

    @property
    def centres(self) -> list[torch.Tensor]:
        return [getattr(self, f"centre_{k}") for k in range(len(self.gamma_logits))]

    def gamma(self) -> torch.Tensor:
        """The layer weights, softmax of the logits: positive, summing to one."""
        return torch.softmax(self.gamma_logits, dim=0)

    @torch.no_grad()
    def update_centres(self, taps: list[torch.Tensor]) -> None:
        """centre <- (1 - m) centre + m * batch mean; the first batch sets the centre outright."""
        # The first-batch test stays on the device (a weight of 1 instead of an ``if``): no host sync
        # per step, and the update can be captured in a CUDA graph.
        weight = torch.where(self.centre_updates == 0, 1.0, self.momentum)
        for centre, features in zip(self.centres, taps, strict=True):
            batch_mean = features.detach().flatten(1).to(centre.dtype).mean(dim=0)
            centre.lerp_(batch_mean, weight.to(centre.dtype))
        self.centre_updates += 1

    def forward(self, taps: list[torch.Tensor], pairs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_centres(taps)
        return similarity_loss(taps, self.centres, pairs, target, self.gamma_logits, self.eps)


class PairSampler:
    """Pairs of distinct target images, ``pairs_per_step`` a step, from its own seeded generator.

    Each step draws 2P distinct images (no image twice, so no self-pair and every forwarded image counts)
    and pairs them in draw order: ``sample()`` returns the image indices (2P,) into the target and the
    pairs (P, 2) as positions into that image batch.
    """

    def __init__(self, n_images: int, pairs_per_step: int, seed: int):
        if pairs_per_step < 1 or 2 * pairs_per_step > n_images:
            raise ValueError(f"{pairs_per_step} pairs a step need 2 x that many of the {n_images} target images")
        self.n_images, self.pairs_per_step = n_images, pairs_per_step
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randperm(self.n_images, generator=self.generator)[: 2 * self.pairs_per_step]
        pairs = torch.arange(2 * self.pairs_per_step).view(-1, 2)
        return images, pairs


@torch.no_grad()
def stimulus_centres(model: nn.Module, stimuli: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """The exact mean tap features over all stimulus images (eq. 9's f-bar), model used as it is set."""
    sums, count = None, 0
    for start in range(0, len(stimuli), batch_size):
        taps = model.taps(stimuli[start : start + batch_size])
        batch_sums = [t.flatten(1).double().sum(dim=0) for t in taps]
        sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
        count += len(taps[0])
    return [s / count for s in sums]


@torch.no_grad()
def evaluate_similarity_loss(
    model: nn.Module,
    gamma_logits: torch.Tensor,
    stimuli: torch.Tensor,
    target: torch.Tensor,
    pairs: torch.Tensor,
    eps: float,
    batch_size: int = 256,
) -> float:
    """L_sim of a trained network in eval mode over given target pairs (P, 2), with exact centres.

    For comparing conditions after training (alpha = 0 never computes the loss while it trains). Pairs
    are taken ``batch_size // 2`` at a time, so memory stays bounded for any number of pairs.
    """
    with evaluation_mode(model):
        centres = stimulus_centres(model, stimuli, batch_size)
        total = 0.0
        chunk = max(1, batch_size // 2)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            images, positions = torch.unique(part.flatten(), return_inverse=True)
            taps = [t.double() for t in model.taps(stimuli[images])]
            values = target[part[:, 0], part[:, 1]]
            loss = similarity_loss(taps, centres, positions.view(-1, 2), values, gamma_logits.double(), eps)
            total += float(loss) * len(part)
    return total / len(pairs)
