"""masked_attention_compact (CPU and CUDA), and the mma.sync kernels, CUDA's default (named
explicitly with SPARSEBERT_ATTENTION_KERNEL=mma; CUDA only: those tests are marked cuda and skip
without a GPU).

The mma kernel is compared with the fp32 reference under flash-attention's rule: its error is at
most twice that of plain PyTorch attention computed in the same low precision (plus a tiny floor).
Its fp32 variant (3xTF32) is compared with a float64 reference at 1e-5 (see TF32_TOL).
"""

from __future__ import annotations

import os

import pytest
import torch

from sparsebert import ops
from sparsebert.reference import (
    masked_attention_backward_ref,
    masked_attention_compact_ref,
    masked_attention_ref,
)
from tests.attention_kit import (
    flash_formulation_grads,
    make_padding,
    plain_pytorch_attention,
    stable_seed,
)

CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
HEADS = 4
SWITCH = "SPARSEBERT_ATTENTION_KERNEL"


def qkv(batch, seq, heads, dim, dtype, device, gen):
    """q, k, v as views of one fused (B, S, 3*H*D) projection (the layout models produce)."""
    fused = torch.randn(batch, seq, 3 * heads * dim, generator=gen).to(device, dtype)
    return tuple(t.view(batch, seq, heads, dim) for t in fused.split(heads * dim, dim=-1))


def gate_for(pattern, batch, heads, device, gen):
    if pattern == "all":
        return torch.ones(heads, device=device)
    if pattern == "none":
        return torch.zeros(heads, device=device)
    if pattern == "some":
        gate = torch.tensor([1.0, 0.0, 0.6, 0.0] * (heads // 4), device=device)
        return gate
    if pattern == "per_example":
        gate = (torch.rand(batch, heads, generator=gen) > 0.5).float()
        gate[0, 0] = 0.4
        return gate.to(device)
    raise ValueError(pattern)


# ---------------------------------------------------------------------------------------------
# masked_attention_compact on the CPU (native kernel: gather + the CPU forward).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kept", [[0, 1, 2, 3], [3, 1], [2], []])
@pytest.mark.parametrize("padded", [False, True])
def test_compact_cpu_matches_reference(dtype, kept, padded, assert_native):
    assert_native("masked_attention_compact", "cpu")
    gen = torch.Generator().manual_seed(stable_seed("compact", str(dtype), kept, padded))
    q, k, v = qkv(2, 9, HEADS, 16, dtype, "cpu", gen)
    gate = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=dtype)
    kept_heads = torch.tensor(kept, dtype=torch.int64)
    mask = make_padding(2, 9, "cpu", gen) if padded else None
    out = ops.masked_attention_compact(q, k, v, gate, kept_heads, mask)
    ref, _ = masked_attention_compact_ref(q, k, v, gate, kept_heads, mask, 16**-0.5)
    assert out.shape == (2, 9, len(kept), 16)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    dense = ops.masked_attention(q, k, v, gate, mask)
    torch.testing.assert_close(out, dense[:, :, kept_heads], atol=0, rtol=0)


def test_compact_opcheck(assert_native):
    assert_native("masked_attention_compact", "cpu")
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(2, 5, HEADS, 8, torch.float32, "cpu", gen)
    args = (q, k, v, torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([3, 0]), None, 8**-0.5)
    torch.library.opcheck(torch.ops.sparsebert.masked_attention_compact.default, args)


@pytest.mark.parametrize(
    "kept,needle",
    [
        (torch.tensor([4]), "'kept_heads'.*\\[0, H = 4\\)"),
        (torch.tensor([-1]), "'kept_heads'"),
        (torch.tensor([[0]]), "'kept_heads'.*1-d"),
        (torch.tensor([0.0]), "'kept_heads'.*int"),
        (torch.arange(5), "'kept_heads'.*at most"),
        (torch.tensor([0, 0, 1, 1, 2]), "'kept_heads'.*at most"),
    ],
)
@pytest.mark.parametrize("path", ["native", "python"])
def test_compact_bad_kept_heads(kept, needle, path, monkeypatch):
    """Both the native checks and the Python ones (builds without the extension)."""
    if path == "python":
        monkeypatch.setattr(ops, "NATIVE_AUTOGRAD", False)
    q = torch.randn(2, 5, HEADS, 8)
    with pytest.raises(ValueError, match=needle):
        ops.masked_attention_compact(q, q, q, torch.ones(HEADS), kept)


# ---------------------------------------------------------------------------------------------
# The mma.sync forward on CUDA (switch on), and the wgmma one where it can run (sm_90a build,
# compute capability 9.0). Each test first proves the kernel ran.
# ---------------------------------------------------------------------------------------------
def check_low_precision(out, ref, low, what):
    """flash-attention's rule: |out - ref| <= 2 |low - ref| + 1e-3 (max abs, fp32 ref); low: one
    yardstick or a tuple of them (the largest error counts)."""
    err = (out.float() - ref.float()).abs().max().item()
    lows = low if isinstance(low, tuple) else (low,)
    base = max((t.float() - ref.float()).abs().max().item() for t in lows)
    assert err <= 2 * base + 1e-3, f"{what}: error {err:.3g} vs the yardstick's {base:.3g}"



@pytest.fixture
def mma_switch(monkeypatch):
    monkeypatch.setenv(SWITCH, "mma")


@pytest.fixture(params=["mma", "wgmma"])
def forward_switch(request, monkeypatch):
    """The forward kernels: mma.sync (the default, named), and wgmma where it can run."""
    if request.param == "wgmma" and not ops.wgmma_forward_available():
        why = ("the wgmma forward needs a build with sm_90a code (TORCH_CUDA_ARCH_LIST=9.0a) "
               "and a compute capability 9.0 GPU")
        if os.environ.get("SPARSEBERT_REQUIRE_WGMMA") == "1":  # bench/gpu_check.sh's wgmma step
            pytest.fail(f"SPARSEBERT_REQUIRE_WGMMA=1: {why}")
        pytest.skip(why)
    monkeypatch.setenv(SWITCH, request.param)
    return request.param


def forward_kernel_ran(switch, fn) -> bool:
    """True if the forward kernel of `switch` (and not the other one) ran during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    wgmma = any("wgmma_forward_kernel" in n for n in names)
    mma = any("mma_forward_kernel" in n and "wgmma_forward_kernel" not in n for n in names)
    return (wgmma and not mma) if switch == "wgmma" else (mma and not wgmma)


def check_pruned_and_compact(q, k, v, gate, mask, out, lse):
    """Pruned heads' out and lse are exactly 0; the compact output over the kept heads equals
    the dense output's slices bit for bit."""
    batch, seq, heads, dim = q.shape
    active = gate.expand(batch, heads) != 0
    pruned = (~active).cpu()
    assert torch.all(out.cpu().transpose(1, 2)[pruned] == 0), "pruned heads must be exactly 0"
    assert torch.all(lse.cpu()[pruned] == 0)
    kept = torch.nonzero(active.any(0)).squeeze(1).to(q.device)
    compact = ops.masked_attention_compact(q, k, v, gate, kept, mask)
    assert compact.shape == (batch, seq, kept.numel(), dim)
    torch.testing.assert_close(compact, out[:, :, kept], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("seq", [1, 17, 128, 300, 512])
@pytest.mark.parametrize("pattern", ["all", "some", "none", "per_example"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_forward_dense_and_compact(device, dtype, dim, seq, pattern, padded, forward_switch,
                                       assert_native):
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(stable_seed("mma", str(dtype), dim, seq, pattern, padded))
    batch, scale = 2, dim**-0.5
    q, k, v = qkv(batch, seq, HEADS, dim, dtype, device, gen)
    gate = gate_for(pattern, batch, HEADS, device, gen)
    mask = make_padding(batch, seq, device, gen) if padded else None
    if pattern == "some" and padded:  # the routing depends on dtype, D and strides only
        assert forward_kernel_ran(
            forward_switch, lambda: torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)
        )
    out, lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)
    ref, ref_lse = masked_attention_ref(q, k, v, gate, mask, scale)
    low = plain_pytorch_attention(q, k, v, gate, mask, scale)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    check_low_precision(out, ref, low, "dense")
    active = (gate.expand(batch, HEADS) != 0)
    torch.testing.assert_close(lse[active], ref_lse[active], atol=2e-3, rtol=1e-3)
    check_pruned_and_compact(q, k, v, gate, mask, out, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_compact_int32_index_and_order(device, dtype, forward_switch):
    gen = torch.Generator().manual_seed(11)
    q, k, v = qkv(3, 70, 8, 64, dtype, device, gen)
    gate = torch.rand(3, 8, generator=gen).to(device)
    kept = torch.tensor([5, 0, 7], dtype=torch.int32, device=device)
    assert forward_kernel_ran(forward_switch,
                              lambda: ops.masked_attention_compact(q, k, v, gate, kept))
    out = ops.masked_attention_compact(q, k, v, gate, kept)
    ref, _ = masked_attention_compact_ref(q, k, v, gate, kept, None, 64**-0.5)
    low = plain_pytorch_attention(q, k, v, gate, None, 64**-0.5)[:, :, kept.long()]
    check_low_precision(out, ref, low, "compact")


@pytest.mark.parametrize("bad", [(HEADS, -1), (2**32 + 1, -(2**32) + 2)])  # 2nd: wrap in int32
@pytest.mark.parametrize("kernel", ["wmma", "mma"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_compact_index_out_of_range_gives_zeros_on_cuda(device, kernel, bad, monkeypatch):
    """On CUDA index values are not checked (a check would synchronise): a slot whose index is
    out of range is zeros (out and lse) on both kernels, also an int64 index that would wrap
    onto a valid head in int32; the other slots are as usual, and the device stays usable (no
    device-side assert from a gather)."""
    monkeypatch.setenv(SWITCH, kernel)  # (the script running this file may have set mma)
    gen = torch.Generator().manual_seed(13)
    q, k, v = qkv(2, 40, HEADS, 64, torch.float16, device, gen)
    gate = torch.ones(HEADS, device=device)
    kept = torch.tensor([2, *bad, 0], device=device)
    out, lse = torch.ops.sparsebert.masked_attention_compact(q, k, v, gate, kept, None, 64**-0.5)
    torch.cuda.synchronize()
    assert torch.all(out[:, :, 1:3] == 0) and torch.all(lse[:, 1:3] == 0)
    good = torch.tensor([0, 3], device=device)
    expected = ops.masked_attention_compact(q, k, v, gate, kept[good])
    torch.testing.assert_close(out[:, :, good], expected, atol=0, rtol=0)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_pruned_heads_never_read_and_cross_lengths(device, forward_switch):
    """NaN in pruned heads' q/k/v never reaches the output; Sq != Sk; deterministic."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(2, 33, HEADS, 32, generator=gen).to(device, torch.float16)
    k, v = (torch.randn(2, 200, HEADS, 32, generator=gen).to(device, torch.float16) for _ in "kv")
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0], device=device)
    for t in (q, k, v):
        t[:, :, 1] = float("nan")
    mask = make_padding(2, 200, device, gen)
    out, _ = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, 0.2)
    again, _ = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, 0.2)
    assert torch.isfinite(out).all() and torch.equal(out, again)
    ref, _ = masked_attention_ref(q, k, v, gate, mask, 0.2)
    low = plain_pytorch_attention(q, k, v, gate, mask, 0.2)
    check_low_precision(out.nan_to_num(), ref.nan_to_num(), low.nan_to_num(), "cross lengths")


def many_items_case(dim, dtype, device, gen):
    """B=32, S=300, H=12: 1920 work items (5 query tiles per active (b, h)), several per CTA of
    the persistent grid on any GPU of up to 240 SMs x 8 CTAs, 5 key tiles with a ragged last one,
    per-example gates and key padding."""
    batch, seq, heads = 32, 300, 12
    q, k, v = qkv(batch, seq, heads, dim, dtype, device, gen)
    gate = (torch.rand(batch, heads, generator=gen) > 0.3).float().to(device)
    mask = make_padding(batch, seq, device, gen)
    return q, k, v, gate, mask, dim**-0.5


@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_forward_many_work_items_per_cta(device, dim, forward_switch):
    """Every CTA walks several work items: each one is computed once and right."""
    gen = torch.Generator().manual_seed(stable_seed("many items", dim))
    q, k, v, gate, mask, scale = many_items_case(dim, torch.float16, device, gen)
    out, lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)
    ref, ref_lse = masked_attention_ref(q, k, v, gate, mask, scale)
    check_low_precision(out, ref, plain_pytorch_attention(q, k, v, gate, mask, scale), "many items")
    active = gate != 0
    torch.testing.assert_close(lse[active], ref_lse[active], atol=2e-3, rtol=1e-3)
    check_pruned_and_compact(q, k, v, gate, mask, out, lse)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_backward_many_work_items_per_cta(device, mma_switch):
    """The backward's persistent grid over the same many work items: the fp32 reference's
    gradients, and exact zeros for pruned heads."""
    gen = torch.Generator().manual_seed(stable_seed("many items backward"))
    q, k, v, gate, mask, scale = many_items_case(64, torch.bfloat16, device, gen)
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v, gate)]
    out = ops.masked_attention(*inputs, mask, scale)
    dout = torch.randn(out.shape, generator=gen).to(device, out.dtype)
    grads = torch.autograd.grad(out, inputs, dout)
    check_grads_near_fp32_reference(grads, (q, k, v, gate), mask, scale, dout)
    assert_pruned_grads_zero(grads, gate)


def check_grads_near_fp32_reference(grads, inputs, mask, scale, dout, tol=2e-2):
    """Each of the q, k, v, gate gradients within relative error (norm) `tol` of the fp32
    reference's for the same inputs and dout."""
    floats = [t.detach().float().requires_grad_(True) for t in inputs]
    ref = masked_attention_ref(*floats, mask, scale)[0]
    ref_grads = torch.autograd.grad(ref, floats, dout.float())
    for name, got, want in zip("q k v gate".split(), grads, ref_grads, strict=True):
        rel = (got.float() - want).norm() / want.norm().clamp_min(1e-6)
        assert rel < tol, f"d{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_forward_with_the_verified_backward(device, forward_switch):
    """Gradients through ops.masked_attention with the mma forward (its out and lse feed the
    existing backward kernel) match the fp32 reference's."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (t.detach().requires_grad_(True)
               for t in qkv(2, 130, HEADS, 64, torch.bfloat16, device, gen))
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0], device=device, requires_grad=True)
    out = ops.masked_attention(q, k, v, gate)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, gate), dout)
    check_grads_near_fp32_reference(grads, (q, k, v, gate), None, 64**-0.5, dout)


def kernel_ran(name, fn) -> bool:
    """True if a CUDA kernel whose name contains `name` ran during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any(name in e.name for e in prof.events())


def backward_case(seq, dtype, dim, pattern, padded, device, gen):
    """Inputs of a backward test: seq = S or (Sq, Sk); q, k, v as views of fused projections;
    the forward's out and lse; dout. Returns the masked_attention_backward arguments."""
    batch, scale = 2, dim**-0.5
    q_len, kv_len = seq if isinstance(seq, tuple) else (seq, seq)
    q = qkv(batch, q_len, HEADS, dim, dtype, device, gen)[0]
    _, k, v = qkv(batch, kv_len, HEADS, dim, dtype, device, gen)
    gate = gate_for(pattern, batch, HEADS, device, gen)
    mask = make_padding(batch, kv_len, device, gen) if padded else None
    out, lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)
    dout = torch.randn(out.shape, generator=gen).to(device, dtype)
    return dout, q, k, v, gate, mask, out, lse, scale


def assert_pruned_grads_zero(grads, gate):
    """dq, dk, dv slices and d_head_gate of heads with gate 0 are exactly 0."""
    pruned = (gate.expand(grads[3].shape) == 0).cpu()
    assert torch.all(grads[3].cpu()[pruned] == 0)
    for g in grads[:3]:
        assert torch.all(g.cpu().transpose(1, 2)[pruned] == 0)


def low_precision_grads(q, k, v, gate, mask, scale, dout):
    """Gradients of plain PyTorch attention in the inputs' own precision (the error yardstick)."""
    qh, kh, vh = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    gh = gate.detach().clone().requires_grad_(True)
    out = plain_pytorch_attention(qh, kh, vh, gh, mask, scale)
    return torch.autograd.grad(out, (qh, kh, vh, gh), dout)


@pytest.mark.parametrize("pattern", ["some", "per_example"])
@pytest.mark.parametrize("seq", [1, 17, (9, 30)])
def test_flash_formulation_grads_match_the_reference(seq, pattern):
    """The second yardstick of the backward checks, given the exact out, is the exact backward
    (float64: padding, gates, cross lengths)."""
    gen = torch.Generator().manual_seed(stable_seed("flash formulation", seq, pattern))
    q_len, kv_len = seq if isinstance(seq, tuple) else (seq, seq)
    q = qkv(2, q_len, HEADS, 16, torch.float64, "cpu", gen)[0]
    _, k, v = qkv(2, kv_len, HEADS, 16, torch.float64, "cpu", gen)
    gate = gate_for(pattern, 2, HEADS, "cpu", gen).double()
    mask = make_padding(2, kv_len, "cpu", gen)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    out, lse = masked_attention_ref(q, k, v, gate, mask, 0.25)
    want = masked_attention_backward_ref(dout, q, k, v, gate, mask, out, lse, 0.25)
    got = flash_formulation_grads(dout, q, k, v, gate, mask, out, 0.25)
    for g, w in zip(got, want[:3]):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dim", [32, 64])
def test_one_key_bf16_gradients_need_the_flash_yardstick(dim):
    """Why the backward checks have a second yardstick: with one key the exact dq, dk are 0, and
    plain PyTorch's bf16 ones are exactly 0 too (P (dP - P dP) with P = 1), so its error is no
    measure there; delta taken from the out rounded to bf16 (what the forward stored) leaves
    dq, dk above the 1e-3 floor (the CUDA kernel showed 1.2e-3..2.8e-3); fp16's rounding, 8x
    finer, leaves less but can reach it too."""
    gen = torch.Generator().manual_seed(stable_seed("one key", dim))
    worst = {torch.bfloat16: 0.0, torch.float16: 0.0}
    for _ in range(4):
        q, k, v = qkv(2, 1, HEADS, dim, torch.float32, "cpu", gen)
        gate = gate_for("some", 2, HEADS, "cpu", gen)
        dout = torch.randn(q.shape, generator=gen)
        out, lse = masked_attention_ref(q, k, v, gate, None, dim**-0.5)
        exact = masked_attention_backward_ref(dout, q, k, v, gate, None, out, lse, dim**-0.5)
        assert exact[0].abs().max() < 1e-6 and exact[1].abs().max() < 1e-6
        low = low_precision_grads(*(t.bfloat16() for t in (q, k, v)), gate, None, dim**-0.5,
                                  dout.bfloat16())
        assert torch.all(low[0] == 0) and torch.all(low[1] == 0)
        for dtype in worst:
            got = flash_formulation_grads(dout, q, k, v, gate, None, out.to(dtype), dim**-0.5)
            worst[dtype] = max(worst[dtype], *(g.abs().max().item() for g in got[:2]))
    assert worst[torch.bfloat16] > 1e-3 and worst[torch.float16] < worst[torch.bfloat16] / 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("seq", [1, 17, 100, 128, 129, 300, 512, (65, 512), (300, 40)])
@pytest.mark.parametrize("pattern", ["all", "some", "per_example"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_backward(device, dtype, dim, seq, pattern, padded, mma_switch, assert_native):
    """The one-launch mma backward (one CTA per head for S <= 128, per 128-row key or query
    block beyond; seq = (Sq, Sk) for cross lengths): dq, dk, dv, d_head_gate vs the fp32
    reference, within twice plain PyTorch's low-precision error; pruned heads get exact zeros."""
    assert_native("masked_attention_backward", device)
    key = ("mma bwd", str(dtype), dim, seq, pattern, padded)
    gen = torch.Generator().manual_seed(stable_seed(*key))
    args = backward_case(seq, dtype, dim, pattern, padded, device, gen)
    dout, q, k, v, gate, mask, _, _, scale = args
    if pattern == "some" and padded:
        assert kernel_ran(
            "mma_backward_kernel", lambda: torch.ops.sparsebert.masked_attention_backward(*args)
        )
    got = torch.ops.sparsebert.masked_attention_backward(*args)
    ref_out, ref_lse = masked_attention_ref(q, k, v, gate, mask, scale)
    want = masked_attention_backward_ref(dout, q, k, v, gate, mask, ref_out, ref_lse, scale)
    low = low_precision_grads(q, k, v, gate, mask, scale, dout)
    # The kernel takes delta from the stored out (args[6]): its rounding is no kernel error.
    flash = flash_formulation_grads(dout, q, k, v, gate, mask, args[6], scale)
    for name, g, w, lo, fl in zip(("dq", "dk", "dv"), got[:3], want[:3], low[:3], flash):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        check_low_precision(g, w, (lo, fl), name)
    active = gate.expand(got[3].shape) != 0
    # d_head_gate = sum_i delta_i / gate, delta from the low-precision out: relative error.
    rel = (got[3][active] - want[3][active]).norm() / want[3][active].norm().clamp_min(1e-6)
    assert rel < 2e-2, f"d_head_gate: relative error {rel:.3g}"
    assert_pruned_grads_zero(got, gate)


# fp16's stored output g * ctx loses digits for a small soft gate (subnormal below 6.1e-5, 0
# below ~3e-8 x |ctx|): the mma backward's d_head_gate = sum_i delta_i / gate, delta from that
# output, cannot restore them (a CPU replay of its arithmetic: 4.4e-2 relative error at 1e-6, 0
# at 1e-9). The CPU kernel and the WMMA/SIMT backward sum P * (dout V^T) instead. To fix: sum
# p * dP in key_chunk_to_grads (csrc/cuda/mma_backward_common.cuh); see csrc/README.md.
FP16_SMALL_GATE = pytest.mark.xfail(
    strict=True, reason="fp16 mma backward: d_head_gate from the stored output (csrc/README.md)")


# Scaled scores past 2^31: the mma forward's exponent fmaf(s, scale_log2, -m), m the rounded max
# product, is off by up to half an ulp (128 there): 2^e overflows (NaN row) or flushes to 0, and
# the backward rebuilds P from the rounded lse (an emulation of the arithmetic: 495 of these
# 2001 rows NaN, 629 zero in fp32). The CPU kernel passes (test_masked_attention.py). To fix:
# see csrc/README.md ("A second known limit").
HUGE_SCORES = pytest.mark.xfail(
    strict=True, reason="mma kernels: exponents at scaled scores past 2^31 (csrc/README.md)")


@HUGE_SCORES
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_huge_equal_scores_share_their_weight(device, dtype, backward, mma_switch):
    """Two keys with the same huge scaled score (~3e9) each get weight 1/2 (out 2.0 from values
    1 and 3; d v 1/2 each), for every score of a range, as in the CPU kernel (D = 32: the mma
    path)."""
    scale, dim = 0.1, 32
    scores = torch.linspace(3e10, 3.0001e10, 2001)  # raw q.k; scaled ~3e9
    batch = scores.numel()
    q = (scores / dim).view(batch, 1, 1, 1).expand(batch, 1, 1, dim).to(device, dtype)
    k = torch.ones(batch, 2, 1, dim, device=device, dtype=dtype)
    v = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).expand(batch, 2, 1, dim).to(device, dtype)
    q, k, v = (t.contiguous().requires_grad_(backward) for t in (q, k, v))
    gate = torch.ones(1, device=device)
    if not backward:
        out, lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, None, scale)
        torch.testing.assert_close(out, torch.full_like(out, 2.0), rtol=0, atol=0)
        assert torch.isfinite(lse).all()
        return
    ops.masked_attention(q, k, v, gate, None, scale).sum().backward()
    torch.testing.assert_close(v.grad, torch.full_like(v.grad, 0.5), rtol=0, atol=0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("dtype, small", [
    (torch.float16, 1e-4),
    pytest.param(torch.float16, 1e-6, marks=FP16_SMALL_GATE),
    pytest.param(torch.float16, 1e-9, marks=FP16_SMALL_GATE),
    (torch.bfloat16, 1e-6), (torch.bfloat16, 1e-9)])
@pytest.mark.parametrize("seq", [64, 300])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_gate_gradient_of_small_gates(device, seq, dtype, small, mma_switch):
    """d_head_gate of a small soft gate within twice plain PyTorch's error in the same dtype,
    against fp64 on the same inputs rounded to the dtype (their rounding is no kernel error;
    the CPU kernel is within 1e-5 relative of it, plain PyTorch 1e-4..2e-2, the fp16 output
    divided by the gate 7e-2 at 1e-6 and 1.0 at 1e-9). S=64 runs the one-block-per-head
    backward, S=300 the key/query-block one."""
    gen = torch.Generator().manual_seed(stable_seed("small gate", str(dtype), small, seq))
    q, k, v = (t.to(dtype).double() for t in qkv(2, seq, 2, 32, torch.float64, "cpu", gen))
    dout = torch.randn(2, seq, 2, 32, generator=gen, dtype=torch.float64).to(dtype).double()

    def gate_grad(fn, dtype, where):
        gate = torch.tensor([small, 1.0], dtype=torch.float32 if dtype != torch.float64
                            else dtype, device=where, requires_grad=True)
        out = fn(*(t.to(where, dtype) for t in (q, k, v)), gate)
        return torch.autograd.grad(out, gate, dout.to(where, out.dtype))[0].double().cpu()

    def plain(q, k, v, gate):
        ctx = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)))
        return ctx.transpose(1, 2) * gate.to(q.dtype)[None, None, :, None]

    truth = gate_grad(plain, torch.float64, "cpu")
    ours = gate_grad(ops.masked_attention, dtype, device)
    theirs = gate_grad(plain, dtype, device)
    error = ((ours - truth).abs() / truth.abs()).max()
    assert error <= 2 * ((theirs - truth).abs() / truth.abs()).max() + 1e-6, error


# ---------------------------------------------------------------------------------------------
# fp32 inputs with the switch on: the 3xTF32 forward (masked_attention_mma_tf32.cu), compared
# with a float64 reference.
#
# Tolerance. 3xTF32 writes each fp32 operand x as big + small (both tf32, 10 mantissa bits),
# which keeps x to 2^-22 relative, and drops only small * small (~2^-22 |a b|); accumulation is
# fp32. For unit-scale inputs (randn q, k, v, scale D^-0.5: scores O(1), outputs O(1)) that
# leaves errors of a few 1e-7: the CPU replay of this kernel (csrc/tests/test_mma_layout.cpp)
# measures <= 3.4e-7 relative to double attention, and the SIMT fp32 kernel is of the same
# order. 1e-5 absolute + 1e-5 relative leaves > 10x room for the tensor core's accumulation
# order and exp2f, and fails plain 1xTF32 (1.7e-4..4.4e-4 relative in the same replay, max
# absolute errors ~1e-3): a kernel that lost the split would not pass.
# ---------------------------------------------------------------------------------------------
TF32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def reference_fp64(q, k, v, gate, mask, scale):
    out, lse = masked_attention_ref(q.double(), k.double(), v.double(), gate.double(), mask, scale)
    return out, lse


@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("seq", [1, 17, 128, 300, 512])
@pytest.mark.parametrize("pattern", ["all", "some", "none", "per_example"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_tf32_forward_dense_and_compact(device, dim, seq, pattern, padded, mma_switch,
                                            assert_native):
    assert_native("masked_attention", device)
    gen = torch.Generator().manual_seed(stable_seed("mma tf32", dim, seq, pattern, padded))
    batch, scale = 2, dim**-0.5
    q, k, v = qkv(batch, seq, HEADS, dim, torch.float32, device, gen)
    gate = gate_for(pattern, batch, HEADS, device, gen)
    mask = make_padding(batch, seq, device, gen) if padded else None
    if pattern == "some" and padded:  # the routing depends on dtype, D and strides only
        assert kernel_ran(
            "mma_forward_tf32_kernel",
            lambda: torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale),
        )
    out, lse = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, scale)
    ref, ref_lse = reference_fp64(q, k, v, gate, mask, scale)
    assert out.shape == q.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **TF32_TOL)
    active = gate.expand(batch, HEADS) != 0
    torch.testing.assert_close(lse[active].double(), ref_lse[active], **TF32_TOL)
    check_pruned_and_compact(q, k, v, gate, mask, out, lse)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_tf32_compact_int32_index_and_order(device, mma_switch):
    gen = torch.Generator().manual_seed(21)
    q, k, v = qkv(3, 70, 8, 64, torch.float32, device, gen)
    gate = torch.rand(3, 8, generator=gen).to(device)
    kept = torch.tensor([5, 0, 7], dtype=torch.int32, device=device)
    assert kernel_ran("mma_forward_tf32_kernel", lambda: ops.masked_attention_compact(q, k, v, gate, kept))
    out = ops.masked_attention_compact(q, k, v, gate, kept)
    ref, _ = reference_fp64(q, k, v, gate, None, 64**-0.5)
    torch.testing.assert_close(out.double(), ref[:, :, kept.long()], **TF32_TOL)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_tf32_pruned_heads_never_read_and_cross_lengths(device, mma_switch):
    """NaN in pruned heads' q/k/v never reaches the output; Sq != Sk; deterministic."""
    gen = torch.Generator().manual_seed(22)
    q = torch.randn(2, 33, HEADS, 64, generator=gen).to(device)
    k, v = (torch.randn(2, 200, HEADS, 64, generator=gen).to(device) for _ in "kv")
    gate = torch.tensor([1.0, 0.0, 0.7, 0.0], device=device)
    for t in (q, k, v):
        t[:, :, 1] = float("nan")
    mask = make_padding(2, 200, device, gen)
    out, _ = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, 0.2)
    again, _ = torch.ops.sparsebert.masked_attention(q, k, v, gate, mask, 0.2)
    assert torch.isfinite(out).all() and torch.equal(out, again)
    live = [0, 2]
    ref, _ = reference_fp64(q[:, :, live], k[:, :, live], v[:, :, live], gate[live], mask, 0.2)
    torch.testing.assert_close(out[:, :, live].double(), ref, **TF32_TOL)


# The fp32 backward (masked_attention_mma_bwd_tf32.cu, 3xTF32) against a float64 backward. Its CPU
# replay (test_mma_layout) measures at most 1.6e-6 relative error in dq, dk, dv and d_head_gate,
# and at least 5e-4 for the same replay with one TF32 product: 2e-5 leaves > 10x room for the
# GPU's accumulation order and exp2f, and fails a kernel that lost the split.
TF32_GRAD_REL = 2e-5


@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("seq", [1, 17, 64, 128, 300, (65, 512), (200, 40)])
@pytest.mark.parametrize("pattern", ["all", "some", "per_example"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_tf32_backward(device, dim, seq, pattern, padded, mma_switch, assert_native):
    """fp32 gradients with the switch on: the 3xTF32 backward; dq, dk, dv, d_head_gate vs a
    float64 backward; pruned heads get exact zeros; seq = (Sq, Sk) for cross lengths."""
    assert_native("masked_attention_backward", device)
    gen = torch.Generator().manual_seed(stable_seed("mma tf32 bwd", dim, seq, pattern, padded))
    args = backward_case(seq, torch.float32, dim, pattern, padded, device, gen)
    dout, q, k, v, gate, mask, _, _, scale = args
    if pattern == "some" and padded:
        assert kernel_ran(
            "mma_backward_tf32_kernel", lambda: torch.ops.sparsebert.masked_attention_backward(*args)
        )
    got = torch.ops.sparsebert.masked_attention_backward(*args)
    q64, k64, v64, g64 = (t.double() for t in (q, k, v, gate))
    ref_out, ref_lse = masked_attention_ref(q64, k64, v64, g64, mask, scale)
    want = masked_attention_backward_ref(dout.double(), q64, k64, v64, g64, mask, ref_out, ref_lse, scale)
    for name, g, w in zip(("dq", "dk", "dv", "d_head_gate"), got, want):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        # relative, floored at a norm of 1 as in the replay: with one key (seq 1) the true dq
        # and dk are 0 and fp32 rounding alone gives them ~1e-7
        rel = (g.double() - w).norm() / w.norm().clamp_min(1.0)
        assert rel < TF32_GRAD_REL, f"{name}: relative error {rel:.3g}"
    assert_pruned_grads_zero(got, gate)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_mma_tf32_autograd_end_to_end(device, mma_switch):
    """ops.masked_attention's autograd with the switch on, fp32: the 3xTF32 forward and backward
    kernels both run, and the gradients match float64 autograd through the reference."""
    gen = torch.Generator().manual_seed(23)
    q, k, v = (t.detach().requires_grad_(True)
               for t in qkv(2, 130, HEADS, 64, torch.float32, device, gen))
    gate = torch.tensor([1.0, 0.0, 0.5, 1.0], device=device, requires_grad=True)
    out = ops.masked_attention(q, k, v, gate)
    dout = torch.randn_like(out)
    lse = torch.ops.sparsebert.masked_attention(q.detach(), k.detach(), v.detach(), gate.detach(),
                                                None, 64**-0.5)[1]
    bargs = (dout, q.detach(), k.detach(), v.detach(), gate.detach(), None, out.detach(), lse, 64**-0.5)
    assert kernel_ran("mma_backward_tf32_kernel",
                      lambda: torch.ops.sparsebert.masked_attention_backward(*bargs))
    grads = torch.autograd.grad(out, (q, k, v, gate), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    g64 = gate.detach().double().requires_grad_(True)
    ref = masked_attention_ref(q64, k64, v64, g64, None, 64**-0.5)[0]
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64, g64), dout.double())
    for name, got, want in zip("q k v gate".split(), grads, ref_grads):
        rel = (got.double() - want).norm() / want.norm().clamp_min(1e-6)
        assert rel < TF32_GRAD_REL, f"d{name}: relative error {rel:.3g}"
