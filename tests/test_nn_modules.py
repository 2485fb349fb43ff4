"""SparseAttention / SparseMLP on their own: vs hand-written references, gate conventions, gate
overrides and their gradients, the FFN-output hook, physical head/neuron selection, HF names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

import sparsebert.nn.attention as sb_attention
import sparsebert.nn.mlp as sb_mlp
from sparsebert import ops
from sparsebert.nn import (
    AttentionLayout,
    MLPLayout,
    SparseAttention,
    SparseMLP,
    to_key_padding_mask,
)
from sparsebert.nn.common import BufferSummary

TOL = 1e-5
B, S, HID, H, FF = 3, 7, 24, 4, 20


@pytest.fixture(params=["host_skip", "tensor_gate"])
def compute_path(request, monkeypatch):
    """'host_skip': gate buffers read on the host (once per change: what the gates mean, live
    heads only), the default outside graph capture and torch.compile; 'tensor_gate': the
    read-free path used while a CUDA graph is captured, under torch.compile and with
    grad-requiring gates (monkeypatched here)."""
    if request.param == "tensor_gate":
        monkeypatch.setattr(sb_attention, "known_all_zero", lambda gate: False)
        monkeypatch.setattr(sb_mlp, "known_all_zero", lambda gate: False)
        monkeypatch.setattr(BufferSummary, "__call__", lambda self, gate: None)
    return request.param


def attention_reference(module: SparseAttention, x, gate, key_padding_mask=None, attend=None,
                        bias=None):
    """Hand-written gated attention block. x (B, S, hid), gate (H,) or (B, H); key_padding_mask
    (B, S) or attend (B, 1|H, S, S), both bool with True = attend; bias: added to the scores
    (broadcastable to (B, H, S, S))."""
    q = module.self.query(x).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, D)
    k = module.self.key(x).view(B, S, H, -1).transpose(1, 2)
    v = module.self.value(x).view(B, S, H, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, S, S)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if attend is not None:
        scores = scores.masked_fill(~attend, float("-inf"))
    if bias is not None:
        scores = scores + bias
    ctx = scores.softmax(-1) @ v  # (B, H, S, D)
    g = gate.view(1, H, 1, 1) if gate.dim() == 1 else gate.view(B, H, 1, 1)
    ctx = (ctx * g).transpose(1, 2).reshape(B, S, -1)
    active = (gate != 0).any(-1).float().view(-1, 1, 1)
    return module.output.LayerNorm(module.output.dense(ctx) * active + x)


def mlp_reference(module: SparseMLP, x, mlp_gate, neuron_gate):
    h = F.gelu(module.intermediate.dense(x)) * neuron_gate
    y = module.output.dense(h)
    active = float((neuron_gate != 0).any())
    return module.output.LayerNorm(y * mlp_gate * active + x)


def make_attention(seed=0, **kw):
    torch.manual_seed(seed)
    return SparseAttention(HID, H, **kw).eval()


def padding_mask():
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False
    return mask


@pytest.mark.parametrize("gate", [[1.0, 1.0, 1.0, 1.0], [0.0, 0.3, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
def test_attention_matches_reference(gate, compute_path):
    module = make_attention()
    x = torch.randn(B, S, HID)
    mask = padding_mask()
    module.head_gate.copy_(torch.tensor(gate))
    out, weights = module(x, attention_mask=mask)
    assert weights is None
    assert (out - attention_reference(module, x, module.head_gate, mask)).abs().max() < TOL
    if not any(gate):  # no head: exactly LayerNorm(residual), output dense bias excluded
        assert torch.equal(out, module.output.LayerNorm(x))


def test_attention_per_example_gate_and_gradient():
    module = make_attention()
    x = torch.randn(B, S, HID)
    gate = torch.tensor(
        [[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.2]], requires_grad=True
    )
    with module.override_head_gate(gate):
        out, _ = module(x)
    assert module.head_gate_override is None  # restored
    ref = attention_reference(module, x, gate.detach())
    assert (out - ref).abs().max() < TOL
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, gate, dout)
    leaf = gate.detach().clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(attention_reference(module, x, leaf), leaf, dout)
    ref_grad = torch.where(leaf != 0, ref_grad, 0.0)  # pruned heads get no gradient
    assert (grad - ref_grad).abs().max() < TOL


def test_live_gate_promise_changes_no_output_or_gradient():
    """override_head_gate(live=True) / override_gates(neurons_live=True), given only when every
    row of the gate has a non-zero entry, skip working out liveness per call: outputs and gate
    gradients are exactly those of the default path; the promise ends with the block."""
    attn, mlp = make_attention(), make_mlp()
    x = torch.randn(B, S, HID)
    head = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.3], [1.0, 1.0, 1.0, 0.2]])
    neuron = (torch.arange(FF) % 3 != 0).float()
    results = {}
    for live in (None, True):
        h_leaf, m_leaf = head.clone().requires_grad_(True), torch.ones(B, requires_grad=True)
        with attn.override_head_gate(h_leaf, live=live):
            hidden, _ = attn(x)
        with mlp.override_gates(mlp_gate=m_leaf, neuron_gate=neuron, neurons_live=live):
            out = mlp(hidden)
        assert attn.head_gate_live is None and mlp.neuron_gate_live is None  # restored
        grads = torch.autograd.grad(out, (h_leaf, m_leaf), torch.randn_like(out,
                                    generator=torch.Generator().manual_seed(1)))
        results[live] = (out, *grads)
    for default, promised in zip(results[None], results[True]):
        assert torch.equal(default, promised)
    with pytest.raises(TypeError, match="'live' must be None or a bool"):
        with attn.override_head_gate(head, live=1):
            pass
    with pytest.raises(TypeError, match="'neurons_live' must be None or a bool"):
        with mlp.override_gates(neurons_live="yes"):
            pass


def test_attention_training_dropout_path_uses_sdpa_then_gate():
    module = make_attention(attention_dropout=0.5)
    module.train()
    module.head_gate.copy_(torch.tensor([1.0, 0.0, 0.5, 1.0]))
    x = torch.randn(B, S, HID)
    torch.manual_seed(123)
    out, _ = module(x)
    torch.manual_seed(123)
    q, k, v = (
        getattr(module.self, n)(x).view(B, S, H, -1).transpose(1, 2)
        for n in ("query", "key", "value")
    )
    ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5) * module.head_gate.view(1, H, 1, 1)
    ref = module.output.LayerNorm(module.output.dense(ctx.transpose(1, 2).reshape(B, S, -1)) + x)
    assert (out - ref).abs().max() < TOL


def test_attention_select_heads_equals_masked(compute_path):
    module = make_attention()
    x = torch.randn(B, S, HID)
    module.head_gate.copy_(torch.tensor([0.0, 0.7, 0.0, 1.0]))
    masked, _ = module(x, attention_mask=padding_mask())
    module.select_heads([1, 3])
    assert (
        module.num_heads == 2 and module.head_ids == [1, 3] and module.self.query.out_features == 12
    )
    assert module.head_gate.tolist() == pytest.approx([0.7, 1.0])
    pruned, _ = module(x, attention_mask=padding_mask())
    assert (pruned - masked).abs().max() < TOL
    module.select_heads([])
    assert module.num_heads == 0 and module.self.query is None and module.output.dense is None
    assert torch.equal(module(x)[0], module.output.LayerNorm(x))


@pytest.mark.parametrize("mode", ["eval", "train_no_dropout", "train_dropout"])
@pytest.mark.parametrize("gate", [[0.0, 1.0, 0.0, 1.0], [0.0, 0.7, 1.0, 0.2], [1.0] * 4])
def test_masked_heads_cost_no_product_and_train_as_before(mode, gate, compute_path):
    """With a gate buffer that masks heads, the projections of the live heads only are computed
    (their weight rows / output-dense columns); outputs and every gradient equal the
    hand-written all-heads reference (masked heads' weights get zero gradients); in training
    each live head gets the same attention dropout as without the slicing."""
    module = make_attention(attention_dropout=0.5 if mode == "train_dropout" else 0.0)
    module.train(mode != "eval")
    module.head_gate.copy_(torch.tensor(gate))
    x = torch.randn(B, S, HID, requires_grad=True)
    mask = padding_mask()
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Products(TorchDispatchMode):  # output widths of the matrix products of a forward
        widths: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("addmm", "mm", "linear"):
                self.widths.append(out.shape[-1])
            return out

    with torch.no_grad(), Products() as products:
        module(x, attention_mask=mask)
    live = sum(1 for g in gate if g != 0)
    if compute_path == "host_skip" and live < H:  # q, k, v of the live heads in one product
        assert products.widths == [3 * live * (HID // H), HID]
    else:  # every head live, or read-free: every head
        assert products.widths == [HID, HID, HID, HID]
    torch.manual_seed(7)
    out, _ = module(x, attention_mask=mask)
    dout = torch.randn_like(out)
    params = [p for p in module.parameters()]
    got = torch.autograd.grad(out, [x, *params], dout)
    torch.manual_seed(7)
    if mode == "train_dropout":  # SDPA with the same dropout, then the gate
        q, k, v = (getattr(module.self, n)(x).view(B, S, H, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        attend = mask[:, None, None, :]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=0.5)
        ctx = ctx * module.head_gate.view(1, H, 1, 1)
        ref = module.output.LayerNorm(
            module.output.dense(ctx.transpose(1, 2).reshape(B, S, -1)) + x)
    else:
        ref = attention_reference(module, x, module.head_gate, mask)
    want = torch.autograd.grad(ref, [x, *params], dout)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    masked_rows = torch.tensor(gate).repeat_interleave(HID // H) == 0
    grads = dict(zip([n for n, _ in module.named_parameters()], got[1:]))
    assert torch.all(grads["self.query.weight"][masked_rows] == 0)
    assert torch.all(grads["output.dense.weight"][:, masked_rows] == 0)


@pytest.mark.parametrize("without_bias", [("value",), ("query", "key"), ("query", "key", "value")])
def test_live_heads_of_projections_without_bias(without_bias):
    """The live heads' q/k/v rows are stacked into one product: a projection without a bias
    (alone, or all three) adds nothing to its part of the stacked bias; output and gradients
    equal the hand-written reference, and the weights' gradients are zero at masked heads."""
    module = make_attention().train()
    for name in without_bias:
        getattr(module.self, name).bias = None
    gate = torch.tensor([0.0, 0.7, 1.0, 0.0])
    module.head_gate.copy_(gate)
    x, mask = torch.randn(B, S, HID, requires_grad=True), padding_mask()
    params = list(module.parameters())
    out = module(x, attention_mask=mask)[0]
    want = attention_reference(module, x, module.head_gate, mask)
    torch.testing.assert_close(out, want, atol=TOL, rtol=TOL)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *params], dout)
    for g, w in zip(got, torch.autograd.grad(want, [x, *params], dout), strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    masked_rows = gate.repeat_interleave(HID // H) == 0
    for name, grad in zip([n for n, _ in module.named_parameters()], got[1:], strict=True):
        if name.startswith("self.") and name.endswith("weight"):
            assert torch.all(grad[masked_rows] == 0) and torch.any(grad[~masked_rows] != 0), name


def _one_head_masked():
    """(an attention block with head 1 masked, its input (B, S, HID), a padding mask)."""
    module = make_attention()
    module.head_gate.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    return module, torch.randn(B, S, HID), padding_mask()


def test_a_replaced_parameter_at_the_old_address_is_sliced_anew():
    """Evaluation keeps the live heads' weight slices while the parameters are unchanged; a
    parameter replaced by a new one that sits at the same address with the same version count
    (as after the allocator reuses a freed block) is another parameter: sliced anew."""
    module, x, mask = _one_head_masked()
    query = module.self.query
    with torch.no_grad():
        module(x, attention_mask=mask)  # slices kept
        old = query.weight
        query.weight = torch.nn.Parameter(old.data)  # same storage, its own version counter
        while query.weight._version < old._version:  # brought to the old one's count
            query.weight.mul_(1.0)
        query.weight.data.copy_(torch.randn_like(old))  # through .data: no version change
        assert query.weight.data_ptr() == old.data_ptr() and query.weight._version == old._version
        got = module(x, attention_mask=mask)[0]
    torch.testing.assert_close(got, attention_reference(module, x, module.head_gate, mask),
                               atol=TOL, rtol=TOL)
    with torch.no_grad():
        query.bias.data = torch.randn_like(query.bias)  # new storage, the same version count
        got = module(x, attention_mask=mask)[0]
    torch.testing.assert_close(got, attention_reference(module, x, module.head_gate, mask),
                               atol=TOL, rtol=TOL)


@pytest.mark.parametrize("optimizer", ["adamw_fused", "sgd_fused", "adamw_foreach"])
def test_an_optimizer_step_is_seen_by_the_kept_slices(optimizer):
    """Fused optimizer kernels write parameters without moving their version counters: the
    slices kept by an evaluation are still made anew after a step (not the weights of before)."""
    module, x, mask = _one_head_masked()
    params = list(module.parameters())
    kind, flavour = optimizer.split("_")
    options = {"fused": True} if flavour == "fused" else {"foreach": True}
    opt = (torch.optim.AdamW(params, lr=1e-2, **options) if kind == "adamw"
           else torch.optim.SGD(params, lr=1e-1, **options))
    module.eval()
    with torch.no_grad():
        before = module(x, attention_mask=mask)[0]  # slices kept
    module.train()
    module(x, attention_mask=mask)[0].square().sum().backward()
    opt.step()
    module.eval()
    with torch.no_grad():
        got = module(x, attention_mask=mask)[0]
        want = attention_reference(module, x, module.head_gate, mask)
    assert (got - before).abs().max() > 1e-3  # the step changed the output
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_new_storage_at_the_old_address_is_sliced_anew():
    """A parameter given new storage at the address of its old one (what a `.to()` round trip
    on a caching allocator can do: same object, same version count, same data_ptr) is sliced
    anew: the storage object tells them apart."""
    module, x, mask = _one_head_masked()
    query = module.self.query
    with torch.no_grad():
        module(x, attention_mask=mask)  # slices kept
        shared = query.weight.detach().numpy()  # the same memory, outside torch's counters
        shared *= 2.0
        query.weight.data = torch.from_numpy(shared)  # new storage object, the same address
        assert query.weight.data_ptr() == shared.ctypes.data
        got = module(x, attention_mask=mask)[0]
    torch.testing.assert_close(got, attention_reference(module, x, module.head_gate, mask),
                               atol=TOL, rtol=TOL)


def test_inference_tensor_weights_are_sliced_on_every_call():
    """Weights that are inference tensors (no version counter) are never kept: a write to them
    between calls is seen."""
    with torch.inference_mode():
        module = make_attention()
        module.head_gate.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
        x, mask = torch.randn(B, S, HID), padding_mask()
        query = module.self.query
        query.weight = torch.nn.Parameter(query.weight.detach().clone(), requires_grad=False)
        assert query.weight.is_inference()
        module(x, attention_mask=mask)
        query.weight.mul_(-1.0)
        got = module(x, attention_mask=mask)[0]
        want = attention_reference(module, x, module.head_gate, mask)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_gate_buffer_changes_are_seen():
    """The buffer's summary follows in-place writes, a new tensor and .to(); a linear with a
    hook keeps the whole product (a weight slice would bypass the hook)."""
    module, mlp = make_attention(), make_mlp()
    x, mask = torch.randn(B, S, HID), padding_mask()
    for gate in ([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0], [1.0] * 4):
        module.head_gate.copy_(torch.tensor(gate))  # in place: the version counter moves
        got = module(x, attention_mask=mask)[0]
        want = attention_reference(module, x, module.head_gate, mask)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    module.head_gate = torch.tensor([0.0, 1.0, 1.0, 0.0])  # another tensor
    torch.testing.assert_close(module(x, attention_mask=mask)[0],
                               attention_reference(module, x, module.head_gate, mask),
                               atol=TOL, rtol=TOL)
    module.to(torch.float64)
    x64 = x.double()
    torch.testing.assert_close(module(x64, attention_mask=mask)[0],
                               attention_reference(module, x64, module.head_gate, mask))
    module.to(torch.float32)
    with torch.no_grad():  # evaluation keeps the live heads' weight slices while unchanged
        first = module(x, attention_mask=mask)[0]
        assert torch.equal(module(x, attention_mask=mask)[0], first)
        module.self.query.weight.mul_(0.5)  # an optimizer step or a load: in place
        module.output.dense.bias.add_(0.1)
        torch.testing.assert_close(module(x, attention_mask=mask)[0],
                                   attention_reference(module, x, module.head_gate, mask),
                                   atol=TOL, rtol=TOL)
    seen = []
    handle = module.self.query.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    module(x, attention_mask=mask)
    handle.remove()
    assert seen == [(B, S, HID)]  # the whole projection, hook called
    plain_forward = module.self.key.forward
    module.self.key.forward = lambda t: seen.append("own forward") or plain_forward(t)
    module(x, attention_mask=mask)  # a replaced forward (offloading wrappers) runs too
    del module.self.key.forward
    assert seen[-1] == "own forward"
    for mlp_gate, neurons in ((1.0, torch.ones(FF)), (0.0, torch.ones(FF)),
                              (1.0, (torch.arange(FF) % 2).float()), (0.3, torch.zeros(FF))):
        mlp.mlp_gate.fill_(mlp_gate)
        mlp.neuron_gate.copy_(neurons)
        torch.testing.assert_close(mlp(x), mlp_reference(mlp, x, mlp_gate, neurons),
                                   atol=TOL, rtol=TOL)


def test_attention_loads_hf_state_dict():
    config = BertConfig(hidden_size=HID, num_attention_heads=H, attn_implementation="eager")
    torch.manual_seed(0)
    hf = BertAttention(config).eval()
    module = SparseAttention(HID, H, layer_norm_eps=config.layer_norm_eps).eval()
    assert list(module.state_dict()) == list(hf.state_dict())
    module.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(B, S, HID)
    assert (module(x)[0] - hf(x)[0]).abs().max() < TOL


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return SparseMLP(HID, FF).eval()


@pytest.mark.parametrize(
    "mlp_gate,neurons", [(1.0, "ones"), (0.6, "random"), (0.0, "ones"), (1.0, "zeros")]
)
def test_mlp_matches_reference(mlp_gate, neurons, compute_path):
    module = make_mlp()
    x = torch.randn(B, S, HID)
    neuron_gate = {
        "ones": torch.ones(FF),
        "zeros": torch.zeros(FF),
        "random": (torch.rand(FF) > 0.5).float() * torch.rand(FF),
    }[neurons]
    module.mlp_gate.fill_(mlp_gate)
    module.neuron_gate.copy_(neuron_gate)
    out = module(x)
    assert (out - mlp_reference(module, x, mlp_gate, neuron_gate)).abs().max() < TOL
    if mlp_gate == 0 or neurons == "zeros":  # MLP contributes nothing, output bias included
        assert torch.equal(out, module.output.LayerNorm(x))


def test_mlp_gate_gradient_is_ffn_output_dot_grad():
    module = make_mlp()
    x = torch.randn(B, S, HID)
    captured = []
    handle = module.register_ffn_output_hook(lambda mod, y: captured.append(y))
    gate = torch.ones(B, requires_grad=True)  # per-example MLP gate
    neuron_gate = torch.ones(FF, requires_grad=True)
    with module.override_gates(mlp_gate=gate, neuron_gate=neuron_gate):
        out = module(x)
    assert module.mlp_gate_override is None and module.neuron_gate_override is None
    (y,) = captured
    y.retain_grad()
    dout = torch.randn_like(out)
    out.backward(dout)
    expected = (y * y.grad).sum(dim=(1, 2))  # (B,): sum over tokens of FFN output . grad
    assert (gate.grad - expected).abs().max() < 1e-4
    assert neuron_gate.grad.shape == (FF,)
    handle.remove()
    module(x)
    assert len(captured) == 1


def test_mlp_select_neurons_equals_masked(compute_path):
    module = make_mlp()
    x = torch.randn(B, S, HID)
    keep = torch.rand(FF) > 0.4
    module.neuron_gate.copy_(keep.float() * 0.9)
    masked = module(x)
    module.select_neurons(torch.nonzero(keep).flatten().tolist())
    assert module.intermediate_size == int(keep.sum()) and module.output.dense.in_features == int(
        keep.sum()
    )
    assert (module(x) - masked).abs().max() < TOL
    module.select_neurons([])
    assert module.intermediate_size == 0 and float(module.mlp_gate) == 0.0
    assert torch.equal(module(x), module.output.LayerNorm(x))


def test_mlp_loads_hf_state_dicts():
    config = BertConfig(hidden_size=HID, intermediate_size=FF)
    torch.manual_seed(0)
    inter, out = BertIntermediate(config).eval(), BertOutput(config).eval()
    module = make_mlp(seed=5)
    combined = {
        **{f"intermediate.{k}": v for k, v in inter.state_dict().items()},
        **{f"output.{k}": v for k, v in out.state_dict().items()},
    }
    assert sorted(module.state_dict()) == sorted(combined)
    module.load_state_dict(combined, strict=True)
    x = torch.randn(B, S, HID)
    assert (module(x) - out(inter(x), x)).abs().max() < TOL


def test_key_padding_mask_conversions():
    real = padding_mask()  # (B, S)
    additive = torch.zeros(B, 1, S, S).masked_fill(
        ~real[:, None, None, :], torch.finfo(torch.float32).min
    )
    assert torch.equal(to_key_padding_mask(real.long(), B, S), real)
    assert torch.equal(to_key_padding_mask(real[:, None, None, :].expand(B, 1, S, S), B, S), real)
    assert torch.equal(to_key_padding_mask(additive, B, S), real)
    assert to_key_padding_mask(None, B, S) is None
    empty = real.clone()
    empty[2] = False
    assert to_key_padding_mask(empty, B, S)[2].all()  # fully padded row attends everywhere
    with pytest.raises(ValueError, match="attention_mask"):
        to_key_padding_mask(torch.ones(B, S, S), B, S)
    with pytest.raises(TypeError, match="eager"):
        to_key_padding_mask(object(), B, S)


def packed_and_causal_masks() -> dict[str, torch.Tensor]:
    """4-d masks (B, 1|H, S, S), True = attend, that are not padding masks."""
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # two sequences packed in one row of S = 7
    packed = (segments[:, None] == segments[None, :]).expand(B, 1, S, S).clone()
    causal = torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S).clone()
    per_head = padding_mask()[:, None, None, :].expand(B, H, S, S).clone()
    per_head[:, 1, :, 0] = False  # head 1 does not see key 0
    return {"packed": packed, "causal": causal, "per-head": per_head}


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("kind", ["packed", "causal", "per-head"])
def test_attention_with_masks_that_are_not_padding_masks(kind, additive):
    """Causal, packed-sequence and per-head 4-d masks are applied as given (through SDPA),
    with the gates (shared and per example) as on the op's path."""
    attend = packed_and_causal_masks()[kind]
    mask = (torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
            if additive else attend)
    assert not sb_attention.is_padding_mask(mask)
    module = make_attention()
    x = torch.randn(B, S, HID)
    per_example = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.0], [1.0] * 4])
    for gate in (torch.ones(H), torch.tensor([0.0, 0.3, 1.0, 0.0]), per_example):
        with torch.no_grad(), module.override_head_gate(gate):
            got = module(x, attention_mask=mask)[0]
        want = attention_reference(module, x, gate, attend=attend)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="not a padding mask"):
        to_key_padding_mask(mask, B, S)


def test_is_padding_mask_reads_materialised_masks():
    """Expanded padding masks pass without a look; materialised ones are compared row by row,
    and an in-place change of the same tensor is seen."""
    real = padding_mask()
    assert sb_attention.is_padding_mask(None) and sb_attention.is_padding_mask(real)
    assert sb_attention.is_padding_mask(real[:, None, None, :].expand(B, 1, S, S))
    materialised = real[:, None, None, :].expand(B, H, S, S).clone()
    assert sb_attention.is_padding_mask(materialised)
    materialised[0, 2, 3, 1] = False  # one head and query row of one example differs
    assert not sb_attention.is_padding_mask(materialised)
    materialised[0, 2, 3, 1] = True
    assert sb_attention.is_padding_mask(materialised)
    torch.testing.assert_close(to_key_padding_mask(materialised, B, S), real)
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        inference = materialised.clone()
        assert sb_attention.is_padding_mask(inference)
        inference[1, 0, 0, 0] = not bool(inference[1, 0, 0, 0])
        assert not sb_attention.is_padding_mask(inference)


def test_key_padding_mask_is_converted_once_per_mask_and_version():
    """The layers of a forward share one mask tensor: its conversion is reused while that tensor
    is unchanged, and redone after an in-place write, for another tensor or other sizes."""
    real = padding_mask()
    additive = torch.zeros(B, 1, S, S).masked_fill(~real[:, None, None, :], -1e9)
    first = to_key_padding_mask(additive, B, S)
    assert to_key_padding_mask(additive, B, S) is first and torch.equal(first, real)
    additive[0, :, :, 0] = -1e9  # example 0 loses its first key
    changed = to_key_padding_mask(additive, B, S)
    assert changed is not first and not changed[0, 0] and torch.equal(changed[1:], real[1:])
    other = additive.clone()
    assert to_key_padding_mask(other, B, S) is not changed
    flat = to_key_padding_mask(real, B, S)  # (B, S) masks too
    assert to_key_padding_mask(real[:1], B, S) is not flat  # one row, expanded to the batch
    with torch.inference_mode():  # no version counter: converted every time
        inference = real.clone()
        assert to_key_padding_mask(inference, B, S) is not to_key_padding_mask(inference, B, S)


def test_soft_additive_masks_are_added_to_the_scores():
    """An additive mask with values other than 0 and <= -1e4 (a soft key bias) is applied as
    given, as stock attention adds it, not read as padding; hard ones still are padding."""
    bias = torch.zeros(B, 1, 1, S)
    bias[:, :, :, 2] = -1.0
    bias[1, :, :, 4] = 0.5
    bias[0, :, :, 5] = torch.finfo(torch.float32).min  # a hard-masked key beside soft ones
    module = make_attention()
    x = torch.randn(B, S, HID)
    gate = torch.tensor([0.0, 0.3, 1.0, 1.0])
    for mask in (bias, bias.expand(B, 1, S, S), bias.expand(B, 1, S, S).clone()):
        assert not sb_attention.is_padding_mask(mask)
        with torch.no_grad(), module.override_head_gate(gate):
            got = module(x, attention_mask=mask)[0]
        torch.testing.assert_close(got, attention_reference(module, x, gate, bias=bias),
                                   atol=TOL, rtol=TOL)
        with pytest.raises(ValueError, match="soft biases"):
            to_key_padding_mask(mask, B, S)
    real = padding_mask()
    for masked in (-1e4, torch.finfo(torch.float32).min, float("-inf")):
        hard = torch.zeros(B, 1, 1, S).masked_fill(~real[:, None, None, :], masked)
        assert sb_attention.is_padding_mask(hard.expand(B, 1, S, S).clone())
        assert torch.equal(to_key_padding_mask(hard, B, S), real)


def test_masks_that_cannot_be_read_while_compiling_run_through_sdpa(monkeypatch):
    """While torch.compile traces (or a CUDA graph is captured) a mask's values cannot be read:
    only bool/int masks that repeat by construction (size 1 or stride 0) are padding masks;
    a materialised causal mask is applied as given, not taken for padding."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = padding_mask()
    assert sb_attention.is_padding_mask(real[:, None, None, :].expand(B, 1, S, S))
    assert sb_attention.is_padding_mask(real[:, None, None, :].long())
    additive = torch.zeros(B, 1, 1, S).masked_fill(~real[:, None, None, :], -1e9)
    assert not sb_attention.is_padding_mask(additive)  # values unread: could be soft
    causal = packed_and_causal_masks()["causal"]
    assert not sb_attention.is_padding_mask(causal)
    module = make_attention()
    x = torch.randn(B, S, HID)
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0])
    with torch.no_grad(), module.override_head_gate(gate):
        got = module(x, attention_mask=causal)[0]
    torch.testing.assert_close(got, attention_reference(module, x, gate, attend=causal),
                               atol=TOL, rtol=TOL)


@pytest.mark.slow  # dynamo traces three modules
def test_blocks_compile_with_fullgraph():
    """torch.compile(fullgraph=True) traces SparseAttention (a masked head in its buffer, a
    padding mask; and a gate override) and SparseMLP without a graph break, with the eager
    outputs."""
    torch._dynamo.reset()
    module = make_attention().eval()
    with torch.no_grad():
        module.head_gate[1] = 0
    x, mask = torch.randn(B, S, HID), padding_mask().long()

    def attend(x, mask):
        return module(x, attention_mask=mask)[0]

    def attend_overridden(x, mask):
        with module.override_head_gate(torch.tensor([1.0, 0.5, 0.0, 1.0])):
            return module(x, attention_mask=mask)[0]

    mlp = SparseMLP(HID, FF).eval()
    with torch.no_grad():
        for f, args in ((attend, (x, mask)), (attend_overridden, (x, mask)), (mlp, (x,))):
            compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(*args), f(*args), atol=TOL, rtol=TOL)


def test_output_attentions_warns_and_bad_hidden_states_are_errors():
    module = make_attention()
    with pytest.warns(UserWarning, match="output_attentions=True returns no attention"):
        module(torch.randn(B, S, HID), output_attentions=True)
    with pytest.raises(ValueError, match=r"hidden_states must be \(batch, seq, hidden\)"):
        module(torch.randn(S, HID))


def test_override_validation():
    module, mlp = make_attention(), make_mlp()
    with (
        pytest.raises(ValueError, match=r"\(4,\) or \(B, 4\)"),
        module.override_head_gate(torch.ones(5)),
    ):
        pass
    with (
        pytest.raises(TypeError, match="floating-point"),
        module.override_head_gate(torch.ones(4, dtype=torch.long)),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"\(\) or \(B,\)"),
        mlp.override_gates(mlp_gate=torch.ones(2, 2)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="neuron_gate"),
        mlp.override_gates(neuron_gate=torch.ones(FF + 1)),
    ):
        pass
    x = torch.randn(B, S, HID)
    for gates in (dict(mlp_gate=torch.ones(B + 1)), dict(mlp_gate=torch.ones(1)),
                  dict(neuron_gate=torch.ones(B - 1, FF))):
        name = next(iter(gates))
        with pytest.raises(ValueError, match=f"per-example '{name}' override has .* batch size {B}"):
            with mlp.override_gates(**gates):
                mlp(x)
    for gate in (torch.rand(B + 1, 4) + 0.1, torch.rand(1, 4) + 0.1, torch.zeros(B + 1, 4)):
        for training in (False, True):  # the op path; SDPA with dropout
            module.train(training)
            with pytest.raises(ValueError, match=f"per-example 'head_gate' override has "
                                                 f"{gate.shape[0]} rows, but .* batch size {B}"):
                with module.override_head_gate(gate):
                    module(x)
    module.eval()
    with pytest.raises(ValueError, match="distinct"):
        module.select_heads([0, 0])


# --------------------------------------------------------------------------------------------
# Public accessors: the parts by role, whatever the layout calls them
# --------------------------------------------------------------------------------------------
def test_attention_accessors_follow_the_layout():
    module = make_attention()
    assert module.query_linear() is module.self.query and module.key_linear() is module.self.key
    assert module.value_linear() is module.self.value
    assert module.output_dense() is module.output.dense
    assert module.output_layer_norm() is module.output.LayerNorm
    assert module.output_dropout() is module.output.dropout
    linears = module.linears()
    assert list(linears) == ["query", "key", "value", "output"]
    assert [tuple(m.weight.shape) for m in linears.values()] == [(H * 6, HID)] * 3 + [(HID, H * 6)]
    layout = AttentionLayout(
        self_attention="attn", query="q_proj", key="k_proj", value="v_proj", output="out",
        output_dense="proj", output_layer_norm="norm", output_dropout="drop",
    )  # fmt: skip
    custom = SparseAttention(HID, H, layout=layout)
    assert custom.query_linear() is custom.attn.q_proj and custom.output_dense() is custom.out.proj
    assert custom.output_layer_norm() is custom.out.norm
    module.select_heads([])  # every head removed: the linears are gone, the LayerNorm stays
    assert all(m is None for m in module.linears().values())
    assert module.output_layer_norm() is module.output.LayerNorm


def test_mlp_accessors_standalone_and_attached():
    module = make_mlp()
    assert module.host is None
    assert module.intermediate_dense() is module.intermediate.dense
    assert module.activation() is module.intermediate.intermediate_act_fn
    assert module.output_dense() is module.output.dense
    assert module.output_layer_norm() is module.output.LayerNorm
    assert module.output_dropout() is module.output.dropout
    assert list(module.linears()) == ["intermediate", "output"]
    assert module.linears()["output"].weight.shape == (HID, FF)
    host = torch.nn.Module()  # a host that owns the FFN children (like a HF BertLayer)
    host.ffn_in, host.ffn_out = make_mlp().intermediate, make_mlp().output
    layout = MLPLayout(intermediate="ffn_in", output="ffn_out")
    attached = SparseMLP.attach(host, layout=layout)
    assert attached.host is host and attached.intermediate_dense() is host.ffn_in.dense
    assert attached.output_dense() is host.ffn_out.dense
    attached.select_neurons([])
    assert attached.linears() == {"intermediate": None, "output": None}


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(num_heads=0), "num_heads must be an int >= 1, got 0"),
        (dict(num_heads=0, head_dim=8), "num_heads must be an int >= 1, got 0"),
        (dict(num_heads=5), "hidden_size 24 is not a multiple of num_heads 5; pass head_dim"),
        (dict(num_heads=4, head_dim=0), "head_dim must be an int >= 1, got 0"),
        (dict(num_heads=4.0), "num_heads must be an int >= 1, got 4.0"),
        (dict(num_heads=None), "num_heads must be an int >= 1, got None"),
        (dict(num_heads=4, layer_norm_eps=-1), "layer_norm_eps must be a finite number > 0"),
        (dict(num_heads=4, attention_dropout=1.5), "attention_dropout must be a probability"),
        (dict(num_heads=4, layout="bert"), "layout must be an AttentionLayout"),
    ],
)
def test_attention_rejects_empty_heads(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SparseAttention(HID, **kwargs)
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got '32'"):
        SparseAttention("32", 4)


@pytest.mark.parametrize(("args", "kwargs", "needle"), [
    ((8, -1), {}, "intermediate_size must be an int >= 1, got -1"),
    ((0, 8), {}, "hidden_size must be an int >= 1, got 0"),
    ((8, 16), {"activation": None}, "activation must be a name"),
    ((8, 16), {"activation": 5}, "activation must be a name"),
    ((8, 16), {"hidden_dropout": -0.1}, "hidden_dropout must be a probability"),
    ((8, 16), {"layer_norm_eps": float("nan")}, "layer_norm_eps must be a finite number"),
])
def test_mlp_constructor_names_a_bad_argument(args, kwargs, needle):
    """Each bad argument is a ValueError naming it, at construction (a None activation failed
    at the first forward, a negative size inside torch)."""
    with pytest.raises(ValueError, match=needle):
        SparseMLP(*args, **kwargs)


def test_attention_skips_the_padding_row_check(monkeypatch):
    """Its key padding masks never have a fully padded row (to_key_padding_mask), so it calls
    the op with check_padding_rows=False: no device sync per call on CUDA."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("check_padding_rows", True))
        return ops.masked_attention(*args, **kwargs)

    monkeypatch.setattr(sb_attention, "masked_attention", spy)
    module = make_attention()
    mask = padding_mask()
    mask[2] = False  # a fully padded row, too: it attends everywhere
    out, _ = module(torch.randn(B, S, HID), attention_mask=mask)
    assert seen == [False] and torch.isfinite(out).all()


@pytest.mark.parametrize("training", [False, True], ids=["op", "dropout-path"])
def test_attention_exact_zero_gate_grad(training):
    """exact_zero_gate_grad: the gate gradient is autograd through the hand-written block at
    every entry, gates at 0 included (a row whose heads are all 0 adds nothing, so 0 there)."""
    module = make_attention(attention_dropout=1e-9 if training else 0.0)
    module.train(training)
    module.exact_zero_gate_grad = True
    x = torch.randn(B, S, HID)
    gate = torch.tensor(
        [[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.2]], requires_grad=True
    )
    with module.override_head_gate(gate):
        out, _ = module(x)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, gate, dout)
    leaf = gate.detach().clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(attention_reference(module, x, leaf), leaf, dout)
    assert (grad - ref_grad).abs().max() < TOL
    assert bool((grad[0, 1] != 0) & (grad[2, 0] != 0)) and bool((grad[1] == 0).all())


def test_exact_zero_gate_grad_through_a_gate_buffer_that_requires_grad():
    """exact_zero_gate_grad with the head_gate buffer itself requiring grad: the masked heads
    are computed (not sliced away), so their gradient is the true one, as through an override
    leaf of the same values."""
    module = make_attention().eval()
    module.exact_zero_gate_grad = True
    x = torch.randn(B, S, HID)
    values = torch.tensor([0.0, 1.0, 0.0, 1.0])
    leaf = values.clone().requires_grad_(True)
    with module.override_head_gate(leaf):
        out, _ = module(x)
    dout = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, leaf, dout)
    module.head_gate.copy_(values)
    module.head_gate.requires_grad_(True)
    out, _ = module(x)
    (got,) = torch.autograd.grad(out, module.head_gate, dout)
    assert want[0] != 0 and want[2] != 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["block-diagonal 4-d mask", "attention dropout"])
@pytest.mark.parametrize("values", [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
def test_a_gate_buffer_that_requires_grad_gets_its_gradient_on_the_sdpa_path(path, values):
    """The SDPA branches (a 4-d mask that is no padding mask; attention dropout in training)
    with the head_gate buffer requiring grad and its live entries all 1: the buffer gets the
    gradient an override leaf of the same values gets (it got none: a gate of ones was left
    out of the product)."""
    module = make_attention(attention_dropout=0.1 if path == "attention dropout" else 0.0)
    module.train(path == "attention dropout")
    x = torch.randn(B, S, HID)
    mask = padding_mask()
    if path == "block-diagonal 4-d mask":
        block = torch.zeros(S, S, dtype=torch.bool)
        block[: S // 2, : S // 2] = block[S // 2:, S // 2:] = True
        mask = block[None, None].expand(B, 1, S, S)
    values = torch.tensor(values)
    dout = torch.randn(B, S, HID)
    leaf = values.clone().requires_grad_(True)
    torch.manual_seed(1)
    with module.override_head_gate(leaf):
        out, _ = module(x, attention_mask=mask)
    (want,) = torch.autograd.grad(out, leaf, dout)
    module.head_gate.copy_(values)
    module.head_gate.requires_grad_(True)
    torch.manual_seed(1)
    out, _ = module(x, attention_mask=mask)
    (got,) = torch.autograd.grad(out, module.head_gate, dout)
    assert want[values == 1].abs().min() > 0
    torch.testing.assert_close(got[values == 1], want[values == 1])


def test_set_zero_gate_grad_on_a_patched_model(tiny_bert):
    import sparsebert

    model = sparsebert.patch(tiny_bert())
    sparsebert.hf.set_zero_gate_grad(model)
    blocks = sparsebert.hf.sparse_blocks(model)
    assert all(attn.exact_zero_gate_grad for attn, _ in blocks)
    sparsebert.hf.set_zero_gate_grad(model, exact=False)
    assert not any(attn.exact_zero_gate_grad for attn, _ in blocks)
    with pytest.raises(TypeError, match="'exact' must be a bool"):
        sparsebert.hf.set_zero_gate_grad(model, exact="yes")
