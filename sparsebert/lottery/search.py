"""`search`: the lottery-ticket study of one task and seed, as resumable stages.

    out/config.json                    SearchConfig + TrainConfig (identity checked on rerun)
    out/full/                          fine-tuned full model (a finetune run directory)
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

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsebert.atomic import atomic_write_json
from sparsebert.errors import RunDirError
from sparsebert.glue.tasks import get_task
from sparsebert.hf.loading import load_model, load_tokenizer
from sparsebert.hf.masks import set_masks
from sparsebert.hf.patching import patch, sparse_blocks
from sparsebert.hf.structure import config_size, structure_for
from sparsebert.hf.surgery import prune
from sparsebert.lottery import magnitude as mag
from sparsebert.lottery.config import SearchConfig, SearchError
from sparsebert.lottery.scoring import load_search_data, report_metric, score_model
from sparsebert.lottery.structured import kept_fraction, structured_search
from sparsebert.lottery.subnetworks import structured_subnetworks
from sparsebert.pruning.importance import importance
from sparsebert.pruning.weight_masks import (
    WeightMasks,
    load_weight_masks,
    mask_counts,
    save_weight_masks,
)
from sparsebert.train.config import RUNTIME_FIELDS, TrainConfig, resolve_device
from sparsebert.train.evaluate import data_source
from sparsebert.train.loop import finetune
from sparsebert.train.metrics_log import MetricsLog
from sparsebert.train.rundir import RunResult, load_run_model

SUMMARY_VERSION = 1


class StopSearch(Exception):
    """Raised by `stop_after` to end a search after a stage (tests, partial runs)."""


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunDirError(f"{path}: damaged ({error}); delete it to redo that stage") from None


def check_search_dir(out: Path, search: SearchConfig, train: TrainConfig) -> None:
    """Refuse a directory that holds a search with another config; write config.json."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is a file, not a search directory")
    saved = _read_json(out / "config.json")
    mine = {"search": search.to_json(), "train": train.to_json()}
    if saved is not None:
        if "search" not in saved or "train" not in saved:
            raise RunDirError(f"{out} holds something else than a search (config.json without "
                              f"search/train); use another --out")
        theirs = SearchConfig.from_json(saved["search"]).identity()
        diff = {k: (theirs.get(k), v) for k, v in search.identity().items()
                if theirs.get(k) != v}
        diff.update({k: (saved["train"].get(k), v) for k, v in mine["train"].items()
                     if k not in RUNTIME_FIELDS and saved["train"].get(k) != v})
        if diff:
            raise SearchError(f"{out} holds a search with a different config ({diff}, as saved "
                              f"vs requested); use another --out or delete that directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", mine)


class Search:
    """One task x seed search in `out` (see the module docstring); call run()."""

    def __init__(self, search: SearchConfig, train: TrainConfig, out: str | os.PathLike,
                 progress: bool = True, stop_after: str | None = None) -> None:
        self.config = search.validate()
        train = train.resolved()
        train.glue_dir = data_source(train.glue_dir).get("path")
        self.train, self.out, self.progress = train, Path(out), progress
        self.task = get_task(train.task)
        self.device = resolve_device(train.device)
        self.stop_after = stop_after
        self.started = time.perf_counter()

    def _stage_done(self, name: str) -> None:
        if self.stop_after == name:
            raise StopSearch(name)

    def _metrics(self, method: str, records: list[dict[str, Any]]) -> None:
        """Append a finished search's steps to out/metrics.jsonl (once per stage)."""
        log = MetricsLog(self.out / "metrics.jsonl", keep_until_step=10**9)
        for record in records:
            log.write({"method": method, **record})

    def _log(self, text: str) -> None:
        if self.progress:
            tqdm.write(f"[search {self.task.name} seed {self.train.seed}] {text}")

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
        check_search_dir(self.out, self.config, self.train)
        self.full = self._full()
        self._stage_done("full")
        self.prepare()
        for method in self.config.methods():
            getattr(self, f"_{method}")()
        summary = self.summarize()
        atomic_write_json(self.out / "summary.json", summary)
        self._stage_done("summary")
        self._report()
        return summary

    def prepare(self) -> None:
        """Tokenize the search and dev data (after the full model is fine-tuned)."""
        tokenizer = load_tokenizer(self.out / "full" / "model")
        self.data = load_search_data(self.task, self.train, tokenizer, self.config.search_data,
                                     self.config.importance_batch_size)

    def _full(self) -> RunResult:
        self._log("fine-tuning the full model")
        result = finetune(self.train, self.out / "full", progress=self.progress)
        if not result.finished:
            raise StopSearch("full")
        return result

    def _fine_tuned(self) -> torch.nn.Module:
        model, _ = load_run_model(self.out / "full", self.task.num_labels, self.task.labels)
        return model.to(self.device).eval()

    def _pretrained(self) -> tuple[torch.nn.Module, Any]:
        """The pre-trained model with the full run's classifier initialisation (same seed)."""
        return load_model(self.train.model, self.task.num_labels, labels=self.task.labels,
                          seed=self.train.seed)

    def _full_scores(self, model: torch.nn.Module) -> tuple[float, dict[str, Any]]:
        return score_model(model, self.data, self.train)

    def _notes_on_threshold(self, full_dev: dict[str, Any], threshold: float) -> list[str]:
        """Say when the stopping rule cannot tell a pruned model from a constant predictor."""
        metric, search_metric = report_metric(self.task), self.task.threshold_metric
        majority = self.data.majority
        if full_dev[metric] <= majority[metric]:
            return [f"the full model's dev {metric} ({full_dev[metric]:.4f}) is at or below "
                    f"the majority class ({majority[metric]:.4f}), so a threshold relative to "
                    f"it is meaningless; the search ran with the rule as specified and its "
                    f"masks mostly reflect noise"]
        if threshold <= majority[search_metric]:
            return [f"the threshold ({threshold:.4f} {search_metric}) is at or below the "
                    f"majority class ({majority[search_metric]:.4f}): a model that always "
                    f"predicts the majority class passes it, so the search can prune almost "
                    f"everything; train the full model better (more data) for a meaningful "
                    f"search"]
        return []

    # s-pruning ---------------------------------------------------------------------------------

    def _structured(self) -> None:
        root = self.out / "structured"
        found = _read_json(root / "search.json")
        model = patch(self._fine_tuned())
        if found is None:
            started = time.perf_counter()
            found = self._structured_search(model)
            found["search_time_s"] = time.perf_counter() - started
            (root / "masks").mkdir(parents=True, exist_ok=True)
            atomic_write_json(root / "search.json", found)
            self._metrics("structured", found["curve"])
        self._stage_done("structured.search")
        good = (torch.tensor(found["head_mask"]), torch.tensor(found["mlp_mask"]))
        subnets = structured_subnetworks(*good, seed=self.train.seed)
        for name in self.config.subnet_list():
            masks = subnets[name]
            mask_file = root / "masks" / f"{name}.json"
            if not mask_file.is_file():
                atomic_write_json(mask_file, {k: v.tolist() for k, v in masks.items()})
            masks = {k: torch.tensor(v) for k, v in json.loads(mask_file.read_text()).items()}
            self.evaluate_structured(model, masks, root / "pruned" / f"{name}.json",
                                     f"s-pruning {name}")
            self._stage_done(f"structured.pruned.{name}")
            if self.config.retrain:
                self._retrain_structured(name, masks)
                self._stage_done(f"structured.retrained.{name}")
        set_masks(model, head_mask=torch.ones_like(good[0]), mlp_mask=torch.ones_like(good[1]))

    def evaluate_structured(self, model: torch.nn.Module, masks: dict[str, torch.Tensor],
                            path: Path, label: str) -> None:
        """Dev metrics of the patched fine-tuned `model` under `masks`, into `path` (once)."""
        if path.is_file():
            return
        set_masks(model, head_mask=masks["head_mask"], mlp_mask=masks["mlp_mask"])
        score, dev = score_model(model, self.data, self.train)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"search_score": score, "metrics": dev})
        self._log(f"{label}: pruned dev {dev}")

    def fine_tuned_patched(self) -> torch.nn.Module:
        """The fine-tuned full model, patched (gates at 1)."""
        return patch(self._fine_tuned())

    def _structured_search(self, model: torch.nn.Module) -> dict[str, Any]:
        row = structure_for(model)
        layers, heads = len(sparse_blocks(model)), config_size(model, row, "num_heads")
        full_search, full_dev = self._full_scores(model)
        metric = report_metric(self.task)
        threshold = self.config.threshold * full_search
        self._log(f"s-pruning: full search score {full_search:.4f}, threshold {threshold:.4f}")

        def evaluate(head_mask, mlp_mask):
            set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
            score, dev = score_model(model, self.data, self.train)
            return score, float(dev[metric])

        def scores(head_mask, mlp_mask):
            set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
            imp = importance(model, self.data.importance_batches,
                             mode=self.config.importance_mode, progress=False)
            return imp.head, imp.mlp

        result = structured_search(layers, heads, threshold, full_search, evaluate, scores,
                                   self.config.masking_amount,
                                   self.config.recompute_after_revert, self.progress,
                                   full_report_score=float(full_dev[metric]))
        sizes = {"hidden": config_size(model, row, "hidden_size"), "head_dim":
                 config_size(model, row, "hidden_size") // heads,
                 "intermediate": config_size(model, row, "intermediate_size"),
                 "layers": layers, "heads": heads}

        def fraction(heads_kept: int, mlps_kept: int) -> float:
            return kept_fraction(heads_kept, mlps_kept, sizes)

        for record in result.curve:
            record["fraction_kept"] = fraction(record["heads_kept"], record["mlps_kept"])
        return {"full_search_score": full_search, "threshold_score": threshold,
                "head_mask": result.head_mask.tolist(), "mlp_mask": result.mlp_mask.tolist(),
                "heads_kept": int(result.head_mask.sum()), "mlps_kept": int(result.mlp_mask.sum()),
                "fraction_kept": fraction(int(result.head_mask.sum()), int(result.mlp_mask.sum())),
                "curve": result.curve,
                "notes": result.notes + self._notes_on_threshold(full_dev, threshold),
                "sizes": sizes}

    def _retrain_structured(self, name: str, masks: dict[str, torch.Tensor]) -> RunResult:
        return self.retrain_structured(self.out / "structured" / "retrained" / name, masks,
                                       f"s-pruning {name}")

    def retrain_structured(self, run_dir: Path, masks: dict[str, torch.Tensor],
                           label: str) -> RunResult:
        """Re-fine-tune the pre-trained model, physically pruned to `masks` (head_mask (L, H),
        mlp_mask (L,)), into `run_dir` (resumable; a finished run is returned as is)."""
        done = RunResult.load(run_dir)
        if done is not None and done.finished:
            return done
        self._log(f"{label}: re-fine-tuning the pre-trained model, pruned")
        model, tokenizer = self._pretrained()
        patch(model)
        set_masks(model, head_mask=masks["head_mask"], mlp_mask=masks["mlp_mask"])
        prune(model)  # s-pruning masks are applied by physically removing heads and MLPs
        return self._finished(finetune(self.train, run_dir, model=model, tokenizer=tokenizer,
                                       progress=self.progress))

    # m-pruning ---------------------------------------------------------------------------------

    def _magnitude(self) -> None:
        root = self.out / "magnitude"
        (root / "masks").mkdir(parents=True, exist_ok=True)
        model = self._fine_tuned()
        params = mag.eligible_parameters(model)
        found = _read_json(root / "search.json")
        if found is None:
            started = time.perf_counter()
            found = self._magnitude_search(model, params)
            found["search_time_s"] = time.perf_counter() - started
            atomic_write_json(root / "search.json", found)
            self._metrics("magnitude", found["curve"])
        self._stage_done("magnitude.search")
        kept = found["kept"]
        generator = torch.Generator().manual_seed(self.train.seed * 1000 + 7)
        builders = {
            "good": lambda: mag.magnitude_mask(params, kept, largest=True),
            "random": lambda: mag.random_mask(params, kept, generator),
            "bad": lambda: mag.magnitude_mask(params, kept, largest=False),
        }
        original = {n: p.detach().clone() for n, p in params.items()}
        for name in self.config.subnet_list():
            mask_file = root / "masks" / f"{name}.safetensors"
            if not mask_file.is_file():
                masks = builders[name]()
                save_weight_masks(mask_file, masks)
                kept_n, total = mask_counts(masks)
                atomic_write_json(root / "masks" / f"{name}.json", {
                    "kept": kept_n, "total": total, "fraction_kept": kept_n / total,
                    "layer_kept_fraction": mag.layer_kept_fractions(model, masks),
                    "file": mask_file.name})
            masks = load_weight_masks(mask_file)
            pruned_file = root / "pruned" / f"{name}.json"
            if not pruned_file.is_file():
                WeightMasks.from_named(model, masks).apply()
                score, dev = score_model(model, self.data, self.train)
                _restore(params, original)
                pruned_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(pruned_file, {"search_score": score, "metrics": dev})
                self._log(f"m-pruning {name}: pruned dev {dev}")
            self._stage_done(f"magnitude.pruned.{name}")
            if self.config.retrain:
                self._retrain_magnitude(name, masks)
                self._stage_done(f"magnitude.retrained.{name}")

    def _magnitude_search(self, model: torch.nn.Module, params) -> dict[str, Any]:
        total = sum(p.numel() for p in params.values())
        full_search, full_dev = self._full_scores(model)
        metric = report_metric(self.task)
        threshold = self.config.threshold * full_search
        original = {n: p.detach().clone() for n, p in params.items()}
        curve = [{"step": 0, "kept": total, "fraction_kept": 1.0, "search_score": full_search,
                  "score": float(full_dev[metric]), "passed": True}]
        good_step = 0
        bar = tqdm(range(1, self.config.magnitude_max_steps + 1), desc="m-pruning",
                   unit="step", disable=not self.progress, leave=False)
        for step in bar:
            kept = mag.kept_count(total, step, self.config.magnitude_amount)
            WeightMasks.from_named(model, mag.magnitude_mask(params, kept)).apply()
            score, dev = score_model(model, self.data, self.train)
            _restore(params, original)
            passed = score >= threshold
            curve.append({"step": step, "kept": kept, "fraction_kept": kept / total,
                          "search_score": score, "score": float(dev[metric]),
                          "passed": bool(passed)})
            bar.set_postfix(kept=f"{kept / total:.3f}", score=f"{score:.4f}")
            if not passed:
                break
            # The authors' loop saves the mask before each prune step, so the last of its
            # magnitude_max_steps iterations is evaluated but never saved.
            if step < self.config.magnitude_max_steps:
                good_step = step
        bar.close()
        kept = mag.kept_count(total, good_step, self.config.magnitude_amount)
        return {"full_search_score": full_search, "threshold_score": threshold,
                "good_step": good_step, "kept": kept, "total": total,
                "fraction_kept": kept / total, "curve": curve,
                "notes": self._notes_on_threshold(full_dev, threshold)}

    def _retrain_magnitude(self, name: str, masks: dict[str, torch.Tensor]) -> RunResult:
        run_dir = self.out / "magnitude" / "retrained" / name
        done = RunResult.load(run_dir)
        if done is not None and done.finished:
            return done
        self._log(f"m-pruning {name}: re-fine-tuning the pre-trained weights, mask held")
        model, tokenizer = self._pretrained()  # rewinding: the mask goes on pre-trained weights
        pairs = WeightMasks.from_named(model, masks).masks
        return self._finished(finetune(self.train, run_dir, model=model, tokenizer=tokenizer,
                                       weight_masks=pairs, progress=self.progress))

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

    def _report(self) -> None:
        try:
            from sparsebert.report import report  # noqa: PLC0415
        except ImportError:
            return
        report([self.out], self.out)


@torch.no_grad()
def _restore(params, original) -> None:
    for name, p in params.items():
        p.copy_(original[name])


def search(task: str, out: str | os.PathLike, *, search_config: SearchConfig | None = None,
           train_config: TrainConfig | None = None, progress: bool = True,
           stop_after: str | None = None, **options) -> dict[str, Any]:
    """Run (or resume) the lottery-ticket study of one task and seed; returns summary.json.

    options: SearchConfig or TrainConfig fields by name (e.g. method="structured",
    max_train_examples=500, seed=1337). Example:

        from sparsebert.lottery import search
        summary = search("MRPC", "runs/mrpc", method="both", seed=42)
        summary["methods"]["structured"]["subnetworks"]["good"]["retrained"]["score"]
    """
    search_fields = {f for f in SearchConfig.__dataclass_fields__}
    train_fields = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(options) - search_fields - train_fields)
    if unknown:
        raise SearchError(f"search: unknown options {unknown}")
    search_config = copy.copy(search_config or SearchConfig())
    train_config = copy.copy(train_config or TrainConfig())
    for key, value in options.items():
        setattr(search_config if key in search_fields else train_config, key, value)
    train_config.task = task
    runner = Search(search_config, train_config, out, progress, stop_after)
    try:
        return runner.run()
    except StopSearch:
        return {"status": "stopped", "out": str(out)}

