"""Real speed next to accuracy: the `sparsebert speed --run` measurements beside the runs.

`sparsebert speed --run DIR` times every subnetwork of a search (masked fast path and physically
pruned, against the full model, interleaved in one process) and writes DIR/speed/<setting>.json,
one file per device, dtype, batch and length setting. The parent of a multi-seed search writes
one file whose subnetworks are named "seed_<s>/<subnet>".

For every run of a report, `collect_speed` reads the rows of its subnetworks from
<run>/speed/*.json and <run>/../speed/*.json; `speed_tables` aggregates them per setting, task
and subnetwork (mean ± sample std over seeds) beside the subnetwork's dev scores (s-pruning, the
summary's "pruned" and "retrained" entries), with the full model as the reference row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sparsebert.report.collect import ReportError, Stat, TaskResults
from sparsebert.report.paper import SUBNETS
from sparsebert.report.summaries import RunSummary, scores_of

SPEED_DIR = "speed"


@dataclass(frozen=True)
class SpeedEntry:
    """One subnetwork of one run, timed in one setting (times: median ms per batch)."""

    setting: str  # one line naming device, dtype, batch, lengths, model
    command: str  # the `sparsebert speed` command that measured it
    task: str
    seed: int
    subnet: str
    heads_kept: float  # fraction of heads kept, over all layers
    ffn_kept: float  # fraction of FFN neurons kept
    dense_ms: float  # the full model on the fast path (all heads), same run of the timer
    masked_ms: float  # the masked model on the fast path
    stock_ms: float | None  # the full model's own (stock Hugging Face) forward
    pruned_ms: float | None  # the physically pruned model's own forward
    file: Path
    # Medians of per-round ratios, where the file has them (older files: ratios of medians):
    masked_paired: float | None = None  # dense / masked
    pruned_paired: float | None = None  # patched full model / pruned, the same forward
    noisy: bool = False  # the file notes noisy timings (a busy machine)
    patched_ms: float | None = None  # the patched full model's forward (what pruned is timed
    # against; older files lack it)
    replaces: tuple[Path, ...] = ()  # older files timing the same subnetwork and setting
    # a row it reads (full model, masked, pruned) gave other logits than its reference: it
    # timed another function, so its times are left out of the tables and the figure
    mismatch: bool = False

    @property
    def masked_speedup(self) -> float:
        """Fast path vs fast path: the same code with and without the masks."""
        return self.masked_paired if self.masked_paired is not None else (
            self.dense_ms / self.masked_ms)

    @property
    def pruned_against_patched(self) -> bool:
        """Whether pruned_speedup compares like with like (the patched full model on the same
        padded forward); older files only timed the stock forward."""
        return self.pruned_paired is not None

    @property
    def pruned_speedup(self) -> float | None:
        """The pruned model against the full one: the patched full model on the same forward
        (per-round ratios), or in older files the full model's stock forward."""
        if self.pruned_paired is not None:
            return self.pruned_paired
        if self.pruned_ms is None or self.stock_ms is None:
            return None
        return self.stock_ms / self.pruned_ms


def _load(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"{file}: not a readable speed result ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(
            data.get("args"), dict):
        raise ReportError(f"{file}: not a `sparsebert speed` result (no 'rows' and 'args')")
    return data


def _setting(data: dict[str, Any]) -> tuple[str, str]:
    """(one-line setting, the command that measured it) of a speed result."""
    a = data["args"]
    lengths = data.get("lengths") or {}
    mean = f" (mean {lengths['mean']:.1f} tokens)" if "mean" in lengths else ""
    versions = data.get("versions") or {}
    device = str(data.get("device", a.get("device"))).replace("(1 threads)", "(1 thread)")
    setting = (f"{device}, {data.get('dtype')}, batch {a.get('batch')}"
               f", padded length {a.get('seq')}, lengths {a.get('lengths')}{mean}, model "
               f"{a.get('model')}, torch {versions.get('torch', '?')}")
    flags = [f"--run {a.get('run')}", f"--batch {a.get('batch')}", f"--seq {a.get('seq')}",
             f"--lengths {a.get('lengths')}", f"--device {a.get('device')}",
             f"--dtype {data.get('dtype')}"]
    # Every other flag that shapes the workload or the timing, when it was given (the file's
    # name does not tell these apart: the command must repeat them).
    for flag in ("threads", "repeats", "warmup", "seed", "model", "glue_dir"):
        if a.get(flag) is not None:
            flags.append(f"--{flag.replace('_', '-')} {a[flag]}")
    return setting, "sparsebert speed " + " ".join(flags)


def _row(rows: list[dict], variant: str, subnet: str | None) -> dict | None:
    """The unpadded (fast path) row of dense/masked `variant` for `subnet`, or its only row."""
    for row in rows:
        if row.get("variant") != variant or row.get("subnetwork") != subnet:
            continue
        if variant in ("dense", "masked") and not row.get("unpad", True):
            continue
        return row
    return None


def _time(rows: list[dict], file: Path, variant: str, subnet: str | None) -> float | None:
    """Median ms of the unpadded (fast path) or pruned row of `variant` for `subnet`."""
    row = _row(rows, variant, subnet)
    if row is None:
        return None
    value = row.get("median_ms")
    if not isinstance(value, (int, float)) or not value > 0:
        raise ReportError(f"{file}: row {variant} {subnet or ''} has no positive median_ms")
    return float(value)


def _paired(rows: list[dict], variant: str, subnet: str, field: str) -> float | None:
    """A row's per-round speed-up `field`, when the file has one (from samples_ms)."""
    row = _row(rows, variant, subnet)
    if row is None or "samples_ms" not in row:
        return None
    value = row.get(field)
    return float(value) if isinstance(value, (int, float)) else None


def _entries_in(file: Path, data: dict[str, Any], run: RunSummary,
                prefix: str) -> list[SpeedEntry]:
    """The run's subnetworks in one loaded speed file (subnetwork names `prefix + subnet`)."""
    rows = data["rows"]
    dense = _time(rows, file, "dense", None)
    stock = _time(rows, file, "hf_eager", None)
    patched = _time(rows, file, "patched", None)
    setting, command = _setting(data)
    noisy = any("noisy timings" in str(note) for note in data.get("notes", []))
    out = []
    for subnet in SUBNETS:
        name = prefix + subnet
        masked = _time(rows, file, "masked", name)
        if masked is None:
            continue
        if dense is None:
            raise ReportError(f"{file}: subnetwork rows but no dense row to compare them with")
        kept = next((r for r in rows if r.get("subnetwork") == name), {})
        read = [_row(rows, variant, sub) for variant, sub in (
            ("dense", None), ("patched", None), ("masked", name), ("pruned", name))]
        mismatch = any(row is not None and row.get("outputs_match") is False for row in read)
        out.append(SpeedEntry(setting, command, run.task, run.seed, subnet,
                              float(kept.get("heads_kept", math.nan)),
                              float(kept.get("ffn_kept", math.nan)), dense, masked, stock,
                              _time(rows, file, "pruned", name), file,
                              masked_paired=_paired(rows, "masked", name, "speedup_vs_dense"),
                              pruned_paired=_paired(rows, "pruned", name, "speedup_vs_patched"),
                              noisy=noisy, patched_ms=patched, mismatch=mismatch))
    return out


def collect_speed(results: Mapping[str, TaskResults]) -> list[SpeedEntry]:
    """Every speed entry of the runs in `results`, in task, seed and subnetwork order."""
    out: list[SpeedEntry] = []
    loaded: dict[Path, dict[str, Any]] = {}  # a seeds' parent file serves every seed: read once
    for res in results.values():
        for run in res.runs:
            # The run's own speed/, and its parent's (a multi-seed run's, rows named
            # "seed_<s>/<subnet>"), for each path the summary was found under (a linked seed:
            # the link's parent too).
            places = []
            for found in run.locations or (run.path,):
                run_dir = found.parent
                places += [(run_dir / SPEED_DIR, ""),
                           (run_dir.parent / SPEED_DIR, f"{run_dir.name}/")]
            for folder, prefix in dict.fromkeys(places):
                for file in sorted(folder.glob("*.json")):
                    if file not in loaded:
                        loaded[file] = _load(file)
                    out += _entries_in(file, loaded[file], run, prefix)
    # One entry per (task, seed, subnetwork, setting): a setting timed again (another file
    # name, e.g. one from before names carried the thread count; or a seed timed on its own
    # and through its parent) counts once, by its latest file; on a tie the run's own file.
    groups: dict[tuple, list[int]] = {}
    for index, e in enumerate(out):
        groups.setdefault((e.task, e.seed, e.subnet, e.setting), []).append(index)
    kept: dict[int, SpeedEntry] = {}
    for indices in groups.values():
        best = max(indices, key=lambda i: (_recency(out[i].file, loaded[out[i].file]), -i))
        older = tuple(dict.fromkeys(out[i].file for i in indices if out[i].file != out[best].file))
        kept[best] = replace(out[best], replaces=older)
    return [kept[i] for i in sorted(kept)]


def _recency(file: Path, data: dict[str, Any]) -> tuple[str, float]:
    """How recent a speed file is: its recorded UTC time (files from before it was recorded
    rank below every file that has one), then its modification time."""
    written = data.get("written_at")
    return (written if isinstance(written, str) else "", file.stat().st_mtime)


def subnet_score(run: RunSummary, subnet: str, stage: str) -> float | None:
    """Mean dev score of an s-pruning subnetwork's "pruned" or "retrained" entry (None if
    absent)."""
    entry = run.subnetworks.get("structured", {}).get(subnet) or {}
    scores = scores_of(entry.get(stage))
    return sum(scores) / len(scores) if scores else None


def _fmt(stat: Stat | None, digits: int, suffix: str = "", seeds: int | None = None) -> str:
    """'1.23x ± 0.04x'; ' (n=2)' added when the cell covers fewer than the row's `seeds` (a
    score missing for a seed that was timed)."""
    if stat is None:
        return "—"
    text = f"{stat.mean:.{digits}f}{suffix}"
    text = text if stat.std is None else text + f" ± {stat.std:.{digits}f}{suffix}"
    return text + (f" (n={stat.n})" if seeds is not None and stat.n < seeds else "")


def speed_tables(results: Mapping[str, TaskResults], entries: list[SpeedEntry]) -> str:
    """Markdown: per setting, a table of task x subnetwork with sizes, dev scores, times and
    speed-ups (mean ± sample std over the seeds measured), the full model as the dense row."""
    runs = {(r.task, r.seed): r for res in results.values() for r in res.runs}
    parts = []
    for setting in dict.fromkeys(e.setting for e in entries):
        chosen = [e for e in entries if e.setting == setting and not e.mismatch]
        wrong = sorted({(e.file.as_posix(), e.subnet) for e in entries
                        if e.setting == setting and e.mismatch})
        commands = sorted({e.command for e in entries if e.setting == setting})
        header = ["task", "subnetwork", "seeds", "heads kept", "FFN kept",
                  "dev score, no retraining", "dev score, retrained",
                  "ms per batch, masked (fast path)", "speed-up vs full (fast path)",
                  "ms per batch, physically pruned", "speed-up vs full (same forward)"]
        lines = [f"**{setting}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join([":--", ":--", "--:"] + ["--:"] * (len(header) - 3)) + "|"]
        for task in results:
            task_entries = [e for e in chosen if e.task == task]
            if not task_entries:
                continue
            seeds = sorted({e.seed for e in task_entries})
            full = Stat.of(runs[(task, s)].full_score for s in seeds)
            per_file = {e.file: e for e in task_entries}.values()  # one full-model time a file
            dense = Stat.of(e.dense_ms for e in per_file)
            # the full model on the pruned model's forward: the patched full model, which
            # the pruned rows' speed-ups compare with (older files: the stock forward, †)
            patched = Stat.of(e.patched_ms for e in per_file if e.patched_ms is not None)
            same = (_fmt(patched, 1) if patched is not None else
                    _fmt(Stat.of(e.stock_ms for e in per_file), 1) + " †")
            lines.append(f"| {task} | full model | {len(seeds)} | 100% | 100% | "
                         f"{_fmt(full, 3, seeds=len(seeds))} | — | {_fmt(dense, 1)} | 1.00x | "
                         f"{same} | 1.00x |")
            for subnet in SUBNETS:
                sub = [e for e in task_entries if e.subnet == subnet]
                if not sub:
                    continue
                pruned_speedups = [e.pruned_speedup for e in sub if e.pruned_speedup is not None]
                stock_based = any(e.pruned_speedup is not None and not e.pruned_against_patched
                                  for e in sub)
                cells = [
                    task, subnet, str(len(sub)),
                    _fmt(Stat.of(100 * e.heads_kept for e in sub), 0, "%"),
                    _fmt(Stat.of(100 * e.ffn_kept for e in sub), 0, "%"),
                    _fmt(Stat.of(subnet_score(runs[(task, e.seed)], subnet, "pruned")
                                 for e in sub), 3, seeds=len(sub)),
                    _fmt(Stat.of(subnet_score(runs[(task, e.seed)], subnet, "retrained")
                                 for e in sub), 3, seeds=len(sub)),
                    _fmt(Stat.of(e.masked_ms for e in sub), 1),
                    _fmt(Stat.of(e.masked_speedup for e in sub), 2, "x"),
                    _fmt(Stat.of(e.pruned_ms for e in sub), 1),
                    _fmt(Stat.of(pruned_speedups), 2, "x") + (" †" if stock_based else ""),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Measured with " + "; ".join(f"`{c}`" for c in commands) + "."]
        if any(not e.pruned_against_patched and e.pruned_speedup is not None
               or e.patched_ms is None for e in chosen):
            lines.append("† against the full model's stock Hugging Face forward: the file "
                         "predates the patched-full-model row, so this ratio also holds the "
                         "kernel change, not only the pruning; rerun the command to separate "
                         "them.")
        replaced = sorted({(old.as_posix(), e.file.as_posix()) for e in chosen
                           for old in e.replaces})
        if replaced:
            lines.append("Timed more than once (the latest file counts; on a tie the run's "
                         "own): " + "; ".join(f"`{new}` counts, `{old}` left out"
                                             for old, new in replaced) + ".")
        if wrong:
            lines.append("Left out: timings of a model whose logits differ from its reference "
                         "beyond rounding (another function, so no speed-up; see the file's "
                         "notes): " + ", ".join(f"`{f}` ({subnet})" for f, subnet in wrong)
                         + ".")
        noisy = sorted({e.file.as_posix() for e in chosen if e.noisy})  # as found: as the
        # command above names its inputs (the same bytes from any working directory)
        if noisy:
            lines.append("Noisy timings (a busy machine; see the file's notes): "
                         + ", ".join(f"`{f}`" for f in noisy) + ".")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


SPEED_NOTE = (
    "Times are medians of interleaved repeats after warm-up (each round runs every row once, "
    "in a random order), all rows of one file from one process; speed-ups are medians of the "
    "per-round ratios, which cancel the drift of a shared machine between rounds. 'masked "
    "(fast path)' runs the patched model with its masks on compact weights over the real "
    "tokens (`sparsebert.accelerate`), against the full model on the same fast path; "
    "'physically pruned' runs `sparsebert.prune`'s model with its own padded forward (Hugging "
    "Face's, with sparsebert's patched blocks), against the patched full model on that same "
    "forward. Heads kept "
    "and FFN kept count every layer (an MLP switched off counts as 0% of its neurons). Only "
    "s-pruning (heads + MLPs) changes the amount of dense work; m-pruning's unstructured "
    "masks do not, so they are not timed.")

