"""How a run executes, as opposed to what it computes: device, precision, memory layout, kernels; and
the small torch plumbing every model path shares: device choice, the evaluation-mode context, and the
one accuracy (``accuracy``, with the image and label checks it rests on) that training and robustness use.

None of these settings enters a config hash. Two runs that differ only here are the same science
(the same row), so they live outside the config tables and come from the worker's environment:

- ``NEUREG_DEVICE``: a torch device (default: the first visible GPU, else the CPU);
- ``NEUREG_AMP=1``: bfloat16 autocast on CUDA (faster on tensor cores; float32 accumulation);
- ``NEUREG_CHANNELS_LAST``: NHWC activations and weights. Off by default everywhere. On the CPU, oneDNN's
  NHWC convolutions train the demo's narrow networks 1.1-1.3x faster (README "Performance"), but the
  oneDNN in torch 2.14.1 crashes the process (segmentation fault, or glibc's "double free") in the
  weight gradient of a 1x1 stride-2 NHWC convolution with few input channels on some CPUs: seen on an
  AMD EPYC with AVX-512 (4 -> 8 channels on 36x64 stimulus maps, the shortcut of a width-1/16 ResNet),
  not on 32x32 maps (``tests/models/test_runtime_layout.py`` tries it in a child process). On CUDA it
  pays under autocast (``NEUREG_AMP``) and is set with it;
- ``NEUREG_DETERMINISTIC=1``: cuDNN's deterministic kernels. Off by default because it forbids the
  fastest convolution algorithms (cuDNN benchmark mode); on, a resumed CUDA run replays the
  uninterrupted one exactly on the same GPU and software stack. CPU runs are deterministic either way.
- ``NEUREG_EVAL_BATCH``: images per evaluation forward pass (test accuracy after training, noise and
  corruption accuracy). Unset or 0: on CUDA as many as half the free memory holds, measured by one probe
  call (:func:`memory_batch_size`); on the CPU the batches rows were always computed with (500 for test
  accuracy, 256 for noise and corruptions), so CPU rows reproduce. A stochastic network draws its noise
  per forward, so a different batch gives its numbers that differ as two noise seeds do.
- ``NEUREG_ATTACK_BATCH``: images per attack call (minimal perturbations, PGD, AutoAttack). Unset or 0:
  on CUDA as many as half the free memory holds, measured by one probe gradient call
  (:func:`memory_batch_size`); on the CPU the batches rows were always computed with
  (128 for minimal perturbations, 256 for fixed epsilon), so CPU rows reproduce. Attacks with random
  starts draw them per batch, so a different batch gives numbers that differ as two seeds do.
- ``NEUREG_CUDA_GRAPHS=1``: capture each training step as one CUDA graph (``graphs.py``): 4-5x
  faster steps at batch 64 on an H200, where eager launches leave the GPU mostly idle.
- ``NEUREG_GROUP`` (or ``--group K`` of ``neureg worker`` / ``populate`` / ``demo``): how many compatible
  networks a worker trains and evaluates as one fused model (``models/vision/group.py``). Unset or
  ``auto``: ``group_size`` picks from the device and the network's width. On the CPU that is 1: oneDNN's
  grouped convolutions at a few channels per group are slower than the same networks one after another
  (0.8x for K = 2 and 4 at the demo's width on the 2026-12-07 machine, ``bench/bench_fused.py``).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _device_from_env() -> str:
    """NEUREG_DEVICE if set, else the first CUDA device when one is visible, else the CPU."""
    requested = os.environ.get("NEUREG_DEVICE")
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"NEUREG_DEVICE={requested} but torch sees no CUDA device")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True)
class Runtime:
    """Execution settings of one run; see the module docstring for what each one trades."""

    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    deterministic: bool = False
    eval_batch_size: int = 0  # images per evaluation forward; 0: chosen from memory (``memory_batch_size``)
    cuda_graphs: bool = False
    group: int = 0  # networks trained as one fused model; 0: chosen by ``group_size``
    attack_batch: int = 0  # images per attack call; 0: chosen from memory (``robustness.evaluation``)

    @classmethod
    def from_env(cls, **overrides) -> Runtime:
        """The worker's settings: NEUREG_* variables, then explicit ``overrides``."""
        batch = os.environ.get("NEUREG_EVAL_BATCH", "0").strip() or "0"
        if not batch.isdigit():
            raise ValueError(f"NEUREG_EVAL_BATCH={batch!r}: expected a positive integer, or 0 for automatic")
        device = _device_from_env()
        attack_batch = os.environ.get("NEUREG_ATTACK_BATCH", "0").strip() or "0"
        if not attack_batch.isdigit():
            raise ValueError(f"NEUREG_ATTACK_BATCH={attack_batch!r}: expected a positive integer, or 0 for automatic")
        runtime = cls(
            device=device,
            amp=_flag("NEUREG_AMP", False),
            channels_last=_flag("NEUREG_CHANNELS_LAST", False),
            deterministic=_flag("NEUREG_DETERMINISTIC", False),
            eval_batch_size=int(batch),
            cuda_graphs=_flag("NEUREG_CUDA_GRAPHS", False),
            group=group_from_text(os.environ.get("NEUREG_GROUP", ""), "NEUREG_GROUP"),
            attack_batch=int(attack_batch),
        )
        return replace(runtime, **overrides)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def on_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def graphs_active(self) -> bool:
        """Whether training steps are recorded and replayed (``graphs.py``): CUDA graphs asked for, on CUDA."""
        return self.cuda_graphs and self.on_cuda

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """bfloat16 under ``amp`` on CUDA; None (float32) otherwise."""
        return torch.bfloat16 if self.amp and self.on_cuda else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """The autocast context of this runtime (a no-op without ``amp`` or off CUDA)."""
        dtype = self.amp_dtype
        return torch.autocast(self.torch_device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    @contextlib.contextmanager
    def kernels(self):
        """cuDNN flags for the duration: deterministic, or benchmark mode (fastest algorithms)."""
        if not self.on_cuda:
            yield
            return
        saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        torch.backends.cudnn.deterministic = self.deterministic
        torch.backends.cudnn.benchmark = not self.deterministic
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved

    def describe(self) -> str:
        """The device as a person reads it: GPU name, or CPU model and thread count."""
        if self.on_cuda:
            return f"{self.device} ({torch.cuda.get_device_name(self.torch_device)})"
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


MAX_GROUP = 64


def group_from_text(value: str, name: str) -> int:
    """A group size as typed: a positive integer up to ``MAX_GROUP``, or ''/auto (0: chosen per network)."""
    text = value.strip().lower()
    if text in ("", "auto"):
        return 0
    if not text.isdigit() or not 1 <= int(text) <= MAX_GROUP:
        raise ValueError(f"{name}={value!r}: expected auto or a whole number from 1 to {MAX_GROUP}")
    return int(text)


def group_size(runtime: Runtime, net_config: dict | None = None) -> int:
    """How many networks of this architecture train as one fused model on this runtime: the worker's
    setting if given, else 1 on the CPU (module notes: fusion does not pay there), and on CUDA 8 for
    networks of width <= 1/4 and 4 for wider ones (more channels already fill more of each kernel)."""
    if runtime.group:
        return runtime.group
    if not runtime.on_cuda:
        return 1
    width = float((net_config or {}).get("width", 1.0))
    return 8 if width <= 0.25 else 4


def as_runtime(runtime: Runtime | str | None) -> Runtime:
    """A Runtime from a Runtime, a device string, or None (the CPU with every default)."""
    if runtime is None:
        return Runtime()
    if isinstance(runtime, str):
        return Runtime(device=runtime)
    return runtime


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU): for timings and epoch boundaries."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to evaluate on: the one asked for, else where the model's parameters already live.

    Defaulting to the model's own device (not "cuda if available", as foolbox does) means evaluating
    never silently moves a caller's model.
    """
    if device is not None:
        return torch.device(device)
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in ``eval()`` for the duration and give it back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------- images in, labels out: one accuracy
#: How many images go through the model at once when nothing else is said.
DEFAULT_BATCH_SIZE = 256
#: Share of the free GPU memory one batch may take (attack libraries keep copies of it besides).
MEMORY_SHARE = 0.5


def memory_batch_size(model: nn.Module, image_shape, n_images: int, device, *, cpu_batch: int, gradient: bool) -> int:
    """Images per call of ``model``: ``cpu_batch`` on the CPU (what the CPU rows were computed with, so they
    reproduce); on CUDA as many of ``n_images`` as ``MEMORY_SHARE`` of the free memory holds, from the peak
    memory of one call on a 16-image probe (with the input gradient an attack takes when ``gradient``). The
    probe is of the model as it will be called: an EoT average already holds its draws, a network group its
    K networks. An execution setting, never a config key."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(cpu_batch, n_images))
    probe = max(1, min(n_images, 16))
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = torch.rand(probe, *image_shape, device=device, requires_grad=gradient)
    with evaluation_mode(model), torch.set_grad_enabled(gradient):
        out = model(x)
        if gradient:
            torch.autograd.grad(out.float().sum(), x)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - before) / probe)
    return batch_from_memory(free, per_image, n_images)


def batch_from_memory(free_bytes: float, per_image_bytes: float, n_images: int) -> int:
    """The arithmetic of :func:`memory_batch_size`: ``MEMORY_SHARE`` of ``free_bytes``, at least one image."""
    return int(max(1, min(n_images, MEMORY_SHARE * free_bytes // per_image_bytes)))


def as_image_tensor(images) -> torch.Tensor:
    """Images as a CPU tensor of torch's default dtype (float32), refusing values outside [0, 1] (every
    attack assumes that box)."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    x = x.detach().to("cpu", torch.get_default_dtype())
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images, got shape {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"images must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    return x


def as_label_tensor(labels, n_images: int) -> torch.Tensor:
    """Labels as an int64 CPU tensor of length ``n_images``."""
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    y = y.detach().to("cpu", torch.int64).reshape(-1)
    if len(y) != n_images:
        raise ValueError(f"got {len(y)} labels for {n_images} images")
    return y


@torch.no_grad()
def predict_labels(
    model: nn.Module, images, batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None
) -> np.ndarray:
    """Arg-max class of every image, in batches, in evaluation mode (one stochastic draw per image): (N,), or
    (N, K) for a model answering for K networks at once (logits (B, K, C), ``robustness/group.py``)."""
    x = as_image_tensor(images)
    device = resolve_device(model, device)
    predictions = []
    with evaluation_mode(model):
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device))
            predictions.append(logits.argmax(dim=-1).cpu())
    if not predictions:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(predictions).numpy()


def accuracy(
    model: nn.Module, images, labels, batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None
) -> float:
    """Fraction of images whose arg-max class equals the label (per network, (K,), for a model answering
    for K networks at once)."""
    x = as_image_tensor(images)
    y = as_label_tensor(labels, len(x)).numpy()
    if len(x) == 0:
        raise ValueError("accuracy of zero images is undefined")
    return hit_rate(predict_labels(model, x, batch_size, device), y)


def hit_rate(predictions, labels):
    """Share of predictions equal to their labels: a float for (N,) predictions, an array (K,) for (N, K)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    hits = predictions == labels.reshape(-1, *[1] * (predictions.ndim - 1))
    return float(hits.mean()) if predictions.ndim == 1 else hits.mean(axis=0)
