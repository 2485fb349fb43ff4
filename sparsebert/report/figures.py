"""The report's figures (PNG, matplotlib's Agg canvas; no pyplot, no global backend change).

* surviving_heads.png: per task, a layer x head heatmap of the share of seeds that keep each
  head, super-survivors (kept in every seed) marked, and an MLP strip per layer.
* subnetworks.png: good / random / bad scores per task and method, pruned and retrained side by
  side, with the full model and the majority class as reference lines.
* pruning_curves.png: the search score after every pruning step vs the fraction kept, per task
  (s-pruning coloured by phase, m-pruning by seed), with the threshold line.
* stability.png (>= 2 seeds): mean Jaccard and Fleiss' kappa of the head masks per task.
* overlap.png (>= 2 tasks of one model with >= 2 seeds): shared super-survivor heads, task x task.
* speed_vs_score.png (runs timed by `sparsebert speed --run`): each s-pruning subnetwork's dev
  score against its measured speed-up over the full model (sparsebert.report.speed_figure).

Each function takes {task: TaskResults} and an output path and returns the path written (None
when the figure does not apply); `write_figures` writes all that apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from sparsebert.report import paper, table
from sparsebert.report.canvas import bottom_legend, panel_grid, save_png
from sparsebert.report.collect import TaskResults, stability, stats_module, task_models
from sparsebert.report.speed import SpeedEntry
from sparsebert.report.speed_figure import speed_vs_score

PHASES = {0: ("full model", "black"), 1: ("s-pruning phase 1: heads + MLPs", "tab:blue"),
          2: ("s-pruning phase 2: heads only", "tab:orange"),
          3: ("s-pruning phase 3: MLPs only", "tab:green")}
# m-pruning curves are coloured by seed (the same seed, the same colour in every panel), with
# colours the phases and the threshold do not use
SEED_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "navy", "gold",
               "teal", "maroon", "darkkhaki")
METHOD_TITLES = {"structured": "s-pruning (heads + MLPs)", "magnitude": "m-pruning (weights)",
                 "super": "super-survivors"}
SUBNET_LABELS = {"structured": ("good", "random", "bad"), "magnitude": ("good", "random", "bad"),
                 "super": ("good\n(kept in all seeds)", "random\n('middling')",
                           "bad\n('bizarro')")}
STAGE_COLORS = {"pruned": "#9ecae1", "retrained": "#2171b5"}


def _task_panels(n_tasks: int, n_methods: int, panel_w: float, panel_h: float,
                 extra_h: float) -> tuple[Figure, list[list[Axes]]]:
    """A figure with one row of `n_methods` panels per task, wrapped so that a figure row holds
    up to 4 panels; returns it and, per task, its panels."""
    per_row = max(1, 4 // n_methods)  # tasks side by side
    rows, cols = math.ceil(n_tasks / per_row), min(n_tasks, per_row) * n_methods
    # at least 6.4 in wide: room for the title and the legend when there is a single panel
    fig = Figure(figsize=(max(panel_w * cols + 0.6, 6.4), panel_h * rows + extra_h),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    panels = [[axes[t // per_row, (t % per_row) * n_methods + m] for m in range(n_methods)]
              for t in range(n_tasks)]
    for ax in axes.ravel()[n_tasks * n_methods:]:  # task t, method m is flat index t * n + m
        ax.set_visible(False)
    return fig, panels


def _super_mask(res: TaskResults) -> np.ndarray | None:
    """(L, H) heads kept in every seed of the heatmap's masks (None with < 2 seeds)."""
    if res.head_masks is None or len(res.head_masks) < 2:
        return None
    stats, _ = stats_module()
    if stats is not None:
        return np.asarray(stats.super_survivors(res.head_masks), dtype=bool)
    return res.super.head_mask if res.super is not None else None


# ----------------------------------------------------------------------------- 1. heads


def surviving_heads(results: Mapping[str, TaskResults], path: Path) -> Path | None:
    """Per task: share of seeds keeping each head (L x H) and each MLP (L x 1); dots mark
    super-survivors. None when no run has an s-pruning good mask."""
    tasks = {t: r for t, r in results.items() if r.head_masks is not None}
    if not tasks:
        return None
    rows, cols = panel_grid(len(tasks), 3)
    some = next(iter(tasks.values()))
    cell_w = 0.32 * (some.num_heads + 2.5) + 0.6
    fig = Figure(figsize=(max(cols * cell_w + 1.2, 6.4), rows * (0.32 * some.num_layers + 2.2)),
                 layout="constrained")  # wide enough for the title
    outer = fig.add_gridspec(rows, cols + 1, width_ratios=[1.0] * cols + [0.04])
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="white")
    image = None
    for k, (task, res) in enumerate(tasks.items()):
        n, L, H = res.head_masks.shape
        ax_h = fig.add_subplot(outer[k // cols, k % cols])
        # Step 1: one image, heads | blank column | MLP, so the MLP strip lines up with layers.
        grid = np.full((L, H + 2), np.nan)  # (L, H + 2)
        grid[:, :H] = res.head_masks.mean(axis=0)  # share of seeds keeping each head
        grid[:, H + 1] = res.mlp_masks.mean(axis=0)  # ... and each MLP
        image = ax_h.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="equal")
        for x0, width in ((-0.5, H), (H + 0.5, 1)):  # outline the head block and MLP strip
            ax_h.add_patch(Rectangle((x0, -0.5), width, L, fill=False, edgecolor="grey",
                                     linewidth=0.8))
        # Step 2: super-survivors (kept in every seed) as white dots.
        sup = _super_mask(res)
        if sup is not None:
            ys, xs = np.nonzero(sup)
            mlp_ys = np.flatnonzero(np.all(res.mlp_masks, axis=0))
            ax_h.scatter(np.r_[xs, np.full(len(mlp_ys), H + 1)], np.r_[ys, mlp_ys], s=22,
                         c="white", edgecolors="black", linewidths=0.8)
        labels = [str(h + 1) if H <= 12 or h % 2 == 0 else "" for h in range(H)]
        ax_h.set_xticks([*range(H), H + 1], [*labels, "MLP"], fontsize=7)
        ax_h.tick_params(axis="x", length=0)
        for side in ("top", "right", "bottom", "left"):
            ax_h.spines[side].set_visible(False)
        ax_h.set_yticks(range(L), [str(i + 1) for i in range(L)], fontsize=7)
        ax_h.set_xlabel("attention head", fontsize=8)
        ax_h.set_ylabel("layer", fontsize=8)
        heads = res.sizes.get(("s", "good", "heads_kept"))
        kept = f"{heads.mean:.0f} of {L * H} heads kept" if heads else ""
        seeds = f"{n} seed{'s' if n > 1 else ''}"
        sup_txt = f", {int(sup.sum())} in all seeds" if sup is not None else ""
        ax_h.set_title(f"{task} ({seeds})\n{kept}{' on average' if n > 1 else ''}{sup_txt}",
                       fontsize=9)
    many = any(len(r.head_masks) > 1 for r in tasks.values())
    fig.colorbar(image, cax=fig.add_subplot(outer[:, -1]),
                 label="share of seeds keeping it" if many else "kept (1) or pruned (0)")
    fig.suptitle("Heads and MLPs kept by the good s-pruning mask"
                 + (" (○ = kept in every seed)" if many else ""), fontsize=11)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- 2. subnetworks


def _methods(results: Mapping[str, TaskResults]) -> list[str]:
    present = {k.split(" ")[0] for r in results.values() for k in r.scores}
    return [m for m in ("structured", "magnitude", "super") if paper.METHOD_PREFIX[m] in present]


def _bars(ax: Axes, res: TaskResults, method: str) -> float:
    """Grouped bars of one task and method; returns the highest bar top (for the y-range)."""
    width, top = 0.38, -math.inf
    for i, subnet in enumerate(paper.SUBNETS):
        for j, stage in enumerate(paper.STAGES):
            stat = res.scores.get(paper.row_key(method, subnet, stage))
            x = i + (j - 0.5) * width
            if stat is None or math.isnan(stat.mean):
                ax.text(x, 0, "not\nrun", ha="center", va="bottom", fontsize=6, color="grey")
                continue
            err = stat.std if stat.std is not None else None
            ax.bar(x, stat.mean, width, yerr=err, capsize=3, color=STAGE_COLORS[stage],
                   edgecolor="black", linewidth=0.5, error_kw={"linewidth": 0.8})
            y = stat.mean + (err or 0)
            fewer = f"\nn={stat.n}" if stat.n < res.n_seeds else ""  # fewer seeds than the task
            ax.annotate(f"{stat.mean:.2f}{fewer}", (x, max(y, 0)), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=6,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3,
                              "alpha": 0.8})
            top = max(top, y)
    ax.set_xticks(range(3), SUBNET_LABELS[method], fontsize=7)
    ax.set_xlim(-0.6, 2.6)
    return top


def subnetworks(results: Mapping[str, TaskResults], path: Path) -> Path | None:
    """Bars of good / random / bad, pruned and retrained, per task (rows) and method (columns),
    error bars = sample std over seeds; lines at the full model and the majority class."""
    methods = _methods(results)
    if not methods:
        return None
    fig, panels = _task_panels(len(results), len(methods), 3.4, 2.6, 0.9)
    for r, (task, res) in enumerate(results.items()):
        full, major = res.scores.get("full model"), res.scores.get("majority baseline")
        labelled = False
        for c, method in enumerate(methods):
            ax = panels[r][c]
            ax.set_title(f"{task}: {METHOD_TITLES[method]}", fontsize=9)
            prefix = paper.METHOD_PREFIX[method] + " "
            if not any(k.startswith(prefix) for k in res.scores):
                ax.text(0.5, 0.5, f"no {METHOD_TITLES[method]} results for {task}",
                        transform=ax.transAxes, ha="center", va="center", color="grey",
                        fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            top = _bars(ax, res, method)
            refs = [v.mean for v in (full, major) if v is not None]
            if full is not None:
                ax.axhline(full.mean, color="black", linestyle="--", linewidth=1)
            if major is not None:
                ax.axhline(major.mean, color="tab:red", linestyle=":", linewidth=1.2)
            low = min([0.0, *refs] + [st.mean - (st.std or 0) for k, st in res.scores.items()
                                      if k.startswith(prefix) and not math.isnan(st.mean)])
            ax.set_ylim(0.0 if low >= 0 else low - 0.05, max([top, *refs, 0.1]) * 1.15 + 0.02)
            if not labelled:  # the task's first panel with bars (s-pruning may have none)
                ax.set_ylabel(f"dev {res.report_metric}")
                labelled = True
            ax.tick_params(axis="y", labelsize=7)
    handles = [Patch(color=STAGE_COLORS["pruned"], label="pruned (no retraining)"),
               Patch(color=STAGE_COLORS["retrained"], label="retrained from pre-trained"),
               Line2D([], [], color="black", linestyle="--", label="full model"),
               Line2D([], [], color="tab:red", linestyle=":",
                      label=table.majority_label(results))]
    bottom_legend(fig, 4, 8, handles)
    many = any(r.n_seeds > 1 for r in results.values())
    fig.suptitle("Good, random and bad subnetworks"
                 + ("\n(mean over seeds; error bars: ± sample std; n=: over fewer seeds)"
                    if many else ""), fontsize=11)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- 3. curves

SEARCH_SETS = {"dev": "dev", "train": "train-subset"}  # --search-data -> the curve's label


def search_set(runs) -> str:
    """What the curves' scores were computed on: "dev" (also for summaries that predate
    --search-data), "train-subset", or "search-set" when the runs differ."""
    found = {SEARCH_SETS.get(run.search_data or "dev", "search-set") for run in runs}
    return found.pop() if len(found) == 1 else "search-set"


def _curve_axes(ax: Axes, res: TaskResults, method: str, seed_colors: Mapping[int, Any]
                ) -> None:
    runs = [r for r in res.runs if r.curves.get(method)]
    if not runs:
        ax.set_title(f"{res.task}: {METHOD_TITLES[method]}", fontsize=9)
        ax.text(0.5, 0.5, f"no {METHOD_TITLES[method]} run for {res.task}",
                transform=ax.transAxes, ha="center", color="grey", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for run in runs:
        pts = [p for p in run.curves[method] if isinstance(p.get("fraction_kept"), (int, float))
               and isinstance(p.get("search_score"), (int, float))]
        ok = [p for p in pts if p.get("passed", True)]
        seed_color = seed_colors[run.seed]  # its line, threshold and good-mask star
        ax.plot([p["fraction_kept"] for p in ok], [p["search_score"] for p in ok],
                color=seed_color, linewidth=0.8, alpha=0.7, label=f"seed {run.seed}")
        for p in pts:
            color = PHASES.get(p.get("phase", 1), ("", "grey"))[1] if method == "structured" \
                else seed_color
            passed = p.get("passed", True)
            ax.scatter(p["fraction_kept"], p["search_score"], s=16 if passed else 22,
                       marker="o" if passed else "x", color=color, zorder=3, linewidths=1)
        ax.axhline(run.threshold * run.full_search_score, color=seed_color, linestyle="--",
                   linewidth=0.8, alpha=0.8)
        good = _good_point(run, method, ok)
        if good is not None:
            ax.scatter(good["fraction_kept"], good["search_score"], s=110, marker="*",
                       facecolor=seed_color, edgecolor="black", linewidths=0.6, zorder=4)
    # pruning goes to the right; a little room past 0 for a star drawn at nothing kept
    ax.set_xlim(1.02, max(-0.03, ax.get_xlim()[0] - 0.02))
    ax.set_xlabel("fraction kept" + (" (heads + MLP params)" if method == "structured"
                                     else " (eligible weights)"), fontsize=8)
    ax.set_ylabel(f"{search_set(res.runs)} {table.metric_name(res.metric)}\n(search metric)",
                  fontsize=8)
    ax.set_title(f"{res.task}: {METHOD_TITLES[method]}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")  # away from the points


def _good_point(run, method: str, passed: list[dict]) -> dict | None:
    """The curve point of the good subnetwork's mask: m-pruning's good_step (the authors' loop
    never saves its last step's mask, so it may sit before the curve's end), s-pruning's last
    passing point at the good mask's fraction kept; None when the summary does not say."""
    good = run.subnetworks.get(method, {}).get("good") or {}
    if method == "magnitude":
        step = run.good_steps.get(method)
        found = [p for p in passed if p.get("step") == step] if step is not None else []
    else:
        fraction = good.get("fraction_kept")
        found = [p for p in passed if isinstance(fraction, (int, float))
                 and math.isclose(p["fraction_kept"], fraction, abs_tol=1e-9)]
    return found[-1] if found else None


def seed_palette(seeds: Sequence[int]) -> dict[int, Any]:
    """A different colour for each seed: SEED_COLORS in order, or, for more seeds than those,
    evenly spaced colours of the turbo colormap (no two seeds alike, whatever their number)."""
    if len(seeds) <= len(SEED_COLORS):
        return dict(zip(seeds, SEED_COLORS))
    cmap = matplotlib.colormaps["turbo"]
    return {seed: cmap(k / (len(seeds) - 1)) for k, seed in enumerate(seeds)}


def pruning_curves(results: Mapping[str, TaskResults], path: Path) -> Path | None:
    """Search score vs fraction kept at every step, per task (rows) and method (columns)."""
    methods = [m for m in ("structured", "magnitude")
               if any(r.curves.get(m) for res in results.values() for r in res.runs)]
    if not methods:
        return None
    fig, panels = _task_panels(len(results), len(methods), 4.2, 3.0, 1.0)
    seeds = sorted({run.seed for res in results.values() for run in res.runs})
    seed_colors = seed_palette(seeds)
    for r, res in enumerate(results.values()):
        for c, method in enumerate(methods):
            _curve_axes(panels[r][c], res, method, seed_colors)
    ratios = {task: res.threshold for task, res in results.items()}
    thr = (f"{next(iter(ratios.values())):g}" if len(set(ratios.values())) == 1 else
           "(" + ", ".join(f"{task} {ratio:g}" for task, ratio in ratios.items()) + ")")
    many = any(r.n_seeds > 1 for r in results.values())
    handles = [Line2D([], [], marker="o", linestyle="", color=color, label=label)
               for label, color in PHASES.values()] if "structured" in methods else []
    handles += [Line2D([], [], marker="x", linestyle="", color="grey", label="step failed "
                       "the threshold (reverted)"),
                Line2D([], [], marker="*", linestyle="", markersize=10, color="grey",
                       markeredgecolor="black", markeredgewidth=0.6,
                       label="the good subnetwork's mask"),
                Line2D([], [], color="grey", linestyle="--",
                       label=f"threshold = {thr} × full model"
                       + (" (each seed's, in its colour)" if many else ""))]
    bottom_legend(fig, 3, 8, handles)
    where = search_set([run for res in results.values() for run in res.runs])
    fig.suptitle(f"Pruning search: {where} score after each step", fontsize=11)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- 4. stability


def _stable_tasks(results: Mapping[str, TaskResults]) -> dict[str, dict]:
    out = {}
    for task, res in results.items():
        st = stability(res)
        if st is not None:
            out[task] = st
    return out


def stability_bars(results: Mapping[str, TaskResults], path: Path) -> Path | None:
    """Mean pairwise Jaccard and Fleiss' kappa of the head masks per task (>= 2 seeds), with
    the paper's kappa (PAPER.md §5.1) as a marker."""
    st = _stable_tasks(results)
    if not st:
        return None
    tasks = list(st)
    x = np.arange(len(tasks))
    fig = Figure(figsize=(max(5.2, 1.3 * len(tasks) + 2.5), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.set_xlim(-0.6, len(tasks) - 0.4)  # set here: NaN bars (undefined values) set no limits
    jac = [st[t]["heads"]["mean_jaccard"] for t in tasks]
    kap = [st[t]["heads"]["fleiss_kappa"] for t in tasks]
    nan = float("nan")
    for dx, vals, color, label in ((-0.2, jac, "tab:blue", "mean pairwise Jaccard (ours)"),
                                   (0.2, kap, "tab:orange", "Fleiss' κ (ours)")):
        vals = [nan if v is None else v for v in vals]  # None: undefined (e.g. equal masks)
        bars = ax.bar(x + dx, vals, 0.4, color=color, label=label)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in vals],
                     fontsize=7, padding=2)
        for xi, v in zip(x + dx, vals, strict=True):
            if math.isnan(v):  # a NaN bar has no top for bar_label to write at
                ax.text(xi, 0.01, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
    pk = [paper.FLEISS_KAPPA_HEADS.get(paper.canonical_task(t) or "", nan) for t in tasks]
    if not all(math.isnan(v) for v in pk):
        ax.scatter(x + 0.2, pk, marker="D", color="black", zorder=3, label="Fleiss' κ (paper)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [f"{t}\n(n={st[t]['heads']['n_seeds']})" for t in tasks], fontsize=8)
    ax.set_ylabel("agreement of seeds' head masks")
    ax.set_xlabel("task (n = seeds)", fontsize=8)
    # room below the lowest bar and above 1 for the bar labels
    ax.set_ylim(min([0.0] + [v for v in kap + pk if v is not None and not math.isnan(v)]) - 0.1,
                1.12)
    bottom_legend(fig, 3, 7)  # clear of the bar labels
    ax.set_title("Stability of the good head masks across seeds\n(1 = identical masks; "
                 "n/a = undefined, see the table note)",
                 fontsize=10)
    return save_png(fig, path)


def overlap(results: Mapping[str, TaskResults], path: Path) -> Path | None:
    """Task x task count of shared super-survivor heads (>= 2 tasks with >= 2 seeds of masks of
    one model); the diagonal is each task's own count. Heads of different models are not the
    same heads: with tasks of several models, the most tasks of one model are drawn and the
    title names the tasks left out."""
    stats, _ = stats_module()
    masks = {t: r.head_masks for t, r in results.items()
             if r.head_masks is not None and len(r.head_masks) > 1}
    if stats is None or not masks:
        return None
    groups: dict[tuple, list[str]] = {}  # (model, mask shape) -> its tasks
    models = task_models(dict(results))
    for task, m in masks.items():
        groups.setdefault((models[task], m.shape[1:]), []).append(task)
    (_, shape), tasks = max(groups.items(), key=lambda item: len(item[1]))  # first of ties
    left_out = [t for t in masks if t not in tasks]
    masks = {t: masks[t] for t in tasks}
    if len(masks) < 2:
        return None
    names, mat = stats.overlap_matrix(masks)
    mat = np.asarray(mat)
    k = len(names)
    fig = Figure(figsize=(1.0 * k + 2.6, 0.9 * k + 1.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mat, cmap="Purples", vmin=0, vmax=max(mat.max(), 1))  # counts, >= 0
    for i in range(k):
        for j in range(k):
            dark = mat[i, j] > 0.6 * max(mat.max(), 1)
            ax.text(j, i, str(int(mat[i, j])), ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(k), names, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    fig.colorbar(image, ax=ax, label="shared super-survivor heads", shrink=0.8)
    ax.set_title(f"Super-survivor heads shared by two tasks\n(of {int(np.prod(shape))} heads;"
                 " diagonal: the task's own)"
                 + (f"\nleft out, run on another model: {', '.join(left_out)}" if left_out
                    else ""), fontsize=9)
    return save_png(fig, path)


def write_figures(results: Mapping[str, TaskResults], out_dir: str | Path,
                  speed: Sequence[SpeedEntry] = ()) -> list[Path]:
    """Write every figure that applies into out_dir; returns the paths written. `speed`: the
    speed measurements of the runs (sparsebert.report.speed), for speed_vs_score.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = [("surviving_heads.png", surviving_heads), ("subnetworks.png", subnetworks),
              ("pruning_curves.png", pruning_curves), ("stability.png", stability_bars),
              ("overlap.png", overlap)]
    written = [maker(results, out / name) for name, maker in makers]
    written.append(speed_vs_score(results, speed, out / "speed_vs_score.png"))
    written = [p for p in written if p is not None]
    for name in [*(name for name, _ in makers), "speed_vs_score.png"]:
        if out / name not in written:  # from an earlier report over other inputs
            (out / name).unlink(missing_ok=True)
    return written
