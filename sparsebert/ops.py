"""The sparsebert op library: schemas, default (reference) kernels, fakes, autograd, wrappers.

Schemas are declared here, once. The pure-PyTorch reference of each op (sparsebert.reference)
is registered as its CompositeExplicitAutograd kernel, so every op works on every device; the
native extension (csrc/, loaded at the bottom of this module) adds CPU and CUDA kernels that
take precedence for their dispatch keys, and masked_attention's autograd in C++. The input
checks with their messages are in sparsebert.op_checks.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from sparsebert import op_checks, reference
from sparsebert._extension import load_extension
from sparsebert.checks import is_integer
from sparsebert.switches import arch_list_has_sm90a, check_attention_kernel

NAMESPACE = "sparsebert"
_lib = torch.library.Library(NAMESPACE, "DEF")

# --------------------------------------------------------------------------------------------
# masked_attention
# --------------------------------------------------------------------------------------------
_lib.define(
    "masked_attention(Tensor q, Tensor k, Tensor v, Tensor head_gate, Tensor? key_padding_mask, "
    "float scale) -> (Tensor out, Tensor lse)"
)
_lib.define(
    "masked_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor head_gate, "
    "Tensor? key_padding_mask, Tensor out, Tensor lse, float scale) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor d_head_gate)"
)
_lib.define(
    "masked_attention_compact(Tensor q, Tensor k, Tensor v, Tensor head_gate, Tensor kept_heads, "
    "Tensor? key_padding_mask, float scale) -> (Tensor out, Tensor lse)"
)
_lib.impl("masked_attention", reference.masked_attention_ref, "CompositeExplicitAutograd")
_lib.impl(
    "masked_attention_compact", reference.masked_attention_compact_ref, "CompositeExplicitAutograd"
)
_lib.impl(
    "masked_attention_backward",
    reference.masked_attention_backward_ref,
    "CompositeExplicitAutograd",
)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"{NAMESPACE}::masked_attention")
def _masked_attention_fake(q, k, v, head_gate, key_padding_mask, scale):
    # the kernels' shape, dtype and device checks, so that a traced graph fails where the op
    # is called (values, e.g. a fully padded row, are unknown here)
    op_checks.validate_masked_attention(q, k, v, head_gate, key_padding_mask,
                                        check_padding_rows=False)
    batch, q_len, heads, head_dim = q.shape
    out = q.new_empty((batch, q_len, heads, head_dim))
    lse = q.new_empty((batch, heads, q_len), dtype=_stat_dtype(q.dtype))
    return out, lse


@torch.library.register_fake(f"{NAMESPACE}::masked_attention_compact")
def _masked_attention_compact_fake(q, k, v, head_gate, kept_heads, key_padding_mask, scale):
    op_checks.validate_masked_attention(q, k, v, head_gate, key_padding_mask,
                                        check_padding_rows=False)
    op_checks.validate_kept_heads(kept_heads, q)
    batch, q_len, _, head_dim = q.shape
    kept = kept_heads.shape[0]
    out = q.new_empty((batch, q_len, kept, head_dim))
    lse = q.new_empty((batch, kept, q_len), dtype=_stat_dtype(q.dtype))
    return out, lse


@torch.library.register_fake(f"{NAMESPACE}::masked_attention_backward")
def _masked_attention_backward_fake(dout, q, k, v, head_gate, key_padding_mask, out, lse, scale):
    d_gate = q.new_empty((q.shape[0], q.shape[2]), dtype=_stat_dtype(q.dtype))
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        d_gate,
    )


def _masked_attention_setup_context(ctx, inputs, output):
    q, k, v, head_gate, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, head_gate, key_padding_mask, out, lse)
    ctx.mark_non_differentiable(lse)  # a statistic the backward reuses; no gradient flows
    ctx.set_materialize_grads(False)  # no zeros made for lse's (unused) gradient
    ctx.scale = scale


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """t with stride 1 in its last dim (a size-1 last dim only gets that stride: same memory)."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()


_AUTOGRAD_TRANSFORMS = frozenset((torch._C._functorch.TransformType.Grad,
                                  torch._C._functorch.TransformType.Jvp,
                                  torch._C._functorch.TransformType.Vmap))


def _needs_reference(*tensors: Tensor | None) -> bool:
    """True under a torch.func transform (grad, vjp, jacrev, vmap, jvp, ...) or under
    forward-mode AD (torch.autograd.forward_ad) with a tangent on one of `tensors`. The kernels'
    autograd (C++, or Python-registered) works with neither, so the wrappers run the reference
    (plain torch ops) there. The level checks are the cheap part."""
    if torch.compiler.is_compiling():  # traced: dynamo handles the transforms itself
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None and any(
            level.key() in _AUTOGRAD_TRANSFORMS
            for level in torch._C._functorch.get_interpreter_stack()):
        return True  # (functionalize alone, as make_fx uses it, keeps the op)
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# When only the gate needs a gradient (q, k and v need none: the first layer of an importance
# pass), d_head_gate is read off the output instead of running the attention backward. fp16 is
# left out: its stored output loses digits for small soft gates (csrc/masked_attention_autograd.cpp
# does the same).
GATE_GRAD_FROM_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


def _gate_grad_from_output(dout: Tensor, out: Tensor, head_gate: Tensor) -> Tensor:
    """d_head_gate (B, H), fp32, from out = gate * ctx per head: sum_{s, d} dout * out / gate
    where the gate is nonzero, and exactly 0 where it is 0 (as the kernels' backward, also for
    a non-finite dout there). dout, out: (B, Sq, H, D); head_gate: (H,) or (B, H)."""
    per_head = (dout.float() * out.float()).sum((1, 3))  # (B, H)
    gate = head_gate.float()  # (H,) broadcast over the batch, or (B, H)
    return torch.where(gate != 0, per_head / gate, 0.0)


def _masked_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, head_gate, key_padding_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    needs = ctx.needs_input_grad
    if (needs[3] and not any(needs[:3]) and not torch.is_grad_enabled()
            and out.dtype in GATE_GRAD_FROM_OUTPUT_DTYPES):
        d_gate = _gate_grad_from_output(grad_out, out, head_gate)
        d_gate = d_gate.sum(0) if head_gate.dim() == 1 else d_gate
        return None, None, None, d_gate.to(head_gate.dtype), None, None
    args = (_last_dim_contiguous(grad_out), q, k, v, head_gate, key_padding_mask, out, lse,
            ctx.scale)
    if torch.is_grad_enabled():  # create_graph=True: outputs that refuse a second derivative
        dq, dk, dv, d_gate = _BackwardOnce.apply(*args)
    else:
        dq, dk, dv, d_gate = torch.ops.sparsebert.masked_attention_backward(*args)
    if needs[3]:
        if head_gate.dim() == 1:
            d_gate = d_gate.sum(0)  # (B, H) -> (H,): the gate is shared by the batch
        d_gate = d_gate.to(head_gate.dtype)
    return (
        dq if needs[0] else None,
        dk if needs[1] else None,
        dv if needs[2] else None,
        d_gate if needs[3] else None,
        None,
        None,
    )


ONCE_DIFFERENTIABLE = (
    "masked_attention is differentiable once: its backward has no derivative (second "
    "derivatives, e.g. gradient penalties, are not supported)"
)


class _BackwardOnce(torch.autograd.Function):
    """masked_attention_backward whose outputs raise when differentiated (create_graph=True).
    forward() runs with grad mode off, as a plain backward calls the op."""

    @staticmethod
    def forward(ctx, *args):
        return torch.ops.sparsebert.masked_attention_backward(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"sparsebert: {ONCE_DIFFERENTIABLE}")


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_gate: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    *,
    check_padding_rows: bool = True,
    exact_zero_gate_grad: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention with a per-head (or per-example, per-head) gate.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D), fp32/fp16/bf16 (fp64 on CPU), any strides (e.g. views of
    one fused QKV projection); head_gate: (H,) or (B, H); key_padding_mask: (B, Sk) bool, True =
    real token; scale defaults to D ** -0.5.
    Returns out (B, Sq, H, D): out[:, :, h] = head_gate[..., h] * softmax(q_h k_h^T * scale) v_h.
    Heads whose gate is exactly 0 are never computed and their output is exactly 0.
    Differentiable in q, k, v and head_gate; the gate gradient
    d_head_gate[b, h] = sum_{s, d} ctx[b, s, h, d] * dout[b, s, h, d] (summed over b for an (H,)
    gate) is computed inside the backward kernel: it is the Michel et al. head importance signal.
    Pruned heads (gate exactly 0) get zero gradients, d_head_gate included, unless
    exact_zero_gate_grad=True: then d_head_gate is the true gradient there too (for
    straight-through or movement-style gate learning), from the pruned heads' attention computed
    in the backward only (the forward still skips them; dq, dk, dv are 0 for them either way, as
    gate * (...) is). First-order only: a second derivative raises. Under torch.func
    transforms (grad, vjp, jacrev, jvp, jacfwd, vmap, hessian) and forward-mode AD this wrapper
    runs the reference (plain torch ops, same gradient convention at a gate of 0, any order of
    derivative); call the wrapper there, not the raw torch.ops op (its autograd refuses
    torch.func.grad/vjp, and without the extension gives forward-mode AD a tangent of 0).

    Every row of key_padding_mask needs at least one True. check_padding_rows=True (default)
    verifies that; on CUDA the check reads the mask on the host, i.e. synchronises the device on
    every call (skipped anyway under CUDA graph capture and torch.compile). Pass False when
    the rows are known to be non-empty, as `sparsebert.nn.to_key_padding_mask` guarantees
    (SparseAttention does): no sync. A fully padded row then gives undefined output on CUDA; CPU
    kernels still reject it (there the check costs no sync).
    return_lse=True also returns lse (B, H, Sq), fp32 (fp64 for fp64 inputs): the log-sum-exp
    of each query's scaled scores over its real keys, logsumexp_j(scale * q_i . k_j), which the
    backward reuses; 0 for pruned heads; no gradient flows through it.
    Raises ValueError naming the argument for bad shapes, dtypes, devices, D < 1 or empty sizes
    (checked in C++ when the extension is loaded, else in Python; both name the argument and
    the expected shape or type, in their own wording).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("head_gate", head_gate),
                    ("key_padding_mask", key_padding_mask)):
        if not isinstance(t, Tensor) and not (name == "key_padding_mask" and t is None):
            raise ValueError(f"masked_attention: '{name}' must be a torch.Tensor, got "
                             f"{type(t).__name__}")
    if not NATIVE_AUTOGRAD:
        # Reference path: Python checks, then the CompositeExplicitAutograd reference.
        # On the CPU the padded-row check costs no sync: made whatever check_padding_rows says,
        # as the native CPU kernel does (except under torch.compile, where it cannot run:
        # op_checks.reject_fully_padded_rows).
        op_checks.validate_masked_attention(q, k, v, head_gate, key_padding_mask,
                                            check_padding_rows or q.device.type == "cpu")
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    elif check_padding_rows and key_padding_mask is not None and q.device.type != "cpu":
        # the native CPU kernel checks by itself
        op_checks.reject_fully_padded_rows(key_padding_mask, q)
    scale = op_checks.attention_scale("masked_attention", scale, q)
    if _needs_reference(q, k, v, head_gate):
        op_checks.validate_masked_attention(q, k, v, head_gate, key_padding_mask,
                                            check_padding_rows)
        return _masked_attention_by_reference(q, k, v, head_gate, key_padding_mask, float(scale),
                                            exact_zero_gate_grad, return_lse)
    # Native path: argument checks in C++ (same messages), autograd registered in C++.
    out, lse = _masked_attention_op(q, k, v, head_gate, key_padding_mask, float(scale))
    if exact_zero_gate_grad and head_gate.requires_grad and torch.is_grad_enabled():
        out = _ZeroGateGrad.apply(out, head_gate, q, k, v, key_padding_mask, float(scale))
    return (out, lse.detach()) if return_lse else out


def _masked_attention_by_reference(q, k, v, head_gate, key_padding_mask, scale,
                                   exact_zero_gate_grad, return_lse):
    """masked_attention under torch.func transforms and forward-mode AD: the reference, whose
    derivative in a gate of 0 is 0 (as the kernels' gradient), or with exact_zero_gate_grad
    the true one (ctx . tangent, ctx . dout)."""
    out, lse = reference.masked_attention_ref(q, k, v, head_gate, key_padding_mask, scale)
    if exact_zero_gate_grad:
        gate = head_gate if head_gate.dim() == 2 else head_gate.expand(q.shape[0], -1)  # (B, H)
        zero = (gate == 0)[:, None, :, None]  # (B, 1, H, 1)
        ctx, _ = reference.attention_context(q, k, v, key_padding_mask, scale)  # (B, Sq, H, D)
        # value unchanged (gate * ctx = 0 there); tangent gate' * ctx at the zero gates
        out = out + torch.where(zero, ctx * gate[:, None, :, None], 0.0).to(out.dtype)
    return (out, lse.detach()) if return_lse else out


class _ZeroGateGrad(torch.autograd.Function):
    """Identity on masked_attention's output whose backward adds the gate gradient where the
    gate is exactly 0: d_head_gate[b, h] = sum_{s, d} ctx[b, s, h, d] * dout[b, s, h, d], with
    ctx the head's ungated attention, computed here by masked_attention with the gate
    (gate == 0): those heads at gate 1, every other head skipped. Shapes do not depend on the
    gate's values (torch.compile traces it whole). Where the gate is nonzero the op's own
    backward already gives the gradient."""

    @staticmethod
    def forward(ctx, out, head_gate, q, k, v, key_padding_mask, scale):
        ctx.save_for_backward(head_gate, q, k, v, key_padding_mask)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        head_gate, q, k, v, key_padding_mask = ctx.saved_tensors
        zero = head_gate == 0  # (H,) or (B, H)
        with torch.no_grad():
            ctx_zero = _masked_attention_op(
                q, k, v, zero.to(head_gate.dtype), key_padding_mask, ctx.scale
            )[0]  # (B, Sq, H, D): the gate-0 heads' attention, zeros elsewhere
            acc = _stat_dtype(q.dtype)
            per_example = (grad_out.to(acc) * ctx_zero.to(acc)).sum((1, 3))  # (B, H)
            if head_gate.dim() == 1:
                per_example = per_example.sum(0)  # (H,)
            d_gate = torch.where(zero, per_example, 0.0).to(head_gate.dtype)
        return grad_out, d_gate, None, None, None, None, None


def masked_attention_compact(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_gate: Tensor,
    kept_heads: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of the kept heads only, written compactly: the inference fast path.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D); head_gate: (H,) or (B, H); kept_heads: (K,) int64 or
    int32 indices into H (on q's device). Returns out (B, Sq, K, D) with
    out[:, :, j] = masked_attention(...)[:, :, kept_heads[j]]; pruned heads are never read.
    Differentiable in q, k, v and head_gate as masked_attention is (the same gradients at the
    kept heads, zeros elsewhere; first order): the backward gathers the kept heads' slices and
    runs masked_attention's fused backward on them. Under torch.func transforms and
    forward-mode AD it runs the reference. On the CPU the kernel reads the kept heads in place.
    On CUDA (fp16/bf16, or fp32 with 3xTF32; D 32/64; 16-byte aligned rows) one mma.sync kernel
    reads the kept heads in place; otherwise (and with SPARSEBERT_ATTENTION_KERNEL=wmma or simt)
    their slices are gathered and the other forward runs. Index values are checked on the CPU
    only (on CUDA a check would synchronise; an index out of range gives zeros there).
    """
    if not isinstance(kept_heads, Tensor):
        raise ValueError(
            "masked_attention_compact: 'kept_heads' must be a 1-d int64/int32 tensor, got "
            f"{type(kept_heads).__name__}"
        )
    if not NATIVE_AUTOGRAD:
        op_checks.validate_masked_attention(q, k, v, head_gate, key_padding_mask)
        op_checks.validate_kept_heads(kept_heads, q)
        heads = q.shape[2]
        in_range = (kept_heads >= 0) & (kept_heads < heads)
        if (kept_heads.numel() and not kept_heads.is_cuda
                and not torch.compiler.is_compiling() and not bool(in_range.all())):
            raise ValueError(
                f"masked_attention_compact: 'kept_heads' must hold indices in [0, H = {heads})"
            )
    scale = op_checks.attention_scale("masked_attention_compact", scale, q)
    if _needs_reference(q, k, v, head_gate):
        op_checks.validate_masked_attention(q, k, v, head_gate, key_padding_mask)
        op_checks.validate_kept_heads(kept_heads, q)
        return reference.masked_attention_compact_ref(q, k, v, head_gate, kept_heads,
                                                      key_padding_mask, float(scale))[0]
    return torch.ops.sparsebert.masked_attention_compact(
        q, k, v, head_gate, kept_heads, key_padding_mask, float(scale)
    )[0]


# --------------------------------------------------------------------------------------------
# group_dot and accumulate_importance_ (importance accumulation)
# --------------------------------------------------------------------------------------------
_lib.define("group_dot(Tensor x, Tensor g, int group_size, Tensor? token_mask) -> Tensor")
_lib.define("accumulate_importance_(Tensor(a!) acc, Tensor scores, int power) -> ()")
_lib.impl("group_dot", reference.group_dot_ref, "CompositeExplicitAutograd")
_lib.impl(
    "accumulate_importance_", reference.accumulate_importance_ref, "CompositeExplicitAutograd"
)


@torch.library.register_fake(f"{NAMESPACE}::group_dot")
def _group_dot_fake(x, g, group_size, token_mask):
    return x.new_empty((x.shape[0], x.shape[2] // group_size), dtype=_stat_dtype(x.dtype))


@torch.library.register_fake(f"{NAMESPACE}::accumulate_importance_")
def _accumulate_importance_fake(acc, scores, power):
    return None


def _accumulate_importance_version_bump(acc, scores, power):
    """The ADInplaceOrView kernel an in-place op needs: runs the op below it, then bumps acc's
    version counter, so that autograd refuses a backward through a saved acc written since
    (as for add_) and version-keyed caches see the write."""
    with torch._C._AutoDispatchBelowADInplaceOrView():
        torch.ops.sparsebert.accumulate_importance_(acc, scores, power)
    torch.autograd.graph.increment_version(acc)


_lib.impl("accumulate_importance_", _accumulate_importance_version_bump, "ADInplaceOrView")


def _group_dot_setup_context(ctx, inputs, output):
    x, g, group_size, token_mask = inputs
    ctx.save_for_backward(x, g, token_mask)
    ctx.group_size = group_size


def _group_dot_backward(ctx, grad_out):
    x, g, token_mask = ctx.saved_tensors
    # grad_out (B, G) -> per feature (B, 1, D), masked per token (B, S, 1).
    per_feature = grad_out.repeat_interleave(ctx.group_size, dim=1)[:, None, :]

    def grad_of(other: Tensor, dtype: torch.dtype) -> Tensor:
        grad = other * per_feature  # (B, S, D)
        if token_mask is not None:  # padded tokens get 0, as the forward skips them (an inf
            # there times a mask of 0 would be nan)
            grad = torch.where(token_mask[:, :, None], grad, 0)
        return grad.to(dtype)

    dx = grad_of(g, x.dtype) if ctx.needs_input_grad[0] else None
    dg = grad_of(x, g.dtype) if ctx.needs_input_grad[1] else None
    return dx, dg, None, None


torch.library.register_autograd(
    f"{NAMESPACE}::group_dot", _group_dot_backward, setup_context=_group_dot_setup_context
)


def group_dot(x: Tensor, g: Tensor, group_size: int, token_mask: Tensor | None = None) -> Tensor:
    """Fused segmented reduction: out[b, j] = sum over real tokens and group j of x * g.

    x, g: (B, S, D) (same shape and dtype, any strides); D must be a multiple of group_size;
    token_mask: (B, S) bool, True = real token. Returns (B, D // group_size), fp32 (fp64 for fp64).
    group_size = D gives one score per example (an MLP gate); group_size = 1 one per feature
    (FFN neurons). With x an activation and g its gradient this is the gate gradient of a gate
    that multiplies x, per example: the importance signal, without materialising x * g.
    group_size: an int or numpy integer (inside a torch.compile'd function, one made there is
    traced as an array: pass int(...)).
    Under torch.func transforms (grad, vjp, vmap, jvp, ...) and forward-mode AD this wrapper runs
    the reference (plain torch ops); the raw torch.ops op's registration gives forward-mode AD a
    tangent of 0.
    """
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.dtype not in op_checks.KERNEL_DTYPES:
            raise ValueError(f"group_dot: '{name}' must be a (B, S, D) tensor of "
                             f"{op_checks.KERNEL_DTYPE_NAMES}")
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
        raise ValueError(
            f"group_dot: 'g' must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
            f"{tuple(g.shape)}, {g.dtype}, {g.device}"
        )
    if not is_integer(group_size):  # an int or numpy integer (a size read from an array)
        raise ValueError(f"group_dot: 'group_size' must be an int, got "
                         f"{type(group_size).__name__} {group_size!r}")
    group_size = int(group_size)
    if group_size < 1 or x.shape[2] % group_size != 0:
        raise ValueError(
            f"group_dot: 'group_size' must be a positive divisor of D={x.shape[2]}, "
            f"got {group_size!r}"
        )
    if token_mask is not None and (
        not isinstance(token_mask, Tensor)
        or token_mask.dtype != torch.bool
        or tuple(token_mask.shape) != tuple(x.shape[:2])
        or token_mask.device != x.device
    ):
        got = (f"{token_mask.dtype} {tuple(token_mask.shape)} on {token_mask.device}"
               if isinstance(token_mask, Tensor) else type(token_mask).__name__)
        raise ValueError(
            f"group_dot: 'token_mask' must be a bool (B, S) = {tuple(x.shape[:2])} tensor on "
            f"{x.device}, got {got}"
        )
    x, g = _last_dim_contiguous(x), _last_dim_contiguous(g)
    if _needs_reference(x, g):  # torch.func transforms, forward-mode AD: the reference
        return reference.group_dot_ref(x, g, group_size, token_mask)
    return torch.ops.sparsebert.group_dot(x, g, group_size, token_mask)


def accumulate_importance_(acc: Tensor, scores: Tensor, power: int = 1) -> Tensor:
    """In place: acc (G...) += sum over the leading dim of |scores (N, G...)| ** power; returns acc.

    power 1 accumulates |.| (Michel / paper importance), power 2 squares (Fisher, Kwon et al.);
    an int or numpy integer, as group_dot's group_size.
    acc must be fp32 or fp64 and contiguous; scores fp16, bf16, fp32 or fp64 on acc's device.
    """
    for name, t in (("acc", acc), ("scores", scores)):
        if not isinstance(t, Tensor):
            raise ValueError(f"accumulate_importance_: '{name}' must be a torch.Tensor, got "
                             f"{type(t).__name__}")
    if not is_integer(power) or power not in (1, 2):  # not 2.0, not True
        raise ValueError(f"accumulate_importance_: 'power' must be 1 or 2 (an int), got "
                         f"{power!r}")
    power = int(power)
    if acc.requires_grad and torch.is_grad_enabled():
        raise ValueError("accumulate_importance_: 'acc' requires grad; an in-place update of "
                         "it cannot be differentiated (accumulate into a plain tensor)")
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"accumulate_importance_: 'acc' must be a contiguous fp32/fp64 tensor, got {acc.dtype}"
        )
    if not acc.is_contiguous():  # updated in place: a contiguous copy would not be acc
        raise ValueError(
            f"accumulate_importance_: 'acc' must be contiguous (it is updated in place), got "
            f"strides {acc.stride()} for shape {tuple(acc.shape)}; accumulate into "
            f"acc.contiguous() (or a fresh torch.zeros) and copy back"
        )
    if scores.dim() != acc.dim() + 1 or scores.shape[1:] != acc.shape:
        raise ValueError(
            f"accumulate_importance_: 'scores' must be (N, *{tuple(acc.shape)}), "
            f"got {tuple(scores.shape)}"
        )
    if scores.device != acc.device or scores.dtype not in op_checks.KERNEL_DTYPES:
        raise ValueError(f"accumulate_importance_: 'scores' must be {op_checks.KERNEL_DTYPE_NAMES} "
                         f"on {acc.device}, got {scores.dtype} on {scores.device}")
    torch.ops.sparsebert.accumulate_importance_(acc, scores, power)
    return acc


check_attention_kernel()  # (the CUDA host code reads it at each call: a typo is refused here)

_C = load_extension()

# The extension registers masked_attention's autograd in C++ (csrc/masked_attention_autograd.cpp:
# no Python between the call and the kernel); without it the same backward is registered here.
NATIVE_AUTOGRAD = _C is not None and "masked_attention" in _C.build_info()["kernels"].get(
    "Autograd", []
)
if not NATIVE_AUTOGRAD:
    torch.library.register_autograd(
        f"{NAMESPACE}::masked_attention",
        _masked_attention_backward,
        setup_context=_masked_attention_setup_context,
    )
_masked_attention_op = torch.ops.sparsebert.masked_attention.default


def wgmma_forward_available() -> bool:
    """Whether SPARSEBERT_ATTENTION_KERNEL=wgmma runs the wgmma forward here: an extension built
    with sm_90a code (TORCH_CUDA_ARCH_LIST holding 9.0a) and a compute capability 9.0 GPU
    (elsewhere that choice runs the mma.sync forward)."""
    if not torch.cuda.is_available() or _C is None:
        return False
    return (torch.cuda.get_device_capability() == (9, 0)
            and arch_list_has_sm90a(_C.build_info().get("cuda_arch_list")))


def _compact_setup_context(ctx, inputs, output):
    q, k, v, head_gate, kept_heads, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, head_gate, kept_heads, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _compact_backward(ctx, grad_out, grad_lse):
    """masked_attention's backward on the kept heads' gathered slices (grad_out (B, Sq, K, D)),
    its gradients scattered back to all H heads (index_add: a head listed twice gets both
    contributions; heads not kept get zeros)."""
    q, k, v, head_gate, kept_heads, key_padding_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 7
    needs = ctx.needs_input_grad
    if kept_heads.numel() == 0:  # no head kept: zero gradients (the backward op needs H >= 1)
        return tuple(t.new_zeros(t.shape) if need else None
                     for t, need in zip((q, k, v, head_gate), needs)) + (None,) * 3
    index = kept_heads.long()  # (K,)
    gathered = [t.index_select(2, index) for t in (q, k, v)]  # (B, S, K, D) each
    args = (_last_dim_contiguous(grad_out), *gathered, head_gate.index_select(-1, index),
            key_padding_mask, out, lse, ctx.scale)
    if torch.is_grad_enabled():  # create_graph=True: outputs that refuse a second derivative
        dq, dk, dv, d_gate = _BackwardOnce.apply(*args)
    else:
        dq, dk, dv, d_gate = torch.ops.sparsebert.masked_attention_backward(*args)

    def scatter(grad: Tensor, like: Tensor) -> Tensor:  # (B, S, K, D) -> (B, S, H, D)
        return like.new_zeros(like.shape).index_add_(2, index, grad.to(like.dtype))

    gate_grad = None
    if needs[3]:  # (B, K) -> (B, H), then (H,) for a gate shared by the batch
        gate_grad = d_gate.new_zeros(d_gate.shape[0], head_gate.shape[-1])
        gate_grad = gate_grad.index_add_(1, index, d_gate)
        gate_grad = (gate_grad.sum(0) if head_gate.dim() == 1 else gate_grad).to(head_gate.dtype)
    return (scatter(dq, q) if needs[0] else None, scatter(dk, k) if needs[1] else None,
            scatter(dv, v) if needs[2] else None, gate_grad, None, None, None)


# The extension registers the same autograd in C++ (csrc/masked_attention_autograd.cpp).
if _C is None or "masked_attention_compact" not in _C.build_info()["kernels"].get("Autograd", []):
    torch.library.register_autograd(
        f"{NAMESPACE}::masked_attention_compact", _compact_backward,
        setup_context=_compact_setup_context,
    )


def native_dispatch_keys(op_name: str) -> list[str]:
    """Dispatch keys (CPU, CUDA) with a native kernel for `sparsebert::<op_name>`."""
    qualname = f"{NAMESPACE}::{op_name}"
    return [
        key
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    ]


OP_NAMES = (
    "masked_attention",
    "masked_attention_backward",
    "masked_attention_compact",
    "group_dot",
    "accumulate_importance_",
)
