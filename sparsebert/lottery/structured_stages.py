"""The s-pruning stages of a search (PAPER.md §1, §3): the head/MLP search on the fine-tuned
model, the good/random/bad masks, their scores on the fine-tuned model ("pruned") and their
re-fine-tunes from the pre-trained model, physically pruned ("retrained").

A mixin of sparsebert.lottery.search.Search: it uses the search's config, data and paths.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sparsebert.atomic import atomic_write_json
from sparsebert.errors import RunDirError
from sparsebert.hf.masks import set_masks
from sparsebert.hf.patching import patch, sparse_blocks
from sparsebert.hf.structure import config_size, structure_for
from sparsebert.hf.surgery import prune
from sparsebert.lottery.scoring import format_metrics, report_metric
from sparsebert.lottery.stage_files import stage_masks
from sparsebert.lottery.structured import kept_fraction, structured_search
from sparsebert.lottery.subnetworks import structured_subnetworks
from sparsebert.pruning.importance import importance
from sparsebert.train.loop import finetune
from sparsebert.train.resume import finished_run
from sparsebert.train.rundir import RunResult


class StructuredStages:
    """s-pruning: search, masks, pruned scores, retrained runs under out/structured/."""

    def _structured(self) -> None:
        self.structured_search_stage()
        self._stage_done("structured.search")
        for name in self.config.subnet_list():
            self.structured_pruned_stage(name)
            self._stage_done(f"structured.pruned.{name}")
            if self.config.retrain:
                self.structured_retrained_stage(name)
                self._stage_done(f"structured.retrained.{name}")

    # Each stage below runs alone on a prepared search (full model fine-tuned, data loaded)
    # and skips itself when its file exists; a sweep schedules them as separate units.

    def structured_search_stage(self) -> dict[str, Any]:
        """search.json and every subnetwork's masks/<subnet>.json; returns search.json."""
        root = self.out / "structured"
        found = self.read_stage(root / "search.json", "structured search")
        if found is None:
            started = time.perf_counter()
            found = self._structured_search(self.fine_tuned_patched())
            found["search_time_s"] = time.perf_counter() - started
            found["precision"] = self.precision  # of every score in it
            (root / "masks").mkdir(parents=True, exist_ok=True)
            atomic_write_json(root / "search.json", found)
        self._metrics("structured", found["curve"])
        good = (torch.tensor(found["head_mask"], dtype=torch.float32),  # (L, H); 0/1 integers too
                torch.tensor(found["mlp_mask"], dtype=torch.float32))  # (L,)
        subnets = structured_subnetworks(*good, seed=self.train.seed)
        for name in self.config.subnet_list():
            mask_file = root / "masks" / f"{name}.json"
            if not mask_file.is_file():
                atomic_write_json(mask_file, {k: v.tolist() for k, v in subnets[name].items()})
        return found

    def structured_masks(self, name: str) -> dict[str, torch.Tensor]:
        """Subnetwork `name`'s head_mask (L, H) and mlp_mask (L,) from its mask file."""
        root = self.out / "structured"
        path = root / "masks" / f"{name}.json"
        masks = self.read_stage(path, "structured masks")
        found = self.read_stage(root / "search.json", "structured search")
        if masks is None or found is None:
            raise RunDirError(f"{path}: missing; run the structured search stage first")
        sizes = found["sizes"]
        return stage_masks(path, masks, (sizes["layers"], sizes["heads"]))

    def structured_pruned_stage(self, name: str) -> None:
        """pruned/<name>.json: the mask on the fine-tuned model."""
        self.evaluate_structured(self.fine_tuned_patched(), self.structured_masks(name),
                                 self.out / "structured" / "pruned" / f"{name}.json",
                                 f"s-pruning {name}")

    def structured_retrained_stage(self, name: str) -> RunResult:
        """retrained/<name>/: the mask on the pre-trained model, re-fine-tuned."""
        return self._retrain_structured(name, self.structured_masks(name))

    def evaluate_structured(self, model: torch.nn.Module, masks: dict[str, torch.Tensor],
                            path: Path, label: str) -> None:
        """Dev metrics of the patched fine-tuned `model` under `masks`, into `path` (once)."""
        if path.is_file():
            return
        set_masks(model, head_mask=masks["head_mask"], mlp_mask=masks["mlp_mask"])
        score, dev = self.score(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"search_score": score, "metrics": dev})
        self._log(f"{label}: pruned dev {format_metrics(dev)}")

    def _structured_search(self, model: torch.nn.Module) -> dict[str, Any]:
        row = structure_for(model)
        layers, heads = len(sparse_blocks(model)), config_size(model, row, "num_heads")
        full_search, full_dev = self._full_scores(model)
        metric = report_metric(self.task)
        threshold = self.config.threshold * full_search
        self._log(f"s-pruning: full search score {full_search:.4f}, threshold {threshold:.4f}")

        def evaluate(head_mask, mlp_mask):
            set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
            score, dev = self.score(model)
            return score, float(dev[metric])

        def scores(head_mask, mlp_mask):
            # Masked heads keep their true score: the search never picks them again, except in
            # the first step of phases 2 and 3, which ranks the previous phase's failed step's
            # heads by it, as the authors' code does (structured.py).
            set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
            imp = importance(model, self.data.importance_batches,
                             mode=self.config.importance_mode,
                             precision=self.config.importance_precision, progress=False,
                             score_masked_heads=True)
            return imp.head, imp.mlp

        sizes = {"hidden": config_size(model, row, "hidden_size"), "head_dim":
                 config_size(model, row, "hidden_size") // heads,
                 "intermediate": config_size(model, row, "intermediate_size"),
                 "layers": layers, "heads": heads}

        def fraction(heads_kept: int, mlps_kept: int) -> float:
            return kept_fraction(heads_kept, mlps_kept, sizes)

        result = structured_search(layers, heads, threshold, full_search, evaluate, scores,
                                   self.config.masking_amount,
                                   self.config.recompute_after_revert, self.progress,
                                   full_report_score=float(full_dev[metric]),
                                   kept_fraction=fraction)

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
        done = finished_run(run_dir)
        if done is not None:
            return done
        self._log(f"{label}: re-fine-tuning the pre-trained model, pruned")
        model, tokenizer = self._pretrained()
        patch(model)
        set_masks(model, head_mask=masks["head_mask"], mlp_mask=masks["mlp_mask"])
        prune(model)  # s-pruning masks are applied by physically removing heads and MLPs
        return self._finished(finetune(self.train, run_dir, model=model, tokenizer=tokenizer,
                                       progress=self.progress))
