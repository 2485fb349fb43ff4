"""Tokenize once, then length-bucketed dynamic-padding batches.

Training order (`train_batches`), deterministic in (seed, epoch):
  1. shuffle all N example indices;
  2. cut the shuffled list into pools of `bucket_batches * batch_size` examples;
  3. sort each pool by token length (stable, so ties keep the shuffled order);
  4. cut each pool into batches of `batch_size` and shuffle the order of all batches.
Each batch then holds examples of similar length and is padded only to its own longest row,
which wastes far fewer tokens than fixed padding to max_length. Batch count per epoch is
ceil(N / batch_size) in every mode; only the last batch of an epoch can be smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparsebert.checks import is_integer
from sparsebert.glue.loading import GlueData


@dataclass
class Encoded:
    """A tokenized split.

    input_ids / token_type_ids: N lists of token ids (unpadded, truncated to max_length);
    token_type_ids is None for tokenizers without segments (RoBERTa).
    labels: (N,) int64 or float32. lengths: (N,) int64 token counts.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray
    lengths: np.ndarray
    pad_token_id: int
    max_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(data: GlueData, tokenizer, max_length: int = 128) -> Encoded:
    """Tokenize every row of `data` once (truncating pairs longest-first to max_length)."""
    _check_integer("encode", "max_length", max_length, 8)
    if not callable(tokenizer):
        raise ValueError(f"encode: 'tokenizer' must be a Hugging Face tokenizer, got "
                         f"{type(tokenizer).__name__}")
    pair = data.texts[1] if len(data.texts) > 1 else None
    enc = tokenizer(data.texts[0], pair, truncation=True, max_length=max_length,
                    padding=False, return_attention_mask=False)
    input_ids = [list(ids) for ids in enc["input_ids"]]
    token_type_ids = enc.get("token_type_ids")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=len(input_ids))
    return Encoded(input_ids, [list(t) for t in token_type_ids] if token_type_ids else None,
                   data.labels, lengths, int(pad), max_length)


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch: ceil(n / batch_size)."""
    return math.ceil(n / batch_size)


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int = 0,
                  bucket: bool = True, bucket_batches: int = 50) -> list[np.ndarray]:
    """Index arrays (B_i,) of one training epoch; see the module docstring for the algorithm.

    bucket=False gives plain shuffled batches. Same (seed, epoch) -> same batches.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("bucket_batches", bucket_batches, 1),
                             ("seed", seed, 0), ("epoch", epoch, 0)):
        _check_integer("train_batches", name, value, low)
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)  # Step 1
    if not bucket:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    pool = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, n, pool):  # Step 2
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # Step 3
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # Step 4: shuffle batch order, but keep the single partial batch (if any) last so every
    # other batch is full, as without bucketing.
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) != batch_size]
    permutation = rng.permutation(len(full))
    return [full[i] for i in permutation] + partial


def _check_integer(function: str, name: str, value: object, low: int) -> None:
    """ValueError naming `name` unless `value` is an integer (not a bool) >= `low`."""
    if not is_integer(value) or value < low:
        raise ValueError(f"{function}: {name!r} must be an integer >= {low}, got {value!r}")


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Index arrays covering all N examples once, longest first (minimal padding)."""
    _check_integer("eval_batches", "batch_size", batch_size, 1)
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_width(encoded: Encoded, lengths: np.ndarray, padding: str = "dynamic",
                pad_to_multiple_of: int | None = None) -> int:
    """The padded width S of a batch whose rows have `lengths` (see collate)."""
    if padding == "max_length":
        return encoded.max_length
    if padding != "dynamic":
        raise ValueError(f"padding must be 'dynamic' or 'max_length', got {padding!r}")
    if pad_to_multiple_of is not None:
        _check_integer("collate", "pad_to_multiple_of", pad_to_multiple_of, 1)
    if len(lengths) == 0:
        raise ValueError("collate: 'indices' is empty (a batch needs at least one example)")
    width = int(lengths.max())
    if pad_to_multiple_of:
        width = min(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of,
                    max(encoded.max_length, width))
    return width


def collate(encoded: Encoded, indices: np.ndarray, padding: str = "dynamic",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the examples at `indices` into tensors.

    padding: "dynamic" pads to the longest row of the batch (rounded up to a multiple of
    pad_to_multiple_of), "max_length" pads to encoded.max_length (the fixed-128 baseline).
    Returns input_ids, attention_mask (and token_type_ids) (B, S) int64, labels (B,), and
    index (B,) the example indices (to put eval predictions back in order).
    """
    lengths = encoded.lengths[indices]
    width = batch_width(encoded, lengths, padding, pad_to_multiple_of)
    batch_size = len(indices)
    input_ids = torch.full((batch_size, width), encoded.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    token_type_ids = torch.zeros((batch_size, width), dtype=torch.long)
    for row, i in enumerate(indices):
        length = int(encoded.lengths[i])
        input_ids[row, :length] = torch.as_tensor(encoded.input_ids[i])
        attention_mask[row, :length] = 1
        if encoded.token_type_ids is not None:
            token_type_ids[row, :length] = torch.as_tensor(encoded.token_type_ids[i])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "labels": torch.as_tensor(encoded.labels[indices]),
             "index": torch.as_tensor(np.asarray(indices), dtype=torch.long)}
    if encoded.token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    return batch


def padding_stats(encoded: Encoded, batches: list[np.ndarray], padding: str = "dynamic",
                  pad_to_multiple_of: int | None = None) -> dict[str, float]:
    """Real vs padded token counts of a list of batches, padded as collate pads them:
    {"real", "padded", "efficiency"}."""
    real = int(encoded.lengths.sum())
    padded = 0
    for b in batches:
        padded += batch_width(encoded, encoded.lengths[b], padding, pad_to_multiple_of) * len(b)
    return {"real": real, "padded": padded, "efficiency": real / max(padded, 1)}
