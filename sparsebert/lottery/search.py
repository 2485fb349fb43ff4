"""`search`: the lottery-ticket study of one task and seed, as resumable stages.

    out/config.json                    SearchConfig + TrainConfig (identity checked on rerun)
    out/data.json                      sha256 of the GLUE files (other data refused on rerun)
    out/full/                          fine-tuned full model (a finetune run directory)
    out/full_model.json                sha256 of its weights: results built on another full
                                       model are set aside (sparsebert.lottery.full_model)
    out/<method>/search.json           the search: curve, good mask, notes
    out/<method>/masks/<subnet>.json   s: head/MLP masks; m: counts (+ .safetensors masks)
    out/<method>/pruned/<subnet>.json  the mask on the fine-tuned model, no retraining
    out/<method>/retrained/<subnet>/   the mask on the pre-trained model, re-fine-tuned
    out/summary.json, report.md, figures/

<method> is structured (s-pruning, PAPER.md §1) or magnitude (m-pruning, §2). Each stage's
file is written atomically when the stage is done, so rerunning the same command skips
finished stages (re-fine-tunes resume from their checkpoints); a directory holding a search
with another config is refused.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsebert.atomic import atomic_write_json, file_lock, read_json, run_lock
from sparsebert.errors import RunDirError
from sparsebert.glue.loading import check_hub_reachable, check_local_splits
from sparsebert.glue.tasks import get_task
from sparsebert.hf.loading import load_model, load_tokenizer, preflight_model
from sparsebert.hf.masks import get_masks, set_masks
from sparsebert.hf.patching import patch
from sparsebert.lottery.config import METHODS, SearchConfig, SearchError
from sparsebert.lottery.full_model import check_full_model
from sparsebert.lottery.magnitude_stages import MagnitudeStages
from sparsebert.lottery.redo import PendingRedo, finish_redo, set_aside
from sparsebert.lottery.scoring import load_search_data, report_metric, score_model
from sparsebert.lottery.stage_files import read_stage_file
from sparsebert.lottery.structured_stages import StructuredStages
from sparsebert.lottery.subnetworks import SUBNETWORKS
from sparsebert.precision import resolve as resolve_precision
from sparsebert.train.config import (
    RUNTIME_FIELDS,
    TrainConfig,
    compared_settings,
    recorded,
    resolve_device,
    same_setting,
    use_cuda_graphs,
)
from sparsebert.train.data_identity import DATA_FILE, check_data
from sparsebert.train.evaluate import data_source, trained_precision
from sparsebert.train.loop import finetune
from sparsebert.train.metrics_log import MetricsLog
from sparsebert.train.model_identity import MODEL_FILE, check_model
from sparsebert.train.resume import finished_run
from sparsebert.train.rundir import (
    RunResult,
    enclosing_sweep,
    foreign_entries,
    is_multi_seed_root,
    listed,
    load_run_model,
    make_out_dir,
    model_missing,
)

SUMMARY_VERSION = 1


class StopSearch(Exception):
    """Raised by `stop_after` to end a search after a stage (tests, partial runs)."""


def _read_json(path: Path, fix: str = "delete it to redo that stage") -> dict[str, Any] | None:
    """The JSON in `path`, or None when it is missing; a damaged file names `fix`."""
    if not path.is_file():
        return None
    return read_json(path, fix)


# Search settings whose change makes a method's finished results stale; any other setting
# (threshold, search_data, ...) is used by both methods.
METHOD_SETTINGS = {
    "structured": frozenset({"importance_mode", "importance_batch_size", "importance_precision",
                             "masking_amount", "recompute_after_revert"}),
    "magnitude": frozenset({"magnitude_amount", "magnitude_max_steps"}),
}


def methods_affected(changed: Iterable[str]) -> list[str]:
    """The methods whose results depend on the changed search settings `changed`."""
    affected = set()
    for name in changed:
        owners = [m for m, settings in METHOD_SETTINGS.items() if name in settings]
        affected.update(owners or METHOD_SETTINGS)
    return [m for m in METHOD_SETTINGS if m in affected]


def check_search_dir(out: Path, search: SearchConfig, train: TrainConfig,
                     redo: tuple[str, ...] = (), write: bool = True) -> None:
    """Refuse a directory that holds a search with another config, except for search settings
    that only `redo`'s methods depend on (their results are set aside and computed again,
    the fine-tuned full model kept); then (`write`) write config.json."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is a file, not a search directory")
    saved = _read_json(out / "config.json", "restore it, or use another --out (deleting it "
                       "would let other settings reuse this search's results)")
    mine = {"search": search.to_json(), "train": train.to_json()}
    if saved is not None:
        if "search" not in saved or "train" not in saved:
            raise RunDirError(f"{out} holds something other than a search (config.json without "
                              f"search/train); use another --out")
        theirs = SearchConfig.from_json(saved["search"]).identity()
        search_diff = {k: (theirs.get(k), v) for k, v in search.identity().items()
                       if theirs.get(k) != v}
        theirs_train = saved["train"]
        train_diff = {k: (recorded(theirs_train, k), recorded(mine["train"], k))
                      for k in compared_settings(theirs_train, mine["train"])
                      if k not in RUNTIME_FIELDS
                      and not same_setting(k, theirs_train.get(k), mine["train"].get(k))}
        affected = [m for m in methods_affected(search_diff)
                    if m in search.methods() or (out / m).exists()]
        if train_diff or not set(affected) <= set(redo):
            hint = ("" if train_diff else
                    f"; to keep the fine-tuned full model, redo what the change affects: "
                    f"--redo {','.join(affected)}"
                    + ("" if set(affected) <= set(search.methods()) else " --method both"))
            raise SearchError(f"{out} holds a search with a different config "
                              f"({search_diff | train_diff}, as saved vs requested){hint}; or "
                              f"use another --out, or delete that directory")
    if write:
        make_out_dir(out, SearchError)
        atomic_write_json(out / "config.json", mine)


def _unclaim(out: Path, existed: bool) -> None:
    """Undo check_search_dir's claim of `out`: its config.json removed, and `out` too when this
    call created it and it is empty again."""
    (out / "config.json").unlink(missing_ok=True)
    if not existed:
        with contextlib.suppress(OSError):  # (not empty: something else wrote there)
            out.rmdir()


def check_search_root(out: Path, seeds: bool) -> None:
    """Refuse an --out that holds another layout: a sweep directory (the sweep runs its own
    searches), a multi-seed search (seed_<s>/ folders) for a single-seed search, or a
    single-seed search for a multi-seed one (its summary would join the seeds' report)."""
    sweep = enclosing_sweep(out)  # a sweep, its task or seed folder
    if sweep is not None:
        raise SearchError(f"--out {out}: {'is' if sweep == out else 'is inside'} a sweep "
                          f"directory ({sweep}); rerun `sparsebert sweep` there, or use "
                          f"another --out")
    if seeds and (out / "config.json").is_file():
        raise SearchError(f"--out {out} holds a single-seed search (config.json); a search "
                          f"with --seeds needs its own --out (an existing seed's search can be "
                          f"linked in as OUT/seed_<s>)")
    if not seeds and is_multi_seed_root(out):
        raise SearchError(f"--out {out} holds a multi-seed search (seed_<s>/ folders); rerun it "
                          f"with its --seeds, or use another --out")
    # Files a search would write beside or over: a single-seed search's --out is its own
    # once its config.json is there (check_search_dir reads it), else it must be empty; a
    # multi-seed root holds seed_<s>/ folders and the seeds' report, super-survivors, timings.
    foreign = [] if not seeds and (out / "config.json").is_file() else foreign_entries(
        out, lambda name: seeds and (name in _MULTI_SEED_ENTRIES or name.startswith("seed_")))
    if foreign:
        raise SearchError(f"--out {out}: holds files that are not a search's "
                          f"({listed(foreign)}); use another (or an empty) --out")


# What the root of a multi-seed search holds besides its seed_<s>/ folders.
_MULTI_SEED_ENTRIES = frozenset({"super", "report.md", "figures", "speed"})


def redo_methods(redo: str | None, search: SearchConfig) -> tuple[str, ...]:
    """--redo's comma-separated methods, each one the search runs."""
    if redo is None:
        return ()
    methods = list(dict.fromkeys(m.strip() for m in str(redo).split(",") if m.strip()))
    outside = [m for m in methods if m not in search.methods()]
    if not methods or outside:
        raise SearchError(f"--redo {redo!r}: expected comma-separated methods the search runs "
                          f"({','.join(search.methods())}; --method {search.method})")
    return tuple(m for m in search.methods() if m in methods)


def set_aside_for_redo(runners: list[Search], root: Path, methods: tuple[str, ...]) -> None:
    """Start (or resume) the redo of `methods` in the searches of `runners` under `root`
    (root itself, or the parent of seed_<s>/ folders): their results and what was built on
    them go to root/.superseded/redo-.../ (sparsebert.lottery.redo.set_aside). A directory
    holding another search is refused first, unless it differs only in search settings that
    `methods` alone depend on (the new settings are recorded once their results are aside)."""
    if not methods:
        return
    if not any((r.out / "config.json").is_file() for r in runners):
        warnings.warn(f"--redo {','.join(methods)}: nothing was searched in {root} yet, so "
                      "there is nothing to redo; the search runs from the start", stacklevel=2)
        return
    done = [runner for runner in runners if (runner.out / "config.json").is_file()]
    for runner in done:
        check_search_dir(runner.out, runner.config, runner.train, methods, write=False)
    pending = PendingRedo(root, methods, runners[0].config.identity())
    if pending.start():
        set_aside(root, [root], [runner.out for runner in runners], methods, pending.aside)
    for runner in done:  # the new settings, once what they make stale is set aside
        check_search_dir(runner.out, runner.config, runner.train, methods)
    pending.set_aside_done()


# The stages a search finishes (in order, for the default subnetworks), by the names
# stop_after takes.
STAGES = ("full", *(f"{method}.{stage}" for method in METHODS for stage in (
    "search", *(f"{kind}.{name}" for name in SUBNETWORKS for kind in ("pruned", "retrained")))),
    "summary")


class Search(StructuredStages, MagnitudeStages):
    """One task x seed search in `out` (see the module docstring); call run()."""

    def __init__(self, search: SearchConfig, train: TrainConfig, out: str | os.PathLike,
                 progress: bool = True, stop_after: str | None = None) -> None:
        self.config = search.validate()
        train = train.resolved()
        train.glue_dir = data_source(train.glue_dir).get("path")
        self.train, self.out, self.progress = train, Path(out).expanduser(), progress
        self.task = get_task(train.task)
        self.device = resolve_device(train.device)
        if stop_after is not None and stop_after not in STAGES:
            raise SearchError(f"stop_after {stop_after!r}: expected a stage name, one of "
                              f"{', '.join(STAGES)}")
        self.stop_after = stop_after
        self.started = time.perf_counter()
        self._models: dict[str, Any] = {}  # loaded once per search: see fine_tuned_patched()

    @staticmethod
    def read_stage(path: Path, kind: str) -> dict[str, Any] | None:
        """A finished stage's JSON file, or None when the stage has not finished; one that is
        not what a stage of `kind` writes (sparsebert.lottery.stage_files) is named."""
        return read_stage_file(path, kind)

    def _stage_done(self, name: str) -> None:
        if self.stop_after == name:
            raise StopSearch(name)

    def _metrics(self, method: str, records: list[dict[str, Any]]) -> None:
        """Add a finished search's steps to out/metrics.jsonl, once per method and all at once:
        a stage calls it whether it ran or found its search.json (a kill between the two
        writes). An incomplete set (written line by line by older versions, cut by a kill) is
        replaced. Under a lock: a sweep runs both methods' searches of a seed at once; the
        curves are kept in METHODS order whichever finished first (the same file either way)."""
        with file_lock(self.out / ".metrics.jsonl.lock"):
            log = MetricsLog(self.out / "metrics.jsonl", keep_until_step=10**9)
            if sum(r.get("method") == method for r in log.records) == len(records):
                return
            kept = [r for r in log.records if r.get("method") != method]
            rank = {name: i for i, name in enumerate(METHODS)}
            log.replace(sorted([*kept, *({"method": method, **r} for r in records)],
                               key=lambda r: rank.get(r.get("method"), -1)))

    def _log(self, text: str) -> None:
        if self.progress:
            tqdm.write(f"[search {self.task.name} seed {self.train.seed}] {text}", file=sys.stderr)

    # --- stages ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """All stages, skipping finished ones; returns summary.json's content."""
        threads = torch.get_num_threads()
        try:
            if self.train.threads:
                torch.set_num_threads(self.train.threads)
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict[str, Any]:
        self.full_stage()
        self._stage_done("full")
        self.prepare()
        for method in self.config.methods():
            getattr(self, f"_{method}")()
        summary = self.summary_stage(report=False)
        self._stage_done("summary")
        write_report(self.out)
        return summary

    # Stages that run alone (a sweep's units): full_stage, then after prepare() or
    # load_full() the method stages (<method>_search_stage, _pruned_stage, _retrained_stage
    # of the mixins), then summary_stage.

    def full_stage(self) -> RunResult:
        """Check (or claim) the directory and fine-tune the full model (resumable)."""
        preflight_model(self.train.model, max_length=self.train.max_length,  # before any write
                        patchable=True)
        use_cuda_graphs(self.train, resolve_device(self.train.device))  # on: needs CUDA
        check_search_dir(self.out, self.config, self.train, write=False)  # another config
        check_local_splits(self.task, self.train.glue_dir)  # the data is there
        for folder in (self.out, self.out / "full"):  # then other data or model files,
            if (folder / DATA_FILE).is_file():  # before config.json records this call's
                check_data(folder, self.task, self.train.glue_dir)  # settings (only checks)
            if (folder / MODEL_FILE).is_file():
                check_model(folder, self.train.model)
        check_hub_reachable(self.task, self.train.glue_dir)  # no GLUE folder: `datasets`
        existed, claimed = self.out.exists(), not (self.out / "config.json").is_file()
        check_search_dir(self.out, self.config, self.train)
        try:
            self.full = self._full()  # refuses other data than full/ was trained on
        except BaseException:  # e.g. a damaged data file, read only now
            if claimed and not (self.out / "full").exists():  # nothing ran: the directory is
                _unclaim(self.out, existed)  # left as it was (a rerun may change settings)
            raise
        check_full_model(self.out)  # results built on another full model are set aside
        check_data(self.out, self.task, self.train.glue_dir)  # recorded once it trained on it
        check_model(self.out, self.train.model)  # (the retrainings reload its weights)
        return self.full

    def load_full(self) -> None:
        """For a stage run alone: the finished full model's result, then prepare()."""
        self.full = RunResult.load(self.out / "full")
        if self.full is None or not self.full.finished:
            raise RunDirError(f"{self.out / 'full'}: the full model is not fine-tuned yet; "
                              f"run the full stage first")
        gone = model_missing(self.out / "full")
        if gone is not None:
            raise RunDirError(f"{self.out / 'full'}: the full model's folder is gone ({gone}); "
                              f"rerun the search (or sweep) command to fine-tune it again, or "
                              f"delete the run directory {self.out / 'full'} to redo it")
        self.prepare()

    def summary_stage(self, report: bool = True) -> dict[str, Any]:
        """summary.json from the stage files (and report.md + figures when `report`)."""
        summary = self.summarize()
        atomic_write_json(self.out / "summary.json", summary)
        if report:
            write_report(self.out)
        return summary

    def prepare(self) -> None:
        """Tokenize the search and dev data (after the full model is fine-tuned); data other
        than the search started with is refused."""
        check_data(self.out, self.task, self.train.glue_dir)
        check_model(self.out, self.train.model)
        tokenizer = load_tokenizer(self.out / "full" / "model")
        self.data = load_search_data(self.task, self.train, tokenizer, self.config.search_data,
                                     self.config.importance_batch_size)
        self.precision = scoring_precision(self.out / "full", self.train, self.device)

    def _full(self) -> RunResult:
        done = finished_run(self.out / "full")
        self._log("fine-tuning the full model" if done is None else
                  "the full model is fine-tuned already"
                  + ("" if done.score is None else f" (dev {done.threshold_metric} "
                                                    f"{done.score:.4f})"))
        result = finetune(self.train, self.out / "full", progress=self.progress)
        if not result.finished:
            raise StopSearch("full")
        return result

    def _fine_tuned(self) -> torch.nn.Module:
        model, _ = load_run_model(self.out / "full", self.task.num_labels, self.task.labels)
        return model.to(self.device).eval()

    def fine_tuned_patched(self) -> torch.nn.Module:
        """The fine-tuned full model, patched, gates reset to 1 (loaded once per search)."""
        if "patched" not in self._models:
            model = patch(self._fine_tuned())
            self._models["patched"] = (model, get_masks(model))
        model, ones = self._models["patched"]
        set_masks(model, head_mask=ones["head_mask"], mlp_mask=ones["mlp_mask"])
        return model

    def fine_tuned_plain(self) -> torch.nn.Module:
        """The fine-tuned full model, unpatched (loaded once per search; callers that change
        its weights restore them)."""
        if "plain" not in self._models:
            self._models["plain"] = self._fine_tuned()
        return self._models["plain"]

    def _pretrained(self) -> tuple[torch.nn.Module, Any]:
        """The pre-trained model with the full run's classifier initialisation (same seed):
        loaded once per search, a fresh copy per call."""
        if "pretrained" not in self._models:
            self._models["pretrained"] = load_model(self.train.model, self.task.num_labels,
                                                    labels=self.task.labels,
                                                    seed=self.train.seed)
        model, tokenizer = self._models["pretrained"]
        return copy.deepcopy(model), tokenizer

    def score(self, model: torch.nn.Module) -> tuple[float, dict[str, Any]]:
        """(search score, dev metrics) of `model` as it stands, in the search's precision."""
        return score_model(model, self.data, self.train, self.precision)

    def _full_scores(self, model: torch.nn.Module) -> tuple[float, dict[str, Any]]:
        return self.score(model)

    def _notes_on_threshold(self, full_dev: dict[str, Any], threshold: float) -> list[str]:
        """Say when the stopping rule cannot tell a pruned model from a constant predictor."""
        metric, search_metric = report_metric(self.task), self.task.threshold_metric
        majority = self.data.majority
        if full_dev[metric] <= majority[metric]:
            return [f"the full model's dev {metric} ({full_dev[metric]:.4f}) is at or below "
                    f"the majority class ({majority[metric]:.4f}), so a threshold relative to "
                    f"it is meaningless; the search ran with the rule as specified and its "
                    f"masks mostly reflect noise"]
        on_search = self.data.search_majority[search_metric]  # the set the threshold is on
        if threshold <= on_search:
            where = "" if self.data.same_sets else " on the search set"
            return [f"the threshold ({threshold:.4f} {search_metric}) is at or below the "
                    f"majority class ({on_search:.4f}{where}): a model that always "
                    f"predicts the majority class passes it, so the search can prune almost "
                    f"everything; train the full model better (more data) for a meaningful "
                    f"search"]
        return []

    @staticmethod
    def _finished(result: RunResult) -> RunResult:
        """A re-fine-tune stopped early (stop_after_steps) ends the search for now."""
        if not result.finished:
            raise StopSearch(result.run)
        return result

    # summary and report ----------------------------------------------------------------------

    def summarize(self) -> dict[str, Any]:
        """summary.json from the stage files (the contract of sparsebert.report)."""
        from sparsebert.lottery.summary import build_summary  # noqa: PLC0415

        return build_summary(self)



def scoring_precision(full_dir: Path, train: TrainConfig, device: torch.device) -> str:
    """The precision every score of a search is computed in: the one its full model was
    fine-tuned and scored in (its results.json), so the search's full score is the run's own and
    every stage scores alike wherever it runs. With precision auto, a stage on another kind of
    device than the full model's (a resumed search, a sweep's unit on another node) keeps it,
    with a warning. The importance pass keeps its own setting (--importance-precision)."""
    precision = trained_precision(full_dir, train)
    here = resolve_precision(train.precision, device)
    if precision == "auto":  # an old run directory that records neither precision nor device
        return here
    if precision != here:
        warnings.warn(f"precision auto: the full model was fine-tuned in {precision}; the "
                      f"search scores in {precision} on {device} as well (auto would pick "
                      f"{here} there)", stacklevel=3)
    return precision


def write_report(out: Path, inputs: list[Path] | None = None) -> bool:
    """out/report.md and figures/ over the study under `out` (sparsebert.report), or over
    `inputs` (run directories) when given; False, with a warning, when the report's dependencies
    (matplotlib) cannot be imported."""
    try:
        from sparsebert.report import report  # noqa: PLC0415
    except ImportError as err:
        warnings.warn(f"no report written under {out}: sparsebert.report cannot be imported "
                      f"({err}); install matplotlib and rerun to write it", stacklevel=2)
        return False
    report(inputs or [out], out)
    return True


def search(task: str, out: str | os.PathLike, *, search_config: SearchConfig | None = None,
           train_config: TrainConfig | None = None, progress: bool = True,
           stop_after: str | None = None, redo: str | None = None,
           **options) -> dict[str, Any]:
    """Run (or resume) the lottery-ticket study of one task and seed; returns summary.json.

    redo: comma-separated methods whose finished results are set aside (to out/.superseded/)
    and computed again, keeping the full model (after an upgrade that changed a method); the
    same redo rerun after an interruption resumes it. options: SearchConfig or TrainConfig
    fields by name (e.g. method="structured", max_train_examples=500, seed=1337). Example:

        from sparsebert.lottery import search
        summary = search("MRPC", "runs/mrpc", method="both", seed=42)
        summary["methods"]["structured"]["subnetworks"]["good"]["retrained"]["score"]
    """
    search_fields = {f for f in SearchConfig.__dataclass_fields__}
    train_fields = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(options) - search_fields - train_fields)
    if unknown:
        raise SearchError(f"search: unknown options {unknown}")
    for name, given, kind in (("search_config", search_config, SearchConfig),
                              ("train_config", train_config, TrainConfig)):
        if given is not None and not isinstance(given, kind):
            raise SearchError(f"search: {name!r} must be a {kind.__name__} (or None), got "
                              f"{type(given).__name__}; or pass fields as keyword options")
    search_config = copy.copy(search_config or SearchConfig())
    train_config = copy.copy(train_config or TrainConfig())
    for key, value in options.items():
        setattr(search_config if key in search_fields else train_config, key, value)
    train_config.task = task
    runner = Search(search_config, train_config, out, progress, stop_after)
    with run_lock(runner.out, "search"):
        check_search_root(runner.out, seeds=False)
        set_aside_for_redo([runner], runner.out, redo_methods(redo, runner.config))
        try:
            summary = runner.run()
        except StopSearch:
            return {"status": "stopped", "out": str(out)}
        finish_redo(runner.out)
        return summary

