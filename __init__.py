"""neureg: brain-regularized, robust vision models on a DataJoint pipeline.

``pipe = neureg.connect()`` starts (or reaches) the database and activates every schema.
"""

import warnings

# neureg configures DataJoint itself (embedded server by default), so a missing datajoint.json is normal.
warnings.filterwarnings("ignore", message="No datajoint.json found", category=UserWarning)

__version__ = "0.1.0"
__all__ = ["connect", "ConfigurationError", "__version__"]


def __getattr__(name: str):
    """``connect`` and ``ConfigurationError`` load the database layer on first use, so ``neureg.models``
    (pure torch and numpy) imports on a GPU node or in a notebook that has no DataJoint installed."""
    if name == "connect":
        from .database.connect import connect

        return connect
    if name == "ConfigurationError":
        from .errors import ConfigurationError

        return ConfigurationError
    raise AttributeError(f"module 'neureg' has no attribute {name!r}")
