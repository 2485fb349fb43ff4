"""sparsebert: a C++/CUDA-accelerated pruning toolkit for BERT-family transformers."""

from sparsebert._command import package_import

with package_import():  # (for the `sparsebert` command: its own errors, warnings and Ctrl-C)
    from sparsebert import hf, nn, ops
    from sparsebert.hf import (
        get_masks,
        load_pruned,
        patch,
        prune,
        save_pruned,
        set_masks,
        use_sparse_attention,
    )
    from sparsebert.ops import group_dot, masked_attention
    from sparsebert.pruning import Importance, importance
    from sparsebert.speed import accelerate

__version__ = "0.1.0"

__all__ = [
    "Importance",
    "__version__",
    "accelerate",
    "get_masks",
    "group_dot",
    "hf",
    "importance",
    "load_pruned",
    "masked_attention",
    "nn",
    "ops",
    "patch",
    "prune",
    "save_pruned",
    "set_masks",
    "use_sparse_attention",
]
