"""What every report figure shares: the PNG resolution, an atomic save, the panel grid."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from sparsebert.atomic import atomic_write_with

DPI = 130


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` as a PNG (atomically: a reader never sees half a file)."""
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def panel_grid(n: int, max_cols: int) -> tuple[int, int]:
    """(rows, columns) for n panels, at most max_cols per row."""
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols
