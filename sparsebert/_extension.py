"""Tolerant loading of the native extension `sparsebert._C`.

Importing `_C` registers the C++/CUDA kernels into the torch dispatcher. If it cannot be loaded,
one warning says how to fix it and the pure-PyTorch references (the ops' default kernels) run.
SPARSEBERT_REQUIRE_EXT=1 turns that into an ImportError (CI sets it).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

_FIX = (
    "build it with `pip install --no-build-isolation -e .` from the repository (needs a C++ "
    "compiler and the torch you run with), or set SPARSEBERT_REQUIRE_EXT=1 to make this an error"
)


def load_extension() -> ModuleType | None:
    """Import sparsebert._C; returns None (after one warning) if it is unavailable."""
    try:
        from sparsebert import _C  # noqa: PLC0415
    except ImportError as error:
        if os.environ.get("SPARSEBERT_REQUIRE_EXT", "0") == "1":
            raise ImportError(
                f"sparsebert._C failed to load and SPARSEBERT_REQUIRE_EXT=1: {error}"
            ) from error
        warnings.warn(
            f"sparsebert native kernels unavailable ({error}); the PyTorch reference "
            f"implementations run instead. To fix: {_FIX}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C
