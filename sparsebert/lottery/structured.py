"""s-pruning: the iterative head + MLP search of PAPER.md §1.3 (authors' `mask_heads_mlps`).

Starting from the fine-tuned full model (all gates 1):

  phase 1  mask the `head_step` lowest-importance unmasked heads and the lowest-importance
           unmasked MLP, recompute importance and the search score under the new masks;
           continue while score >= threshold, else revert to the last passing masks. The
           phase ends as soon as no head or no MLP is left to mask, keeping the last passing
           head and MLP masks (both from the same step);
  phase 2  from there, `head_step // 2` heads per step, MLPs fixed; revert on failure;
  phase 3  one MLP per step, heads fixed; revert on failure.

`head_step` = max(1, int(num_heads_total * masking_amount)): 14 of 144 heads for BERT-base,
7 of 72 for the default model. Phase 2 masks max(1, head_step // 2) heads per step (the
authors' `num_to_mask // 2` is 0 below 20 heads, which skips phase 2; only tiny models differ).
Quirk kept from the authors' code: the first step of phases 2 and 3 ranks components by the
importance computed under the previous phase's *failed* mask (the masks are reverted, the scores
are not). The heads that failed step had masked are live again and ranked by their true scores
under that mask, so `importance` must score masked components (the search's importance does:
score_masked_heads=True), not give them 0; importance mode michel scores masked heads 0, so the
search refuses it without recompute_after_revert. One difference remains: when the failed step
masked the last heads of a layer, those heads score 0 here (the layer is LayerNorm(residual), no
gate reaches it) and are masked first, where the authors' masked layer keeps the attention
output's bias and their heads a gradient. `recompute_after_revert=True` recomputes the scores
under the reverted masks instead (a documented deviation, off by default). Likewise a step's dev
score: a layer with every head masked is scored as physically pruned, without the attention
output's bias (sparsebert.nn.attention's convention), where the authors' masked model keeps that
bias; the search can then stop at another step when a step empties a layer.

The search is model-agnostic: it calls `evaluate(head_mask, mlp_mask) -> (score, report)`
and `importance(head_mask, mlp_mask) -> (head (L, H), mlp (L,))`, so the schedule is tested
on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

Evaluate = Callable[[Tensor, Tensor], tuple[float, float]]
Importance = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class StructuredResult:
    """The good masks and the search curve.

    head_mask (L, H), mlp_mask (L,): 0/1 float. curve: one record per evaluated step:
    {"phase", "step", "heads_kept", "mlps_kept", "search_score", "score", "passed"}, phase 0
    being the full model. notes: what the search decided in unusual cases.
    """

    head_mask: Tensor
    mlp_mask: Tensor
    curve: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def head_step_size(num_heads_total: int, masking_amount: float) -> int:
    """Heads masked per phase-1 step: max(1, int(total * amount)) (authors' num_to_mask)."""
    return max(1, int(num_heads_total * masking_amount))


def lowest_unmasked(scores: Tensor, mask: Tensor, count: int) -> Tensor:
    """Flat indices of the `count` lowest-scoring entries with mask == 1 (ties: lower index
    first). scores, mask: same shape; returns (min(count, unmasked),) int64."""
    flat_scores, flat_mask = scores.flatten().double(), mask.flatten()
    candidates = torch.nonzero(flat_mask != 0).flatten()
    if count <= 0 or len(candidates) == 0:
        return candidates[:0]
    order = torch.argsort(flat_scores[candidates], stable=True)
    return candidates[order[:count]]


def _masked(mask: Tensor, indices: Tensor) -> Tensor:
    out = mask.clone().flatten()
    out[indices] = 0
    return out.view_as(mask)


def full_fails_threshold(full_score: float, threshold: float) -> str:
    """The note of a search that pruned nothing: its full model fails its own threshold (a
    negative score, e.g. a Matthews correlation below 0, lies below any fraction of itself;
    else the threshold asked for more than the full model's score)."""
    why = (", as a negative score lies below any fraction of itself" if full_score < 0
           else "")
    return (f"the full model's search score ({full_score:.4f}) is below the threshold "
            f"({threshold:.4f}){why}: nothing was pruned (the authors' loops test the full "
            f"model's score before the first step)")


def structured_search(num_layers: int, num_heads: int, threshold: float, full_score: float,
                      evaluate: Evaluate, importance: Importance, masking_amount: float = 0.1,
                      recompute_after_revert: bool = False, progress: bool = True,
                      full_report_score: float | None = None,
                      kept_fraction: Callable[[int, int], float] | None = None,
                      ) -> StructuredResult:
    """Run phases 1-3 and return the last passing masks (see the module docstring).

    threshold: the absolute search score a step must reach (e.g. 0.9 x full_score).
    evaluate(head_mask, mlp_mask) -> (search_score, report_score).
    importance(head_mask, mlp_mask) -> (head scores (L, H), MLP scores (L,)).
    kept_fraction(heads kept, MLPs kept) -> the kept fraction of the s-prunable parameters,
    shown on the progress bar (`kept_fraction` below with the model's sizes).
    """
    head_mask = torch.ones(num_layers, num_heads)
    mlp_mask = torch.ones(num_layers)
    head_step = head_step_size(num_layers * num_heads, masking_amount)
    curve: list[dict[str, Any]] = [{
        "phase": 0, "step": 0, "heads_kept": num_layers * num_heads, "mlps_kept": num_layers,
        "search_score": full_score,
        "score": full_score if full_report_score is None else full_report_score,
        "passed": full_score >= threshold}]
    notes: list[str] = []
    if full_score < threshold:  # the authors' loop tests the full model's score first
        notes.append(full_fails_threshold(full_score, threshold))
        return StructuredResult(head_mask, mlp_mask, curve, notes)
    head_scores, mlp_scores = importance(head_mask, mlp_mask)
    bar = tqdm(desc="s-pruning", unit="step", disable=not progress, leave=False)
    phases = ((1, head_step, 1), (2, max(1, head_step // 2), 0), (3, 0, 1))
    for phase, heads_per_step, mlps_per_step in phases:
        if phase > 1 and recompute_after_revert:
            head_scores, mlp_scores = importance(head_mask, mlp_mask)
        step = 0
        while True:
            # Step 1: mask the lowest-importance unmasked components of this phase.
            heads = lowest_unmasked(head_scores, head_mask, heads_per_step)
            mlps = lowest_unmasked(mlp_scores, mlp_mask, mlps_per_step)
            exhausted = [name for name, wanted, found in (("heads", heads_per_step, heads),
                                                          ("MLPs", mlps_per_step, mlps))
                         if wanted and len(found) == 0]
            if exhausted:
                notes.append(f"phase {phase}: no {exhausted[0]} left to mask")
                break
            new_heads, new_mlps = _masked(head_mask, heads), _masked(mlp_mask, mlps)
            # Step 2: importance and score under the new masks.
            head_scores, mlp_scores = importance(new_heads, new_mlps)
            search_score, report_score = evaluate(new_heads, new_mlps)
            step += 1
            passed = search_score >= threshold
            curve.append({"phase": phase, "step": step,
                          "heads_kept": int(new_heads.sum()), "mlps_kept": int(new_mlps.sum()),
                          "search_score": search_score, "score": report_score,
                          "passed": bool(passed)})
            bar.update(1)
            kept = ({} if kept_fraction is None else
                    {"kept": f"{kept_fraction(int(new_heads.sum()), int(new_mlps.sum())):.3f}"})
            bar.set_postfix(phase=phase, heads=int(new_heads.sum()), mlps=int(new_mlps.sum()),
                            **kept, score=f"{search_score:.4f}")
            # Step 3: keep on success, revert (stop the phase) on failure.
            if not passed:
                break
            head_mask, mlp_mask = new_heads, new_mlps
    bar.close()
    return StructuredResult(head_mask, mlp_mask, curve, notes)


def component_fractions(heads_kept: int, mlps_kept: int, heads_total: int, mlps_total: int,
                        hidden: int, head_dim: int, intermediate: int) -> float:
    """Kept fraction of the s-prunable parameters (a head: its Q/K/V rows and biases and its
    attention-output columns, 4*hidden*D + 3*D; an MLP: 2*hidden*F + F + hidden)."""
    per_head = 4 * hidden * head_dim + 3 * head_dim
    per_mlp = 2 * hidden * intermediate + intermediate + hidden
    total = heads_total * per_head + mlps_total * per_mlp
    return (heads_kept * per_head + mlps_kept * per_mlp) / total


def kept_fraction(heads_kept: int, mlps_kept: int, sizes: dict[str, int]) -> float:
    """component_fractions with the model sizes a search records: {"layers", "heads",
    "hidden", "head_dim", "intermediate"}."""
    return component_fractions(heads_kept, mlps_kept, sizes["layers"] * sizes["heads"],
                               sizes["layers"], sizes["hidden"], sizes["head_dim"],
                               sizes["intermediate"])
