"""group_dot and accumulate_importance_: native kernels vs references, autograd, opcheck, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsebert import ops
from sparsebert.reference import accumulate_importance_ref, group_dot_ref

FLOAT8 = getattr(torch, "float8_e4m3fn", None)


def make_xg(batch, seq, dim, dtype, device, gen, strided=False):
    if strided:  # views into a wider buffer: non-contiguous batch/sequence strides
        wide = torch.randn(batch, seq, 2 * dim, generator=gen).to(device, dtype)
        wide2 = torch.randn(batch, seq, 2 * dim, generator=gen).to(device, dtype)
        return wide[..., :dim], wide2[..., dim:]
    return (torch.randn(batch, seq, dim, generator=gen).to(device, dtype) for _ in range(2))


def make_mask(batch, seq, device, gen):
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    mask[:, 0] = True
    return mask.to(device)


@pytest.mark.all_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim,group_size", [(96, 1), (96, 96), (96, 32), (37, 37), (37, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_group_dot_matches_reference(
    device, dtype, dim, group_size, masked, strided, assert_native
):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is a CPU (gradcheck) dtype")
    assert_native("group_dot", device)
    gen = torch.Generator().manual_seed(dim * group_size)
    batch, seq = 3, 9
    x, g = make_xg(batch, seq, dim, dtype, device, gen, strided)
    mask = make_mask(batch, seq, device, gen) if masked else None
    got = torch.ops.sparsebert.group_dot(x, g, group_size, mask)
    want = group_dot_ref(x, g, group_size, mask)
    assert got.shape == (batch, dim // group_size)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, want, atol=1e-4 * seq * group_size, rtol=1e-4)


def test_group_dot_reference_is_a_segmented_sum():
    """Independent check of the reference against explicit loops."""
    gen = torch.Generator().manual_seed(0)
    x, g = make_xg(2, 4, 6, torch.float64, "cpu", gen)
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    out = group_dot_ref(x, g, 3, mask)
    for b in range(2):
        for j in range(2):
            expected = sum(
                float(x[b, s, d] * g[b, s, d])
                for s in range(4)
                if mask[b, s]
                for d in range(3 * j, 3 * j + 3)
            )
            assert abs(float(out[b, j]) - expected) < 1e-12


@pytest.mark.all_devices
def test_group_dot_is_the_gate_gradient(device, assert_native):
    """group_dot(h, dL/dy) is dL/dgate for y = gate * h with one gate per group and example."""
    assert_native("group_dot", device)
    gen = torch.Generator().manual_seed(1)
    x, w = make_xg(2, 5, 8, torch.float32, device, gen)
    mask = make_mask(2, 5, device, gen)
    gate = torch.ones(2, 2, device=device, requires_grad=True)
    y = x * gate.repeat_interleave(4, dim=1)[:, None, :]
    loss = ((y * w) * mask[:, :, None]).sum()
    loss.backward()
    torch.testing.assert_close(ops.group_dot(x, w * mask[:, :, None], 4, None), gate.grad)
    torch.testing.assert_close(ops.group_dot(x, w, 4, mask), gate.grad)


def test_group_dot_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x, g = make_xg(2, 4, 6, torch.float64, "cpu", gen)
    mask = make_mask(2, 4, "cpu", gen)
    inputs = (x.requires_grad_(True), g.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: ops.group_dot(a, b, 3, mask), inputs)
    # its backward is itself differentiable (README, Ops)
    assert torch.autograd.gradgradcheck(lambda a, b: ops.group_dot(a, b, 3, mask), inputs)


@pytest.mark.all_devices
def test_group_dot_opcheck(device, assert_native):
    assert_native("group_dot", device)
    gen = torch.Generator().manual_seed(3)
    x, g = make_xg(2, 4, 6, torch.float32, device, gen)
    mask = make_mask(2, 4, device, gen)
    torch.library.opcheck(
        torch.ops.sparsebert.group_dot.default, (x.requires_grad_(True), g, 3, mask)
    )
    torch.library.opcheck(torch.ops.sparsebert.group_dot.default, (x, g, 6, None))


@pytest.mark.all_devices
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
def test_accumulate_importance(device, power, acc_dtype, score_dtype, assert_native):
    assert_native("accumulate_importance_", device)
    gen = torch.Generator().manual_seed(power)
    acc = torch.rand(3, 4, generator=gen, dtype=acc_dtype).to(device)
    scores = torch.randn(5, 3, 4, generator=gen).to(device, score_dtype)
    expected = acc.clone()
    accumulate_importance_ref(expected, scores, power)
    independent = acc + (scores.to(acc_dtype).abs() ** power).sum(0)
    result = ops.accumulate_importance_(acc, scores.transpose(1, 2).transpose(1, 2), power)
    assert result is acc
    torch.testing.assert_close(acc, expected)
    torch.testing.assert_close(acc, independent)


@pytest.mark.all_devices
def test_accumulate_importance_opcheck(device, assert_native):
    assert_native("accumulate_importance_", device)
    acc = torch.zeros(6, device=device)
    torch.library.opcheck(
        torch.ops.sparsebert.accumulate_importance_.default,
        (acc, torch.randn(4, 6, device=device), 1),
    )


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(x=torch.randn(2, 3)), "'x'"),
        (dict(g=torch.randn(2, 3, 5)), "'g'"),
        (dict(group_size=5), "'group_size'"),
        (dict(group_size=0), "'group_size'"),
        (dict(token_mask=torch.ones(2, 3)), "'token_mask'"),
        (dict(token_mask=torch.ones(2, 4, dtype=torch.bool)), "'token_mask'"),
        *([(dict(x=torch.randn(2, 3, 6).to(FLOAT8), g=torch.randn(2, 3, 6).to(FLOAT8)),
            "'x'.*float32")] if FLOAT8 else []),
    ],
)
@pytest.mark.parametrize("native", [False, True])
def test_group_dot_bad_input(kwargs, needle, native):
    args = dict(x=torch.randn(2, 3, 6), g=torch.randn(2, 3, 6), group_size=3, token_mask=None)
    args.update(kwargs)
    call = torch.ops.sparsebert.group_dot if native else ops.group_dot
    with pytest.raises((ValueError, RuntimeError), match=needle):
        call(args["x"], args["g"], args["group_size"], args["token_mask"])


def test_wrappers_refuse_bools_and_floats_for_integer_arguments():
    """True is an int to Python (and to the ops' schemas), 2.0 equals 2: the wrappers refuse
    both with their usual error rather than taking them (or failing in the schema's cast)."""
    with pytest.raises(ValueError, match="'group_size'"):
        ops.group_dot(torch.randn(2, 3, 6), torch.randn(2, 3, 6), True)
    for power in (2.0, True):
        with pytest.raises(ValueError, match="'power' must be 1 or 2"):
            ops.accumulate_importance_(torch.zeros(4), torch.randn(2, 4), power)


def test_wrappers_take_numpy_integers_and_name_what_is_wrong():
    """A numpy integer (a size read from an array) is an int to the wrappers, as to the rest
    of the API; a non-contiguous 'acc' is refused for being non-contiguous, not for its
    (valid) dtype."""
    x, g = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    torch.testing.assert_close(ops.group_dot(x, g, np.int64(4)), ops.group_dot(x, g, 4))
    with pytest.raises(ValueError, match="'group_size' must be an int, got Tensor"):
        ops.group_dot(x, g, torch.tensor(4))
    acc = torch.zeros(3)
    ops.accumulate_importance_(acc, torch.ones(2, 3), np.int64(2))
    torch.testing.assert_close(acc, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=r"'acc' must be contiguous .*strides \(1, 3\)"):
        ops.accumulate_importance_(torch.zeros(4, 3).t(), torch.randn(5, 3, 4), 1)


@pytest.mark.parametrize(
    "acc,scores,power,needle",
    [
        (torch.zeros(4), torch.randn(2, 4), 3, "'power'"),
        (torch.zeros(4, dtype=torch.float16), torch.randn(2, 4), 1, "'acc'"),
        (torch.zeros(4), torch.randn(2, 5), 1, "'scores'"),
        *([(torch.zeros(4), torch.randn(2, 4).to(FLOAT8), 1, "'scores'.*float32")]
          if FLOAT8 else []),
    ],
)
def test_accumulate_importance_bad_input(acc, scores, power, needle):
    with pytest.raises(ValueError, match=needle):
        ops.accumulate_importance_(acc, scores, power)
    with pytest.raises(ValueError, match=needle):
        torch.ops.sparsebert.accumulate_importance_(acc, scores, power)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_group_dot_gradient_is_zero_at_padded_tokens(bad):
    """The forward skips padded tokens (an inf there is not multiplied by 0); so does the
    backward: their gradient is 0, not nan, and the real tokens' match autograd of x * g."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, 4, generator=gen)
    g[0, 2] = bad
    mask = torch.tensor([[True, True, False], [True, True, True]])
    g.requires_grad_(True)
    out = ops.group_dot(x, g, 2, mask)
    assert torch.isfinite(out).all()
    dout = torch.randn_like(out)
    dx, dg = torch.autograd.grad(out, (x, g), dout)
    assert torch.equal(dx[0, 2], torch.zeros(4)) and torch.equal(dg[0, 2], torch.zeros(4))
    per_feature = dout.repeat_interleave(2, dim=1)[:, None, :]  # (B, 1, D)
    real = mask[:, :, None].expand_as(dx)
    torch.testing.assert_close(dx[real], (g.detach() * per_feature)[real])
    torch.testing.assert_close(dg[real], (x.detach() * per_feature)[real])


def test_group_dot_forward_mode_ad_and_size_one_strided_last_dim():
    """jvp through ops.group_dot (linear in x: the tangent is group_dot(tangent, g)), and a
    size-1 last dimension with a stride other than 1 (any stride is fine there)."""
    gen = torch.Generator().manual_seed(3)
    x, g, t = (torch.randn(2, 3, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    _, tangent = torch.func.jvp(lambda x: ops.group_dot(x, g, 2), (x,), (t,))
    torch.testing.assert_close(tangent, group_dot_ref(t, g, 2, None))
    x1 = torch.randn(2, 1, 3, generator=gen).transpose(1, 2)  # (2, 3, 1), last-dim stride 3
    g1 = torch.randn(2, 3, 1, generator=gen)
    assert x1.stride(-1) == 3
    torch.testing.assert_close(ops.group_dot(x1, g1, 1), (x1 * g1).sum(1))
    torch.testing.assert_close(torch.ops.sparsebert.group_dot(x1, g1, 1, None), (x1 * g1).sum(1))


def test_group_dot_under_torch_func_grad_and_vmap():
    """torch.func.grad through ops.group_dot matches autograd through the op, and vmap over a
    batch of (x, g) pairs matches a loop (the reference runs under the transforms)."""
    gen = torch.Generator().manual_seed(5)
    x, g, w = (torch.randn(2, 3, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    weight = torch.randn(2, 2, dtype=torch.float64, generator=gen)

    def loss(x, g):
        return (ops.group_dot(x, g, 2, mask) * weight).sum()

    leaves = (x.clone().requires_grad_(True), g.clone().requires_grad_(True))
    want = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.func.grad(loss, argnums=(0, 1))(x, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    stacked = torch.func.vmap(lambda x, g: ops.group_dot(x, g, 2, mask))(
        torch.stack([x, w]), torch.stack([g, g]))
    torch.testing.assert_close(stacked, torch.stack([group_dot_ref(x, g, 2, mask),
                                                     group_dot_ref(w, g, 2, mask)]))


def test_wrappers_name_non_tensor_arguments():
    """Lists where tensors belong are ValueErrors naming the argument (not AttributeErrors),
    and an accumulator that requires grad is refused (its in-place update is not tracked)."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="'token_mask'.*got list"):
        ops.group_dot(x, x, 2, [[True] * 3] * 2)
    with pytest.raises(ValueError, match="'scores' must be a torch.Tensor, got list"):
        ops.accumulate_importance_(torch.zeros(4), [[1.0] * 4])
    with pytest.raises(ValueError, match="'acc' requires grad"):
        ops.accumulate_importance_(torch.zeros(4, requires_grad=True), torch.randn(2, 4))


@pytest.mark.all_devices
def test_group_dot_skips_non_finite_padded_tokens(device, assert_native):
    """A padded token contributes nothing, even an inf or nan one (fp16 overflow at padding):
    the reference skips it as the kernels do, rather than multiplying it by 0."""
    assert_native("group_dot", device)
    x = torch.ones(1, 2, 4, device=device)
    x[0, 1] = torch.tensor([float("inf"), float("nan"), 1.0, -float("inf")])
    g = torch.ones(1, 2, 4, device=device)
    mask = torch.tensor([[True, False]], device=device)
    expected = torch.tensor([[2.0, 2.0]], device=device)
    torch.testing.assert_close(group_dot_ref(x, g, 2, mask), expected)
    torch.testing.assert_close(torch.ops.sparsebert.group_dot(x, g, 2, mask), expected)
    _, tangent = torch.func.jvp(lambda x: ops.group_dot(x, g, 2, mask), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, expected)  # forward AD runs the reference


@pytest.mark.all_devices
def test_group_dot_raw_op_takes_any_last_dim_stride(device, assert_native):
    """The op itself (not only the wrapper) takes a last dimension with a stride other than 1,
    as its reference and fake kernel do: opcheck's schema test calls it that way."""
    assert_native("group_dot", device)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, generator=gen).transpose(1, 2).to(device)  # (2, 3, 6), stride 3
    g = torch.randn(2, 3, 6, generator=gen).to(device)
    assert x.stride(-1) == 3
    torch.testing.assert_close(torch.ops.sparsebert.group_dot(x, g, 2, None),
                               (x * g).reshape(2, 3, 3, 2).sum(dim=(1, 3)))
    torch.library.opcheck(torch.ops.sparsebert.group_dot.default, (x, g, 3, None))


@pytest.mark.all_devices
def test_accumulate_importance_adds_the_row_sum_once(device, assert_native):
    """acc += sum_n |scores[n]|: the rows are summed before the add, so an fp32 accumulator at
    2^24 still takes four +1s (adding them one by one would round each away)."""
    assert_native("accumulate_importance_", device)
    acc = torch.full((3,), 2.0**24, device=device)
    ops.accumulate_importance_(acc, torch.ones(4, 3, device=device))
    assert acc.tolist() == [2.0**24 + 4] * 3
    small = torch.zeros(1, device=device)
    ops.accumulate_importance_(small, torch.full((20000, 1), 1e-3, device=device))
    torch.testing.assert_close(small, torch.tensor([20.0], device=device), rtol=1e-6, atol=0)


@pytest.mark.all_devices
@pytest.mark.parametrize("call", ["wrapper", "raw op"])
def test_accumulate_importance_bumps_the_version_counter(device, call, assert_native):
    """An in-place write autograd can see, as add_'s: acc's version moves, and a backward
    through a product that saved acc before the write refuses (instead of a wrong gradient)."""
    assert_native("accumulate_importance_", device)

    def accumulate(acc, scores):
        if call == "wrapper":
            ops.accumulate_importance_(acc, scores)
        else:
            torch.ops.sparsebert.accumulate_importance_(acc, scores, 1)

    acc = torch.zeros(3, device=device)
    before = acc._version
    accumulate(acc, torch.ones(2, 3, device=device))
    assert acc._version > before and acc.tolist() == [2.0] * 3
    weight = torch.ones(3, device=device, requires_grad=True)
    product = (acc * weight).sum()  # saves acc for weight's gradient
    accumulate(acc, torch.full((1, 3), 4.0, device=device))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# group_dot and accumulate_importance_
# ---------------------------------------------------------------------------------------------
def test_group_dot_x_and_g_with_different_strides(assert_native):
    """x contiguous and g a view with other batch / sequence strides, and the reverse."""
    assert_native("group_dot", "cpu")
    gen = torch.Generator().manual_seed(26)
    x = _randn(3, 5, 12, gen=gen)
    g = _randn(3, 7, 20, gen=gen)[:, 1:6, 4:16]
    assert x.stride() != g.stride() and g.stride(-1) == 1
    for a, b in ((x, g), (g, x)):
        torch.testing.assert_close(torch.ops.sparsebert.group_dot(a, b, 4, None),
                                   group_dot_ref(a, b, 4, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_view", ["sliced", "transposed"])
def test_group_dot_non_contiguous_token_mask(mask_view, assert_native):
    assert_native("group_dot", "cpu")
    gen = torch.Generator().manual_seed(27)
    batch, seq = 3, 6
    x, g = (_randn(batch, seq, 8, gen=gen) for _ in "xg")
    dense = torch.rand(batch, seq, generator=gen) > 0.4
    if mask_view == "sliced":
        wide = torch.zeros(batch, seq + 5, dtype=torch.bool)
        wide[:, 2:seq + 2] = dense
        mask = wide[:, 2:seq + 2]
    else:
        mask = dense.t().contiguous().t()
    assert not mask.is_contiguous()
    torch.testing.assert_close(torch.ops.sparsebert.group_dot(x, g, 2, mask),
                               group_dot_ref(x, g, 2, dense), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("power", [1, 2])
def test_accumulate_importance_non_contiguous_scores(power, assert_native):
    """scores as a permuted (non-contiguous) view: read through its strides."""
    assert_native("accumulate_importance_", "cpu")
    gen = torch.Generator().manual_seed(30 + power)
    scores = _randn(4, 3, 5, gen=gen).permute(2, 0, 1)  # (5, 4, 3), not contiguous
    assert not scores.is_contiguous()
    acc = torch.rand(4, 3, generator=gen)
    expected = acc.clone()
    accumulate_importance_ref(expected, scores, power)
    torch.ops.sparsebert.accumulate_importance_(acc, scores, power)
    torch.testing.assert_close(acc, expected)
