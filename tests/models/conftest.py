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


@pytest.fixture(scope="session")
def nhwc_crashes() -> bool:
    """Whether this CPU's oneDNN crashes in an NHWC weight gradient (the probe of test_runtime_layout.py, in a
    child process): where it does, CPU tests of the opt-in NHWC layout cannot run (models/runtime.py)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        return False
    spec = importlib.util.spec_from_file_location("runtime_layout", Path(__file__).with_name("test_runtime_layout.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return subprocess.run([sys.executable, "-c", probe.CHILD], capture_output=True, timeout=120).returncode != 0
