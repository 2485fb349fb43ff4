"""Drop-in gated BERT blocks: SparseAttention (self-attention + output projection) and SparseMLP
(intermediate + output), usable in any model; `sparsebert.hf.patch` swaps them into Hugging Face
models. See each module's docstring for the gate conventions and the importance-scoring hooks."""

from sparsebert.nn.attention import AttentionLayout, SparseAttention, to_key_padding_mask
from sparsebert.nn.mlp import MLPLayout, SparseMLP

__all__ = ["AttentionLayout", "MLPLayout", "SparseAttention", "SparseMLP", "to_key_padding_mask"]
