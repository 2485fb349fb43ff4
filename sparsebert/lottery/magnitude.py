"""m-pruning: global magnitude masks over the eligible encoder weights (PAPER.md §2).

Eligible (from the architecture table, sparsebert/hf/structure.py): per encoder layer the
Q, K, V weights and biases, the attention-output dense weight and bias, the FFN
intermediate weight and bias and the FFN output weight. Never: embeddings, LayerNorms,
pooler, classifier, the FFN output bias.

Each step prunes 10% of the *remaining* eligible weights (torch's global L1Unstructured with
a pruning container: round(0.1 x remaining)), by magnitude over all eligible tensors at
once, on the fine-tuned weights, with no retraining between steps. Since the weights do not
change during the search, step k's mask keeps the `kept_count(total, k)` largest-magnitude
weights. Masks are {parameter name: bool tensor}; True = kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsebert.hf.structure import encoder_layers, resolve, structure_for


def _weights(linear: nn.Module | None, bias: bool = True) -> list[nn.Parameter | None]:
    """A Linear's weight (and bias); none for a part physical pruning removed (None)."""
    if linear is None:
        return []
    return [linear.weight, linear.bias] if bias else [linear.weight]


def eligible_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the m-prunable weights of an HF model, found through the model's
    row of the architecture table; names as in model.named_parameters(). On a physically
    pruned model, the projections of removed heads and MLPs are gone and not listed."""
    row = structure_for(model)
    attention, ffn = row.attention_layout, row.mlp_layout
    chosen: list[nn.Parameter | None] = []
    for layer in encoder_layers(model, row):
        block = getattr(layer, row.attention)
        self_attention = getattr(block, attention.self_attention)
        for child in (attention.query, attention.key, attention.value):
            chosen += _weights(getattr(self_attention, child))
        out = resolve(block, attention.output)
        chosen += _weights(getattr(out, attention.output_dense))
        chosen += _weights(getattr(getattr(layer, ffn.intermediate), ffn.intermediate_dense))
        down = getattr(getattr(layer, ffn.output), ffn.output_dense)
        chosen += _weights(down, bias=False)  # the FFN output bias is never pruned
    ids = {id(p) for p in chosen if p is not None}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def kept_count(total: int, steps: int, amount: float = 0.1) -> int:
    """Weights kept after `steps` steps that each prune round(amount x remaining)."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount}")
    if steps < 0 or total < 0:
        raise ValueError(f"total and steps must be >= 0, got total={total}, steps={steps}")
    kept = total
    for _ in range(steps):
        kept -= int(round(amount * kept))
    return kept


def _flat_magnitudes(params: dict[str, nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().float().abs().flatten().cpu() for p in params.values()])


def _unflatten(params: dict[str, nn.Parameter], keep: Tensor) -> dict[str, Tensor]:
    """Split a flat bool keep vector back into per-parameter masks."""
    out, start = {}, 0
    for name, p in params.items():
        out[name] = keep[start:start + p.numel()].view(p.shape).clone()
        start += p.numel()
    return out


def magnitude_order(params: dict[str, nn.Parameter], largest: bool = True) -> Tensor:
    """Flat indices of all of `params`' weights by magnitude, largest first (largest=False:
    smallest first); (total,) int64. Sort once, then cut masks with mask_from_order."""
    return torch.argsort(_flat_magnitudes(params), descending=largest, stable=True)


def mask_from_order(params: dict[str, nn.Parameter], order: Tensor, kept: int,
                    ) -> dict[str, Tensor]:
    """Keep the first `kept` weights of `order` (see magnitude_order)."""
    if not 0 <= kept <= order.numel():
        raise ValueError(f"kept must be in [0, {order.numel()}], got {kept}")
    keep = torch.zeros(order.numel(), dtype=torch.bool)
    keep[order[:kept]] = True
    return _unflatten(params, keep)


def magnitude_mask(params: dict[str, nn.Parameter], kept: int, largest: bool = True,
                   ) -> dict[str, Tensor]:
    """Keep the `kept` largest-magnitude weights over all of `params` (largest=False keeps
    the smallest ones instead: the paper's "bad" subnetwork, which removes the largest)."""
    return mask_from_order(params, magnitude_order(params, largest), kept)


def random_mask(params: dict[str, nn.Parameter], kept: int,
                generator: torch.Generator) -> dict[str, Tensor]:
    """Keep `kept` weights drawn uniformly at random over all of `params` (global, as torch's
    RandomUnstructured at the same amount)."""
    total = sum(p.numel() for p in params.values())
    if not 0 <= kept <= total:
        raise ValueError(f"kept must be in [0, {total}], got {kept}")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=generator)[:kept]] = True
    return _unflatten(params, keep)


def layer_kept_fractions(model: nn.Module, masks: dict[str, Tensor]) -> list[float]:
    """Kept fraction of the eligible weights per encoder layer, (L,) as a list; 1.0 for a layer
    with no eligible weights (nothing of it was pruned)."""
    row = structure_for(model)
    fractions = []
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in encoder_layers(model, row):
        mine = [names[id(p)] for p in layer.parameters() if names.get(id(p)) in masks]
        kept = sum(int(masks[n].sum()) for n in mine)
        total = sum(masks[n].numel() for n in mine)
        fractions.append(kept / total if total else 1.0)
    return fractions
