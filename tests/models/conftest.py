"""Shared by every model test: one torch thread.

The test machines have two cores shared with other jobs; torch's default two OpenMP threads then spin at
barriers against each other and run 10-30x slower than one thread.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
