"""Markdown tables: the paper's results table with our values beside the paper's, subnetwork
sizes, and stability across seeds.

Every function takes the {task: TaskResults} of `collect.collect` (tasks in column order) and
returns GitHub-flavoured markdown. Cells read "0.781 ± 0.012 (n=3)" (mean ± sample std over n
seeds), just "0.781" for one seed ("0.781 (n=1)" where the task has more seeds), and "—" for a
setting that was not run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from sparsebert.glue.tasks import is_regression_task
from sparsebert.report import paper
from sparsebert.report.collect import Stat, TaskResults, cochran_pvalue, stability, stats_module

DASH = "—"


def fmt_stat(stat: Stat | None, digits: int = 3, *, show_n: bool = True,
             seeds: int | None = None) -> str:
    """'0.781 ± 0.012 (n=3)', or '0.781' for one seed, or '—' for None. seeds: how many seeds
    the task has; a cell over fewer says its n even for one value ('0.730 (n=1)')."""
    if stat is None:
        return DASH
    text = _num(stat.mean, digits)
    if stat.std is not None:
        text += f" ± {_num(stat.std, digits)}"
    if show_n and (stat.std is not None or (seeds is not None and stat.n < seeds)):
        text += f" (n={stat.n})"
    return text


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return DASH
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _pvalue(p: float | None) -> str:
    if p is None:
        return DASH
    return "nan" if math.isnan(p) else f"{p:.2g}"


def _paper_pvalue(p: float | None) -> str:
    """The paper's Cochran's Q p-value; None where it reports the test rejected without a p."""
    return "rejected (p not given)" if p is None else _pvalue(p)


def fmt_paper(cell: paper.Cell | None) -> str:
    """A §4 cell: '0.771 ± 0.012' (the paper's n is 5), '0.684' without std."""
    if cell is None:
        return DASH
    mean, std = cell
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    aligns = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table_rows(results: Mapping[str, TaskResults]) -> list[paper.Row]:
    """The paper's rows, plus the super-survivor random/bad P rows if any task has them."""
    rows = list(paper.ROWS)
    for subnet in ("random", "bad"):
        key = paper.row_key("super", subnet, "pruned")
        if any(key in res.scores for res in results.values()):
            at = next(i for i, r in enumerate(rows) if r.key == f"super {subnet} R")
            rows.insert(at, paper.Row(key, "super", subnet, "pruned"))
    return rows


def results_table(results: Mapping[str, TaskResults]) -> str:
    """The paper's results table (PAPER.md §4 layout): a row per setting, a column per task in
    `results`, and for the paper's tasks a "paper" column beside ours."""
    header = ["Setting"]
    for task, res in results.items():
        header.append(f"{task} {res.report_metric} (ours)")
        if paper.canonical_task(task):
            header.append(f"{task} (paper)")
    body = []
    for row in table_rows(results):
        cells = [row.key]
        for task, res in results.items():
            stat = res.scores.get(row.key)
            if row.key == "majority baseline" and stat is not None:
                cells.append(_num(stat.mean))  # a property of the dev set, the same every seed
            else:
                cells.append(fmt_stat(stat, seeds=res.n_seeds))
            if paper.canonical_task(task):
                cells.append(fmt_paper(paper.paper_value(row.key, task)))
        body.append(cells)
    return _markdown(header, body)


def results_notes(results: Mapping[str, TaskResults]) -> str:
    """What the results table's cells mean, and any metric that differs from the paper's."""
    notes = [
        "Ours: mean ± sample std (ddof=1) over n seeds; paper: Prasanna et al. 2020, "
        "BERT-base, mean ± sample std over 5 seeds. P = the mask applied to the fine-tuned "
        "model (no retraining); R = the masked pre-trained model fine-tuned again. "
        "s = structured (heads + MLPs), m = magnitude; super = heads/MLPs kept in every seed, "
        "random = the paper's 'middling', bad = its 'bizarro'. — = not run; (n=1) after a "
        "single value: run on fewer of the task's seeds than the other rows.",
    ]
    for task, res in results.items():
        canon = paper.canonical_task(task)
        if canon and res.report_metric != paper.METRIC[canon]:
            notes.append(f"{task}: our column is {res.report_metric}, the paper's is "
                         f"{paper.METRIC[canon]}.")
        run = res.runs[0]
        if run.metric != res.report_metric:  # STS-B: thresholded in corr, reported in Pearson
            notes.append(f"{task}: the search thresholds {metric_name(run.metric)}, the table "
                         f"shows {res.report_metric}: a subnetwork that keeps {run.threshold} x "
                         f"the full model's {run.metric} can score below {run.threshold} x its "
                         f"{res.report_metric}.")
        if is_regression_task(task) and "majority baseline" in res.scores:
            theirs = paper.paper_value("majority baseline", task) if canon else None
            notes.append(f"{task} is a regression task: its 'majority baseline' is a constant "
                         "prediction (the mean training score), whose correlation with the "
                         "labels is undefined and scored 0"
                         + (f" (the paper lists {fmt_paper(theirs)})" if theirs else "") + ".")
        weak = threshold_at_majority(res)
        if weak:
            which = f"{'seed' if len(weak) == 1 else 'seeds'} {', '.join(map(str, weak))}"
            notes.append(
                f"{task}: in {len(weak)} of {res.n_seeds} seeds ({which}) the search threshold "
                f"({run.threshold} x the full model's {run.metric}) is at or below the majority "
                "class, so a model that always predicts it passes: those searches can prune almost "
                "everything, and their good / random / bad gaps mean little.")
    return "\n\n".join(notes)


# the threshold metrics whose names do not say what they are
METRIC_DEFINITIONS = {"corr": "corr = (Pearson + Spearman) / 2"}


def metric_name(metric: str) -> str:
    """A metric's name with its definition where the name alone does not give it."""
    return METRIC_DEFINITIONS.get(metric, metric)


def majority_label(tasks: Iterable[str]) -> str:
    """A figure legend's name for the majority-baseline line of these tasks' panels (STS-B's is
    a constant prediction: a regression task has no majority class)."""
    regression = any(is_regression_task(task) for task in tasks)
    return "majority class" + (" (regression: a constant prediction)" if regression else "")


def threshold_at_majority(res: TaskResults) -> list[int]:
    """Seeds whose absolute search threshold (threshold x the full model's search score) is at
    or below the majority-class score on the search set (older summaries record it on dev only:
    used when the search ran on dev and in the searched metric)."""
    def majority_on_search_set(run) -> float | None:
        if run.search_majority is not None:
            return run.search_majority
        on_dev = run.search_data in (None, "dev") and run.metric == run.report_metric
        return run.majority if on_dev else None

    return [run.seed for run in res.runs
            if (majority := majority_on_search_set(run)) is not None
            and run.threshold * run.full_search_score <= majority]


def _fewer(stat: Stat, seeds: int | None) -> str:
    """' (n=1)' when `stat` covers fewer than the task's `seeds`, else ''."""
    return f" (n={stat.n})" if seeds is not None and stat.n < seeds else ""


def _count(stat: Stat | None, total: int | None, digits: int = 1,
           seeds: int | None = None) -> str:
    if stat is None:
        return DASH
    std = "" if stat.std is None else f" ± {stat.std:.{digits}f}"
    of = f" of {total} ({stat.mean / total:.0%})" if total else ""
    return f"{stat.mean:.{digits}f}{std}{of}{_fewer(stat, seeds)}"


def _fraction(stat: Stat | None, seeds: int | None = None) -> str:
    if stat is None:
        return DASH
    std = "" if stat.std is None else f" ± {stat.std:.2f}"
    return f"{stat.mean:.2f}{std}{_fewer(stat, seeds)}"


def sizes_table(results: Mapping[str, TaskResults]) -> str:
    """Sizes of the good subnetworks per task, with the paper's (PAPER.md §1.4, §2)."""
    header = ["Task", "seeds", "s good: heads kept", "s good: MLPs kept", "s good: fraction kept",
              "m good: fraction kept", "super-survivors: heads / MLPs", "paper: heads kept",
              "paper: MLPs kept", "paper: s fraction ≈", "paper: m fraction ≈",
              "paper: super-survivors"]
    body = []
    for task, res in results.items():
        n_layers = res.num_layers
        n_heads = None if n_layers is None or res.num_heads is None else n_layers * res.num_heads
        sz = res.sizes
        sup = DASH
        if ("super", "good", "heads_kept") in sz:
            sup = (f"{sz[('super', 'good', 'heads_kept')].mean:.0f} / "
                   f"{sz[('super', 'good', 'mlps_kept')].mean:.0f}")
        seeds = res.n_seeds
        row = [task, str(seeds), _count(sz.get(("s", "good", "heads_kept")), n_heads,
                                        seeds=seeds),
               _count(sz.get(("s", "good", "mlps_kept")), n_layers, seeds=seeds),
               _fraction(sz.get(("s", "good", "fraction_kept")), seeds),
               _fraction(sz.get(("m", "good", "fraction_kept")), seeds), sup]
        ps = paper.SIZES.get(paper.canonical_task(task) or "")
        if ps is None:
            row += [DASH] * 5
        else:
            row += [f"{ps.mean_heads:.1f} of {paper.TOTAL_HEADS} "
                    f"({ps.mean_heads / paper.TOTAL_HEADS:.0%})",
                    f"{ps.mean_mlps:.1f} of {paper.TOTAL_MLPS}",
                    f"{ps.structured_fraction:.2f}", f"{ps.magnitude_fraction:.2f}",
                    f"{ps.super_heads} / {ps.super_mlps}"]
        body.append(row)
    return _markdown(header, body)


SIZES_NOTE = (
    "s fraction kept: kept share of the prunable head + MLP parameters; m fraction kept: kept "
    "share of the weights eligible for magnitude pruning. The paper's fractions are derived: "
    "s from its per-seed head/MLP counts with BERT-base layer sizes, m from its Fig. 3 "
    "'% weights' (approximate)."
)


def stability_table(results: Mapping[str, TaskResults]) -> str | None:
    """Agreement of the good s-pruning masks across seeds (PAPER.md §5.1), for tasks with >= 2
    seeds of masks; None when no task has them. A one-line note when the statistics module
    cannot be imported."""
    tasks = {t: r for t, r in results.items() if r.head_masks is not None and len(r.head_masks) > 1}
    if not tasks:
        return None
    module, why = stats_module()
    if module is None:
        return f"Stability statistics unavailable: {why}."
    header = ["Task", "seeds", "heads kept (seed: heads)", "super-survivor heads", "mean Jaccard",
              "Fleiss κ", "Cochran Q p", "MLP super-survivors", "MLP Fleiss κ",
              "MLP Krippendorff α", "MLP Cochran Q p",
              "paper: super-survivor heads", "paper: Fleiss κ", "paper: Cochran Q p"]
    body = []
    for task, res in tasks.items():
        st = stability(res)
        heads, mlps = st["heads"], st["mlps"]
        kept = zip(res.mask_seeds, heads["survivors"], strict=True)
        row = [task, str(heads["n_seeds"]), ", ".join(f"{seed}: {n}" for seed, n in kept),
               str(heads["super_survivors"]), _num(heads["mean_jaccard"], 2),
               _num(heads["fleiss_kappa"], 2), _pvalue(cochran_pvalue(heads)),
               str(mlps["super_survivors"]), _num(mlps["fleiss_kappa"], 2),
               _num(mlps.get("krippendorff_alpha"), 2), _pvalue(cochran_pvalue(mlps))]
        canon = paper.canonical_task(task)
        if canon is None:
            row += [DASH] * 3
        else:
            row += [f"{paper.SIZES[canon].super_heads} of {paper.TOTAL_HEADS}",
                    f"{paper.FLEISS_KAPPA_HEADS[canon]:.2f}",
                    _paper_pvalue(paper.COCHRAN_Q_PVALUE_HEADS[canon])]
        body.append(row)
    return _markdown(header, body)


STABILITY_NOTE = (
    "Columns without 'MLP' are about heads. Super-survivors: kept in every seed. Jaccard: "
    "mean over seed pairs of |A ∩ B| / |A ∪ B| of the kept sets (pairs that both keep nothing "
    "left out: 0/0). — = undefined (every seed keeps nothing, or all agree by construction). "
    "Fleiss κ: agreement of the "
    "seeds beyond chance (1 = identical masks, 0 = chance); Krippendorff α: the same from the "
    "coincidence of values within each component, the paper's MLP statistic (it reports -0.10 "
    "to 0.45 across tasks). Cochran's Q: a small p rejects 'every seed keeps components at the "
    "same rate'. Paper: Prasanna et al. 2020, 5 seeds, 144 heads."
)
