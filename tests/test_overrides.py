"""override_attributes: blocks that end in any order leave the object as it was, and the gate
overrides built on it (SparseAttention, SparseMLP, override_head_gates, first_token_readout)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from sparsebert.nn.attention import SparseAttention
from sparsebert.nn.mlp import SparseMLP
from sparsebert.overrides import _OPEN, override_attributes


class Thing:
    def __init__(self):
        self.a, self.b = "a0", "b0"


def test_nested_blocks_restore_in_turn():
    thing = Thing()
    with override_attributes(thing, a="a1"):
        with override_attributes(thing, a="a2", b="b2"):
            assert (thing.a, thing.b) == ("a2", "b2")
        assert (thing.a, thing.b) == ("a1", "b0")
    assert (thing.a, thing.b) == ("a0", "b0")
    assert id(thing) not in _OPEN


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                                   (2, 1, 0)])
def test_blocks_ending_in_any_order_leave_the_original_values(order):
    """Three overlapping blocks (as from three threads) ended in every order: while some are
    open, each attribute holds the latest open block's value; after all, the originals."""
    thing = Thing()
    values = [dict(a="a1"), dict(a="a2", b="b2"), dict(b="b3")]
    blocks = [override_attributes(thing, **v) for v in values]
    for block in blocks:
        block.__enter__()
    assert (thing.a, thing.b) == ("a2", "b3")
    open_blocks = [0, 1, 2]
    for index in order:
        blocks[index].__exit__(None, None, None)
        open_blocks.remove(index)
        for name in ("a", "b"):
            setters = [i for i in open_blocks if name in values[i]]
            want = values[setters[-1]][name] if setters else f"{name}0"
            assert getattr(thing, name) == want, (order, index, name)
    assert id(thing) not in _OPEN


def test_a_block_restores_on_error_and_holds_no_reference():
    thing = Thing()
    with pytest.raises(RuntimeError), override_attributes(thing, a="a1"):
        raise RuntimeError("inside")
    assert thing.a == "a0"
    with override_attributes(thing, a="a1"):
        pass
    ref = weakref.ref(thing)
    del thing
    gc.collect()
    assert ref() is None


def test_overlapping_head_gate_overrides_from_two_threads_end_clean():
    """Thread A overrides a block's head gate, B overrides it too, A's block ends, then B's:
    once both have ended the block has no override and computes with its own gate (restoring
    what each saw on entry left A's gate in place for good)."""
    torch.manual_seed(0)
    block = SparseAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = block(x)[0]
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def thread_a():
        with block.override_head_gate(torch.tensor([1.0, 0.0, 0.0, 0.0])):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def thread_b():
        a_in.wait(10)
        with block.override_head_gate(torch.tensor([0.0, 0.0, 0.0, 1.0])):
            b_in.set()
            a_out.wait(10)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert block.head_gate_override is None and block.head_gate_live is None
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0], plain, rtol=0, atol=0)


def test_mlp_gate_overrides_ending_out_of_order():
    mlp = SparseMLP(16, 32).eval()
    first = mlp.override_gates(torch.tensor(0.5), torch.ones(32), neurons_live=True)
    second = mlp.override_gates(None, torch.zeros(32))
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert mlp.mlp_gate_override is None and mlp.neuron_gate_override is not None
    second.__exit__(None, None, None)
    assert (mlp.mlp_gate_override, mlp.neuron_gate_override, mlp.neuron_gate_live) == (
        None, None, None)


class Equal(Thing):
    """Instances equal to each other, and unhashable (__eq__ without __hash__)."""

    def __eq__(self, other):
        return isinstance(other, Equal)


class EqualHashed(Equal):
    def __hash__(self):
        return 0


def test_objects_are_told_apart_by_identity():
    """Objects that define __eq__ (so unhashable) or compare equal to each other: overrides
    key on identity, so each works and neither inherits the other's saved values."""
    with override_attributes(Equal(), a="a1"):
        pass
    first, second = EqualHashed(), EqualHashed()
    one, two = override_attributes(first, a="x"), override_attributes(second, a="y")
    one.__enter__()
    two.__enter__()
    one.__exit__(None, None, None)
    two.__exit__(None, None, None)
    assert (first.a, second.a) == ("a0", "a0") and not _OPEN


class Refusing(Thing):
    """b refuses None (a validating property)."""

    @property
    def b(self):
        return self._b

    @b.setter
    def b(self, value):
        if value is None:
            raise ValueError("b must not be None")
        self._b = value


def test_a_block_that_fails_to_begin_leaves_nothing_behind():
    """A setattr that raises while a block begins: the attributes it set are put back and the
    block is not left open (an earlier block's restore would have been handed to it)."""
    thing = Refusing()
    first = override_attributes(thing, a="a1")
    first.__enter__()
    with pytest.raises(ValueError, match="must not be None"):
        override_attributes(thing, a="a2", b=None).__enter__()
    assert (thing.a, thing.b) == ("a1", "b0")
    first.__exit__(None, None, None)
    assert (thing.a, thing.b) == ("a0", "b0") and id(thing) not in _OPEN


def test_a_copy_made_inside_a_block_has_the_models_own_state(tiny_bert, tiny_batch):
    """A deep copy of a patched model made inside override_head_gates / first_token_readout
    blocks computes with its own gates and every row (it kept the blocks' overrides and one-row
    readout for good, since no block restores the copy; an override made of views of a leaf
    that requires grad could not be copied at all). Pickles take the same state."""
    import copy  # noqa: PLC0415

    import sparsebert  # noqa: PLC0415
    from sparsebert.hf import first_token_readout, override_head_gates  # noqa: PLC0415

    model = sparsebert.patch(tiny_bert()).eval()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    own = torch.ones(layers, heads)
    own[0, 2] = 0
    sparsebert.set_masks(model, head_mask=own)
    leaf = torch.rand(layers, heads, requires_grad=True)
    ids, mask = tiny_batch()

    def outputs(m):
        with torch.no_grad():
            return m.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    want = outputs(model)
    blocks = [block for pair in sparsebert.hf.sparse_blocks(model) for block in pair]
    own_state = [{name: getattr(block, name) for name in block.BLOCK_ATTRIBUTES}
                 for block in blocks]
    with override_head_gates(model, leaf), first_token_readout(model) as one_row:
        assert one_row
        twin = copy.deepcopy(model)
        for block, before in zip(blocks, own_state, strict=True):
            state = block.__getstate__()  # what a pickle takes
            assert {name: state[name] for name in before} == before
    got = outputs(twin)
    assert got.shape == want.shape  # every row
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(sparsebert.get_masks(twin)["head_mask"], own)


def test_a_copy_keeps_values_assigned_outside_any_block(tiny_bert):
    """output_rows assigned directly (a documented attribute) stays in a copy or pickle, also
    one made inside a first_token_readout block that set it again: only what open blocks set
    goes back to the value before them."""
    import copy  # noqa: PLC0415
    import pickle  # noqa: PLC0415

    import sparsebert  # noqa: PLC0415
    from sparsebert.hf import first_token_readout  # noqa: PLC0415

    model = sparsebert.patch(tiny_bert()).eval()
    attention, mlp = sparsebert.hf.sparse_blocks(model)[-1]
    attention.output_rows = mlp.output_rows = 2
    assert copy.deepcopy(attention).output_rows == 2
    assert pickle.loads(pickle.dumps(mlp)).output_rows == 2
    with first_token_readout(model) as one_row:
        assert one_row and attention.output_rows == 1
        assert copy.deepcopy(attention).output_rows == 2
        assert pickle.loads(pickle.dumps(mlp)).output_rows == 2
    assert attention.output_rows == 2



def test_a_wrapper_around_a_patched_model_is_named(tiny_bert):
    """override_head_gates on DataParallel / DistributedDataParallel around a patched model says
    to pass the wrapped model (it said the model was neither patched nor on the backend)."""
    import sparsebert  # noqa: PLC0415
    from sparsebert.hf import override_head_gates  # noqa: PLC0415
    from sparsebert.hf.attention_backend import AttentionBackendError  # noqa: PLC0415

    model = sparsebert.patch(tiny_bert())
    wrapper = torch.nn.DataParallel(model)
    gates = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    with pytest.raises(AttentionBackendError, match=r"a DataParallel wrapper; pass the model it "
                                                    r"wraps \(DataParallel.module\)"):
        with override_head_gates(wrapper, gates):
            pass
