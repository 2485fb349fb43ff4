"""FixedGates: while a CUDA graph is captured inside a FixedGates block, the blocks use the gate
summaries read before the capture (masked heads' products and masked MLPs left out), the block
records the buffers it relied on and sees in-place writes to them afterwards. Without the block
a capture computes everything (a replay must follow the gates' values).

On the CPU the capture is simulated: `can_read_on_host` answers False, as it does while a CUDA
graph is captured, and `known_all_zero` False, as it does for CUDA tensors
(tests/test_train_step.py runs the real capture on a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsebert.nn.attention as sb_attention
import sparsebert.nn.common as sb_common
import sparsebert.nn.mlp as sb_mlp
from sparsebert.hf.attention_backend import padding_masks_as_views
from sparsebert.nn import SparseAttention, SparseMLP
from sparsebert.nn.common import FixedGates, fixed_gates

B, S, HID, H, FF = 3, 7, 24, 4, 20
D = HID // H
TOL = 1e-5


@pytest.fixture
def capturing(monkeypatch):
    """capturing(True|False): whether the blocks see a CUDA graph being captured."""
    state = {"on": False}

    def can_read_on_host() -> bool:
        return not state["on"]

    monkeypatch.setattr(sb_common, "can_read_on_host", can_read_on_host)
    monkeypatch.setattr(sb_attention, "can_read_on_host", can_read_on_host)
    for module in (sb_attention, sb_mlp):
        known_all_zero = module.known_all_zero
        monkeypatch.setattr(module, "known_all_zero",
                            lambda gate, known=known_all_zero: not state["on"] and known(gate))

    def set_capturing(on: bool) -> None:
        state["on"] = on

    return set_capturing


class Products(TorchDispatchMode):
    """The output widths of the matrix products run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("addmm", "mm", "linear"):
            self.widths.append(out.shape[-1])
        return out


def forward_widths(module, *args, **kwargs) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad(), Products() as products:
        out = module(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out), products.widths


def attention_with_gate(gate: list[float], dropout: float = 0.0) -> SparseAttention:
    torch.manual_seed(0)
    module = SparseAttention(HID, H, attention_dropout=dropout).eval()
    module.head_gate.copy_(torch.tensor(gate))
    return module


def padding_mask() -> torch.Tensor:
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False
    return mask


def test_a_capture_outside_the_block_computes_every_head(capturing):
    module = attention_with_gate([0.0, 1.0, 0.0, 1.0])
    x, mask = torch.randn(B, S, HID), padding_mask()
    eager, widths = forward_widths(module, x, attention_mask=mask)
    assert widths == [3 * 2 * D, HID]  # read on the host: live heads only, q/k/v in one
    capturing(True)
    captured, widths = forward_widths(module, x, attention_mask=mask)
    assert widths == [HID, HID, HID, HID]  # nothing read: every head, times its gate
    torch.testing.assert_close(captured, eager, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("mode", ["eval", "train", "train_dropout"])
def test_a_capture_in_the_block_uses_the_summary_read_before(capturing, mode):
    """The warm-up (eager, in the block) reads the gate; the capture then projects the live
    heads only, with the same output and gradients as the eager forward, and the block records
    the buffer and keeps the index tensors the capture reads."""
    module = attention_with_gate([0.0, 1.0, 0.0, 0.5], dropout=0.5 if "dropout" in mode else 0.0)
    module.train(mode != "eval")
    x, mask = torch.randn(B, S, HID, requires_grad=True), padding_mask()
    params = list(module.parameters())
    with FixedGates() as fixed:
        assert fixed_gates() is fixed
        torch.manual_seed(5)
        eager = module(x, attention_mask=mask)[0]
        dout = torch.randn_like(eager)
        want = torch.autograd.grad(eager, [x, *params], dout)
        assert fixed.buffers == []  # an eager forward relies on nothing
        capturing(True)
        _, widths = forward_widths(module, x, attention_mask=mask)
        assert widths == [3 * 2 * D, HID]
        torch.manual_seed(5)
        captured = module(x, attention_mask=mask)[0]
        got = torch.autograd.grad(captured, [x, *params], dout)
    assert fixed_gates() is None
    torch.testing.assert_close(captured, eager, atol=TOL, rtol=TOL)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert len(fixed.buffers) == 1 and fixed.buffers[0] is module.head_gate
    live = module._live_heads_kept
    assert any(kept is live for kept in fixed._kept.values())
    if mode == "eval":  # a capture slices in its replays: no slices kept from the capture
        assert live._kept is None


def test_a_gate_never_read_or_written_since_is_computed_in_full(capturing):
    module = attention_with_gate([1.0, 0.0, 0.0, 1.0])
    x, mask = torch.randn(B, S, HID), padding_mask()
    with FixedGates() as fixed:
        capturing(True)
        _, widths = forward_widths(module, x, attention_mask=mask)  # never read: nothing known
        assert widths == [HID] * 4 and fixed.buffers == []
        capturing(False)
        forward_widths(module, x, attention_mask=mask)  # read
        module.head_gate[1] = 1.0  # then written in place: the summary is stale
        capturing(True)
        captured, widths = forward_widths(module, x, attention_mask=mask)
        assert widths == [HID] * 4 and fixed.buffers == []
    capturing(False)
    torch.testing.assert_close(captured, forward_widths(module, x, attention_mask=mask)[0],
                               atol=TOL, rtol=TOL)


def test_the_block_sees_writes_to_the_buffers_it_recorded(capturing):
    module = attention_with_gate([0.0, 1.0, 1.0, 1.0])
    x, mask = torch.randn(B, S, HID), padding_mask()
    with FixedGates() as fixed:
        forward_widths(module, x, attention_mask=mask)
        capturing(True)
        forward_widths(module, x, attention_mask=mask)
    assert fixed.unchanged()
    module.head_gate.copy_(module.head_gate.clone())  # the same values, written: a new version
    assert not fixed.unchanged()
    fixed.settle()
    assert fixed.unchanged()
    module.head_gate.zero_()  # set_masks writes in place
    assert not fixed.unchanged()


def test_a_masked_mlp_is_left_out_of_the_capture(capturing):
    torch.manual_seed(0)
    mlp = SparseMLP(HID, FF).eval()
    mlp.mlp_gate.zero_()
    x = torch.randn(B, S, HID)
    with FixedGates() as fixed:
        out, widths = forward_widths(mlp, x)
        assert widths == []
        capturing(True)
        captured, widths = forward_widths(mlp, x)
    assert widths == []  # neither dense runs
    torch.testing.assert_close(captured, mlp.output.LayerNorm(x))
    assert {id(b) for b in fixed.buffers} == {id(mlp.mlp_gate), id(mlp.neuron_gate)}
    capturing(True)
    _, widths = forward_widths(mlp, x)  # outside the block: computed, times the zero gate
    assert widths == [FF, HID]


def test_the_same_values_read_again_give_the_same_summary():
    """A block keyed on its summary (the live heads' index tensors a graph reads) survives a
    write of the same values: restoring a snapshot after a capture writes every buffer."""
    module = attention_with_gate([0.0, 1.0, 0.0, 1.0])
    first = module.gate_summary()
    module.head_gate.copy_(module.head_gate.clone())
    assert module.gate_summary() is first
    module.head_gate[0] = 1.0
    second = module.gate_summary()
    assert second is not first and second.live == (0, 1, 3)


def test_the_block_does_nothing_under_torch_compile(monkeypatch):
    module = attention_with_gate([0.0, 1.0, 0.0, 1.0])
    module.gate_summary()  # read
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FixedGates() as fixed:
        assert module.gate_summary() is None and fixed.buffers == []


# --- whole patched models: the masks they build -----------------------------------------------
def tiny_patched_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification  # noqa: PLC0415

    import sparsebert.hf as sbhf  # noqa: PLC0415

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(0)
    model = sbhf.patch(BertForSequenceClassification(config).train())
    sbhf.set_masks(model, head_mask=torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]]))
    return model


def model_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 3:] = 0
    return {"input_ids": torch.randint(1, 100, (4, 12), generator=gen) * mask,
            "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=gen)}


class AttentionCalls(TorchDispatchMode):
    """How often the masked_attention op ran, and the q/k/v/output products' widths."""

    def __init__(self) -> None:
        super().__init__()
        self.op = 0
        self.widths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.op += name == "masked_attention"
        if name in ("addmm", "mm", "linear") and not torch.is_grad_enabled():
            self.widths.append(out.shape[-1])
        return out


def loss_and_grads(model, batch, **extra):
    loss = model(**batch, **extra).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


def test_a_patched_model_captured_as_the_training_step_does(capturing):
    """As CudaGraphStep(fixed_gates=True) captures (a FixedGates block, padding masks as
    views): a patched model's capture runs the masked_attention op over the live heads only,
    with the eager forward's loss and gradients."""
    model, batch = tiny_patched_classifier(), model_batch()
    want_loss, want = loss_and_grads(model, batch)
    with FixedGates(), padding_masks_as_views(model):
        loss_and_grads(model, batch)  # warm-up: the gates are read here
        capturing(True)
        with AttentionCalls() as calls:
            got_loss, got = loss_and_grads(model, batch)
        assert calls.op == 2  # the op, not SDPA, in both layers
        with torch.no_grad(), AttentionCalls() as calls:
            model(**batch)
    hid, dim = 32, 8
    assert calls.widths[:2] == [3 * 2 * dim, hid]  # layer 0: 2 live heads, q/k/v in one
    assert calls.widths[4:6] == [3 * 3 * dim, hid]  # layer 1: 3 live heads
    torch.testing.assert_close(got_loss, want_loss, atol=TOL, rtol=TOL)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


class OpCount(TorchDispatchMode):
    """How often an op (by name) ran inside it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.count = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == self.name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("in_block", [True, False])
def test_a_capture_in_the_block_converts_the_mask_once_for_every_layer(capturing, in_block):
    """The key-padding form of the model's mask (its `|` with the fully-padded-rows fix) is
    recorded once per captured forward in a FixedGates block, by the first layer; without the
    block every layer converts it during a capture (a result kept from before the capture would
    not be recomputed on replay)."""
    model, batch = tiny_patched_classifier(), model_batch()
    want_loss, want = loss_and_grads(model, batch)
    with FixedGates() if in_block else contextlib.nullcontext(), padding_masks_as_views(model):
        loss_and_grads(model, batch)  # warm-up
        capturing(True)
        with OpCount("bitwise_or") as conversions:
            got_loss, got = loss_and_grads(model, batch)
    layers = model.config.num_hidden_layers
    assert conversions.count == (1 if in_block else layers)
    torch.testing.assert_close(got_loss, want_loss, atol=TOL, rtol=TOL)
    if in_block:  # (out of it every head is projected and multiplied by its gate)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_the_blocks_mask_conversion_follows_the_mask_and_ends_with_the_entry(capturing):
    convert = sb_attention.to_key_padding_mask
    mask = padding_mask()[:, None, None, :].expand(B, 1, S, S)  # a padding mask as a view
    capturing(True)
    assert convert(mask, B, S) is not convert(mask, B, S)  # no block: converted every call
    fixed = FixedGates()
    with fixed:
        first = convert(mask, B, S)
        assert convert(mask, B, S) is first  # the same tensor at the same version
        assert torch.equal(first, padding_mask())
        other = padding_mask()[:, None, None, :].expand(B, 1, S, S)
        assert convert(other, B, S) is not first  # another tensor
        base = mask._base
        base[0, 2] = False  # an in-place write moves the version counter of its views too
        fresh = convert(mask, B, S)
        assert fresh is not first and not bool(fresh[0, 2])
    assert fixed._shared == {}  # nothing of the capture is kept past the entry
    with fixed:
        assert convert(mask, B, S) is not fresh  # a new entry, a new capture: converted anew
    capturing(False)
    assert convert(mask, B, S) is convert(mask, B, S)  # eager: the last conversion is kept


@pytest.mark.parametrize("setting", ["plain", "views_only"])
def test_a_capture_without_fixed_gates_follows_the_gates_values(capturing, setting):
    """Without the block a capture multiplies by every gate (the graph must follow in-place
    gate writes); a materialised 4-d mask cannot be read, so SDPA runs unless the masks come
    as views."""
    model, batch = tiny_patched_classifier(), model_batch()
    want_loss, _ = loss_and_grads(model, batch)
    with padding_masks_as_views(model) if setting == "views_only" else contextlib.nullcontext():
        loss_and_grads(model, batch)
        capturing(True)
        with AttentionCalls() as calls:
            got_loss, _ = loss_and_grads(model, batch)
        with torch.no_grad(), AttentionCalls() as products:
            model(**batch)
    assert calls.op == (2 if setting == "views_only" else 0)
    assert products.widths[:4] == [32] * 4  # every head projected
    torch.testing.assert_close(got_loss, want_loss, atol=TOL, rtol=TOL)


def test_a_block_is_seen_by_its_own_thread_only():
    import threading  # noqa: PLC0415

    seen = []
    with FixedGates() as fixed:
        thread = threading.Thread(target=lambda: seen.append(fixed_gates()))
        thread.start()
        thread.join()
        assert fixed_gates() is fixed
    assert seen == [None] and fixed_gates() is None
