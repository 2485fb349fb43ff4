"""`sparsebert.accelerate(model)`: fast inference for a patched Hugging Face model.

    fast = sparsebert.accelerate(model)          # model: patched (sparsebert.patch), masks set
    logits = fast(input_ids=ids, attention_mask=mask).logits

The returned AcceleratedModel runs the model's own forward (embeddings, pooler, task head, loss
and output class are Hugging Face's), except that the encoder is a FastEncoder: compact weights
of the kept heads and neurons, padded tokens dropped once for the whole encoder, CUDA graphs on
GPU. It shares every parameter and gate with `model` (registered as `fast.model`, so `.to()`,
`.half()` and state dicts reach them under the usual names prefixed by `model.`): changing masks
with `sparsebert.set_masks(model, ...)` or weights in place is picked up on the next call; the
original weights are never modified, so masks stay reversible.

Inference only: the forward runs without gradients and refuses training mode. Outputs: what the
model returns, computed from the last hidden state, which holds zeros at padded positions (the model
itself leaves meaningless values there: a token-level loss over them must use label -100 there to
match the model's; `accelerate(model, unpad=False)` computes them as the model does);
`output_hidden_states` / `output_attentions` are not supported (use the model itself). Left-padded
batches run padded, so the pooler's first position is the model's. Any other attribute (`config`,
`device`, `dtype`, `num_labels`, `save_pretrained`, ...) is the model's own. On the CPU the encoder
keeps its large per-layer intermediates in buffers reused between calls (`fast.release_buffers()`
frees them; `reuse_buffers=False` turns that off).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsebert.checks import is_integer
from sparsebert.hf.patching import patch, sparse_blocks
from sparsebert.hf.structure import structure_for
from sparsebert.speed.compact import FastPathError
from sparsebert.speed.encoder import FastEncoder


def _encoder_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(module that owns the encoder, attribute name): the base model and 'encoder'."""
    row = structure_for(model)
    base = getattr(model, "base_model", model)
    path = row.layers.split(".")  # e.g. encoder.layer: the encoder is the first part
    if len(path) < 2 or not isinstance(getattr(base, path[0], None), nn.Module):
        raise FastPathError(f"accelerate: cannot find the encoder of {type(model).__name__}")
    return base, path[0]


def _runner(model: nn.Module, encoder: FastEncoder) -> nn.Module:
    """A view of `model` whose base model's encoder is `encoder`: shallow copies of the model
    and its base model with their own child tables; every other module (and parameter) shared."""
    base, name = _encoder_owner(model)
    new_base = copy.copy(base)
    new_base._modules = dict(base._modules)
    new_base._modules[name] = encoder
    if base is model:
        return new_base
    prefix = getattr(model, "base_model_prefix", "")
    if getattr(model, prefix, None) is not base:
        raise FastPathError(f"accelerate: {type(model).__name__}.{prefix} is not its base model")
    runner = copy.copy(model)
    runner._modules = dict(model._modules)
    runner._modules[prefix] = new_base
    return runner


def _structure_tables(model: nn.Module) -> list[dict]:
    """The child tables (`_modules`) a runner is built from: the model's, its base model's, the
    encoder's and its layer list's, and every encoder layer's."""
    base, name = _encoder_owner(model)
    encoder = base._modules[name]
    row = structure_for(model)
    layers = encoder
    for part in row.layers.split(".")[1:]:
        layers = layers._modules[part]
    tables = [model._modules, base._modules, encoder._modules, layers._modules]
    tables += [layer._modules for layer in layers._modules.values()]
    return list({id(table): table for table in tables}.values())


SPAN_LABELS = ("start_positions", "end_positions")  # question answering's loss arguments


class AcceleratedModel(nn.Module):
    """A patched HF model's forward on the fast path (see the module docstring).

    Attributes: `model` (the patched model, shared), `encoder` (the FastEncoder). Methods:
    `invalidate()` (rebuild compact weights on the next call: only needed after writes through
    `param.data`, which bypass version counters), `release_buffers()` (free the reused CPU
    buffers).
    """

    def __init__(self, model: nn.Module, *, unpad: bool = True, graphs: bool | None = None,
                 bucket: int = 256, compile: bool = False, reuse_buffers: bool = True) -> None:
        super().__init__()
        if not is_integer(bucket) or bucket < 1:
            raise ValueError(f"accelerate: 'bucket' must be an int >= 1 (the token-count "
                             f"granularity of the CUDA graph buckets), got {bucket!r}")
        for name, value in (("unpad", unpad), ("graphs", graphs), ("compile", compile),
                            ("reuse_buffers", reuse_buffers)):
            if not isinstance(value, bool) and not (name == "graphs" and value is None):
                raise ValueError(f"accelerate: {name!r} must be True or False"
                                 + (" (or None, the default: on)" if name == "graphs"
                                    else "") + f", got {value!r}")
        self.model = model
        object.__setattr__(self, "_options", {
            "unpad": unpad, "graphs": True if graphs is None else graphs, "bucket": int(bucket),
            "compile": compile, "reuse_buffers": reuse_buffers})
        self._build()
        self.train(False)

    def _build(self) -> None:
        """The FastEncoder over the model's blocks, the runner around it, and a snapshot of
        the child tables they were built from (`_structure_changed`)."""
        object.__setattr__(self, "encoder", FastEncoder(sparse_blocks(self.model),
                                                        **self._options))
        object.__setattr__(self, "_runner", _runner(self.model, self.encoder))
        object.__setattr__(self, "_tables", [(table, dict(table)) for table in
                                             _structure_tables(self.model)])

    def _structure_changed(self) -> bool:
        """True when a module of the model was replaced, added or removed since _build (a new
        classifier, pooler or embeddings, a deleted or re-patched layer): the runner and the
        encoder's blocks would still run the old ones."""
        for table, snapshot in self._tables:
            if len(table) != len(snapshot) or any(
                    table.get(name) is not module for name, module in snapshot.items()):
                return True
        return False

    @property
    def config(self):
        return self.model.config

    def __getattr__(self, name: str):
        """Parameters, buffers and submodules as nn.Module finds them; anything else is the
        wrapped model's (device, dtype, num_labels, save_pretrained, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
            return getattr(super().__getattr__("model"), name)

    def invalidate(self) -> None:
        self.encoder.invalidate()

    def release_buffers(self) -> None:
        self.encoder.release_buffers()

    def train(self, mode: bool = True) -> AcceleratedModel:
        if mode:
            raise FastPathError("accelerate: the fast path is for inference; keep the model in "
                                "eval mode (train the patched model itself)")
        self.model.eval()
        return super().train(False)

    def forward(self, *args, **kwargs):
        """The model's forward (same arguments, same output type), on the fast path."""
        for flag in ("output_hidden_states", "output_attentions"):
            asked = kwargs.get(flag)  # None: the model's config decides, as in Hugging Face
            if asked is None:
                asked = getattr(self.model.config, flag, False)
            if asked:
                where = f"{flag}=True" if kwargs.get(flag) else f"config.{flag}=True"
                raise FastPathError(f"accelerate: {where} is not supported; call the model")
        if kwargs.get("head_mask") is not None:  # transformers 5 would silently ignore it
            raise FastPathError("accelerate: the head_mask argument is not applied; set gates "
                                "with sparsebert.set_masks(model, head_mask=...) instead")
        if self.model.training:
            raise FastPathError("accelerate: the model is in training mode; call model.eval()")
        if torch.is_grad_enabled() and any(
                isinstance(value, torch.Tensor) and value.requires_grad
                for value in (*args, *kwargs.values())):
            raise FastPathError("accelerate: an input requires grad, but the fast path computes "
                                "no gradients; call the model itself")
        if self._structure_changed():
            self._build()
        # A span loss (question answering) is a softmax over every position, padding included:
        # those positions must hold the model's values, so such a call runs padded.
        every_position = any(kwargs.get(name) is not None for name in SPAN_LABELS)
        with torch.no_grad(), self.encoder.unpadding(not every_position):
            return self._runner(*args, **kwargs)


def accelerate(model: nn.Module, *, unpad: bool = True, graphs: bool | None = None,
               bucket: int = 256, compile: bool = False,
               reuse_buffers: bool = True) -> AcceleratedModel:
    """Fast inference for a Hugging Face BERT-family model (patched in place if it is not).

    model: a supported HF model (sparsebert.hf.structure), masks set with set_masks (binary or
    soft gates; per-call gate overrides are refused); it is put in eval mode.
    unpad: drop padded tokens for the whole encoder (default True).
    graphs: CUDA-graph replay per (B, S, tokens) bucket on CUDA (default on; ignored on CPU).
    bucket: token-count granularity of the graph buckets.
    compile: torch.compile the layer loop (eager by default: compile measured within noise of
        eager on CPU, after most of a minute of compiling); on CUDA it applies with
        graphs=False only (a captured graph replays the eager layer loop).
    reuse_buffers: on the CPU, keep the layers' large intermediates (the QKV, FFN and output
        projections) in buffers reused between calls instead of allocating them on every call
        (default True: 11-15% of the forward's time on the default model, B=16, S=128; the
        buffers hold about tokens * (3 * kept heads * head_dim + kept neurons + hidden) values
        of the largest batch seen); the eager layer loop only (not with compile).
    Returns an AcceleratedModel: call it like the model (same logits, no gradients).
    """
    patch(model)
    model.eval()
    return AcceleratedModel(model, unpad=unpad, graphs=graphs, bucket=bucket, compile=compile,
                            reuse_buffers=reuse_buffers)
