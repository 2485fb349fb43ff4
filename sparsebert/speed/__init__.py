"""Fast masked inference and honest speed measurement.

    fast = sparsebert.accelerate(model)     # compact kept heads/neurons, unpadding, CUDA graphs
    `sparsebert speed --model minilm --prune-heads 0.5 --prune-ffn 0.5`  # dense vs masked vs pruned

Modules: compact (compact weights per layer), watch (when they are stale), tokens (unpadding),
attention_core (attention over packed tokens), encoder (FastEncoder), graphs (CUDA-graph
buckets), accelerate (the public entry point), and for the `speed` command: workload (models,
masks, lengths), variants (what is timed), timing, command (flags, table, JSON).
"""

from sparsebert.speed.accelerate import AcceleratedModel, accelerate
from sparsebert.speed.compact import FastPathError
from sparsebert.speed.encoder import FastEncoder

__all__ = ["AcceleratedModel", "FastEncoder", "FastPathError", "accelerate"]
