"""The paper's numbers, as data: Prasanna et al. 2020, "When BERT Plays the Lottery, All Tickets
Are Winning" (BERT-base, 9 GLUE dev sets, 5 fine-tuning seeds 1337, 42, 86, 71, 166).

Sources (the project's PAPER.md, which transcribes the authors' result files):

* §4, the results table: mean ± sample std (Bessel-corrected) over 5 seeds; CoLA MCC, STS-B
  Pearson, MNLI matched accuracy, accuracy for every other task. "P" = the mask applied to the
  fine-tuned model without retraining, "R" = the masked pre-trained model re-fine-tuned.
  The table text below is copied verbatim from PAPER.md §4 and parsed at import, so it can be
  checked against the source line by line.
* §1.4, the sizes of the good s-pruning subnetworks (heads out of 144, MLPs out of 12, per seed)
  and the super-survivor counts; §2 the m-pruning sizes (paper Fig. 3, right panel).
* §5.1, the stability statistics across seeds (Fleiss' kappa and Cochran's Q of the head masks).

Row keys are the paper's row labels ("full model", "s good P", ...); `ROWS` gives them in the
paper's order together with the (method, subnetwork, stage) they come from in a search summary.
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS: tuple[str, ...] = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")
SEEDS: tuple[int, ...] = (1337, 42, 86, 71, 166)
N_SEEDS = len(SEEDS)
TOTAL_HEADS = 144  # BERT-base: 12 layers x 12 heads
TOTAL_MLPS = 12

# BERT-base parameter counts per encoder layer (hidden 768, intermediate 3072), used only to put
# the paper's head/MLP counts on the scale of our `fraction_kept` (prunable heads + MLP params).
_HIDDEN, _INTERMEDIATE = 768, 3072
_ATTN_PARAMS_PER_LAYER = 4 * (_HIDDEN * _HIDDEN + _HIDDEN)  # Q, K, V, attention-output dense
_MLP_PARAMS_PER_LAYER = 2 * _HIDDEN * _INTERMEDIATE + _INTERMEDIATE + _HIDDEN  # FFN in + out


@dataclass(frozen=True)
class Row:
    """One row of the paper's results table.

    key: the paper's label ("s good P"); method: "structured", "magnitude" or "super" (None for
    the majority baseline and the full model); subnet: "good", "random" or "bad"; stage:
    "pruned" or "retrained".
    """

    key: str
    method: str | None = None
    subnet: str | None = None
    stage: str | None = None


METHOD_PREFIX = {"structured": "s", "magnitude": "m", "super": "super"}
STAGE_SUFFIX = {"pruned": "P", "retrained": "R"}
SUBNETS: tuple[str, ...] = ("good", "random", "bad")
STAGES: tuple[str, ...] = ("pruned", "retrained")


def row_key(method: str, subnet: str, stage: str) -> str:
    """The table label of one setting: row_key("structured", "good", "pruned") == "s good P"."""
    return f"{METHOD_PREFIX[method]} {subnet} {STAGE_SUFFIX[stage]}"


def _rows() -> tuple[Row, ...]:
    rows = [Row("majority baseline"), Row("full model")]
    for method in ("structured", "magnitude"):
        for subnet in SUBNETS:
            rows += [Row(row_key(method, subnet, st), method, subnet, st) for st in STAGES]
    rows += [Row(row_key("super", "good", st), "super", "good", st) for st in STAGES]
    rows += [Row(row_key("super", s, "retrained"), "super", s, "retrained") for s in SUBNETS[1:]]
    return tuple(rows)


ROWS: tuple[Row, ...] = _rows()
"""The paper's 18 rows in its order (the super-survivor random/bad rows exist only retrained)."""

# Verbatim from PAPER.md §4 (bold markers and the |---| line dropped; lines kept whole so
# they can be compared with the source).
_RESULTS_TABLE = """
| Setting | CoLA | SST-2 | MRPC | STS-B | QQP | MNLI | QNLI | RTE | WNLI |
| majority baseline | 0.000 | 0.509 | 0.684 | 0.024 | 0.632 | 0.354 | 0.505 | 0.527 | 0.563 |
| full model | 0.560±.006 | 0.926±.003 | 0.839±.009 | 0.887±.005 | 0.909±.002 | 0.845±.002 | 0.915±.001 | 0.632±.031 | 0.338±.055 |
| s good P | 0.511±.007 | 0.842±.006 | 0.771±.012 | 0.801±.010 | 0.831±.006 | 0.764±.003 | 0.829±.004 | 0.574±.035 | 0.538±.057 |
| s good R | 0.505±.044 | 0.874±.070 | 0.773±.056 | 0.752±.228 | 0.887±.011 | 0.795±.041 | 0.887±.022 | 0.575±.062 | 0.538±.057 |
| s random P | 0.432±.106 | 0.689±.133 | 0.483±.231 | 0.530±.253 | 0.742±.072 | 0.640±.189 | 0.688±.118 | 0.507±.038 | 0.538±.057 |
| s random R | 0.417±.234 | 0.894±.015 | 0.679±.206 | 0.791±.080 | 0.876±.031 | 0.790±.079 | 0.842±.049 | 0.565±.054 | 0.538±.057 |
| s bad P | 0.336±.090 | 0.616±.147 | 0.431±.149 | 0.324±.377 | 0.679±.061 | 0.598±.126 | 0.628±.058 | 0.492±.036 | 0.538±.057 |
| s bad R | 0.406±.105 | 0.858±.057 | 0.677±.142 | 0.607±.207 | 0.820±.108 | 0.803±.045 | 0.766±.115 | 0.588±.037 | 0.538±.057 |
| m good P | 0.517±.008 | 0.846±.008 | 0.779±.020 | 0.823±.018 | 0.833±.006 | 0.779±.004 | 0.839±.008 | 0.613±.015 | 0.485±.098 |
| m good R | 0.544±.015 | 0.915±.005 | 0.840±.010 | 0.879±.004 | 0.907±.002 | 0.839±.001 | 0.909±.004 | 0.614±.017 | 0.411±.108 |
| m random P | 0.023±.028 | 0.547±.094 | 0.390±.164 | 0.077±.045 | 0.632±.000 | 0.327±.013 | 0.508±.018 | 0.474±.003 | 0.507±.078 |
| m random R | 0.157±.062 | 0.829±.005 | 0.703±.014 | 0.235±.032 | 0.856±.003 | 0.756±.004 | 0.809±.009 | 0.561±.018 | 0.470±.120 |
| m bad P | 0.000±.000 | 0.494±.008 | 0.390±.164 | 0.054±.065 | 0.632±.000 | 0.318±.000 | 0.507±.022 | 0.495±.030 | 0.530±.055 |
| m bad R | 0.025±.033 | 0.816±.004 | 0.675±.008 | 0.082±.003 | 0.775±.001 | 0.619±.003 | 0.607±.001 | 0.495±.030 | 0.490±.108 |
| super good P | 0.128±.060 | 0.541±.027 | 0.390±.164 | 0.379±.069 | 0.632±.000 | 0.343±.014 | 0.556±.035 | 0.517±.025 | 0.538±.057 |
| super good R | 0.492±.018 | 0.835±.003 | 0.711±.004 | 0.805±.005 | 0.869±.001 | 0.761±.003 | 0.832±.003 | 0.500±.034 | 0.563±.000 |
| super random R | 0.154±.149 | 0.848±.004 | 0.693±.008 | 0.117±.026 | 0.829±.041 | 0.747±.014 | 0.762±.078 | 0.503±.028 | 0.563±.000 |
| super bad R | 0.126±.034 | 0.827±.006 | 0.694±.007 | 0.134±.013 | 0.869±.001 | 0.767±.003 | 0.568±.027 | 0.492±.033 | 0.563±.000 |
"""

Cell = tuple[float, "float | None"]


def _parse_results(text: str) -> dict[str, dict[str, Cell]]:
    """Parse the verbatim §4 table into {row label: {task: (mean, std or None)}}."""
    lines = [ln.strip().strip("|") for ln in text.strip().splitlines()]
    tasks = [c.strip() for c in lines[0].split("|")[1:]]
    table: dict[str, dict[str, Cell]] = {}
    for line in lines[1:]:
        label, *cells = (c.strip() for c in line.split("|"))
        row: dict[str, Cell] = {}
        for task, cell in zip(tasks, cells, strict=True):
            mean, _, std = cell.partition("±")
            row[task] = (float(mean), float(std) if std else None)
        table[label] = row
    return table


RESULTS: dict[str, dict[str, Cell]] = _parse_results(_RESULTS_TABLE)
"""PAPER.md §4: {row label: {task: (mean, sample std)}}; the majority baseline has std None."""

METRIC: dict[str, str] = {
    t: {"CoLA": "mcc", "STS-B": "pearson"}.get(t, "acc") for t in TASKS
}
"""The metric of each task's column in §4 (MNLI: matched accuracy)."""


@dataclass(frozen=True)
class PaperSizes:
    """PAPER.md §1.4 and §2: the good subnetworks of one task.

    heads / mlps: heads (of 144) and MLPs (of 12) kept by the s-pruning good mask, per seed
    (seed order 1337, 42, 86, 71, 166); super_heads / super_mlps: kept in all 5 seeds;
    s_weights_pct / m_weights_pct: the "% weights" of paper Fig. 3 for s- and m-pruning, i.e.
    params_after / params_before - 0.21 (the unpruned model reads 79%), each (mean, std).
    """

    heads: tuple[int, ...]
    mlps: tuple[int, ...]
    super_heads: int
    super_mlps: int
    s_weights_pct: tuple[float, float]
    m_weights_pct: tuple[float, float]

    @property
    def mean_heads(self) -> float:
        return sum(self.heads) / len(self.heads)

    @property
    def mean_mlps(self) -> float:
        return sum(self.mlps) / len(self.mlps)

    @property
    def structured_fraction(self) -> float:
        """Mean kept fraction of the prunable head + MLP parameters (our `fraction_kept`),
        derived from the per-seed counts with BERT-base layer sizes (every layer is the same
        size, so only the counts matter)."""
        per_seed = [
            (h / TOTAL_HEADS * _ATTN_PARAMS_PER_LAYER + m / TOTAL_MLPS * _MLP_PARAMS_PER_LAYER)
            / (_ATTN_PARAMS_PER_LAYER + _MLP_PARAMS_PER_LAYER)
            for h, m in zip(self.heads, self.mlps, strict=True)
        ]
        return sum(per_seed) / len(per_seed)

    @property
    def magnitude_fraction(self) -> float:
        """Approximate kept fraction of the eligible weights (our m-pruning `fraction_kept`).

        PAPER.md §2: eligible weights are 85,008,384 of about 109.48M parameters (0.776), so
        Fig. 3's value = 0.224 + 0.776 k - 0.21, i.e. k = (value - 0.014) / 0.776. Approximate:
        not every figure value matches a whole number of 10% steps.
        """
        return (self.m_weights_pct[0] / 100 - 0.014) / 0.776


SIZES: dict[str, PaperSizes] = {
    "CoLA": PaperSizes((95, 81, 116, 102, 67), (11, 12, 10, 11, 10), 34, 9, (65, 5), (51, 7)),
    "SST-2": PaperSizes((88, 74, 67, 60, 46), (8, 7, 8, 9, 7), 19, 2, (47, 5), (35, 1)),
    "MRPC": PaperSizes((88, 81, 95, 81, 102), (8, 9, 11, 9, 9), 28, 4, (57, 5), (45, 4)),
    "STS-B": PaperSizes((74, 74, 81, 88, 67), (8, 7, 8, 5, 9), 24, 1, (47, 5), (40, 2)),
    "QQP": PaperSizes((67, 67, 88, 102, 67), (8, 9, 9, 9, 8), 23, 3, (53, 5), (38, 1)),
    "MNLI": PaperSizes((95, 102, 95, 88, 95), (9, 9, 9, 7, 8), 40, 4, (55, 5), (41, 0)),
    "QNLI": PaperSizes((81, 95, 88, 74, 88), (9, 9, 9, 9, 8), 31, 5, (55, 2), (42, 1)),
    "RTE": PaperSizes((18, 116, 74, 74, 88), (11, 11, 7, 8, 9), 11, 2, (54, 9), (43, 2)),
    "WNLI": PaperSizes((0, 0, 144, 0, 0), (0, 0, 0, 0, 0), 0, 0, (7, 12), (38, 23)),
}
"""PAPER.md §1.4 (s-pruning good masks, super-survivors) and §2 (m-pruning sizes)."""

FLEISS_KAPPA_HEADS: dict[str, float] = {
    "CoLA": 0.23, "SST-2": 0.32, "MRPC": 0.22, "STS-B": 0.22, "QQP": 0.19,
    "MNLI": 0.26, "QNLI": 0.30, "RTE": 0.18, "WNLI": -0.25,
}
"""PAPER.md §5.1: Fleiss' kappa of the 5 seeds' head masks (`statistics_on_pruning.ipynb`)."""

COCHRAN_Q_PVALUE_HEADS: dict[str, float | None] = {
    "CoLA": 2e-11, "SST-2": 3e-8, "MRPC": 0.014, "STS-B": 0.058, "QQP": 3e-7,
    "MNLI": 0.39, "QNLI": 0.033, "RTE": 3e-36, "WNLI": None,
}
"""PAPER.md §5.1: Cochran's Q p-value across the 5 head masks (WNLI: rejected, p not given)."""


def canonical_task(name: str) -> str | None:
    """The paper's spelling of a task name ("sst2" -> "SST-2"), or None if not one of its 9."""
    key = name.lower().replace("-", "").replace("_", "")
    for task in TASKS:
        if key == task.lower().replace("-", ""):
            return task
    return None


def paper_value(row: str, task: str) -> Cell | None:
    """(mean, std) of the paper's §4 cell for row label `row` and `task`, or None."""
    canon = canonical_task(task)
    if canon is None or row not in RESULTS:
        return None
    return RESULTS[row][canon]
