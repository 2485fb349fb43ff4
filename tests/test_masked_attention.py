"""masked_attention: native kernels vs the fp32 reference, gradients, gradcheck, opcheck, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsebert import ops
from sparsebert.reference import (
    masked_attention_backward_ref,
    masked_attention_compact_ref,
    masked_attention_ref,
)
from tests.attention_kit import (
    make_padding,
    plain_pytorch_attention,
    run_without_extension,
    stable_seed,
)

HEADS = 4
GATE_PATTERNS = ("all_on", "all_off", "one_head", "fractional", "per_example")


def make_gate(pattern: str, batch: int, heads: int, device: str, generator: torch.Generator):
    if pattern == "all_on":
        return torch.ones(heads, device=device)
    if pattern == "all_off":
        return torch.zeros(heads, device=device)
    if pattern == "one_head":
        gate = torch.zeros(heads, device=device)
        gate[heads // 2] = 1.0
        return gate
    if pattern == "fractional":
        gate = torch.rand(heads, generator=generator).to(device)
        gate[0] = 0.0  # fractional gates next to a pruned head
        return gate
    if pattern == "per_example":
        gate = (torch.rand(batch, heads, generator=generator) > 0.4).float()
        gate[0, 1] = 0.37
        return gate.to(device)
    raise ValueError(pattern)


def make_qkv(batch, seq, heads, dim, dtype, device, generator, layout="fused_qkv"):
    """q, k, v (B, S, H, D). layout 'fused_qkv': strided views of one (B, S, 3*H*D) projection
    output (last dim contiguous); 'contiguous'; 'transposed': views of (B, H, S, D) tensors."""
    if layout == "fused_qkv":
        fused = torch.randn(batch, seq, 3 * heads * dim, generator=generator).to(device, dtype)
        return tuple(t.view(batch, seq, heads, dim) for t in fused.split(heads * dim, dim=-1))
    if layout == "transposed":
        return tuple(
            torch.randn(batch, heads, seq, dim, generator=generator)
            .to(device, dtype)
            .transpose(1, 2)
            for _ in range(3)
        )
    return tuple(
        torch.randn(batch, seq, heads, dim, generator=generator).to(device, dtype) for _ in range(3)
    )


def call_op(q, k, v, gate, mask, scale):
    return torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)


@pytest.mark.all_devices
def test_native_kernels_registered(device, assert_native):
    assert_native("masked_attention", device)
    assert_native("masked_attention_backward", device)


@pytest.mark.all_devices
@pytest.mark.parametrize("dim,seq", [(32, 7), (64, 129), (48, 1), (32, 129), (64, 7)])
@pytest.mark.parametrize("pattern", GATE_PATTERNS)
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_reference_fp32(device, dim, seq, pattern, padded, assert_native):
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(stable_seed(dim, seq, pattern, padded))
    batch = 3
    q, k, v = make_qkv(batch, seq, HEADS, dim, torch.float32, device, gen)
    gate = make_gate(pattern, batch, HEADS, device, gen)
    mask = make_padding(batch, seq, device, gen) if padded else None
    scale = dim**-0.5
    out, lse = call_op(q, k, v, gate, mask, scale)
    ref_out, ref_lse = masked_attention_ref(q, k, v, gate, mask, scale)
    assert out.shape == (batch, seq, HEADS, dim) and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    pruned = (gate.expand(batch, HEADS) == 0).cpu()
    assert torch.all(out.cpu().transpose(1, 2)[pruned] == 0), "pruned heads must be exactly 0"


@pytest.mark.all_devices
@pytest.mark.parametrize("layout", ["fused_qkv", "transposed", "contiguous"])
def test_strided_inputs_and_cross_lengths(device, layout, assert_native):
    """Non-contiguous q/k/v (fused projection views, transposed storage) and Sk != Sq."""
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(1)
    q, _, _ = make_qkv(2, 9, HEADS, 32, torch.float32, device, gen, layout)
    _, k, v = make_qkv(2, 13, HEADS, 32, torch.float32, device, gen, layout)
    gate = torch.tensor([1.0, 0.0, 0.3, 1.0], device=device)
    mask = make_padding(2, 13, device, gen)
    out = ops.masked_attention(q, k, v, gate, mask)
    ref, _ = masked_attention_ref(q, k, v, gate, mask, 32**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.all_devices
def test_pruned_heads_are_never_read(device, assert_native):
    """NaNs in q/k/v of pruned heads must not reach the output: those heads are skipped."""
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(2, 16, HEADS, 32, torch.float32, device, gen, "contiguous")
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0], device=device)
    for t in (q, k, v):
        t[:, :, 1] = float("nan")
        t[:, :, 3] = float("nan")
    out = ops.masked_attention(q, k, v, gate)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, :, 1] == 0) and torch.all(out[:, :, 3] == 0)


@pytest.mark.all_devices
@pytest.mark.parametrize("view", ["strided_h", "transposed_bh", "half_gate", "expanded_bh"])
def test_gate_views_are_read_in_place(device, view, assert_native):
    """The kernels read the gate through its strides ((H,) with batch stride 0, any (B, H)
    view, any float dtype), forward and backward."""
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(stable_seed("gate view", view))
    batch = 3
    q, k, v = make_qkv(batch, 6, HEADS, 8, torch.float32, device, gen)
    base = torch.rand(2 * HEADS, batch, generator=gen).to(device)
    base[0] = 0.0  # a pruned head
    gate = {
        "strided_h": base[::2, 0],  # (H,), stride 2
        "transposed_bh": base[::2].t(),  # (B, H), strides (1, 2B)
        "half_gate": base[::2, 0].half(),
        "expanded_bh": base[::2, 0].expand(batch, HEADS),  # (B, H), batch stride 0
    }[view]
    out, lse = call_op(q, k, v, gate, None, 8**-0.5)
    ref, ref_lse = masked_attention_ref(q, k, v, gate, None, 8**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=gen).to(device)
    got = torch.ops.sparsebert.masked_attention_backward(
        dout, q, k, v, gate, None, out, lse, 8**-0.5
    )
    want = masked_attention_backward_ref(dout, q, k, v, gate, None, ref, ref_lse, 8**-0.5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.all_devices
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 48])
@pytest.mark.parametrize("pattern", ["all_on", "fractional", "per_example"])
def test_low_precision_error_at_most_twice_pytorch(device, dtype, dim, pattern, assert_native):
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(dim)
    batch, seq = 2, 65
    q, k, v = make_qkv(batch, seq, HEADS, dim, dtype, device, gen)
    gate = make_gate(pattern, batch, HEADS, device, gen)
    mask = make_padding(batch, seq, device, gen)
    scale = dim**-0.5
    exact, _ = masked_attention_ref(*(t.float() for t in (q, k, v)), gate, mask, scale)
    ours, _ = call_op(q, k, v, gate, mask, scale)
    assert ours.dtype == dtype
    stock = plain_pytorch_attention(q, k, v, gate, mask, scale)
    our_err = (ours.float() - exact).abs().max().item()
    stock_err = (stock.float() - exact).abs().max().item()
    assert our_err <= 2 * stock_err, f"error {our_err:.3e} > 2 x stock PyTorch {stock_err:.3e}"


def _grads_via_autograd(q, k, v, gate, mask, dout):
    q, k, v, gate = (t.detach().clone().requires_grad_(True) for t in (q, k, v, gate))
    out = ops.masked_attention(q, k, v, gate, mask)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad, gate.grad


@pytest.mark.all_devices
@pytest.mark.parametrize("dim,seq", [(32, 7), (64, 129), (48, 33)])
@pytest.mark.parametrize("pattern", GATE_PATTERNS)
def test_gradients_match_reference(device, dim, seq, pattern, assert_native):
    assert_native("masked_attention_backward", device)
    gen = torch.Generator().manual_seed(seq * dim)
    batch = 2
    q, k, v = make_qkv(batch, seq, HEADS, dim, torch.float32, device, gen)
    gate = make_gate(pattern, batch, HEADS, device, gen)
    mask = make_padding(batch, seq, device, gen)
    dout = torch.randn(batch, seq, HEADS, dim, generator=gen).to(device)
    _, dq, dk, dv, d_gate = _grads_via_autograd(q, k, v, gate, mask, dout)
    ref_out, ref_lse = masked_attention_ref(q, k, v, gate, mask, dim**-0.5)
    rq, rk, rv, rg = masked_attention_backward_ref(
        dout, q, k, v, gate, mask, ref_out, ref_lse, dim**-0.5
    )
    if gate.dim() == 1:
        rg = rg.sum(0)
    for name, got, want in (
        ("dq", dq, rq),
        ("dk", dk, rk),
        ("dv", dv, rv),
        ("d_head_gate", d_gate, rg),
    ):
        torch.testing.assert_close(
            got, want, atol=5e-5, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert d_gate.shape == gate.shape


def test_reference_gate_gradient_is_michel_importance():
    """d_head_gate of the reference equals sum(ctx * dout) computed by hand (independent check)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 6, HEADS, 8, torch.float64, "cpu", gen, "contiguous")
    gate = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    dout = torch.randn(2, 6, HEADS, 8, generator=gen, dtype=torch.float64)
    ctx = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    expected = (ctx * dout).sum(dim=(1, 3))  # (B, H)
    expected[:, 2] = 0.0  # pruned head
    *_, d_gate = masked_attention_backward_ref(dout, q, k, v, gate, None, None, None, 8**-0.5)
    torch.testing.assert_close(d_gate, expected)


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck_fp64_cpu(per_example, padded, assert_native):
    assert_native("masked_attention_backward", "cpu")
    gen = torch.Generator().manual_seed(11)
    batch, seq, heads, dim = 2, 5, 3, 4
    q, k, v = make_qkv(batch, seq, heads, dim, torch.float64, "cpu", gen, "contiguous")
    shape = (batch, heads) if per_example else (heads,)
    gate = 0.2 + 0.8 * torch.rand(shape, generator=gen, dtype=torch.float64)
    mask = make_padding(batch, seq, "cpu", gen) if padded else None
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, gate))
    assert torch.autograd.gradcheck(lambda *a: ops.masked_attention(*a, mask), inputs)
    # With a pruned head (gate exactly 0, not differentiated) q, k, v gradients still check.
    pruned_gate = gate.detach().clone()
    pruned_gate[..., 1] = 0.0
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.masked_attention(a, b, c, pruned_gate, mask), inputs[:3]
    )


@pytest.mark.all_devices
@pytest.mark.parametrize("padded", [False, True])
def test_opcheck(device, padded, assert_native):
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float64 if device == "cpu" else torch.float32
    q, k, v = make_qkv(2, 5, HEADS, 8, dtype, device, gen)
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=dtype, device=device)
    mask = make_padding(2, 5, device, gen) if padded else None
    args = tuple(t.requires_grad_(True) for t in (q, k, v, gate)) + (mask, 8**-0.5)
    torch.library.opcheck(torch.ops.sparsebert.masked_attention.default, args)
    out, lse = torch.ops.sparsebert.masked_attention(
        *(a.detach() if torch.is_tensor(a) else a for a in args)
    )
    dout = torch.randn_like(out)
    bargs = (dout, *(t.detach() for t in (q, k, v, gate)), mask, out, lse, 8**-0.5)
    torch.library.opcheck(torch.ops.sparsebert.masked_attention_backward.default, bargs)


# ---------------------------------------------------------------------------------------------
# Bad input: both the Python wrapper and the raw op (C++ checks) name the argument.
# ---------------------------------------------------------------------------------------------
def _good():
    q = torch.randn(2, 5, HEADS, 8)
    return dict(q=q, k=q.clone(), v=q.clone(), head_gate=torch.ones(HEADS), key_padding_mask=None)


BAD_CASES = {
    "rank": (dict(q=torch.randn(2, 5, 32)), "'q'"),
    "k_shape": (dict(k=torch.randn(2, 5, HEADS, 16)), "'k'"),
    "v_shape": (dict(v=torch.randn(2, 6, HEADS, 8)), "'v'"),
    "dtype": (dict(k=torch.randn(2, 5, HEADS, 8, dtype=torch.float64)), "'k'"),
    "gate_shape": (dict(head_gate=torch.ones(HEADS + 1)), "'head_gate'"),
    "gate_batch": (dict(head_gate=torch.ones(3, HEADS)), "'head_gate'"),
    "mask_dtype": (dict(key_padding_mask=torch.ones(2, 5)), "'key_padding_mask'"),
    "mask_shape": (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "'key_padding_mask'"),
    "mask_fully_padded": (
        dict(key_padding_mask=torch.tensor([[True] * 5, [False] * 5])),
        "'key_padding_mask'",
    ),
    "head_dim_zero": (dict(zip("qkv", torch.randn(3, 2, 5, HEADS, 0))), "'q'"),
    "gate_int": (
        dict(head_gate=torch.ones(HEADS, dtype=torch.int64)),
        "'head_gate'.*(Long|int64)",  # native: Long, wrapper: torch.int64
    ),
    "gate_bool": (dict(head_gate=torch.ones(HEADS, dtype=torch.bool)), "'head_gate'.*[Bb]ool"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_python_wrapper(case):
    change, needle = BAD_CASES[case]
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=needle):
        ops.masked_attention(**args)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_native_kernel(case, assert_native):
    assert_native("masked_attention", "cpu")
    change, needle = BAD_CASES[case]
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=needle):
        torch.ops.sparsebert.masked_attention(
            args["q"], args["k"], args["v"], args["head_gate"], args["key_padding_mask"], 0.3
        )


@pytest.mark.parametrize(
    "q_shape,needle",
    [
        ((2, 5, HEADS, 0), r"'q' has head dim D = q.shape\[-1\] = 0; expected D >= 1"),
        ((0, 5, HEADS, 8), r"'q' has B = q.shape\[0\] = 0; expected B >= 1"),
        ((2, 0, HEADS, 8), r"'q' has S = q.shape\[1\] = 0; expected S >= 1"),
        ((2, 5, 0, 8), r"'q' has H = q.shape\[2\] = 0; expected H >= 1"),
    ],
)
def test_empty_sizes_name_the_dimension(q_shape, needle):
    """D = 0 used to raise ZeroDivisionError (from the default scale D ** -0.5)."""
    q = torch.randn(q_shape)
    gate = torch.ones(q_shape[2])
    for scale in (None, 0.5):
        with pytest.raises(ValueError, match=needle):
            ops.masked_attention(q, q.clone(), q.clone(), gate, scale=scale)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_gate_message_names_dtype(dtype):
    q = torch.randn(2, 5, HEADS, 8)
    with pytest.raises(ValueError) as info:
        ops.masked_attention(q, q, q, torch.ones(HEADS, dtype=dtype))
    message = str(info.value)
    assert "'head_gate'" in message and str(dtype) in message and "float32" in message


@pytest.mark.parametrize("scale", ["0.5", [0.5], True, float("nan"), float("inf"), 10**400,
                                   np.complex128(1 + 2j), torch.tensor([0.5, 0.5]),
                                   torch.tensor(0.5, requires_grad=True)])
@pytest.mark.parametrize("compact", [False, True])
def test_bad_scale_is_refused_by_name(scale, compact):
    """A scale that is no finite real number was taken by float() (a string, True as 1.0, nan)
    or failed there without naming the argument."""
    q = torch.randn(2, 5, HEADS, 8)
    gate = torch.ones(HEADS)
    with pytest.raises(ValueError, match="'scale' must be a finite real number"):
        if compact:
            ops.masked_attention_compact(q, q, q, gate, torch.tensor([0, 2]), None, scale)
        else:
            ops.masked_attention(q, q, q, gate, None, scale)


@pytest.mark.parametrize("scale", [1, 0.25, np.float32(0.25), np.float64(0.25), 0,
                                   torch.tensor(0.25), torch.tensor([0.25]), np.array(0.25)])
def test_real_scales_are_taken(scale):
    q = torch.randn(2, 5, HEADS, 8, dtype=torch.float64)
    gate = torch.ones(HEADS, dtype=torch.float64)
    out = ops.masked_attention(q, q, q, gate, None, scale)
    want, _ = masked_attention_ref(q, q, q, gate, None, float(scale))
    torch.testing.assert_close(out, want)


FLOAT8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.skipif(FLOAT8 is None, reason="this torch has no float8_e4m3fn")
@pytest.mark.parametrize("argument", ["q", "head_gate"])
def test_float8_inputs_are_refused_by_name(argument):
    """fp8 passed the floating-point checks, then the native kernel raised an unnamed
    NotImplementedError and the reference computed in fp8."""
    q = torch.randn(2, 5, HEADS, 8)
    gate = torch.ones(HEADS)
    if argument == "q":
        q = q.to(FLOAT8)
    else:
        gate = gate.to(FLOAT8)
    with pytest.raises(ValueError, match=f"'{argument}'.*float16.*bfloat16.*float32.*float64"):
        ops.masked_attention(q, q.clone(), q.clone(), gate)


@pytest.mark.skipif(FLOAT8 is None, reason="this torch has no float8_e4m3fn")
def test_native_op_refuses_float8_by_name(assert_native):
    assert_native("masked_attention", "cpu")
    q = torch.randn(2, 5, HEADS, 8).to(FLOAT8)
    with pytest.raises(ValueError, match="'q'.*torch.float32"):
        torch.ops.sparsebert.masked_attention(q, q, q, torch.ones(HEADS), None, 0.5)


@pytest.mark.parametrize("kernel", ["reference", "op"])
def test_pruned_heads_have_zero_gradients_whatever_their_inputs(kernel):
    """A pruned head is never computed: inf/NaN in its q, k, v must not reach any gradient
    (the reference's autograd used to give NaN dq, dk for it)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, HEADS, 8, generator=gen) for _ in range(3))
    gate = torch.tensor([1.0, 0.0, 0.5, 0.0])
    q[:, :, 1] = float("nan")
    k[:, 2, 1] = float("inf")
    v[:, :, 3] = float("nan")
    dout = torch.randn(2, 6, HEADS, 8, generator=gen)
    if kernel == "reference":
        dq, dk, dv, d_gate = masked_attention_backward_ref(dout, q, k, v, gate, None, None, None,
                                                           8 ** -0.5)
    else:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        gate_leaf = gate.clone().requires_grad_(True)
        ops.masked_attention(*leaves, gate_leaf).backward(dout)
        dq, dk, dv, d_gate = (t.grad for t in (*leaves, gate_leaf))
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
        assert (grad[:, :, [1, 3]] == 0).all()
    assert torch.isfinite(d_gate).all() and (d_gate[..., [1, 3]] == 0).all()


def test_padding_row_check_can_be_skipped(monkeypatch):
    """check_padding_rows=False never reads the mask's values (no device sync on CUDA);
    SparseAttention passes it because its masks never have a fully padded row."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float32, "cpu", gen, "contiguous")
    mask = make_padding(2, 5, "cpu", gen)
    gate = torch.ones(HEADS)
    reads = []
    original_any = torch.Tensor.any

    def counting_any(self, *args, **kwargs):
        if self is mask:
            reads.append(args)
        return original_any(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "any", counting_any)
    checked = ops.masked_attention(q, k, v, gate, mask)
    # the reference path checks the rows in Python; the native CPU kernel checks them itself
    assert bool(reads) != ops.NATIVE_AUTOGRAD, "the default path checks the rows once"
    reads.clear()
    unchecked = ops.masked_attention(q, k, v, gate, mask, check_padding_rows=False)
    assert not reads
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)


def test_non_contiguous_last_dim_is_accepted_by_wrapper():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 8, HEADS, generator=gen).transpose(2, 3) for _ in range(3))
    gate = torch.ones(HEADS)
    torch.testing.assert_close(
        ops.masked_attention(q, k, v, gate), masked_attention_ref(q, k, v, gate, None, 8**-0.5)[0]
    )


def test_gate_patterns_are_distinct():
    """The parametrisations above stay meaningful: every pattern gives a different gate."""
    gen = torch.Generator().manual_seed(0)
    gates = {p: make_gate(p, 3, HEADS, "cpu", gen) for p in GATE_PATTERNS}
    for a, b in itertools.combinations(GATE_PATTERNS, 2):
        assert gates[a].shape != gates[b].shape or not torch.equal(gates[a], gates[b])


# --------------------------------------------------------------------------------------------
# exact_zero_gate_grad: the true gate gradient at gate 0
# --------------------------------------------------------------------------------------------
def _plain_gated_attention(q, k, v, gate, mask, scale):
    """Gated attention written with einsum and autograd-friendly ops only (no pruning shortcut):
    its gate gradient at 0 is the true one, sum ctx . dout. q, k, v (B, S, H, D)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    g = gate[None, None, :, None] if gate.dim() == 1 else gate[:, None, :, None]
    return ctx * g.to(ctx.dtype)


@pytest.mark.all_devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pattern", ["fractional", "one_head", "all_off", "per_example"])
def test_exact_zero_gate_grad_is_the_true_gradient(device, dtype, pattern):
    """With exact_zero_gate_grad=True, d_head_gate equals autograd through plain attention at
    every entry (gate 0 included); the output and dq, dk, dv are those of the default."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is CPU-only")
    gen = torch.Generator().manual_seed(stable_seed("zero-gate", pattern))
    batch, seq, dim = 3, 11, 16
    q, k, v = make_qkv(batch, seq, HEADS, dim, dtype, device, gen, layout="contiguous")
    gate = make_gate(pattern, batch, HEADS, device, gen)
    if pattern == "per_example":
        gate[1, 2] = 0.0
    gate = gate.to(dtype if dtype == torch.float64 else torch.float32)
    mask = make_padding(batch, seq, device, gen)
    dout = torch.randn(batch, seq, HEADS, dim, generator=gen, dtype=dtype).to(device)
    assert bool((gate == 0).any())

    def grads(fn, **kw):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, gate)]
        out = fn(*leaves, mask, dim**-0.5, **kw)
        out.backward(dout)
        return out.detach(), *(t.grad for t in leaves)

    default = grads(ops.masked_attention)
    exact = grads(ops.masked_attention, exact_zero_gate_grad=True)
    plain = grads(_plain_gated_attention)
    tol = {"atol": 1e-10, "rtol": 1e-8} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(exact[4], plain[4], **tol)  # d_head_gate, every entry
    assert torch.equal(exact[0], default[0])  # the forward is unchanged
    for got, want in zip(exact[1:4], default[1:4]):  # dq, dk, dv: as the default
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    zero = gate == 0
    assert bool((default[4][zero] == 0).all()) and bool((exact[4][zero] != 0).all())
    assert torch.equal(exact[4][~zero], default[4][~zero])


def test_exact_zero_gate_grad_without_gate_grad_is_a_no_op():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float32, "cpu", gen)
    gate = torch.tensor([1.0, 0.0, 0.5, 0.0])
    out = ops.masked_attention(q, k, v, gate, exact_zero_gate_grad=True)
    assert out.grad_fn is None and torch.equal(out, ops.masked_attention(q, k, v, gate))


def test_fully_padded_row_is_refused_on_cpu_either_way():
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float32, "cpu", gen, "contiguous")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    for check in (True, False):
        with pytest.raises(ValueError, match="key_padding_mask"):
            ops.masked_attention(q, k, v, torch.ones(HEADS), mask, check_padding_rows=check)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("small", [1e-4, 1e-6, 1e-9])
def test_gate_gradient_of_small_gates_keeps_its_precision(dtype, small, assert_native):
    """d_head_gate = sum(dout . ctx) must not come from the stored, gate-scaled output
    (g * ctx rounds to a subnormal or to 0 in fp16 for small g): within twice the error of
    plain PyTorch in the same dtype, against fp64."""
    assert_native("masked_attention_backward", "cpu")
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(2, 64, 2, 32, torch.float64, "cpu", gen, "contiguous")
    dout = torch.randn(2, 64, 2, 32, generator=gen, dtype=torch.float64)

    def gate_grad(fn, dtype):
        gate = torch.tensor([small, 1.0], dtype=torch.float32 if dtype != torch.float64
                            else dtype, requires_grad=True)
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype), gate)
        return torch.autograd.grad(out, gate, dout.to(out.dtype))[0].double()

    def plain(q, k, v, gate):
        ctx = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return ctx.transpose(1, 2) * gate.to(q.dtype)[None, None, :, None]

    truth = gate_grad(plain, torch.float64)
    ours = gate_grad(ops.masked_attention, dtype)
    theirs = gate_grad(plain, dtype)
    error = ((ours - truth).abs() / truth.abs()).max()
    assert error <= 2 * ((theirs - truth).abs() / truth.abs()).max() + 1e-6, error


def test_second_derivative_raises():
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float64, "cpu", gen, "contiguous")
    q.requires_grad_(True)
    out = ops.masked_attention(q, k, v, torch.ones(HEADS, dtype=torch.float64))
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(dq.sum(), q)


@pytest.mark.parametrize("gate_shape", ["(H,)", "(B, H)"])
def test_compact_gradients_are_the_gathered_heads(gate_shape):
    """compact differentiates as masked_attention of the kept heads' slices: the same
    gradients there, zeros at the heads not kept, a head listed twice gets both contributions
    (float64 gradcheck too); no graph without inputs that need gradients."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float64, "cpu", gen, "contiguous")
    gate = torch.tensor([1.0, 0.5, 0.0, 0.8], dtype=torch.float64)
    if gate_shape == "(B, H)":
        gate = torch.stack([gate, gate.flip(0)])
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    kept = torch.tensor([3, 1, 2, 1])  # head 1 twice, head 0 not at all
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, gate)]
    dout = torch.randn(2, 5, len(kept), 8, dtype=torch.float64, generator=gen)
    out = ops.masked_attention_compact(*inputs, kept, mask)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(
        ops.masked_attention(*(t.index_select(2, kept) for t in inputs[:3]),
                             inputs[3].index_select(-1, kept), mask), inputs, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not got[0][:, :, 0].any() and got[0][:, :, 1].any()
    assert torch.autograd.gradcheck(
        lambda *t: ops.masked_attention_compact(*t, kept, mask),
        [t.detach().clone().requires_grad_(True) for t in (q, k, v, gate.clamp(min=0.3))])
    with torch.no_grad():  # the fast path's use
        assert ops.masked_attention_compact(q, k, v, gate, torch.tensor([1])).grad_fn is None
    # no head kept: an empty output, zero gradients (the backward op refused H = 0)
    none = ops.masked_attention_compact(*inputs, torch.tensor([], dtype=torch.long), mask)
    assert none.shape == (2, 5, 0, 8)
    got = torch.autograd.grad(none.sum(), inputs, allow_unused=True)
    assert all(g is not None and not g.any() and g.shape == t.shape
               for g, t in zip(got, inputs))


@pytest.mark.all_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_gradients_on_each_device(device, dtype, assert_native):
    """The native compact forward (on CUDA the mma.sync one) with its backward: the gradients
    of masked_attention on the gathered kept heads."""
    assert_native("masked_attention_compact", device)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (t.to(device) for t in make_qkv(2, 33, HEADS, 64, dtype, "cpu", gen, "contiguous"))
    gate = torch.tensor([1.0, 0.5, 0.0, 0.8], device=device)
    mask = torch.ones(2, 33, dtype=torch.bool, device=device)
    mask[1, 20:] = False
    kept = torch.tensor([3, 1], device=device)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, gate)]
    dout = torch.randn(2, 33, 2, 64, generator=gen).to(device, dtype)
    got = torch.autograd.grad(ops.masked_attention_compact(*inputs, kept, mask), inputs, dout)
    want = torch.autograd.grad(
        ops.masked_attention(*(t.index_select(2, kept) for t in inputs[:3]),
                             inputs[3].index_select(-1, kept), mask), inputs, dout)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert not got[0][:, :, [0, 2]].any()


def test_compact_passes_opcheck_with_inputs_that_need_gradients():
    """(it failed test_aot_dispatch_dynamic while its backward raised)"""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float32, "cpu", gen, "contiguous")
    gate = torch.tensor([1.0, 0.5, 0.0, 0.8], requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 4:] = False
    torch.library.opcheck(torch.ops.sparsebert.masked_attention_compact.default,
                          (q.requires_grad_(True), k, v, gate, torch.tensor([0, 3]), mask, 0.35))


def test_compact_under_torch_func_runs_the_reference():
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(2, 5, HEADS, 8, torch.float64, "cpu", gen, "contiguous")
    gate = torch.tensor([1.0, 0.5, 0.3, 0.8], dtype=torch.float64)
    kept = torch.tensor([0, 2])

    def loss(gate):
        return ops.masked_attention_compact(q, k, v, gate, kept).pow(2).sum()

    got = torch.func.grad(loss)(gate)
    g = gate.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(loss(g), g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[1] == 0 and got[3] == 0


def test_fake_kernels_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode():
        q = torch.randn(2, 3, HEADS, 8)
        with pytest.raises(ValueError, match="'k' must be"):
            torch.ops.sparsebert.masked_attention(q, torch.randn(2, 3, HEADS, 4), q,
                                                  torch.ones(HEADS), None, 1.0)
        with pytest.raises(ValueError, match="'head_gate' must have shape"):
            torch.ops.sparsebert.masked_attention(q, q, q, torch.ones(HEADS + 1), None, 1.0)
        with pytest.raises(ValueError, match="'kept_heads' must be a 1-d"):
            torch.ops.sparsebert.masked_attention_compact(
                q, q, q, torch.ones(HEADS), torch.ones(2, 2, dtype=torch.long), None, 1.0)


@pytest.mark.parametrize("exact", [False, True])
def test_torch_compile_fullgraph_matches_eager(exact):
    """The fakes and autograd trace whole (no graph breaks): forward + backward of a fused-QKV
    call with padding and a gate with a pruned head, exact_zero_gate_grad on and off."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 7, 3 * HEADS * 8, generator=gen, requires_grad=True)
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0], requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    weights = torch.randn(2, 7, HEADS, 8, generator=gen)

    def f(qkv, gate):
        q, k, v = qkv.view(2, 7, 3, HEADS, 8).unbind(2)
        out = ops.masked_attention(q, k, v, gate, mask, exact_zero_gate_grad=exact)
        return (out * weights).sum()  # d out = weights: nonzero at the pruned head too

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want = torch.autograd.grad(f(qkv, gate), (qkv, gate))
    got = torch.autograd.grad(compiled(qkv, gate), (qkv, gate))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[1][1] != 0) == exact  # the pruned head's gate gradient


def test_compact_compiles_with_inputs_that_need_gradients():
    """Traced by torch.compile with q, k, v from a layer that needs gradients (it failed at
    compile time while its backward raised, also for a forward-only call): eager's outputs and
    the gradients of masked_attention on the gathered kept heads."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 7, 3 * HEADS * 8, generator=gen, requires_grad=True)
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0])
    kept = torch.tensor([0, 2, 3])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    weights = torch.randn(2, 7, len(kept), 8, generator=gen)

    def compact(qkv):
        q, k, v = qkv.view(2, 7, 3, HEADS, 8).unbind(2)
        return ops.masked_attention_compact(q, k, v, gate, kept, mask)

    def gathered(qkv):
        q, k, v = (t.index_select(2, kept) for t in qkv.view(2, 7, 3, HEADS, 8).unbind(2))
        return ops.masked_attention(q, k, v, gate[kept], mask)

    compiled = torch.compile(compact, backend="aot_eager", fullgraph=True)
    out = compiled(qkv)
    torch.testing.assert_close(out, compact(qkv.detach()), rtol=1e-5, atol=1e-6)
    (got,) = torch.autograd.grad((out * weights).sum(), qkv)
    (want,) = torch.autograd.grad((gathered(qkv) * weights).sum(), qkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (eager,) = torch.autograd.grad((compact(qkv) * weights).sum(), qkv)
    torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_with_a_changing_scale():
    """A scale that changes between calls is traced as a symbolic float after the first
    recompile (torch's specialize_float off): still one graph, no break at the scale's check."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    gate = torch.ones(2)
    compiled = torch.compile(lambda q, scale: ops.masked_attention(q, k, v, gate, None, scale),
                             backend="aot_eager", fullgraph=True)
    for scale in (0.25, 0.5, 0.75):
        want, _ = masked_attention_ref(q, k, v, gate, None, scale)
        torch.testing.assert_close(compiled(q, scale), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["0.5", True, float("nan")])
def test_compiled_calls_refuse_a_bad_scale_too(scale):
    """While torch.compile traces, a bad constant scale is refused as in eager mode."""
    torch._dynamo.reset()
    q = torch.randn(1, 4, 2, 8)
    compiled = torch.compile(lambda q, scale: ops.masked_attention(q, q, q, torch.ones(2), None,
                                                                   scale), backend="eager")
    with pytest.raises(ValueError, match="'scale' must be a finite real number"):
        compiled(q, scale)


def test_torch_compile_fullgraph_off_the_cpu_with_a_mask():
    """Off the CPU the wrapper checks for fully padded rows (meta tensors stand in for CUDA
    ones): a compiled call with a mask traces whole, the check skipped while compiling (it
    read the functorch stack first, which Dynamo cannot trace)."""
    q = torch.randn(2, 7, HEADS, 8, device="meta")
    mask = torch.ones(2, 7, dtype=torch.bool, device="meta")
    gate = torch.ones(HEADS, device="meta")
    for heads, op in ((HEADS, lambda q, m: ops.masked_attention(q, q, q, gate, m)),
                      (2, lambda q, m: ops.masked_attention_compact(  # the kept heads only
                          q, q, q, gate, torch.arange(2, device="meta"), m))):
        out = torch.compile(op, backend="aot_eager", fullgraph=True)(q, mask)
        assert out.shape == (2, 7, heads, 8) and out.device.type == "meta"
        assert op(q, mask).shape == out.shape  # eager on meta too: no values to check


def test_non_finite_scores_of_real_keys_turn_rows_nan_as_softmax(assert_native):
    """A NaN or infinite score on a real key makes its rows NaN, as softmax (and the
    reference) do, with a padding mask too (it was clamped into a finite, wrong output); a
    NaN in a padded key's k leaves the output as it is (its score is never used; a NaN in
    its v row is not kept out, as with SDPA: README, Ops)."""
    assert_native("masked_attention", "cpu")
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(2, 6, HEADS, 8, torch.float32, "cpu", gen, "contiguous")
    gate = torch.ones(HEADS)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    k[0, 2, 0, 0] = float("nan")  # a real key of batch 0, head 0
    q[1, 3, 1, 0] = float("inf")  # a query of batch 1, head 1
    k[1, 5, 2, :] = float("nan")  # a padded key of batch 1, head 2
    for padding in (mask, None):
        got = ops.masked_attention(q, k, v, gate, padding)
        want, _ = masked_attention_ref(q, k, v, gate, padding, 8**-0.5)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-6)
        assert got[0, :, 0].isnan().all() and got[1, 3, 1].isnan().all()
    assert not got[0, :, 1:].isnan().any()
    clean = ops.masked_attention(q, k, v, gate, mask)[1, :, 2]
    assert not clean.isnan().any()  # the padded key's NaN stays out


FALLBACK_SCRIPT = """
import torch
from sparsebert import ops
assert not ops.NATIVE_AUTOGRAD
full = torch.ones(2, 5, dtype=torch.bool)
for check in (True, False):  # the wrapper's padding-row check, skipped while compiling
    f = torch.compile(lambda q, m: ops.masked_attention(q, q, q, torch.ones(3), m,
                                                        check_padding_rows=check),
                      backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(f(x, full), ops.masked_attention(x, x, x, torch.ones(3), full))
# dynamic shapes with a gate made inside the traced function (the shape check compared q's
# symbolic H with the gate's plain 3 and refused the call)
f = torch.compile(lambda q: ops.masked_attention(q, q, q, torch.ones(3)),
                  backend="aot_eager", fullgraph=True, dynamic=True)
x = torch.randn(2, 5, 3, 4)
torch.testing.assert_close(f(x), ops.masked_attention(x, x, x, torch.ones(3)))
q, k, v = (torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
gate = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
mask = torch.ones(2, 5, dtype=torch.bool)
mask[1, 3:] = False
assert torch.autograd.gradcheck(lambda q, k, v, g: ops.masked_attention(q, k, v, g, mask),
                                (q, k, v, gate.detach().clone().fill_(0.7).requires_grad_()))
out = ops.masked_attention(q, k, v, gate, mask)
dq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
try:
    torch.autograd.grad(dq.sum(), q)
except RuntimeError as error:
    assert "differentiable once" in str(error), error
else:
    raise AssertionError("a second derivative did not raise")
kept = torch.tensor([2, 0, 2])  # compact's gradients: masked_attention's of the gathered heads
got = torch.autograd.grad(ops.masked_attention_compact(q, k, v, gate, kept, mask).sum(),
                          (q, k, v, gate))
want = torch.autograd.grad(ops.masked_attention(*(t.index_select(2, kept) for t in (q, k, v)),
                                                gate[kept], mask).sum(), (q, k, v, gate))
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
torch.library.opcheck(torch.ops.sparsebert.masked_attention_compact.default,
                      (q, k, v, gate, kept, mask, 0.5))
none = ops.masked_attention_compact(q, k, v, gate, torch.tensor([], dtype=torch.long), mask)
assert not any(g.any() for g in torch.autograd.grad(none.sum(), (q, k, v, gate)))
for bad in ([0, 3], [-1]):  # one past the end, negative: the wrapper's error, not IndexError
    try:
        ops.masked_attention_compact(q, k, v, gate, torch.tensor(bad))
    except ValueError as error:
        assert "[0, H = 3)" in str(error), error
    else:
        raise AssertionError(f"kept_heads {bad} was accepted")
# The backward kernel (closed form, no autograd inside) under inference_mode, under a dispatch
# mode (FlopCounterMode) and through opcheck, with the gradients of plain autograd.
from torch.utils.flop_counter import FlopCounterMode
q0, k0, v0, g0 = (t.detach() for t in (q, k, v, gate))
out0, lse0 = torch.ops.sparsebert.masked_attention(q0, k0, v0, g0, mask, 0.5)
dout = torch.randn_like(out0)
args = (dout, q0, k0, v0, g0, mask, out0, lse0, 0.5)
want = torch.ops.sparsebert.masked_attention_backward(*args)
with torch.inference_mode():
    got = torch.ops.sparsebert.masked_attention_backward(*args)
assert all(torch.equal(a, b) for a, b in zip(got, want))
with FlopCounterMode(display=False):
    ops.masked_attention(q, k, v, gate, mask).backward(dout)
plain = torch.autograd.grad(ops.masked_attention(q, k, v, gate, mask), (q, k, v, gate), dout)
for a, b in zip((q.grad, k.grad, v.grad, gate.grad), plain):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
torch.library.opcheck(torch.ops.sparsebert.masked_attention_backward.default, args)
print("ok")
"""


def test_reference_path_without_the_extension():
    """The pure-PyTorch path (extension not built): gradcheck with a mask, a second
    derivative raises as on the native path, the compact op's gradients and opcheck, it names
    a kept head out of [0, H), and the backward runs under inference_mode, a dispatch mode and
    opcheck."""
    run_without_extension(FALLBACK_SCRIPT)


def test_return_lse_is_the_log_sum_exp_of_the_scores(assert_native):
    """lse (B, H, Sq) = logsumexp over real keys of scale * q . k; 0 for a pruned head."""
    assert_native("masked_attention", "cpu")
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(2, 6, HEADS, 8, torch.float64, "cpu", gen, "contiguous")
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out, lse = ops.masked_attention(q, k, v, gate, mask, return_lse=True)
    assert torch.equal(out, ops.masked_attention(q, k, v, gate, mask))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    want = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    want[:, 1] = 0.0  # the pruned head
    assert lse.shape == (2, HEADS, 6) and lse.dtype == torch.float64
    torch.testing.assert_close(lse, want, rtol=1e-10, atol=1e-10)


def _transform_case(gen: torch.Generator, per_example: bool):
    """fp64 q, k, v (B=2, S=5, H=3, D=4), a mask with padding in example 1, and a gate with a
    pruned head, (H,) or (B, H): the torch.func tests' inputs."""
    q, k, v = (torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    gate = (torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
            if per_example else torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    return q, k, v, mask, gate


@pytest.mark.parametrize("exact", [False, True], ids=["zero-gate-tangent-0", "exact"])
@pytest.mark.parametrize("per_example", [False, True])
def test_forward_mode_ad_agrees_with_reverse_mode(per_example, exact):
    """torch.func.jvp through ops.masked_attention (the reference runs under forward-mode AD):
    <J t, c> equals <t, J^T c> from the kernels' backward, for tangents on every input."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, mask, gate = _transform_case(gen, per_example)
    inputs = (q, k, v, gate)
    tangents = tuple(torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in inputs)

    def f(q, k, v, g):
        return ops.masked_attention(q, k, v, g, mask, exact_zero_gate_grad=exact)

    out, tangent_out = torch.func.jvp(f, inputs, tangents)
    torch.testing.assert_close(out, f(*inputs))
    cotangent = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    leaves = tuple(t.clone().requires_grad_(True) for t in inputs)
    grads = torch.autograd.grad((f(*leaves) * cotangent).sum(), leaves)
    torch.testing.assert_close((tangent_out * cotangent).sum(),
                               sum((g * t).sum() for g, t in zip(grads, tangents)))


@pytest.mark.parametrize("exact", [False, True], ids=["zero-gate-grad-0", "exact"])
@pytest.mark.parametrize("per_example", [False, True])
def test_torch_func_grad_vjp_and_per_example_grads_match_autograd(per_example, exact):
    """torch.func.grad / vjp / vmap(grad) through ops.masked_attention (the reference runs under
    the transforms) give the kernels' reverse-mode gradients, the gate-0 convention included."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, mask, gate = _transform_case(gen, per_example)
    weight = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=gen)

    def loss(q, k, v, g):
        return (ops.masked_attention(q, k, v, g, mask, exact_zero_gate_grad=exact) * weight).sum()

    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v, gate))
    want = torch.autograd.grad(loss(*leaves), leaves)  # the kernels' backward
    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gate)
    for name, g, w in zip(("q", "k", "v", "gate"), got, want):
        torch.testing.assert_close(g, w, msg=name)
    out, pullback = torch.func.vjp(
        lambda *a: ops.masked_attention(*a, mask, exact_zero_gate_grad=exact), q, k, v, gate)
    torch.testing.assert_close(out, ops.masked_attention(q, k, v, gate, mask))
    for g, w in zip(pullback(weight), want):
        torch.testing.assert_close(g, w)
    if per_example:
        return
    # Per-example gate gradients with vmap(grad): example b alone, its own mask row.
    def one(q, k, v, m, w):
        f = lambda g: (ops.masked_attention(q[None], k[None], v[None], g, m[None],  # noqa: E731
                                            exact_zero_gate_grad=exact) * w[None]).sum()
        return torch.func.grad(f)(gate)

    per_example_grads = torch.func.vmap(one)(q, k, v, mask, weight)  # (B, H)
    torch.testing.assert_close(per_example_grads.sum(0), want[3])
    for b in range(q.shape[0]):
        torch.testing.assert_close(per_example_grads[b], one(q[b], k[b], v[b], mask[b], weight[b]))


def test_functionalize_keeps_the_op():
    """torch.func.functionalize (as make_fx and export use it) is not an autograd transform:
    the traced graph holds the masked_attention op, not the reference's plain ops."""
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    q = torch.randn(1, 4, 2, 8)
    gate = torch.ones(2)
    graph = make_fx(torch.func.functionalize(
        lambda q: ops.masked_attention(q, q, q, gate)))(q).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert "sparsebert.masked_attention.default" in targets


def test_raw_op_refuses_forward_mode_ad_and_lse_has_no_gradient(assert_native):
    """The op itself has no jvp: it says so (instead of returning zero tangents); its lse output
    is marked non-differentiable."""
    assert_native("masked_attention", "cpu")
    q, k, v = (torch.randn(1, 3, 2, 4, dtype=torch.float64) for _ in range(3))
    gate = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="no forward-mode derivative"):
        torch.func.jvp(lambda q: torch.ops.sparsebert.masked_attention(q, k, v, gate, None, 0.5)[0],
                       (q,), (torch.ones_like(q),))
    out, lse = torch.ops.sparsebert.masked_attention(q.requires_grad_(True), k, v, gate, None,
                                                     0.5)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("name", ["q", "k", "v", "head_gate", "key_padding_mask"])
def test_non_tensor_arguments_are_named(name):
    args = _good()
    args[name] = args[name].tolist() if args[name] is not None else [[True] * 5] * 2
    with pytest.raises(ValueError, match=f"'{name}' must be a torch.Tensor, got list"):
        ops.masked_attention(**args)


@pytest.mark.all_devices
def test_keys_far_below_the_row_max_get_no_weight(device, assert_native):
    """A key whose scaled score is 200 below the row's max has weight exp(-200) ~ 1e-87: 0 in
    fp32, however large its value (not exp(-87) ~ 1.6e-38 from a clamped exponent)."""
    assert_native("masked_attention", device)
    q = torch.ones(1, 1, 1, 1, device=device)
    k = torch.tensor([0.0, -200.0], device=device).view(1, 2, 1, 1)
    v = torch.tensor([0.0, 1e30], device=device).view(1, 2, 1, 1)
    out = ops.masked_attention(q, k, v, torch.ones(1, device=device), None, 1.0)
    assert out.item() == 0.0
    assert masked_attention_ref(q, k, v, torch.ones(1, device=device), None, 1.0)[0].item() == 0.0


@pytest.mark.parametrize("padded", [False, True])
def test_huge_equal_scores_share_their_weight(padded, assert_native):
    """Two keys with the same huge scaled score (~3e9, ulp 256) each get weight 1/2 in the CPU
    kernel's forward and backward, for every score of a range: the max and each exponent must
    come from the same rounded products (a fused multiply-subtract of the exponent's argument
    would be off by up to half an ulp, exp(-128) = 0 for both keys: a NaN row)."""
    assert_native("masked_attention", "cpu")
    scale = 0.1
    scores = torch.linspace(3e10, 3.0001e10, 2001)  # raw q.k; scaled ~3e9
    batch = scores.numel()
    q = scores.view(batch, 1, 1, 1).requires_grad_(True)
    k = torch.ones(batch, 2, 1, 1, requires_grad=True)
    v = torch.tensor([1.0, 3.0]).expand(batch, 2).reshape(batch, 2, 1, 1).requires_grad_(True)
    mask = torch.ones(batch, 2, dtype=torch.bool) if padded else None
    out, lse = torch.ops.sparsebert.masked_attention(q, k, v, torch.ones(1), mask, scale)
    torch.testing.assert_close(out, torch.full_like(out, 2.0), rtol=0, atol=0)
    assert torch.isfinite(lse).all()
    ops.masked_attention(q, k, v, torch.ones(1), mask, scale).sum().backward()
    torch.testing.assert_close(v.grad, torch.full_like(v.grad, 0.5), rtol=0, atol=0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_reference_rows_of_large_scores_sum_to_one():
    """The reference's probabilities are a softmax (rows sum to 1 within fp32 rounding), not
    exp(scores - lse), which lse's rounding scales by 1 + 2.5e-5 at scores ~1000."""
    torch.manual_seed(0)
    q = torch.full((1, 1, 1, 1), 1000.0)
    k = (1.0 + 1e-4 * torch.randn(1, 4, 1, 1))  # near-equal scores ~1000
    v = torch.ones(1, 4, 1, 1)  # out = the sum of the probabilities
    out, lse = masked_attention_ref(q, k, v, torch.ones(1), None, 1.0)
    assert abs(out.item() - 1.0) <= 4 * torch.finfo(torch.float32).eps
    want = torch.logsumexp((q[0, 0, 0] * k[0, :, 0, 0]).double(), 0)
    assert abs(lse.item() - want.item()) <= 1e-3


@pytest.mark.all_devices
def test_gate_is_read_in_the_inputs_compute_dtype(device, assert_native):
    """An fp64 gate on fp32 inputs is read in fp32 by the kernels and by both references: a gate
    of 1e-50 is 0 there, so the head is pruned (output and lse 0) everywhere."""
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 3, 2, 4, generator=gen).to(device) for _ in range(3))
    gate = torch.tensor([1e-50, 1.0], dtype=torch.float64, device=device)
    out, lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, None, 0.5)
    ref_out, ref_lse = masked_attention_ref(q, k, v, gate, None, 0.5)
    assert not lse[:, 0].any() and not ref_lse[:, 0].any() and not out[:, :, 0].any()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_gradients_of_near_one_hot_attention_as_accurate_as_sdpa(seed, assert_native):
    """Large scores (q, k x 10: nearly one-hot rows): the CPU backward's error against a float64
    oracle stays within 3x that of torch SDPA in fp32. (P recomputed as exp(s - lse) carries the
    stored lse's rounding, ~eps |max score| for the whole row; unnormalised, dP' - r cancelled it
    into 15-30x SDPA's error.)"""
    assert_native("masked_attention_backward", "cpu")
    gen = torch.Generator().manual_seed(seed)
    batch, seq, heads, dim = 2, 9, HEADS, 8
    q64, k64 = (10 * torch.randn(batch, seq, heads, dim, generator=gen, dtype=torch.float64)
                for _ in "qk")
    v64, dout64 = (torch.randn(batch, seq, heads, dim, generator=gen, dtype=torch.float64)
                   for _ in "vd")
    gate = torch.ones(heads)
    oracle = masked_attention_backward_ref(dout64, q64, k64, v64, gate.double(), None,
                                           *masked_attention_ref(q64, k64, v64, gate.double(),
                                                                 None, dim**-0.5), dim**-0.5)[:3]

    def grads(fn):
        q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
        (fn(q, k, v) * dout64.float()).sum().backward()
        return q.grad, k.grad, v.grad

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))
                                              ).transpose(1, 2)

    ours = grads(lambda q, k, v: ops.masked_attention(q, k, v, gate, None))
    base = grads(sdpa)
    for name, got, ref, want in zip(("dq", "dk", "dv"), ours, base, oracle):
        err = (got.double() - want).abs().max().item()
        base_err = (ref.double() - want).abs().max().item()
        assert err <= 3 * base_err + 1e-6, f"{name}: error {err:.3g} vs SDPA's {base_err:.3g}"


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _check_strided_grads(q, k, v, gate, mask, dout, scale, atol, rtol):
    # copies with the same strides (clone() of a non-dense view would be contiguous)
    leaves = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_(True)
              for t in (q, k, v, gate)]
    assert [t.stride() for t in leaves] == [t.stride() for t in (q, k, v, gate)]
    out = ops.masked_attention(*leaves, mask, scale)
    out.backward(dout)
    ref_out, ref_lse = masked_attention_ref(q, k, v, gate, mask, scale)
    torch.testing.assert_close(out.detach(), ref_out, atol=atol, rtol=rtol)
    want = masked_attention_backward_ref(dout, q, k, v, gate, mask, ref_out, ref_lse, scale)
    want = (*want[:3], want[3].sum(0) if gate.dim() == 1 else want[3])
    for name, leaf, w in zip(("dq", "dk", "dv", "d_head_gate"), leaves, want):
        torch.testing.assert_close(leaf.grad, w, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# masked_attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sq,sk", [(5, 13), (13, 5), (130, 7), (3, 131)])
def test_backward_with_cross_lengths_and_padding(sq, sk, assert_native):
    """Sq != Sk in the backward: the lse rows are Sq long, the padding mask is Sk long."""
    assert_native("masked_attention_backward", "cpu")
    gen = torch.Generator().manual_seed(sq * 1000 + sk)
    batch, dim = 3, 16
    q = _randn(batch, sq, HEADS, dim, gen=gen)
    k, v = (_randn(batch, sk, HEADS, dim, gen=gen) for _ in "kv")
    gate = torch.tensor([[1.0, 0.0, 0.4, 1.0], [1.0, 1.0, 0.0, 0.7], [0.2, 1.0, 1.0, 1.0]])
    lengths = torch.tensor([sk, max(1, sk // 2), 1])
    mask = torch.arange(sk)[None, :] < lengths[:, None]
    dout = _randn(batch, sq, HEADS, dim, gen=gen)
    _check_strided_grads(q, k, v, gate, mask, dout, dim**-0.5, atol=5e-5, rtol=2e-4)


@pytest.mark.parametrize("mask_view", ["sliced", "transposed"])
def test_non_contiguous_key_padding_mask(mask_view, assert_native):
    """A (B, Sk) mask that is a view (a slice of a longer mask, or a transposed (Sk, B) one) is
    read through its strides, forward and backward."""
    assert_native("masked_attention", "cpu")
    gen = torch.Generator().manual_seed(21)
    batch, seq, dim = 3, 9, 8
    q, k, v = (_randn(batch, seq, HEADS, dim, gen=gen) for _ in "qkv")
    lengths = torch.tensor([seq, 4, 1])
    dense = torch.arange(seq)[None, :] < lengths[:, None]
    if mask_view == "sliced":
        wide = torch.zeros(batch, 2 * seq + 3, dtype=torch.bool)
        wide[:, :seq] = dense
        mask = wide[:, :seq]
    else:
        mask = dense.t().contiguous().t()
    assert not mask.is_contiguous() and torch.equal(mask, dense)
    gate = torch.tensor([1.0, 0.5, 0.0, 1.0])
    out = ops.masked_attention(q, k, v, gate, mask)
    torch.testing.assert_close(out, masked_attention_ref(q, k, v, gate, dense, dim**-0.5)[0],
                               atol=2e-5, rtol=1e-4)
    dout = _randn(batch, seq, HEADS, dim, gen=gen)
    _check_strided_grads(q, k, v, gate, mask, dout, dim**-0.5, atol=5e-5, rtol=2e-4)


def test_k_and_v_with_different_strides(assert_native):
    """k contiguous and v a view of a fused projection: each is read through its own
    strides, forward and backward."""
    assert_native("masked_attention", "cpu")
    gen = torch.Generator().manual_seed(22)
    batch, seq, dim = 2, 7, 8
    q = _randn(batch, seq, HEADS, dim, gen=gen)
    k = _randn(batch, seq, HEADS, dim, gen=gen)
    v = _randn(batch, seq, 2 * HEADS * dim, gen=gen)[..., HEADS * dim:].view(batch, seq, HEADS, dim)
    assert k.stride() != v.stride()
    gate = torch.tensor([1.0, 0.3, 0.0, 1.0])
    mask = torch.tensor([[True] * seq, [True] * 3 + [False] * (seq - 3)])
    dout = _randn(batch, seq, HEADS, dim, gen=gen)
    _check_strided_grads(q, k, v, gate, mask, dout, dim**-0.5, atol=5e-5, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# argument checks of the native op (the wrapper defers to them when the extension is loaded)
# ---------------------------------------------------------------------------------------------
def test_native_checks_refuse_wrong_head_counts(assert_native):
    """A (B, H') gate with H' != H and a k/v with another head count are refused naming the
    argument, by the op and by the wrapper (which defers to the native checks)."""
    assert_native("masked_attention", "cpu")
    q = torch.randn(2, 5, HEADS, 8)
    with pytest.raises(ValueError, match="'head_gate'"):
        torch.ops.sparsebert.masked_attention(q, q, q, torch.ones(2, HEADS + 1), None, 0.3)
    with pytest.raises(ValueError, match="'head_gate'"):
        ops.masked_attention(q, q, q, torch.ones(2, HEADS + 1))
    kv = torch.randn(2, 5, HEADS + 2, 8)
    with pytest.raises(ValueError, match="'k'"):
        torch.ops.sparsebert.masked_attention(q, kv, kv, torch.ones(HEADS), None, 0.3)
    with pytest.raises(ValueError, match="'k'"):
        ops.masked_attention(q, kv, kv, torch.ones(HEADS))


def test_native_compact_refuses_kept_head_h(assert_native):
    """kept_heads = [H] (one past the end) is a ValueError naming 'kept_heads' with the range,
    from the op and from the wrapper with the extension loaded."""
    assert_native("masked_attention_compact", "cpu")
    q = torch.randn(2, 5, HEADS, 8)
    for call in (
        lambda kept: torch.ops.sparsebert.masked_attention_compact(
            q, q, q, torch.ones(HEADS), kept, None, 0.3),
        lambda kept: ops.masked_attention_compact(q, q, q, torch.ones(HEADS), kept),
    ):
        with pytest.raises(ValueError, match=rf"'kept_heads'.*\[0, H = {HEADS}\)"):
            call(torch.tensor([0, HEADS]))


# ---------------------------------------------------------------------------------------------
# masked_attention_compact: values against the reference and the dense op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kept", [[3, 0, 2], [1], [2, 3]])
@pytest.mark.parametrize("per_example", [False, True])
def test_compact_matches_reference_and_dense_op(kept, per_example, assert_native):
    assert_native("masked_attention_compact", "cpu")
    gen = torch.Generator().manual_seed(25)
    batch, sq, sk, dim = 3, 6, 9, 8
    q = _randn(batch, sq, HEADS, dim, gen=gen)
    k, v = (_randn(batch, sk, HEADS, dim, gen=gen) for _ in "kv")
    gate = (torch.tensor([[1.0, 0.5, 1.0, 0.3], [0.7, 1.0, 1.0, 1.0], [1.0, 1.0, 0.2, 1.0]])
            if per_example else torch.tensor([0.9, 1.0, 0.4, 1.0]))
    mask = torch.arange(sk)[None, :] < torch.tensor([sk, 4, 1])[:, None]
    kept_heads = torch.tensor(kept)
    out = ops.masked_attention_compact(q, k, v, gate, kept_heads, mask)
    want, _ = masked_attention_compact_ref(q, k, v, gate, kept_heads, mask, dim**-0.5)
    assert out.shape == (batch, sq, len(kept), dim)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    dense = ops.masked_attention(q, k, v, gate, mask)
    torch.testing.assert_close(out, dense[:, :, kept_heads], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_compact_reads_kept_heads_in_place_from_strided_inputs(dtype, assert_native):
    """The CPU compact kernel walks (batch, kept head) pairs over q/k/v views of one fused QKV
    projection (no gathered copies): its output and log-sum-exp equal the dense op's slices for
    kept heads out of order, listed twice, gated 0, and given as int32."""
    assert_native("masked_attention_compact", "cpu")
    gen = torch.Generator().manual_seed(31)
    batch, seq, dim = 2, 7, 8
    fused = _randn(batch, seq, 3 * HEADS * dim, gen=gen).to(dtype)  # (B, S, 3*H*D)
    q, k, v = (t.view(batch, seq, HEADS, dim) for t in fused.split(HEADS * dim, dim=-1))
    gate = torch.tensor([[1.0, 0.0, 0.6, 1.0], [0.3, 1.0, 1.0, 0.0]])  # (B, H)
    mask = torch.arange(seq)[None, :] < torch.tensor([seq, 3])[:, None]
    kept = torch.tensor([3, 1, 3, 0], dtype=torch.int32)
    scale = dim**-0.5
    out, lse = torch.ops.sparsebert.masked_attention_compact(q, k, v, gate, kept, mask, scale)
    dense, dense_lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)
    index = kept.long()
    assert out.shape == (batch, seq, 4, dim) and lse.shape == (batch, 4, seq)
    assert torch.equal(out, dense[:, :, index]) and torch.equal(lse, dense_lse[:, index])
    assert not out[0, :, 1].any() and not out[1, :, 0].any() and not out[1, :, 2].any()
