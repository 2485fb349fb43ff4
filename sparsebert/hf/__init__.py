"""Hugging Face integration: patch BERT-family models with gated blocks, set/read masks,
prune heads/MLPs/neurons for real, save and reload pruned models.

    model = sparsebert.hf.patch(model)                     # gates at 1: same outputs
    sparsebert.hf.set_masks(model, head_mask=hm, mlp_mask=mm)
    sparsebert.hf.prune(model)                             # same outputs, smaller layers
    sparsebert.hf.save_pruned(model, "out/pruned"); model = sparsebert.hf.load_pruned("out/pruned")
"""

from sparsebert.hf.masks import get_masks, set_masks
from sparsebert.hf.patching import is_patched, patch, sparse_blocks
from sparsebert.hf.serialization import (
    PrunedModelError,
    PrunedModelNotFoundError,
    load_pruned,
    save_pruned,
)
from sparsebert.hf.structure import STRUCTURES, ModelStructure, supported_model_types
from sparsebert.hf.surgery import layer_sizes, prune

__all__ = [
    "STRUCTURES",
    "ModelStructure",
    "PrunedModelError",
    "PrunedModelNotFoundError",
    "get_masks",
    "is_patched",
    "layer_sizes",
    "load_pruned",
    "patch",
    "prune",
    "save_pruned",
    "set_masks",
    "sparse_blocks",
    "supported_model_types",
]
