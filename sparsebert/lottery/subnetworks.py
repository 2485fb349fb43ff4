"""Good, random and bad subnetworks of the same size (PAPER.md §3).

s-pruning (components: heads (L, H) and MLPs (L,), 1 = kept):
  random  independent Bernoulli per head and per MLP with p = the good mask's kept fraction,
          over the whole model (so it may include good components; matches size only in
          expectation). Unlike the authors' runs, one draw serves both "pruned" and
          "retrained", so the two rows compare the same subnetwork.
  bad     the same number of components as good, taken from the pruned ones; when more
          survived than were pruned, all pruned ones plus a random top-up from the good
          ones; otherwise a random subset of the pruned ones (`run_glue.py` l.772-784).
m-pruning (sparsebert.lottery.magnitude): random = global random at the same amount;
bad = remove the largest-magnitude weights (keep the smallest) at the same amount.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SUBNETWORKS = ("good", "random", "bad")


def structured_random(good: Tensor, rng: np.random.Generator) -> Tensor:
    """Bernoulli(p = kept fraction of `good`) per component, same shape, 0/1 float."""
    p = float((good != 0).float().mean())
    return torch.from_numpy((rng.random(tuple(good.shape)) < p).astype(np.float32))


def structured_bad(good: Tensor, rng: np.random.Generator) -> Tensor:
    """As many components as `good` keeps, drawn from its pruned ones first (see module
    docstring); 0/1 float of good's shape."""
    flat = (good != 0).flatten().numpy()
    kept, pruned = np.flatnonzero(flat), np.flatnonzero(~flat)
    n = len(kept)
    if n >= len(pruned):
        top_up = rng.choice(kept, n - len(pruned), replace=False) if n > len(pruned) else []
        chosen = np.concatenate([pruned, np.asarray(top_up, dtype=np.int64)])
    else:
        chosen = rng.choice(pruned, n, replace=False)
    out = np.zeros(flat.shape, dtype=np.float32)
    out[chosen.astype(np.int64)] = 1.0
    return torch.from_numpy(out).view(good.shape)


def structured_subnetworks(head_mask: Tensor, mlp_mask: Tensor, seed: int,
                           ) -> dict[str, dict[str, Tensor]]:
    """{"good" | "random" | "bad": {"head_mask": (L, H), "mlp_mask": (L,)}}, seeded."""
    rng = np.random.default_rng([seed, 2020])
    out = {"good": {"head_mask": head_mask.float(), "mlp_mask": mlp_mask.float()}}
    out["random"] = {"head_mask": structured_random(head_mask, rng),
                     "mlp_mask": structured_random(mlp_mask, rng)}
    out["bad"] = {"head_mask": structured_bad(head_mask, rng),
                  "mlp_mask": structured_bad(mlp_mask, rng)}
    return out
