"""Network weights as a uint8 array, so they live in the object store as ``<npy@store>``.

DataJoint's ``<npy@store>`` is the one external type that works on both PostgreSQL and MariaDB here
(``<blob@store>`` and ``<attach@store>`` fail on MariaDB), so a state dict travels as the bytes of
``torch.save`` viewed as uint8: portable, loadable without neureg, and checked by torch on load.
"""

from __future__ import annotations

import io

import numpy as np
import torch


def state_to_array(state: dict) -> np.ndarray:
    """A torch state_dict as a uint8 array, so weights can be stored in an object-store attribute."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}, buffer)
    return np.frombuffer(buffer.getbuffer(), dtype=np.uint8).copy()


def array_to_state(array, map_location: str = "cpu") -> dict:
    """The state_dict back from ``state_to_array``'s bytes, through torch's weights-only loader (no arbitrary
    objects)."""
    data = np.asarray(array, dtype=np.uint8)
    return torch.load(io.BytesIO(data.tobytes()), map_location=map_location, weights_only=True)
