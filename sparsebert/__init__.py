"""sparsebert: a C++/CUDA-accelerated pruning toolkit for BERT-family transformers."""

from sparsebert import ops
from sparsebert.ops import masked_attention

__version__ = "0.1.0"

__all__ = ["ops", "masked_attention", "__version__"]
