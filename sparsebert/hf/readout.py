"""The last layer at the first position only, where the task head reads nothing else.

A sequence classifier of the BERT family (BertForSequenceClassification and its kin: the row's
`first_token_classifier` in sparsebert.hf.structure) reads the last encoder layer at position 0
only: the pooler or classification head takes hidden[:, 0]. The other S - 1 rows of that layer
are computed and thrown away. Within `first_token_readout(model)` the last layer's patched blocks
compute position 0 only (`output_rows = 1`), its keys and values still covering the whole
sequence:

    with sparsebert.hf.first_token_readout(model):
        logits = model(**batch).logits        # the same logits, loss and gradients

* evaluation (no gradients) and importance scoring (eval mode): the last layer's query, output
  and FFN products, its attention and its LayerNorms run on one row instead of S (a 6-layer
  model does about 14% less work);
* training: the SparseMLP runs on one row; the attention block computes every row, so that its
  dropout draws what it draws without the readout, and the SparseMLP's dropout runs at full
  size (on zero padding): the same random numbers, the same masks at position 0.

Logits, losses and gradients are those of the full computation up to rounding (a product over
fewer rows may round differently). The last hidden state inside the block is (B, 1, hidden):
code that reads every position of it (output_hidden_states, a token-level hook on the last layer)
sees one row. sparsebert's own loops use it (training, evaluation, importance other than the
per-token `michel` mode); SPARSEBERT_FULL_LAST_LAYER=1 turns it off everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from sparsebert.hf.patching import is_patched, sparse_blocks
from sparsebert.hf.structure import STRUCTURES
from sparsebert.overrides import override_attributes
from sparsebert.switches import env_switch

FULL_LAST_LAYER_ENV = "SPARSEBERT_FULL_LAST_LAYER"


def reads_first_token_only(model: nn.Module) -> bool:
    """Whether `model` is transformers' own sequence classifier of a supported type (exactly
    that class, not a subclass that may read other positions), patched, and without chunked
    feed-forward layers (config.chunk_size_feed_forward > 1 cuts the sequence into chunks of
    that many rows, which one row is not)."""
    config = getattr(model, "config", None)
    row = STRUCTURES.get(getattr(config, "model_type", None))
    if row is None or row.first_token_classifier is None:
        return False
    if (getattr(config, "chunk_size_feed_forward", 0) or 0) > 1:
        return False
    cls = type(model)
    if cls.__name__ != row.first_token_classifier or not cls.__module__.startswith(
            "transformers.models."):
        return False
    return is_patched(model)  # every layer's blocks, the last one's included


@contextlib.contextmanager
def first_token_readout(model: nn.Module) -> Iterator[bool]:
    """Within the block, the last layer of `model` computes position 0 only where the task head
    reads nothing else (`reads_first_token_only`); yields whether it does (False: the model runs
    as is; also with SPARSEBERT_FULL_LAST_LAYER=1). The blocks' settings are restored on exit,
    even on error; blocks nest."""
    if env_switch(FULL_LAST_LAYER_ENV) or not reads_first_token_only(model):
        yield False
        return
    attention, mlp = sparse_blocks(model)[-1]
    with override_attributes(attention, output_rows=1), override_attributes(mlp, output_rows=1):
        yield True
