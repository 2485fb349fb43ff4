"""The GLUE task registry: text fields, label sets, metrics and file layout of each task.

Label order follows the Hugging Face `nyu-mll/glue` ClassLabel order, so a model fine-tuned on
the TSV files and one fine-tuned on the hub copy share the same output indices.

Threshold metric (PAPER.md §0): CoLA MCC, STS-B (Pearson + Spearman) / 2 ("corr"), accuracy for
every other task (MRPC and QQP included); F1 is reported too for MRPC/QQP, Pearson and Spearman
for STS-B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsebert.errors import SparsebertError


class GlueError(SparsebertError):
    """Bad GLUE input: unknown task, missing file, wrong columns, bad labels, empty split."""


class SplitNotFoundError(GlueError):
    """A GLUE folder has no file for the requested split (the one GlueError an optional split,
    such as MNLI's dev_mismatched, may be skipped on)."""


@dataclass(frozen=True)
class TsvLayout:
    """How one task's GLUE TSV files are laid out.

    header: whether the first line names the columns. Without a header (CoLA train/dev),
    `columns` gives the names of the fixed columns in order.
    text_columns / label_column: column names (header names, or names from `columns`).
    skip_malformed_rows: rows whose field count differs from the header's are skipped with a
    warning (QQP, as GLUE's reference reader did) instead of refused.
    """

    text_columns: tuple[str, ...]
    label_column: str
    header: bool = True
    columns: tuple[str, ...] = ()
    skip_malformed_rows: bool = False


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    name: canonical name ("SST-2"); folder: the glue_data folder; hub_config: the
    `nyu-mll/glue` config; text_fields: names of the 1 or 2 text inputs (hub feature names);
    labels: the label strings as they appear in the TSV files, in model output order
    (empty for the regression task STS-B); metrics: every metric reported; threshold_metric:
    the metric the paper's pruning threshold uses; splits: file stem of each split
    (split name -> file stem, e.g. "dev_matched" -> "dev_matched"); hub_splits: split name ->
    hub split name.
    """

    name: str
    folder: str
    hub_config: str
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    threshold_metric: str
    tsv: TsvLayout
    dev_splits: tuple[str, ...] = ("dev",)
    hub_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "dev": "validation"}
    )
    aliases: tuple[str, ...] = ()
    label_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        """True for STS-B: one real-valued output, MSE loss."""
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Size of the classifier output: number of classes, or 1 for regression."""
        return 1 if self.is_regression else len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names this task knows: train plus its dev splits."""
        return ("train", *self.dev_splits)

    def resolve_split(self, split: str) -> str:
        """Canonical split name; "dev"/"validation" mean the first dev split (MNLI: matched)."""
        if not isinstance(split, str):
            raise GlueError(f"split {split!r}: expected a split name of task {self.name}, one "
                            f"of {list(self.splits)} (or dev)")
        key = split.lower()
        if key in ("dev", "validation", "val"):
            return self.dev_splits[0]
        for name in self.splits:
            if key == name or key == self.hub_splits.get(name, name):
                return name
        raise GlueError(
            f"unknown split {split!r} for task {self.name}; expected one of {list(self.splits)}"
        )


_BINARY = ("0", "1")
_PAIR = ("sentence1", "sentence2")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="CoLA", folder="CoLA", hub_config="cola", text_fields=("sentence",),
            labels=_BINARY, metrics=("mcc", "acc"), threshold_metric="mcc",
            tsv=TsvLayout(("sentence",), "label", header=False,
                          columns=("source", "label", "original_label", "sentence")),
        ),
        GlueTask(
            name="SST-2", folder="SST-2", hub_config="sst2", text_fields=("sentence",),
            labels=_BINARY, metrics=("acc",), threshold_metric="acc",
            tsv=TsvLayout(("sentence",), "label"), aliases=("sst2", "sst"),
        ),
        GlueTask(
            name="MRPC", folder="MRPC", hub_config="mrpc", text_fields=_PAIR,
            labels=_BINARY, metrics=("acc", "f1"), threshold_metric="acc",
            tsv=TsvLayout(("#1 String", "#2 String"), "Quality"),
        ),
        GlueTask(
            name="STS-B", folder="STS-B", hub_config="stsb", text_fields=_PAIR,
            labels=(), metrics=("pearson", "spearman", "corr"), threshold_metric="corr",
            tsv=TsvLayout(_PAIR, "score"), aliases=("stsb", "sts"), label_range=(0.0, 5.0),
        ),
        GlueTask(
            name="QQP", folder="QQP", hub_config="qqp", text_fields=("question1", "question2"),
            labels=_BINARY, metrics=("acc", "f1"), threshold_metric="acc",
            tsv=TsvLayout(("question1", "question2"), "is_duplicate", skip_malformed_rows=True),
        ),
        GlueTask(
            name="MNLI", folder="MNLI", hub_config="mnli", text_fields=("premise", "hypothesis"),
            labels=("entailment", "neutral", "contradiction"), metrics=("acc",),
            threshold_metric="acc", tsv=TsvLayout(_PAIR, "gold_label"),
            dev_splits=("dev_matched", "dev_mismatched"),
            hub_splits={"train": "train", "dev_matched": "validation_matched",
                        "dev_mismatched": "validation_mismatched"},
            aliases=("mnli-m", "mnli_m"),
        ),
        GlueTask(
            name="QNLI", folder="QNLI", hub_config="qnli", text_fields=("question", "sentence"),
            labels=("entailment", "not_entailment"), metrics=("acc",), threshold_metric="acc",
            tsv=TsvLayout(("question", "sentence"), "label"),
        ),
        GlueTask(
            name="RTE", folder="RTE", hub_config="rte", text_fields=_PAIR,
            labels=("entailment", "not_entailment"), metrics=("acc",), threshold_metric="acc",
            tsv=TsvLayout(_PAIR, "label"),
        ),
        GlueTask(
            name="WNLI", folder="WNLI", hub_config="wnli", text_fields=_PAIR,
            labels=_BINARY, metrics=("acc",), threshold_metric="acc",
            tsv=TsvLayout(_PAIR, "label"),
        ),
    )
}


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def task_names() -> list[str]:
    """Canonical names of all registered tasks, in GLUE order."""
    return list(TASKS)


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by name, case-insensitively, ignoring '-'/'_' ("sst2", "sts-b", "Cola").

    Raises GlueError listing the known tasks when the name is unknown.
    """
    if isinstance(name, GlueTask):
        return name
    key = _normalize(str(name))
    for task in TASKS.values():
        if key == _normalize(task.name) or key in {_normalize(a) for a in task.aliases}:
            return task
    raise GlueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}")


def is_regression_task(name: str) -> bool:
    """True for a GLUE regression task (STS-B); False for names outside GLUE."""
    try:
        return get_task(name).is_regression
    except GlueError:  # not a GLUE task name
        return False
