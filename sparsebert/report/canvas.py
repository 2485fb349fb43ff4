"""What every report figure shares: the PNG resolution, an atomic save, the panel grid, the
legend below the panels."""

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


def bottom_legend(fig: Figure, ncols: int, fontsize: float, handles: list | None = None):
    """A legend centred below the panels (the figure's own handles, or its axes' labels) in
    as many of `ncols` columns as fit the figure's width: a one-panel figure is narrower than
    four entries side by side, whose ends would be cut off."""
    columns = max(1, ncols)
    while True:
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=columns,
                            fontsize=fontsize)
        fig.draw_without_rendering()  # the layout, so that the legend has its size
        if columns == 1 or legend.get_window_extent().width <= fig.bbox.width:
            return legend
        legend.remove()
        columns -= 1


def panel_grid(n: int, max_cols: int) -> tuple[int, int]:
    """(rows, columns) for n panels, at most max_cols per row."""
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols
