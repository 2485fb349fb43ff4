"""Loading GLUE splits: a local GLUE download (GLUE_DIR / --glue-dir) first, else the hub.

Local layout (the standard `download_glue_data.py` output):
    <glue_dir>/<TASK>/train.tsv, dev.tsv          (MNLI: dev_matched.tsv, dev_mismatched.tsv)
JSONL files with the same stem (`MNLI/dev_matched.jsonl`, one object per line with the hub's
field names or the TSV's column names) are accepted too.

TSV quirks handled here: CoLA has no header; MRPC starts with a UTF-8 byte-order mark; quotes
inside sentences are literal (csv.QUOTE_NONE); rows with mojibake are kept as they are.
Package code never hard-codes a data folder: callers pass `glue_dir` or set GLUE_DIR.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsebert.glue.tasks import GlueError, GlueTask, SplitNotFoundError, get_task

GLUE_DIR_ENV = "GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"

csv.field_size_limit(1 << 24)  # a few QQP/MNLI fields are longer than csv's 128 KiB default


@dataclass
class GlueData:
    """One split of one task.

    texts: one list of N strings per text field (1 for single-sentence tasks, 2 for pairs).
    labels: (N,) int64 class indices into task.labels, or float32 scores for STS-B.
    source: the file it came from, or "hub:nyu-mll/glue/<config>/<split>".
    """

    task: GlueTask
    split: str
    texts: tuple[list[str], ...]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> GlueData:
        """The rows at `indices` (K,), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        texts = tuple([column[i] for i in idx] for column in self.texts)
        return GlueData(self.task, self.split, texts, self.labels[idx], self.source)


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """`glue_dir` if given, else $GLUE_DIR if set, else None (meaning: use the hub)."""
    if glue_dir is not None and str(glue_dir).strip() != "":
        return Path(str(glue_dir).strip()).expanduser()
    env = os.environ.get(GLUE_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else None


def candidate_paths(task: GlueTask, split: str, glue_dir: Path) -> list[Path]:
    """Files that may hold `split` of `task` under `glue_dir`, in the order they are tried."""
    folders = dict.fromkeys([task.folder, task.name, task.hub_config])
    stems = dict.fromkeys([split, task.hub_splits.get(split, split)])
    return [glue_dir / folder / f"{stem}.{ext}"
            for folder in folders for stem in stems for ext in ("tsv", "jsonl")]


def _parse_label(task: GlueTask, raw: object, where: str) -> float | int:
    """One label as a class index (classification) or a float score (STS-B)."""
    if task.is_regression:
        try:
            if isinstance(raw, bool):  # JSON true/false: not a score
                raise TypeError
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise GlueError(f"{where}: label {raw!r} is not a number ({task.name} is a "
                            f"regression task)") from None
        low, high = task.label_range or (-np.inf, np.inf)
        if not (low <= value <= high):
            raise GlueError(f"{where}: score {value} outside [{low}, {high}] for {task.name}")
        return value
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        if 0 <= int(raw) < task.num_labels:  # hub-style class index
            return int(raw)
    elif isinstance(raw, str) and raw.strip() in task.labels:
        return task.labels.index(raw.strip())
    raise GlueError(f"{where}: label {raw!r} is not in the label set of {task.name} "
                    f"({', '.join(task.labels)}; or an index 0..{task.num_labels - 1} in JSONL)")


def _finish(task: GlueTask, split: str, texts: list[list[str]], labels: list, source: str,
            ) -> GlueData:
    """Step 3 of every reader: check non-empty, build arrays."""
    if not labels:
        raise GlueError(f"{source}: no rows for {task.name} {split} (empty dataset)")
    dtype = np.float32 if task.is_regression else np.int64
    return GlueData(task, split, tuple(texts), np.asarray(labels, dtype=dtype), source)


def read_tsv(path: str | os.PathLike, task: str | GlueTask, split: str = "train") -> GlueData:
    """Parse one GLUE TSV file (csv.QUOTE_NONE, UTF-8 with optional BOM)."""
    task = get_task(task)
    layout = task.tsv
    wanted = (*layout.text_columns, layout.label_column)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            rows = list(reader)
        except UnicodeDecodeError as error:
            raise GlueError(f"{path}: not valid UTF-8 ({error})") from None
        except csv.Error as error:  # a field over csv's size limit (a file that is not a TSV)
            raise GlueError(f"{path}:{reader.line_num}: {error}") from None
    rows_with_numbers = [(number, row) for number, row in enumerate(rows, start=1)
                         if any(field.strip() for field in row)]  # blank lines: none
    # Step 1: column names, from the header or the task's fixed layout (CoLA).
    has_header = layout.header or (
        bool(rows_with_numbers) and layout.label_column in rows_with_numbers[0][1])
    if has_header:
        if not rows_with_numbers:
            raise GlueError(f"{path}: empty file (expected a header and rows for {task.name})")
        header = [name.strip() for name in rows_with_numbers[0][1]]
        rows_with_numbers = rows_with_numbers[1:]
    else:
        header = list(layout.columns)
    missing = [name for name in wanted if name not in header]
    if missing:
        raise GlueError(f"{path}: wrong columns for {task.name}: missing {missing}; expected "
                        f"columns {list(wanted)} in the header, found {header}")
    index = [header.index(name) for name in wanted]
    # Step 2: rows -> texts and labels, checking every row. A row with another field count
    # than the header's is refused: with more fields a tab inside a text would shift the
    # columns and silently cut texts or take the wrong label.
    texts: list[list[str]] = [[] for _ in layout.text_columns]
    labels: list = []
    skipped = []
    for number, row in rows_with_numbers:
        if len(row) != len(header):
            if layout.skip_malformed_rows:
                skipped.append(number)
                continue
            hint = " (a tab inside a field?)" if len(row) > len(header) else ""
            expected = (f"the header has {len(header)}" if has_header else
                        f"{task.name} files have no header and {len(header)} columns")
            raise GlueError(f"{path}:{number}: row has {len(row)} fields, {expected} "
                            f"({header}){hint}")
        for column, i in zip(texts, index[:-1]):
            column.append(row[i])
        labels.append(_parse_label(task, row[index[-1]], f"{path}:{number}"))
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} row(s) whose field count differs from the "
                      f"header's {len(header)} (lines {', '.join(map(str, skipped[:5]))}"
                      f"{', ...' if len(skipped) > 5 else ''}), as GLUE's reference {task.name} "
                      "reader does", stacklevel=2)
    return _finish(task, split, texts, labels, str(path))


def read_jsonl(path: str | os.PathLike, task: str | GlueTask, split: str = "train") -> GlueData:
    """Parse a JSONL split: one object per line with hub field names or TSV column names."""
    task = get_task(task)
    text_keys = [(hub, tsv) for hub, tsv in zip(task.text_fields, task.tsv.text_columns)]
    texts: list[list[str]] = [[] for _ in text_keys]
    labels: list = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.readlines()
    except UnicodeDecodeError as error:
        raise GlueError(f"{path}: not valid UTF-8 ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise GlueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise GlueError(f"{where}: expected a JSON object per line, found "
                            f"{type(record).__name__}")
        for column, keys in zip(texts, text_keys):
            key = next((k for k in keys if k in record), None)
            if key is None:
                raise GlueError(f"{where}: wrong columns for {task.name}: expected one of "
                                f"{list(keys)}, found {sorted(record)}")
            if not isinstance(record[key], str):
                raise GlueError(f"{where}: field {key!r} is {json.dumps(record[key])}, "
                                f"expected a string")
            column.append(record[key])
        key = next((k for k in ("label", task.tsv.label_column) if k in record), None)
        if key is None:
            raise GlueError(f"{where}: no label field ('label' or "
                            f"'{task.tsv.label_column}'), found {sorted(record)}")
        labels.append(_parse_label(task, record[key], where))
    return _finish(task, split, texts, labels, str(path))


def _hub_text(text: object, where: str, field: str) -> str:
    """One text field of a hub row: a string (a missing one is an error, not "None")."""
    if not isinstance(text, str):
        raise GlueError(f"{where}: {field} is {text!r}, expected a string")
    return text


def _no_data_source(task: GlueTask) -> GlueError:
    """The error for no local GLUE folder and no `datasets` package to reach the hub."""
    return GlueError(
        f"no local GLUE data ({GLUE_DIR_ENV} is not set and no --glue-dir given) and the "
        f"`datasets` package is not installed. Point {GLUE_DIR_ENV} (or --glue-dir) at a "
        f"GLUE download (folders like {task.folder}/ holding train.tsv and dev.tsv), or "
        f"`pip install datasets` to download {task.name} from the hub")


def load_hub(task: str | GlueTask, split: str = "train") -> GlueData:
    """Download a split from the Hugging Face hub (`datasets`, imported lazily)."""
    task = get_task(task)
    split = task.resolve_split(split)
    hub_split = task.hub_splits[split]
    source = f"hub:{HUB_DATASET}/{task.hub_config}/{hub_split}"
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise _no_data_source(task) from None
    try:
        table = datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    except Exception as error:  # network, auth, cache: all reported the same way
        raise GlueError(
            f"could not load {source} from the hub ({type(error).__name__}: {error}). Offline? "
            f"Set {GLUE_DIR_ENV} (or --glue-dir) to a local GLUE download") from None
    texts = [[_hub_text(text, f"{source} row {row}", name)
              for row, text in enumerate(table[name])] for name in task.text_fields]
    labels = [_parse_label(task, value if task.is_regression else int(value),
                           f"{source} row {row}") for row, value in enumerate(table["label"])]
    return _finish(task, split, texts, labels, source)


def load_split(task: str | GlueTask, split: str = "train",
               glue_dir: str | os.PathLike | None = None, *,
               origin: str | None = None) -> GlueData:
    """Load one split: `glue_dir`, else $GLUE_DIR, else the hub.

    split: "train", "dev" (the first dev split: MNLI matched), or a task's own split name
    ("dev_matched", "dev_mismatched"); hub names ("validation") work too.
    Raises GlueError naming the paths looked for when a local folder lacks the file (origin:
    where the folder came from, as find_split_file takes it).
    """
    task = get_task(task)
    split = task.resolve_split(split)
    root = resolve_glue_dir(glue_dir)
    if root is None:
        return load_hub(task, split)
    path = find_split_file(task, split, glue_dir, origin=origin)
    reader = read_tsv if path.suffix == ".tsv" else read_jsonl
    return reader(path, task, split)


def check_local_splits(task: str | GlueTask, glue_dir: str | os.PathLike | None,
                       splits: tuple[str, ...] = ("train", "dev")) -> None:
    """Before a run writes anything: with a local GLUE folder (`glue_dir`, else $GLUE_DIR),
    the task's files for `splits` are there (GlueError naming the paths looked for); with the
    hub, nothing is checked here (check_hub_reachable)."""
    if resolve_glue_dir(glue_dir) is not None:
        for split in splits:
            find_split_file(task, split, glue_dir)


def check_hub_reachable(task: str | GlueTask, glue_dir: str | os.PathLike | None) -> None:
    """Before a run writes anything: without a local GLUE folder, the `datasets` package that
    reaches the hub is installed (GlueError saying what to do; the hub is not contacted)."""
    if resolve_glue_dir(glue_dir) is None and importlib.util.find_spec("datasets") is None:
        raise _no_data_source(get_task(task))


def find_split_file(task: str | GlueTask, split: str,
                    glue_dir: str | os.PathLike | None = None, *,
                    origin: str | None = None) -> Path:
    """The local file that holds `split` of `task` under `glue_dir` (else $GLUE_DIR), without
    reading it; GlueError naming the paths looked for when there is none (or no folder).

    origin: where the folder came from, named in that error: "--glue-dir", "$GLUE_DIR", or a
    description such as "the run's recorded data folder, recorded in run/config.json".
    Default: $GLUE_DIR when `glue_dir` is not given or equals it, else --glue-dir.
    """
    task = get_task(task)
    split = task.resolve_split(split)
    root = resolve_glue_dir(glue_dir)
    if root is None:
        raise GlueError(f"no GLUE folder: pass --glue-dir or set {GLUE_DIR_ENV}")
    candidates = candidate_paths(task, split, root)
    for path in candidates:
        if path.is_file():
            return path
    if origin is None:
        from_env = resolve_glue_dir(None)  # a run records $GLUE_DIR as its glue_dir
        origin = f"${GLUE_DIR_ENV}" if not glue_dir or root == from_env else "--glue-dir"
    layout = f"<dir>/{task.folder}/{split}.tsv"
    if origin == f"${GLUE_DIR_ENV}":
        hint = (f"Point {GLUE_DIR_ENV} or --glue-dir at a GLUE download with the layout "
                f"{layout}, or unset {GLUE_DIR_ENV} to use the hub")
    elif origin == "--glue-dir":
        hint = f"Point --glue-dir at a GLUE download with the layout {layout}"
    else:
        hint = (f"Pass --glue-dir or set {GLUE_DIR_ENV} to a GLUE download with the layout "
                f"{layout}")
    if not root.exists():
        hint = f"{root} does not exist. {hint}"
    elif not root.is_dir():
        hint = f"{root} is not a folder. {hint}"
    elif root.name in (task.folder, task.name, task.hub_config):
        hint = (f"{root} looks like the {task.name} folder itself: give its parent "
                f"({root.parent}). {hint}")
    raise SplitNotFoundError(
        f"{task.name} {split} split not found under {root} (from {origin}): looked for "
        f"{candidates[0]} (also tried "
        f"{', '.join(str(p.relative_to(root)) for p in candidates[1:])}). {hint}")
