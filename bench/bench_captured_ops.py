"""What a CUDA graph of one training step holds: tensor ops (about one kernel each) and the
matrix products' FLOPs of a forward+backward, stock vs patched models, with and without fixed
gates (`CudaGraphStep(fixed_gates=True)`: the capture uses the gates read at warm-up).

Rows (random BERT-shaped classifier, dropout off, padded rows; no optimizer step):
  stock               the unpatched Hugging Face model (SDPA)
  patched             sparsebert.patch'ed, every gate 1: a capture can read neither the gates
                      nor the 4-d masks, so every layer multiplies by its gates (and tests
                      them) and runs SDPA with the materialised mask
  patched_fixed       the same captured as CudaGraphStep(fixed_gates=True) does (a FixedGates
                      block, padding masks as views): no gate multiplies, and the
                      masked_attention op instead of SDPA
  patched_half        every other head of every layer masked (set_masks)
  patched_half_fixed  the same in a FixedGates block: the masked heads' products left out (the
                      live heads' weight slices and their gradients' scatter are the extra ops)
On CUDA the step is captured into a real CUDA graph (after two eager warm-up steps, in the
block for the *_fixed rows) and the ops are counted as the capture records them. On the CPU the
capture is simulated: the blocks are told a graph is being captured (`can_read_on_host` answers
False, `known_all_zero` False as for CUDA tensors), which is all the patched code consults.
FLOPs count mm/addmm/bmm (2 m n k; the attention op's own products are not included).

    python bench/bench_captured_ops.py                          # CPU: bert-base-host, B=8, S=64
    python bench/bench_captured_ops.py --device cuda --model bert-base --batch 32 --seq 128
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert.hf as sbhf  # noqa: E402
import sparsebert.nn.attention as sb_attention  # noqa: E402
import sparsebert.nn.common as sb_common  # noqa: E402
import sparsebert.nn.mlp as sb_mlp  # noqa: E402
from sparsebert.graph_capture import capture  # noqa: E402
from sparsebert.hf.attention_backend import padding_masks_as_views  # noqa: E402
from sparsebert.nn.common import FixedGates  # noqa: E402

VARIANTS = ("stock", "patched", "patched_fixed", "patched_half", "patched_half_fixed")


class OpCounter(TorchDispatchMode):
    """Tensor ops by name (views and bare allocations left out) and matrix-product FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in common._NO_KERNEL_OPS:
            self.ops[name] += 1
        if name in ("mm", "addmm", "bmm"):
            left = args[1] if name == "addmm" else args[0]
            self.flops += 2 * out.numel() * left.shape[-1]
        return out


@contextlib.contextmanager
def simulated_capture():
    """The patched blocks see a CUDA graph being captured (CPU runs)."""
    saved = {(module, name): getattr(module, name)
             for module, name in ((sb_common, "can_read_on_host"),
                                  (sb_attention, "can_read_on_host"),
                                  (sb_attention, "known_all_zero"), (sb_mlp, "known_all_zero"))}
    try:
        for module, name in saved:
            setattr(module, name, lambda *args: False)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def build(variant: str, base: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = copy.deepcopy(base).to(device)
    if variant == "stock":
        return model
    model = sbhf.patch(model)
    if "_half" in variant:
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        keep = (torch.arange(heads) % 2 == 1).float()
        sbhf.set_masks(model, head_mask=keep.expand(layers, heads).clone())
    return model


def count_captured_step(model, batch, device: torch.device, fixed: bool) -> OpCounter:
    """Ops and FLOPs of one forward+backward as a capture records them."""

    def step() -> None:
        model(**batch).loss.backward()

    with contextlib.ExitStack() as stack:
        if fixed:  # as CudaGraphStep(fixed_gates=True) captures
            stack.enter_context(FixedGates())
            stack.enter_context(padding_masks_as_views(model))
        for _ in range(2):  # warm-up (eager): lazy inits; in the block, the gates are read here
            step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with capture(graph, device), OpCounter() as counter:
                step()
            graph.replay()
            torch.cuda.synchronize(device)
        else:
            with simulated_capture(), OpCounter() as counter:
                step()
    return counter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="bert-base-host",
                        help=f"a random model of shape {sorted(common.MODEL_SHAPES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)
    if args.model not in common.MODEL_SHAPES:
        parser.error(f"--model: unknown shape {args.model!r}; expected "
                     f"{sorted(common.MODEL_SHAPES)}")
    device = common.use_device(args.device)
    torch.manual_seed(0)
    base = common.random_classifier(args.model).train()
    for module in base.modules():  # dropout off: the same ops on every call
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    base.config.attention_probs_dropout_prob = 0.0
    batch = common.padded_classifier_batch(args.batch, args.seq, 30000, device)
    counts = {}
    for variant in VARIANTS:
        model = build(variant, base, device)
        counts[variant] = count_captured_step(model, batch, device, variant.endswith("_fixed"))
    stock = counts["stock"]
    rows, records = [], []
    for variant, counter in counts.items():
        ops, extra = sum(counter.ops.values()), counter.ops - stock.ops
        rows.append([variant, ops, f"{ops / sum(stock.ops.values()):.2f}x",
                     f"{counter.flops / 1e9:.3f}", f"{counter.flops / stock.flops:.2f}x",
                     ", ".join(f"{name} {n}" for name, n in sorted(extra.items())) or "-"])
        records.append({"variant": variant, "ops": ops, "flops": counter.flops,
                        "ops_by_name": dict(counter.ops)})
    how = "CUDA graph capture" if device.type == "cuda" else "simulated capture on the CPU"
    common.report("captured_ops", args, argv,
                  f"Tensor ops and matrix-product FLOPs of one captured training forward+backward "
                  f"({how}), random {args.model}-shaped classifier, B={args.batch}, "
                  f"S={args.seq}, padded rows, dropout off",
                  ["variant", "tensor ops", "vs stock", "matrix-product GFLOP", "vs stock",
                   "ops beyond stock's"], rows, records)


if __name__ == "__main__":
    main()
