"""Why NHWC is opt-in on the CPU (models/runtime.py): the crash, tried in a child process, and the default.

The child runs the one operation that crashed oneDNN here: the weight gradient of a 1x1 stride-2 NHWC
convolution, 4 -> 8 channels, on 36x64 maps. Where it crashes, the test says so and checks that nothing
neureg runs by default takes that path; where it does not, NCHW and NHWC gradients must agree."""

from __future__ import annotations

import subprocess
import sys

import torch

CHILD = r"""
import sys, torch
from torch import nn
torch.set_num_threads(1)
conv = nn.Conv2d(4, 8, 1, 2, bias=False)
x = torch.rand(32, 4, 36, 64)
conv(x).pow(2).mean().backward()
reference = conv.weight.grad.clone()
conv.weight.grad = None
nhwc = conv.to(memory_format=torch.channels_last)
nhwc(x.contiguous(memory_format=torch.channels_last)).pow(2).mean().backward()
print(float((nhwc.weight.grad - reference).abs().max()))
"""


def test_the_cpu_default_is_nchw_whatever_this_cpu_does_with_nhwc(monkeypatch):
    from neureg.models.runtime import Runtime

    monkeypatch.delenv("NEUREG_CHANNELS_LAST", raising=False)
    assert Runtime.from_env(device="cpu").memory_format == torch.contiguous_format
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    if child.returncode != 0:  # the crash the default avoids (a signal: negative return code)
        assert child.returncode < 0 or "double free" in child.stderr or "corrupt" in child.stderr, child.stderr
        return
    assert float(child.stdout.strip()) < 1e-5
