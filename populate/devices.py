"""Which torch device a worker's stages run on, chosen once at start-up and shared through NEUREG_DEVICE.

The choice itself is ``models.runtime.Runtime.from_env`` (the one device choice, which every stage's make
reads); this module only applies ``--device``, checks the GPU exists and says which one was taken.
"""

from __future__ import annotations

import logging
import os

from ..errors import ConfigurationError

logger = logging.getLogger("neureg")


def select_device(requested: str | None) -> str:
    """The torch device the stages will use: ``--device``, else NEUREG_DEVICE, else the first visible GPU.

    The choice is written back to NEUREG_DEVICE so every stage's ``Runtime.from_env()`` agrees with the log.
    With docker's GPU reservation or CUDA_VISIBLE_DEVICES=1, "cuda" is the one GPU this worker may use.
    A mistyped execution setting (``NEUREG_*``) raises ValueError here, before the first job.
    """
    if requested:
        os.environ["NEUREG_DEVICE"] = requested
    import torch

    from ..models.runtime import Runtime

    try:
        device = Runtime.from_env().device
    except RuntimeError as exc:
        raise ConfigurationError(str(exc)) from exc
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise ConfigurationError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        name = torch.cuda.get_device_name(index)
        logger.info("worker: device %s (%s, CUDA_VISIBLE_DEVICES=%s)", device, name, visible)
    else:
        logger.info("worker: device %s", device)
    os.environ["NEUREG_DEVICE"] = device
    return device
