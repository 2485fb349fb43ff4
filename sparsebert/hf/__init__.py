"""Hugging Face integration: patch BERT-family models with gated blocks, set/read masks,
prune heads/MLPs/neurons for real, save and reload pruned models.

    model = sparsebert.hf.patch(model)                     # gates at 1: same outputs
    sparsebert.hf.set_masks(model, head_mask=hm, mlp_mask=mm)
    sparsebert.hf.prune(model)                             # same outputs, smaller layers
    sparsebert.hf.save_pruned(model, "out/pruned"); model = sparsebert.hf.load_pruned("out/pruned")

Any model whose attention goes through transformers' AttentionInterface (ELECTRA, XLM-R,
DistilBERT, Llama, Qwen2, GPT-2, ...) can instead run the "sparsebert" attention backend:

    model = AutoModel.from_pretrained(path, attn_implementation="sparsebert")
    sparsebert.hf.set_masks(model, head_mask=hm)           # (L, H) head gates
"""

from sparsebert.hf.attention_backend import (
    ATTN_IMPLEMENTATION,
    AttentionBackendError,
    register_attention_backend,
    register_on_import,
)
from sparsebert.hf.head_gates import (
    attention_modules,
    override_head_gates,
    use_sparse_attention,
    uses_sparse_attention,
)
from sparsebert.hf.masks import get_masks, set_masks, set_zero_gate_grad
from sparsebert.hf.patching import is_patched, patch, sparse_blocks
from sparsebert.hf.readout import first_token_readout, reads_first_token_only
from sparsebert.hf.serialization import (
    PrunedModelError,
    PrunedModelNotFoundError,
    load_pruned,
    save_pruned,
)
from sparsebert.hf.structure import STRUCTURES, ModelStructure, supported_model_types
from sparsebert.hf.surgery import layer_sizes, prune

register_on_import()  # attn_implementation="sparsebert", once transformers is loaded

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionBackendError",
    "STRUCTURES",
    "ModelStructure",
    "PrunedModelError",
    "PrunedModelNotFoundError",
    "attention_modules",
    "first_token_readout",
    "get_masks",
    "is_patched",
    "layer_sizes",
    "load_pruned",
    "override_head_gates",
    "patch",
    "prune",
    "reads_first_token_only",
    "register_attention_backend",
    "save_pruned",
    "set_masks",
    "set_zero_gate_grad",
    "sparse_blocks",
    "supported_model_types",
    "use_sparse_attention",
    "uses_sparse_attention",
]
