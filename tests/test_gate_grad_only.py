"""masked_attention's backward when only the gate needs a gradient (q, k and v need none, as in
the first layer of an importance pass with frozen weights): d_head_gate is read off the output,
sum_{s, d} dout * out / gate, instead of running the attention backward. Checked against a
float64 reference differentiated by autograd, against the op's full backward, on the native
(C++ autograd) path and on the Python registration used without the extension."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsebert import ops, reference
from tests.attention_kit import plain_pytorch_attention, run_without_extension

BATCH, SEQ, HEADS, DIM = 3, 9, 4, 8


class OpNames(TorchDispatchMode):
    """The names of the ops that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def make_inputs(dtype, gate_shape, seed=0, device="cpu"):
    """q, k, v, dout (B, S, H, D) in `dtype`; the gate, fp32, (H,) or (B, H), with a live head,
    a pruned one (0), a soft one and a negative one; a key padding mask with a short row and a
    row of one real key."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(BATCH, SEQ, HEADS, DIM, generator=gen).to(device, dtype)
                     for _ in range(4))
    gate = torch.tensor([1.0, 0.0, 0.37, -1.5])
    if gate_shape == "BH":
        gate = gate.expand(BATCH, HEADS).clone()
        gate[1, 2], gate[2, 0] = 0.0, 2.0
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 1:] = False
    return q, k, v, gate.to(device), mask.to(device), dout


def gate_grad(q, k, v, gate, mask, dout, **kwargs):
    """d/d gate of sum(masked_attention(...) * dout), asked together with q's gradient when q
    needs one (the engine only has the op compute the gradients a call asks for)."""
    gate = gate.clone().requires_grad_()
    out = ops.masked_attention(q, k, v, gate, mask, **kwargs)
    wanted = (gate, q) if q.requires_grad else (gate,)
    return torch.autograd.grad((out * dout).sum(), wanted)[0]


def reference_gate_grad(q, k, v, gate, mask, dout):
    """The same in float64 by autograd through the reference; 0 where the gate is 0 (the op's
    documented gradient there)."""
    gate64 = gate.double().requires_grad_()
    out, _ = reference.masked_attention_ref(q.double(), k.double(), v.double(), gate64, mask,
                                            DIM ** -0.5)
    grad = torch.autograd.grad((out * dout.double()).sum(), gate64)[0]
    return torch.where(gate == 0, 0.0, grad).to(gate.device)


@pytest.mark.all_devices
@pytest.mark.parametrize("gate_shape", ["H", "BH"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_only_backward_reads_the_gradient_off_the_output(dtype, gate_shape, device):
    q, k, v, gate, mask, dout = make_inputs(dtype, gate_shape, device=device)
    with OpNames() as ran:
        got = gate_grad(q, k, v, gate, mask, dout)
    assert "masked_attention_backward" not in ran.names  # the attention backward did not run
    assert got.dtype == gate.dtype and got.shape == gate.shape
    want = reference_gate_grad(q, k, v, gate, mask, dout)
    # bf16: the output it reads is rounded to 8 bits (as the GPU kernels' delta = dO . O);
    # fp32 on CUDA: the forward's products are 3xTF32
    fp32_tol = 1e-5 if device == "cpu" else 1e-4
    tol = (dict(rtol=fp32_tol, atol=fp32_tol) if dtype == torch.float32
           else dict(rtol=2e-2, atol=5e-2))
    torch.testing.assert_close(got, want.float(), **tol)
    assert (got[gate == 0] == 0).all()
    # the full backward (q needs a gradient) gives the same d_head_gate
    with OpNames() as ran:
        full = gate_grad(q.clone().requires_grad_(), k, v, gate, mask, dout)
    assert "masked_attention_backward" in ran.names
    torch.testing.assert_close(got, full, **tol)


@pytest.mark.all_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_only_backward_is_zero_at_a_pruned_head_for_any_dout(dtype, device):
    """An infinite or NaN dout at a pruned head (gate 0, output 0) gives its gate exactly the 0
    of the full backward, not NaN (0 * inf); the other heads' gradients are unchanged."""
    q, k, v, gate, mask, dout = make_inputs(dtype, "H", device=device)
    finite = gate_grad(q, k, v, gate, mask, dout)
    for bad in (float("inf"), float("nan")):
        broken = dout.clone()
        broken[:, :, 1] = bad  # head 1's gate is 0
        got = gate_grad(q, k, v, gate, mask, broken)
        assert got[1] == 0
        torch.testing.assert_close(got, finite)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_keep_the_attention_backward(dtype):
    """fp16 (a small soft gate's output loses digits in its subnormal range) and fp64 keep the
    kernels' backward, which sums P * (dout V^T)."""
    q, k, v, gate, mask, dout = make_inputs(dtype, "H")
    with OpNames() as ran:
        got = gate_grad(q, k, v, gate, mask, dout)
    assert "masked_attention_backward" in ran.names
    want = reference_gate_grad(q, k, v, gate, mask, dout)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=5e-3, atol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)


def test_gate_only_backward_with_exact_zero_gate_grad():
    """exact_zero_gate_grad adds the true gradient at the zero gates on top: the live gates'
    gradients come from the output, the pruned one's from the extra forward."""
    q, k, v, gate, mask, dout = make_inputs(torch.float32, "H")
    got = gate_grad(q, k, v, gate, mask, dout, exact_zero_gate_grad=True)
    gate64 = gate.double().requires_grad_()
    out = plain_pytorch_attention(q.double(), k.double(), v.double(), gate64, mask, DIM ** -0.5)
    want = torch.autograd.grad((out * dout.double()).sum(), gate64)[0]  # the true gradient
    assert want[1] != 0  # at the pruned head too
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_only_the_gradients_asked_for_decide():
    """q needs a gradient but the call asks for the gate's only: the engine has the op compute
    d_head_gate alone, so the output is read; asked for q's too, the attention backward runs."""
    q, k, v, gate, mask, dout = make_inputs(torch.float32, "H")
    q.requires_grad_()
    gate_leaf = gate.clone().requires_grad_()
    loss = (ops.masked_attention(q, k, v, gate_leaf, mask) * dout).sum()
    with OpNames() as ran:
        (alone,) = torch.autograd.grad(loss, gate_leaf, retain_graph=True)
    assert "masked_attention_backward" not in ran.names
    with OpNames() as ran:
        both = torch.autograd.grad(loss, (gate_leaf, q))
    assert "masked_attention_backward" in ran.names
    torch.testing.assert_close(alone, both[0], rtol=1e-5, atol=1e-5)


def test_gate_only_backward_under_create_graph_keeps_the_kernel_backward():
    """create_graph=True records the backward (which refuses a second derivative): the
    attention backward runs, with the same first derivative."""
    q, k, v, gate, mask, dout = make_inputs(torch.float32, "H")
    gate_leaf = gate.clone().requires_grad_()
    out = ops.masked_attention(q, k, v, gate_leaf, mask)
    with OpNames() as ran:
        (got,) = torch.autograd.grad((out * dout).sum(), gate_leaf, create_graph=True)
    assert "masked_attention_backward" in ran.names
    torch.testing.assert_close(got.detach(), gate_grad(q, k, v, gate, mask, dout),
                               rtol=1e-5, atol=1e-5)


FALLBACK_SCRIPT = """
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from sparsebert import ops, reference
assert not ops.NATIVE_AUTOGRAD
names = []
class Names(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
gen = torch.Generator().manual_seed(1)
q, k, v, dout = (torch.randn(2, 5, 3, 4, generator=gen) for _ in range(4))
mask = torch.ones(2, 5, dtype=torch.bool)
mask[1, 3:] = False
for gate in (torch.tensor([0.0, 1.0, 0.5]), torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, -1.0]])):
    leaf = gate.clone().requires_grad_()
    with Names():
        got, = torch.autograd.grad((ops.masked_attention(q, k, v, leaf, mask) * dout).sum(), leaf)
    assert "masked_attention_backward" not in names, names
    g64 = gate.double().requires_grad_()
    out, _ = reference.masked_attention_ref(q.double(), k.double(), v.double(), g64, mask, 0.5)
    want, = torch.autograd.grad((out * dout.double()).sum(), g64)
    want = torch.where(gate == 0, 0.0, want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    broken = dout.clone()
    broken[..., 0, :] = float("inf")  # head 0's gate is 0 in both gates' first row
    leaf = gate.clone().requires_grad_()
    got, = torch.autograd.grad((ops.masked_attention(q, k, v, leaf, mask) * broken).sum(), leaf)
    assert (got[..., 0] == 0).all() if gate.dim() == 1 else got[0, 0] == 0, got
print("ok")
"""


def test_gate_only_backward_without_the_extension():
    """The Python autograd registration (extension not built) takes the same shortcut."""
    run_without_extension(FALLBACK_SCRIPT)
