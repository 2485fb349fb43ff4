"""speed_vs_score.png: per task, the dev score of each timed s-pruning subnetwork against its
measured speed-up over the full model (runs timed by `sparsebert speed --run`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sparsebert.report.canvas import bottom_legend, panel_grid, save_png
from sparsebert.report.collect import TaskResults
from sparsebert.report.speed import SpeedEntry, subnet_score
from sparsebert.report.table import majority_label

SUBNET_COLORS = {"good": "tab:green", "random": "tab:blue", "bad": "tab:red"}


def speed_vs_score(results: Mapping[str, TaskResults], entries: Sequence[SpeedEntry],
                   path: Path) -> Path | None:
    """Per task, the dev score of each timed subnetwork (retrained, and without retraining)
    against its measured speed-up over the full model on the fast path, one point per seed, in
    the first setting measured for the task; the full model at 1x."""
    if not entries:
        return None
    first = {}  # task -> its first setting
    for e in entries:
        first.setdefault(e.task, e.setting)
    chosen = [e for e in entries if first[e.task] == e.setting]
    tasks = [t for t in results if t in first]
    measured = {t: first[t].split(", lengths ", 1)[0] for t in tasks}  # device, dtype, batch, S
    shared = len(set(measured.values())) == 1  # else each panel names its own
    rows, cols = panel_grid(len(tasks), 3)
    fig = Figure(figsize=(max(7.0, 3.6 * cols + 0.4), 3.2 * rows + 1.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    runs = {(r.task, r.seed): r for res in results.values() for r in res.runs}
    for ax, task in zip(axes, tasks, strict=False):
        res = results[task]
        task_entries = [e for e in chosen if e.task == task]
        for e in task_entries:
            for stage, marker in (("retrained", "o"), ("pruned", "^")):
                score = subnet_score(runs[(task, e.seed)], e.subnet, stage)
                if score is not None:
                    ax.scatter(e.masked_speedup, score, marker=marker,
                               color=SUBNET_COLORS[e.subnet], s=28, zorder=3,
                               facecolors="none" if marker == "^" else None)
        for seed in sorted({e.seed for e in task_entries}):
            ax.scatter(1.0, runs[(task, seed)].full_score, marker="s", color="black", s=28,
                       zorder=3)
        major = res.scores.get("majority baseline")
        if major is not None:
            ax.axhline(major.mean, color="grey", linestyle=":", linewidth=1.2)
        ax.set_xscale("log", base=2)
        # Ticks at powers of 2, finer when the points span less than 2 octaves.
        span = max([1.0] + [e.masked_speedup for e in task_entries]) / min(
            [1.0] + [e.masked_speedup for e in task_entries])
        subs = (tuple(1.0 + 0.1 * k for k in range(10)) if span < 1.6 else
                (1.0, 1.25, 1.5, 1.75) if span < 4 else (1.0,))
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2, subs=subs))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        lengths = first[task].split(", lengths ", 1)[-1].split(", model ", 1)[0]
        ax.set_title(f"{task}: lengths {lengths}" if shared else
                     f"{task}: " + measured[task].replace(", ", "\n", 1)
                     + f"\nlengths {lengths}", fontsize=8)  # device, then dtype, batch, S
        ax.set_xlabel("speed-up over the full model (masked, fast path)", fontsize=8)
        ax.set_ylabel(f"dev {res.report_metric}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f"{name}, retrained")
               for name, c in SUBNET_COLORS.items()]
    handles += [Line2D([], [], marker="^", linestyle="", color="grey", markerfacecolor="none",
                       label="without retraining"),
                Line2D([], [], marker="s", linestyle="", color="black", label="full model (1x)"),
                Line2D([], [], color="grey", linestyle=":", label=majority_label(tasks))]
    bottom_legend(fig, 3, 8, handles)
    title = "s-pruning subnetworks: dev score vs measured speed-up (one point per seed)"
    fig.suptitle(title + (f"\n{measured[tasks[0]]}" if shared else ""), fontsize=9)
    return save_png(fig, path)
