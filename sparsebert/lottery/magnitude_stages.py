"""The m-pruning stages of a search (PAPER.md §2, §3): the global magnitude search on the
fine-tuned weights, the good/random/bad weight masks, their scores on the fine-tuned model
("pruned") and the re-fine-tunes of the pre-trained weights with the mask held ("retrained",
i.e. rewinding to the pre-trained initialisation).

A mixin of sparsebert.lottery.search.Search: it uses the search's config, data and paths.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsebert.atomic import atomic_write_json
from sparsebert.errors import RunDirError
from sparsebert.lottery import magnitude as mag
from sparsebert.lottery.scoring import format_metrics, report_metric
from sparsebert.lottery.structured import full_fails_threshold
from sparsebert.pruning.weight_masks import (
    WeightMasks,
    load_weight_masks,
    mask_counts,
    save_weight_masks,
)
from sparsebert.train.loop import finetune
from sparsebert.train.resume import finished_run
from sparsebert.train.rundir import RunResult


class MagnitudeStages:
    """m-pruning: search, masks, pruned scores, retrained runs under out/magnitude/."""

    def _magnitude(self) -> None:
        self.magnitude_search_stage()
        self._stage_done("magnitude.search")
        for name in self.config.subnet_list():
            self.magnitude_pruned_stage(name)
            self._stage_done(f"magnitude.pruned.{name}")
            if self.config.retrain:
                self.magnitude_retrained_stage(name)
                self._stage_done(f"magnitude.retrained.{name}")

    # Each stage below runs alone on a prepared search (full model fine-tuned, data loaded)
    # and skips itself when its file exists; a sweep schedules them as separate units.

    def magnitude_search_stage(self) -> dict[str, Any]:
        """search.json and every subnetwork's masks/<subnet>.safetensors (+ .json)."""
        root = self.out / "magnitude"
        (root / "masks").mkdir(parents=True, exist_ok=True)
        model = self.fine_tuned_plain()
        params = mag.eligible_parameters(model)
        found = self.read_stage(root / "search.json", "magnitude search")
        if found is None:
            started = time.perf_counter()
            found = self._magnitude_search(model, params)
            found["search_time_s"] = time.perf_counter() - started
            found["precision"] = self.precision  # of every score in it
            atomic_write_json(root / "search.json", found)
        self._metrics("magnitude", found["curve"])
        kept = found["kept"]
        # Any valid seed (< 2**64): the derived seed wraps into torch's 64-bit range.
        generator = torch.Generator().manual_seed((self.train.seed * 1000 + 7) % 2**64)
        builders = {
            "good": lambda: mag.magnitude_mask(params, kept, largest=True),
            "random": lambda: mag.random_mask(params, kept, generator),
            "bad": lambda: mag.magnitude_mask(params, kept, largest=False),
        }
        for name in self.config.subnet_list():
            mask_file = root / "masks" / f"{name}.safetensors"
            # The pair is one unit (a kill can fall between the two writes): both or rebuild.
            if not mask_file.is_file() or self.read_stage(mask_file.with_suffix(".json"),
                                                             "magnitude masks") is None:
                masks = builders[name]()
                save_weight_masks(mask_file, masks)
                kept_n, total = mask_counts(masks)
                atomic_write_json(mask_file.with_suffix(".json"), {
                    "kept": kept_n, "total": total, "fraction_kept": kept_n / total,
                    "layer_kept_fraction": mag.layer_kept_fractions(model, masks),
                    "file": mask_file.name})
        return found

    def magnitude_masks(self, name: str) -> dict[str, torch.Tensor]:
        """Subnetwork `name`'s weight masks by parameter name, from its mask file."""
        path = self.out / "magnitude" / "masks" / f"{name}.safetensors"
        record = self.read_stage(path.with_suffix(".json"), "magnitude masks")
        if not path.is_file() or record is None:
            raise RunDirError(f"{path}: missing; run the magnitude search stage first")
        masks = load_weight_masks(path)
        counts = mask_counts(masks)
        if [record["kept"], record["total"]] != [*counts]:
            raise RunDirError(
                f"{path}: damaged (it keeps {counts[0]} of {counts[1]} weights, "
                f"{path.with_suffix('.json').name} records {record['kept']} of "
                f"{record['total']}); delete both to rebuild them from the search")
        return masks

    def magnitude_pruned_stage(self, name: str) -> None:
        """pruned/<name>.json: the mask on the fine-tuned weights (restored afterwards)."""
        pruned_file = self.out / "magnitude" / "pruned" / f"{name}.json"
        if pruned_file.is_file():
            return
        model = self.fine_tuned_plain()
        params = mag.eligible_parameters(model)
        original = {n: p.detach().clone() for n, p in params.items()}
        WeightMasks.from_named(model, self.magnitude_masks(name)).apply()
        try:
            score, dev = self.score(model)
        finally:
            _restore(params, original)
        pruned_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(pruned_file, {"search_score": score, "metrics": dev})
        self._log(f"m-pruning {name}: pruned dev {format_metrics(dev)}")

    def magnitude_retrained_stage(self, name: str) -> RunResult:
        """retrained/<name>/: the pre-trained weights re-fine-tuned with the mask held."""
        return self._retrain_magnitude(name, self.magnitude_masks(name))

    def _magnitude_search(self, model: torch.nn.Module, params) -> dict[str, Any]:
        total = sum(p.numel() for p in params.values())
        full_search, full_dev = self._full_scores(model)
        metric = report_metric(self.task)
        threshold = self.config.threshold * full_search
        original = {n: p.detach().clone() for n, p in params.items()}
        order = mag.magnitude_order(params)  # the weights do not change: sort once
        curve = [{"step": 0, "kept": total, "fraction_kept": 1.0, "search_score": full_search,
                  "score": float(full_dev[metric]), "passed": full_search >= threshold}]
        good_step = 0
        notes = self._notes_on_threshold(full_dev, threshold)
        if full_search < threshold:  # the authors' loop tests the full model's score first
            notes.append(full_fails_threshold(full_search, threshold))
        steps = range(1, self.config.magnitude_max_steps + 1) if curve[0]["passed"] else ()
        bar = tqdm(steps, desc="m-pruning", unit="step", disable=not self.progress,
                   leave=False)
        for step in bar:
            kept = mag.kept_count(total, step, self.config.magnitude_amount)
            WeightMasks.from_named(model, mag.mask_from_order(params, order, kept)).apply()
            try:
                score, dev = self.score(model)
            finally:  # the fine-tuned model is shared by later stages (and a sweep's retries)
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
                "fraction_kept": kept / total, "curve": curve, "notes": notes}

    def _retrain_magnitude(self, name: str, masks: dict[str, torch.Tensor]) -> RunResult:
        run_dir = self.out / "magnitude" / "retrained" / name
        done = finished_run(run_dir)
        if done is not None:
            return done
        self._log(f"m-pruning {name}: re-fine-tuning the pre-trained weights, mask held")
        model, tokenizer = self._pretrained()  # rewinding: the mask goes on pre-trained weights
        pairs = WeightMasks.from_named(model, masks).masks
        return self._finished(finetune(self.train, run_dir, model=model, tokenizer=tokenizer,
                                       weight_masks=pairs, progress=self.progress))


@torch.no_grad()
def _restore(params, original) -> None:
    for name, p in params.items():
        p.copy_(original[name])
