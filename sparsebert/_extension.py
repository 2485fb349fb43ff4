"""Tolerant loading of the native extension `sparsebert._C`.

Importing `_C` registers the C++/CUDA kernels into the torch dispatcher. If it cannot be loaded,
one warning says how to fix it and the pure-PyTorch references (the ops' default kernels) run.
SPARSEBERT_REQUIRE_EXT=1 turns that into an ImportError (CI sets it).

A `_C` built from other op schemas than sparsebert/ops.py's (sources updated, extension not
rebuilt) is refused the same way before it is loaded: loading it would make torch abort the
process while the kernels register (sparsebert/schema.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType

from sparsebert import schema
from sparsebert.errors import ExtensionUnavailable
from sparsebert.switches import env_switch

__all__ = ["env_switch", "load_extension"]

_FIX = (
    "build it with `pip install --no-build-isolation -e .` from the repository (needs a C++ "
    "compiler and the torch you run with), or set SPARSEBERT_REQUIRE_EXT=1 to make this an error"
)
def _unavailable(reason: str) -> None:
    """The warning (or, with SPARSEBERT_REQUIRE_EXT on, the ImportError) for an unusable _C."""
    if env_switch("SPARSEBERT_REQUIRE_EXT"):
        raise ExtensionUnavailable(f"sparsebert._C failed to load and SPARSEBERT_REQUIRE_EXT="
                          f"{os.environ['SPARSEBERT_REQUIRE_EXT']}: {reason}")
    warnings.warn(f"sparsebert native kernels unavailable ({reason}); the PyTorch reference "
                  f"implementations run instead. To fix: {_FIX}", RuntimeWarning, stacklevel=4)


def _schema_mismatch(library: str) -> str | None:
    """Why the library at `library` does not fit this source's op schemas, or None when it
    does (or when the sources cannot be read to tell)."""
    ops_source = Path(__file__).with_name("ops.py")
    try:
        expected = schema.source_fingerprint(ops_source)
    except (OSError, ValueError, SyntaxError):
        return None  # no readable sources (a bytecode-only install): nothing to compare
    try:
        built = schema.built_fingerprint(library)
    except (OSError, ValueError) as error:
        return f"{library} cannot be read ({error})"
    if built is None:
        return (f"{library} carries no op-schema fingerprint: it was built by an older "
                f"version of sparsebert; rebuild it")
    if built != expected:
        return (f"{library} was built for other op schemas ({built}) than "
                f"sparsebert/ops.py defines ({expected}): the sources changed since the build; "
                f"rebuild it")
    return None


def load_extension() -> ModuleType | None:
    """Import sparsebert._C; returns None (after one warning) if it is unavailable."""
    env_switch("SPARSEBERT_REQUIRE_EXT")  # a bad value is refused even when _C loads
    try:
        spec = importlib.util.find_spec("sparsebert._C")
    except ImportError as error:
        _unavailable(str(error))
        return None
    if spec is None or spec.origin is None:
        _unavailable("sparsebert._C is not built")
        return None
    mismatch = _schema_mismatch(spec.origin)
    if mismatch is not None:
        _unavailable(mismatch)
        return None
    try:
        return importlib.import_module("sparsebert._C")
    except ImportError as error:
        _unavailable(str(error))
        return None
