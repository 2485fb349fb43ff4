"""Gate overrides under Hugging Face gradient checkpointing: the backward pass computes each
checkpointed layer again, and must do so with the gates its forward used, wherever backward()
is called (inside the override block, after it, or under another override).

The independent reference is the same model without checkpointing, whose autograd graph holds
the gates of the forward: its gradients (of the gates and of every parameter) must be matched.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch

import sparsebert
from sparsebert.hf import override_head_gates, use_sparse_attention
from sparsebert.hf.checkpoint_replay import CHECKPOINT_FUNC, ReplayingCheckpoint

# (L, H) gates for the 3 x 4 tiny models: soft gates, a pruned head, a layer all pruned.
GATES_A = [[1.0, 0.0, 0.5, 0.8], [0.0, 0.0, 0.0, 0.0], [0.3, 1.0, 0.0, 0.7]]
GATES_B = [[0.2, 0.9, 1.0, 0.0], [1.0, 0.4, 0.6, 0.1], [0.0, 0.5, 1.0, 1.0]]
KEPT_HEADS = [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]]


def _enable_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _models(tiny_bert, kind: str, reentrant: bool):
    """(checkpointed, plain): two copies of one tiny gated BERT in training mode (no dropout,
    so the two forwards compute the same thing), `kind` "backend", "patched", or "pruned"
    (patched, with heads removed so that each layer keeps ids that are not one run)."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = use_sparse_attention(model) if kind == "backend" else sparsebert.patch(model)
    if kind == "pruned":
        sparsebert.set_masks(model, head_mask=torch.tensor(KEPT_HEADS))
        sparsebert.prune(model)
    plain = copy.deepcopy(model).train()
    checkpointed = model.train()
    _enable_checkpointing(checkpointed, reentrant)
    return checkpointed, plain


def _leaf(rows) -> torch.Tensor:
    return torch.tensor(rows, requires_grad=True)


def _loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


def _grads(model, *gates) -> list[torch.Tensor]:
    params = [p.grad for p in model.parameters() if p.grad is not None]  # (fresh models: the
    # first scenario runs no override block before its forward)
    assert params, "no parameter received a gradient"
    return [g.grad for g in gates] + params


def _assert_same_grads(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        # tolerance relative to the largest entry: a tiny model's gradients are small
        torch.testing.assert_close(g, w, atol=1e-5 * float(w.abs().max()), rtol=1e-4)


def _scenario(model, batch, name: str) -> list[torch.Tensor]:
    """Runs scenario `name` on `model`; returns the gradients of the gates and parameters."""
    a, b = _leaf(GATES_A), _leaf(GATES_B)
    if name == "forward outside any block, backward in one":
        loss = _loss(model, batch)
        with override_head_gates(model, b.detach()):
            loss.backward()
        return _grads(model)
    if name == "backward after the block":
        with override_head_gates(model, a):
            loss = _loss(model, batch)
        loss.backward()
        return _grads(model, a)
    if name == "backward under another override":
        with override_head_gates(model, a):
            loss = _loss(model, batch)
            with override_head_gates(model, b.detach()):
                loss.backward()
        return _grads(model, a)
    if name == "two overrides, one backward":
        with override_head_gates(model, a):
            loss_a = _loss(model, batch)
        with override_head_gates(model, b):
            loss_b = _loss(model, batch)
        (loss_a + 2 * loss_b).backward()
        return _grads(model, a, b)
    if name == "nested blocks, backward after both":
        with override_head_gates(model, a):
            loss_a = _loss(model, batch)
            with override_head_gates(model, b):
                loss_b = _loss(model, batch)
            loss_a2 = _loss(model, batch)
        (loss_a + loss_b + 3 * loss_a2).backward()
        return _grads(model, a, b)
    raise AssertionError(name)


SCENARIOS = ["forward outside any block, backward in one", "backward after the block", "backward under another override",
             "two overrides, one backward", "nested blocks, backward after both"]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["backend", "patched", "pruned"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_checkpointed_backward_uses_the_forward_gates(scenario, kind, reentrant, tiny_bert,
                                                     tiny_batches):
    checkpointed, plain = _models(tiny_bert, kind, reentrant)
    batch = tiny_batches(num_batches=1)[0]
    want = _scenario(plain, batch, scenario)
    got = _scenario(checkpointed, batch, scenario)
    _assert_same_grads(got, want)


@pytest.mark.parametrize("kind", ["backend", "patched", "pruned"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_and_pickles_replay_their_own_modules(how, kind, tiny_bert, tiny_batches):
    """A deep copy or a pickle of a checkpointed model, taken after a block's forward (its
    layers replaying) or before any forward, replays its own modules: a forward outside any
    block with backward inside one gives the uncheckpointed gradients, and the original is
    untouched by the copy's recomputation."""
    checkpointed, plain = _models(tiny_bert, kind, reentrant=False)
    checkpointed.disable_input_require_grads()  # (transformers' own hook does not pickle)
    batch = tiny_batches(num_batches=1)[0]
    duplicate = copy.deepcopy if how == "deepcopy" else (lambda m: pickle.loads(pickle.dumps(m)))
    fresh = duplicate(checkpointed)
    with override_head_gates(checkpointed, _leaf(GATES_A)):
        _loss(checkpointed, batch)
    after = duplicate(checkpointed)
    wrapped = [m.__dict__[CHECKPOINT_FUNC] for m in after.modules()
               if isinstance(m.__dict__.get(CHECKPOINT_FUNC), ReplayingCheckpoint)]
    assert wrapped and all(module in set(after.modules())
                           for wrapper in wrapped for module, _ in wrapper.gated)
    want = _scenario(plain, batch, "forward outside any block, backward in one")
    for model_copy in (fresh, after):
        _assert_same_grads(_scenario(model_copy, batch, "forward outside any block, "
                                     "backward in one"), want)
    assert all(p.grad is None for p in checkpointed.parameters())


def test_a_first_forward_through_the_base_model_is_replayed(tiny_bert, tiny_batch):
    """model.bert(...) called directly, first forward of a fresh checkpointed model, backward
    after the block: the gates of the forward."""
    checkpointed, plain = _models(tiny_bert, "backend", reentrant=False)
    ids, mask = tiny_batch()
    grads = []
    for model in (plain, checkpointed):
        gates = _leaf(GATES_A)
        with override_head_gates(model, gates):
            loss = model.bert(ids, attention_mask=mask).last_hidden_state.pow(2).sum()
        loss.backward()
        grads.append(_grads(model, gates))
    _assert_same_grads(grads[1], grads[0])


def test_checkpointing_set_again_inside_a_block_stays(tiny_bert, tiny_batches):
    """Checkpointing turned on again inside a block (another setting) is the model's after the
    block, and a later block replays with it."""
    checkpointed, plain = _models(tiny_bert, "patched", reentrant=False)
    batch = tiny_batches(num_batches=1)[0]
    with override_head_gates(checkpointed, _leaf(GATES_A)):
        _enable_checkpointing(checkpointed, reentrant=True)
        layer = checkpointed.bert.encoder.layer[0]
        set_inside = layer.__dict__[CHECKPOINT_FUNC]
    assert layer.__dict__[CHECKPOINT_FUNC] is set_inside
    want = _scenario(plain, batch, "backward after the block")
    got = _scenario(checkpointed, batch, "backward after the block")
    _assert_same_grads(got, want)
    assert layer.__dict__[CHECKPOINT_FUNC].inner is set_inside


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_checkpointed_model_in_one_graph(reentrant, tiny_bert, tiny_batches):
    """torch.compile(fullgraph=True) of a checkpointed model on the backend, called inside
    override blocks with backward after them: one graph, compiled once, gradients of the
    uncompiled model."""
    checkpointed, plain = _models(tiny_bert, "backend", reentrant)
    checkpointed.config.use_cache = False  # (transformers' warning about it breaks the graph)
    checkpointed.config.problem_type = "single_label_classification"  # (else set by the first
    # forward: a recompilation that is not the gates')
    batch = tiny_batches(num_batches=1)[0]
    torch._dynamo.reset()
    compiled = torch.compile(checkpointed, fullgraph=True, backend="aot_eager")
    graphs = []
    for gates in (GATES_A, GATES_B):
        for model in (checkpointed, plain):
            model.zero_grad()
        want_gate, got_gate = _leaf(gates), _leaf(gates)
        with override_head_gates(plain, want_gate):
            want = _loss(plain, batch)
        with override_head_gates(checkpointed, got_gate):
            got = _loss(compiled, batch)
        want.backward()
        got.backward()
        _assert_same_grads(_grads(checkpointed, got_gate), _grads(plain, want_gate))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1]  # not compiled again for the second block


@pytest.mark.parametrize("kind", ["backend", "patched"])
def test_a_gated_base_model_is_freed(kind, tiny_model, tiny_batch):
    """A base model (whose top module has the checkpointing flag itself) gated, overridden and
    run is freed once the caller drops it: nothing of this module holds it."""
    model = tiny_model("bert", attn="eager")
    model = use_sparse_attention(model) if kind == "backend" else sparsebert.patch(model)
    _enable_checkpointing(model, reentrant=False)
    ids, mask = tiny_batch()
    with override_head_gates(model.train(), _leaf(GATES_A)):
        model(ids, attention_mask=mask).last_hidden_state.sum().backward()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
