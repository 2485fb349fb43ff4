"""The multi-seed study: one search per seed, then the super-survivors (PAPER.md §3, §5).

    out/seed_<s>/          a full search directory per seed (sparsebert.lottery.search)
    out/super/masks/       good (kept in every seed), bad ("bizarro": pruned in every seed,
                           resampled to the good size) and random ("middling": in neither set,
                           resampled) head and MLP masks
    out/super/pruned/<subnet>/seed_<s>.json     each mask on seed s's fine-tuned model
    out/super/retrained/<subnet>/seed_<s>/      each mask re-fine-tuned from the pre-trained
                                                model with seed s (physically pruned)
    out/super/summary.json (kind "sparsebert-super")
    out/report.md, out/figures/   the task's report over every seed (and super/), >= 2 seeds

Heads and MLPs get their controls separately (sparsebert.lottery.stats.super_survivor_controls).
Every stage is resumable as in the single-seed search.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsebert.atomic import atomic_write_json, read_json, run_lock
from sparsebert.errors import RunDirError
from sparsebert.glue.tasks import GlueTask, get_task
from sparsebert.lottery.config import SearchConfig, SearchError
from sparsebert.lottery.redo import finish_redo, move_aside, unused
from sparsebert.lottery.scoring import report_metric
from sparsebert.lottery.search import (
    Search,
    StopSearch,
    check_search_root,
    redo_methods,
    set_aside_for_redo,
    write_report,
)
from sparsebert.lottery.stage_files import (
    check_stage,
    read_stage_file,
    stage_masks,
    stage_metric,
)
from sparsebert.lottery.stats import stability_summary, super_survivor_controls
from sparsebert.lottery.structured import kept_fraction
from sparsebert.lottery.subnetworks import SUBNETWORKS
from sparsebert.train.config import TrainConfig
from sparsebert.train.resume import finished_run
from sparsebert.train.rundir import RunResult, now

SUPER_VERSION = 1


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed_{seed}"


DRAW_AGAIN = "delete it to draw the masks again"
SCORE_AGAIN = "delete it to score that subnetwork again"
REDO_SEARCH = ("rerun that seed's search with --redo structured (in a sweep: the sweep's command "
               "with --redo structured)")


def seed_search(out: Path, seed: int) -> dict[str, Any]:
    """The seed's finished s-pruning search (structured/search.json); a clear error when it is
    missing or damaged."""
    path = seed_dir(out, seed) / "structured" / "search.json"
    if not path.is_file():
        raise RunDirError(f"{path}: missing: the super-survivors need every seed's finished "
                          f"s-pruning search; {REDO_SEARCH}")
    return check_stage(path, read_json(path, REDO_SEARCH), "structured masks", REDO_SEARCH)


def mask_digest(found: dict[str, Any]) -> str:
    """A short digest of a seed search's good head and MLP masks (as kept / pruned bits)."""
    bits = [(np.asarray(found[key], dtype=float) != 0).astype(int).tolist()
            for key in ("head_mask", "mlp_mask")]
    return hashlib.sha256(json.dumps(bits).encode()).hexdigest()[:16]


def mask_sources(out: Path, seeds: list[int]) -> dict[str, str]:
    """{seed: mask_digest} of each seed's good s-pruning masks: what super/masks.json records
    it was drawn from, so that masks drawn before a seed's search was redone are not reused."""
    return {str(seed): mask_digest(seed_search(out, seed)) for seed in seeds}


def super_masks(out: Path, seeds: list[int], first_seed: int) -> dict[str, Any]:
    """good / random / bad head (L, H) and MLP (L,) masks from the seeds' good s-pruning masks,
    with the per-seed stability statistics and the digests of the masks they come from; drawn
    with a generator seeded by the seeds."""
    heads, mlps, sources = [], [], {}
    for seed in seeds:
        found = seed_search(out, seed)
        heads.append(found["head_mask"])
        mlps.append(found["mlp_mask"])
        sources[str(seed)] = mask_digest(found)
    heads_arr, mlps_arr = np.asarray(heads), np.asarray(mlps)
    rng = np.random.default_rng([first_seed, *seeds, 5])
    head_controls = super_survivor_controls(heads_arr, rng)
    mlp_controls = super_survivor_controls(mlps_arr, rng)
    masks = {name: {"head_mask": head_controls[name].tolist(),
                    "mlp_mask": mlp_controls[name].tolist()} for name in SUBNETWORKS}
    return {"masks": masks,
            "notes": [f"heads: {n}" for n in head_controls["notes"]]
            + [f"MLPs: {n}" for n in mlp_controls["notes"]],
            "stability": {"heads": stability_summary(heads_arr),
                          "mlps": stability_summary(mlps_arr)},
            "sources": sources}


def seeds_report(out: Path, seeds: list[int]) -> bool:
    """out/report.md and figures/ over this seed list: out/seed_<s>/ of each seed, and super/
    when its super-survivors come from these seeds. Seed directories of other seeds under out
    (an earlier run with more seeds) and super-survivors of another seed list (an earlier run,
    before --no-super) are left out, with a note, so that the report of a mixed directory is
    that of the command run. False as write_report's."""
    mine = {seed_dir(out, s).name for s in seeds}
    leave_out = sorted((p for p in out.glob("seed_*") if p.is_dir() and p.name not in mine),
                       key=lambda p: p.name)
    sup = out / "super" / "summary.json"
    again = "delete it to write the super-survivors' summary again"
    super_seeds = (check_stage(sup, read_json(sup, again), "object", again).get("seeds")
                   if sup.is_file() else None)
    super_fits = super_seeds is None or sorted(super_seeds) == sorted(seeds)
    if not leave_out and super_fits:
        return write_report(out)  # everything under out is this seed list's
    for path in leave_out:
        print(f"[report] {path}: not one of the seeds {seeds}; left out of {out / 'report.md'}",
              file=sys.stderr)
    inputs = [seed_dir(out, s) for s in seeds]
    if sup.is_file():
        if super_fits:
            inputs.append(out / "super")
        else:
            print(f"[report] {out / 'super'}: super-survivors of seeds {super_seeds}, not "
                  f"{seeds}; left out of {out / 'report.md'}", file=sys.stderr)
    return write_report(out, inputs)


def search_seeds(task: str, out: str | os.PathLike, seeds: list[int], *,
                 search_config: SearchConfig | None = None,
                 train_config: TrainConfig | None = None, progress: bool = True,
                 super_survivors: bool = True, redo: str | None = None) -> dict[str, Any]:
    """One search per seed into out/seed_<s>/, then the super-survivor stage (needs the
    structured method and >= 2 seeds). Returns the super summary (or the last seed's summary
    when super_survivors is False). redo: as for search() (for structured, the
    super-survivors are redone too)."""
    if not seeds:
        raise SearchError("--seeds: expected at least one seed")
    if len(set(seeds)) != len(seeds):
        raise SearchError(f"--seeds {seeds}: expected distinct seeds")
    search_config = (search_config or SearchConfig()).validate()
    train_config = train_config or TrainConfig()
    out = Path(out).expanduser()
    with run_lock(out, "search"):
        check_search_root(out, seeds=True)
        runners = []
        for seed in seeds:
            train = copy.copy(train_config)
            train.task, train.seed = task, seed
            runners.append(Search(search_config, train, seed_dir(out, seed), progress))
        methods = redo_methods(redo, search_config)
        set_aside_for_redo(runners, out, methods)
        summaries = []
        for runner in runners:
            try:
                summaries.append(runner.run())
            except StopSearch:
                return {"status": "stopped", "out": str(out)}
        if not super_survivors or len(seeds) < 2 or "structured" not in search_config.methods():
            if len(seeds) >= 2:
                seeds_report(out, seeds)  # over the seed directories (and super/ of these seeds)
            result = summaries[-1]
        else:
            result = SuperStage(task, out, seeds, search_config, train_config, progress).run()
        finish_redo(out)
        return result


class SuperStage:
    """Masks, pruned scores and re-fine-tunes of the super-survivor controls."""

    def __init__(self, task: str, out: Path, seeds: list[int], search_config: SearchConfig,
                 train_config: TrainConfig, progress: bool,
                 runner_for: Callable[[int], Search] | None = None) -> None:
        """runner_for(seed): a prepared Search of that seed (default: a new one, loaded)."""
        self.task_name, self.out, self.seeds = task, out, seeds
        self.runner_for = runner_for
        self.search_config, self.train_config = search_config, train_config
        self.progress = progress
        self.root = out / "super"

    def _runner(self, seed: int) -> Search:
        if self.runner_for is not None:
            return self.runner_for(seed)
        train = copy.copy(self.train_config)
        train.task, train.seed = self.task_name, seed
        runner = Search(self.search_config, train, seed_dir(self.out, seed), self.progress)
        runner.load_full()
        return runner

    def run(self) -> dict[str, Any]:
        self.masks_stage()
        for seed in self.seeds:
            runner = self._runner(seed)
            for name in self.search_config.subnet_list():
                self.pruned_stage(seed, name, runner)
                if self.search_config.retrain:
                    self.retrained_stage(seed, name, runner)
        return self.summary_stage()

    # Stages that run alone (a sweep's units): masks_stage once every seed's structured
    # search is done, then pruned_stage / retrained_stage per seed and subnetwork, then
    # summary_stage.

    def masks_stage(self) -> dict[str, Any]:
        """super/masks.json (once per seed list): the controls' masks, notes and stability
        statistics, with the seeds they come from. Masks of another seed list (a rerun with
        more seeds, say) are set aside with everything built on them, and drawn again; the same
        seeds in another order are the same list (a fresh draw follows the order given). So are
        masks drawn before a seed's search was redone (--redo structured of that seed alone):
        they record the digests of the seed masks they come from."""
        masks_file = self.root / "masks.json"
        found = read_stage_file(masks_file, "super masks", DRAW_AGAIN)
        redone: list[str] = []
        if found is not None and sorted(found.get("seeds") or []) == sorted(self.seeds):
            redone = self._redone_seeds(found)
            if not redone:
                return found
        fresh = {**super_masks(self.out, self.seeds, self.seeds[0]), "seeds": self.seeds}
        written_before_seeds = found is not None and "seeds" not in found
        if redone:
            self._set_aside(found["seeds"], f"its masks come from good masks of seed(s) "
                                            f"{', '.join(redone)} that were searched again since")
        elif found is not None and not (written_before_seeds
                                        and found["masks"] == fresh["masks"]):
            self._set_aside(found.get("seeds"), f"its masks come from seeds "
                                                f"{found.get('seeds') or 'unknown'}, not "
                                                f"{self.seeds}")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(masks_file, fresh)
        return fresh

    def _redone_seeds(self, found: dict[str, Any]) -> list[str]:
        """The seeds whose good masks are no longer those `found` (masks.json of this seed
        list) was drawn from. Masks written before they recorded their sources: all seeds when
        their good masks are not the heads and MLPs kept in every seed's current masks."""
        sources = mask_sources(self.out, self.seeds)
        recorded = found.get("sources")
        if recorded is not None:
            return [seed for seed, digest in sources.items() if recorded.get(seed) != digest]
        searches = [seed_search(self.out, seed) for seed in self.seeds]
        for key in ("head_mask", "mlp_mask"):
            kept_in_all = np.all([np.asarray(f[key], dtype=float) != 0 for f in searches],
                                 axis=0)
            if not np.array_equal(kept_in_all, np.asarray(found["masks"]["good"][key]) != 0):
                return list(sources)
        return []

    def _set_aside(self, seeds: list[int] | None, why: str) -> None:
        """Move super/ (masks of `seeds`, and the pruned and retrained runs of those masks) to
        out/.superseded/super-seeds-<seeds>-<time>/, saying `why`."""
        label = "-".join(map(str, seeds)) if seeds else "unknown"
        stamp = time.strftime("%Y-%m-%dT%H%M%S%z")
        aside = unused(self.out / ".superseded" / f"super-seeds-{label}-{stamp}")
        move_aside(self.root, aside)
        print(f"[super] {self.root}: {why}; set aside in {aside}, drawing them again",
              file=sys.stderr)

    def _masks(self, name: str) -> dict[str, torch.Tensor]:
        path = self.root / "masks.json"
        found = read_stage_file(path, "super masks", DRAW_AGAIN)
        if found is None:
            raise SearchError(f"{path}: missing; run the super-survivor masks stage first")
        seed_masks = seed_search(self.out, self.seeds[0])  # the model's (L, H)
        shape = (len(seed_masks["head_mask"]), len(seed_masks["head_mask"][0]))
        return stage_masks(path, found["masks"][name], shape, DRAW_AGAIN)

    def pruned_stage(self, seed: int, name: str, runner: Search | None = None) -> None:
        """super/pruned/<name>/seed_<s>.json: the control on seed s's fine-tuned model."""
        path = self.root / "pruned" / name / f"seed_{seed}.json"
        if path.is_file():
            return
        runner = runner or self._runner(seed)
        runner.evaluate_structured(runner.fine_tuned_patched(), self._masks(name), path,
                                   f"super {name} seed {seed}")

    def retrained_stage(self, seed: int, name: str, runner: Search | None = None) -> None:
        """super/retrained/<name>/seed_<s>/: the control re-fine-tuned with seed s."""
        run_dir = self.root / "retrained" / name / f"seed_{seed}"
        if finished_run(run_dir) is not None:
            return
        runner = runner or self._runner(seed)
        runner.retrain_structured(run_dir, self._masks(name), f"super {name} seed {seed}")

    def summary_stage(self, report: bool = True) -> dict[str, Any]:
        """super/summary.json, then (`report`) report.md and figures/ over the task's
        directory."""
        found = self.masks_stage()
        summary = self.summarize(found, get_task(self.task_name))
        atomic_write_json(self.root / "summary.json", summary)
        if report:
            seeds_report(self.out, self.seeds)
        return summary

    def summarize(self, found: dict[str, Any], task: GlueTask) -> dict[str, Any]:
        metric = report_metric(task)
        first = task.dev_splits[0]
        sizes = seed_search(self.out, self.seeds[0])["sizes"]
        subnetworks = {}
        asked = self.search_config.subnet_list()
        for name in SUBNETWORKS:  # those asked for and any built before (a rerun may ask for fewer)
            masks = found["masks"][name]
            pruned, retrained = [], []
            for seed in self.seeds:
                path = self.root / "pruned" / name / f"seed_{seed}.json"
                found_pruned = read_stage_file(path, "pruned", SCORE_AGAIN)
                if found_pruned is not None:
                    metrics = found_pruned["metrics"]
                    pruned.append({"seed": seed,
                                   "score": stage_metric(path, metrics, metric, SCORE_AGAIN),
                                   "metrics": metrics})
                result = RunResult.load(self.root / "retrained" / name / f"seed_{seed}")
                if result is not None and result.finished:
                    retrained.append({"seed": seed,
                                      "score": float(result.metrics[first][metric]),
                                      "metrics": result.metrics[first]})
            if name not in asked and not pruned and not retrained:
                continue
            heads = int(np.asarray(masks["head_mask"]).sum())
            mlps = int(np.asarray(masks["mlp_mask"]).sum())
            subnetworks[name] = {"heads_kept": heads, "mlps_kept": mlps,
                                 "fraction_kept": kept_fraction(heads, mlps, sizes),
                                 "head_mask": masks["head_mask"], "mlp_mask": masks["mlp_mask"],
                                 "pruned": pruned or None, "retrained": retrained or None}
        return {"version": SUPER_VERSION, "kind": "sparsebert-super", "task": task.name,
                "seeds": self.seeds, "report_metric": metric,
                "head_mask": found["masks"]["good"]["head_mask"],
                "mlp_mask": found["masks"]["good"]["mlp_mask"],
                "subnetworks": subnetworks, "notes": found["notes"],
                "stability": found["stability"], "written_at": now()}
