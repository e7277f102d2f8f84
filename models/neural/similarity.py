"""Similarity targets over images (docs/science.md §5, §7), as pure functions.

Every target is an (n_images, n_images) symmetric matrix built with the project's one definition of
similarity, ``rsa.centered_cosine`` (equation 2), so targets from neurons, models, pixels and VGG
features are comparable entry by entry. The DataJoint similarity schema stores what these return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .rsa import centered_cosine

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG_CONV3_1_END = 12  # torchvision vgg19.features[:12] ends with the ReLU (index 11) after conv3_1 (10)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_similarity(pred_rates: np.ndarray, snr_weight: np.ndarray, model_corr: np.ndarray) -> np.ndarray:
    """S^model (equation 6): centered cosine of rhat_ai = w_a * v_a * rhohat_ai.

    ``pred_rates`` (n_images, n_units) are the model's denoised responses, ``snr_weight`` w_a (equation
    1) and ``model_corr`` v_a (held-out correlation of the model with the unit). A negative v_a is set to
    0: an anti-correlated prediction is not a denoised copy of the unit, and because a unit enters the
    dot products as (w_a v_a)^2 its sign would not be removed by the weighting, only its trust
    inflated. Non-finite weights are an error rather than a silent zero: they mean an upstream
    estimate failed (e.g. a unit with no repeat noise gets w_a = inf).
    """
    rates = np.asarray(pred_rates, dtype=np.float64)
    w = np.asarray(snr_weight, dtype=np.float64)
    v = np.asarray(model_corr, dtype=np.float64)
    if rates.ndim != 2 or w.shape != (rates.shape[1],) or v.shape != (rates.shape[1],):
        raise ValueError(
            f"pred_rates (n_images, n_units) {rates.shape} needs snr_weight and model_corr "
            f"of shape ({rates.shape[1]},); got {w.shape} and {v.shape}"
        )
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(v)) and np.all(np.isfinite(rates))):
        raise ValueError("pred_rates, snr_weight and model_corr must be finite")
    return centered_cosine(rates * (w * np.clip(v, 0.0, None)))


def data_similarity(responses: np.ndarray, snr_weight: np.ndarray) -> np.ndarray:
    """S^data (equation 2) of single-trial responses (n_images, n_units) scaled by w_a."""
    r = np.asarray(responses, dtype=np.float64)
    return centered_cosine(r * np.asarray(snr_weight, dtype=np.float64))


def pixel_similarity(images: np.ndarray) -> np.ndarray:
    """S^pixel (Attias et al. 2024): flatten, subtract the mean image, normalize, dot product."""
    imgs = np.asarray(images)
    return centered_cosine(imgs.reshape(len(imgs), -1).astype(np.float64))


def threshold_similarity(s: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """S^Th: +1 where s > threshold, -1 where s < -threshold, 0 otherwise (same dtype as ``s``).

    Attias et al. keep only the confidently similar / dissimilar pairs of S^pixel; the diagonal (1)
    stays +1 for any threshold below 1.
    """
    s = np.asarray(s)
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    out = np.zeros_like(s)
    out[s > threshold] = 1
    out[s < -threshold] = -1
    return out


def shuffled(s: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The Shuffle control: P S P^T for a random permutation, and that permutation.

    ``out[i, j] = s[perm[i], perm[j]]``: the matrix keeps its value distribution and its structure,
    but image i now gets the similarities of image perm[i]. The permutation is drawn again (from the
    same seeded generator) while it is the identity, so for n >= 2 the control always moves images.
    """
    s = np.asarray(s)
    n = s.shape[0]
    if s.shape != (n, n):
        raise ValueError(f"s must be square, got {s.shape}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    while n >= 2 and np.array_equal(perm, np.arange(n)):
        perm = rng.permutation(n)
    return s[np.ix_(perm, perm)], perm


def random_similarity(n_images: int, seed: int, dim: int = 1000) -> np.ndarray:
    """A similarity matrix with no image structure: centered cosine of i.i.d. N(0, 1) features.

    'Random' means a population of ``dim`` units whose responses are independent of the image (the
    default matches a scan's unit count), not random matrix entries: the result is a valid similarity
    matrix (symmetric, unit diagonal, positive semi-definite) whose off-diagonal entries scatter around
    -1/(n-1) with spread about 1/sqrt(dim).
    """
    if n_images < 2 or dim < 1:
        raise ValueError(f"need n_images >= 2 and dim >= 1, got {n_images}, {dim}")
    features = np.random.default_rng(seed).standard_normal((n_images, dim))
    return centered_cosine(features)


def similarity_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r between two similarity matrices over their upper-triangle, off-diagonal pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(f"need two equal square matrices of at least 3 images, got {a.shape}, {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    x, y = a[iu] - a[iu].mean(), b[iu] - b[iu].mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


# -- VGG19 conv3_1 -------------------------------------------------------------------------------------
def _vgg19_conv3_1(weights_path: str | Path):
    """torchvision's vgg19 cut after conv3_1's ReLU, with the user's weights; eval mode, CPU."""
    import torch
    from torchvision.models import vgg19

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG19 weights not found at {path}. The 'vgg' target needs torchvision's ImageNet VGG19 "
            f"state_dict: download {VGG19_URL} to that path, or run `torch.save(torchvision.models."
            f"vgg19(weights='IMAGENET1K_V1').state_dict(), '{path}')` on a machine with internet access."
        )
    try:  # mmap: the 400 MB of classifier weights are checked for shape, never read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle, zip or unsupported-type errors: not a state_dict file
        raise ValueError(f"{path} is not a torch state_dict file ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a VGG19 state_dict")
    with torch.device("meta"):  # the architecture's keys and shapes without allocating 143M weights
        expected = vgg19(weights=None).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not a torchvision VGG19 state_dict (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, wrong shape {wrong[:4]}); expected the file from {VGG19_URL}"
        )
    with torch.device("meta"):
        trunk = vgg19(weights=None).features[:VGG_CONV3_1_END]
    trunk = trunk.to_empty(device="cpu")
    prefix = "features."
    trunk.load_state_dict(
        {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and int(k.split(".")[1]) < VGG_CONV3_1_END
        }
    )
    return trunk.eval()


def vgg_features(images: np.ndarray, weights_path: str | Path, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Flattened VGG19 conv3_1 (post-ReLU) features, (n_images, 256 * h/4 * w/4) float32.

    Grayscale uint8 images are scaled to [0, 1], replicated to 3 channels and ImageNet-normalized, at
    their native resolution (VGG is convolutional; the paper's VGG control takes the stimuli as shown).
    """
    import torch

    net = _vgg19_conv3_1(weights_path).to(device)
    imgs = np.asarray(images)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(imgs), batch_size):
            x = torch.as_tensor(imgs[start : start + batch_size], device=device).float().div(255.0)
            x = (x.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
            chunks.append(net(x).flatten(1).cpu().numpy())
    return np.concatenate(chunks)


def vgg_similarity(
    images: np.ndarray, weights_path: str | Path, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """The VGG control: centered cosine similarity of VGG19 conv3_1 features (``vgg_features``).

    ``weights_path`` is a torchvision-format VGG19 state_dict (FileNotFoundError with download
    instructions when absent, ValueError when the file is something else).
    """
    return _centered_cosine_lean(vgg_features(images, weights_path, batch_size, device))


def _centered_cosine_lean(features: np.ndarray) -> np.ndarray:
    """``rsa.centered_cosine`` for wide float32 features without float64 copies of them.

    conv3_1 of a 36x64 image has 36,864 features; for 5000 images ``centered_cosine`` would hold about
    three float64 copies (4.4 GB). Here the mean is accumulated in float64, the centred features stay
    float32 (in place), and only the (n, n) result is float64; agreement with the float64 definition is
    about 1e-6.
    """
    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    silent = (norms == 0).ravel()
    x[silent] = 0.0
    s = (x @ x.T).astype(np.float64)
    s = (s + s.T) / 2  # exact symmetry and unit diagonal despite float32 rounding
    s[np.flatnonzero(~silent), np.flatnonzero(~silent)] = 1.0
    return s


def model_agreement(pred_rates: np.ndarray, snr_weight: np.ndarray, model_corr: np.ndarray, oracle: np.ndarray) -> dict:
    """How well S^model over the oracle images agrees with S^oracle (Fig. 1D), and both spreads."""
    model = model_similarity(pred_rates, snr_weight, model_corr)
    upper = np.triu_indices(len(oracle), 1)
    return {
        "n_images": len(oracle),
        "model_oracle_r": similarity_agreement(model, oracle),
        "model_spread": float(np.std(model[upper])),
        "oracle_spread": float(np.std(np.asarray(oracle)[upper])),
    }
