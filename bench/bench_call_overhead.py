"""Host-side cost of one masked-attention call: sparsebert vs torch SDPA on tiny inputs.

At B=S=H=1, D=8 the arithmetic is negligible, so the time per call is the host path: Python
wrapper, argument checks, dispatcher, autograd, allocation, kernel launch. Providers:
  sdpa            F.scaled_dot_product_attention on (B, H, S, D) views (the baseline)
  sparsebert      sparsebert.ops.masked_attention (checks and autograd in C++)
  op              torch.ops.sparsebert.masked_attention directly (no Python wrapper)
Modes: fwd (no input needs grad), fwd+bwd (q and the gate need grad; one autograd.grad) and
fwd+mask (fwd with a key padding mask: SDPA gets it as a boolean attn_mask (B, 1, 1, S)).
Providers are timed in interleaved rounds (each round times every provider once) and the
median over rounds is reported, so machine noise hits all providers alike.

Script:  python bench/bench_call_overhead.py [--device cpu|cuda] [--rounds 15]
         writes bench/results/call_overhead-<device>.{json,md} (--stem renames)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sparsebert import ops  # noqa: E402

PROVIDERS = ("sdpa", "sparsebert", "op")


def make_call(provider: str, mode: str, shape: tuple[int, int, int, int], device: str):
    """A zero-argument callable doing one call (and its backward for fwd+bwd)."""
    batch, seq, heads, dim = shape
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(batch, seq, heads, dim, device=device) for _ in range(3))
    gate = torch.ones(heads, device=device)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device) if mode == "fwd+mask" \
        else None  # (B, S), True = real token
    sdpa_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
    if grad:
        q.requires_grad_(True)
        gate.requires_grad_(True)
    scale = dim**-0.5
    if provider == "sdpa":
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def forward():
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sdpa_mask)

        inputs = (q,)
    elif provider == "sparsebert":

        def forward():
            return ops.masked_attention(q, k, v, gate, mask)

        inputs = (q, gate)
    elif provider == "op":
        op = torch.ops.sparsebert.masked_attention.default

        def forward():
            return op(q, k, v, gate, mask, scale)[0]

        inputs = (q, gate)
    else:
        raise ValueError(provider)
    if not grad:
        return forward
    dout = torch.randn(batch, heads, seq, dim, device=device)
    if provider != "sdpa":
        dout = dout.transpose(1, 2).contiguous()

    def forward_backward():
        torch.autograd.grad(forward(), inputs, dout)

    return forward_backward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 1, 1, 8],
                        metavar=("B", "S", "H", "D"))
    parser.add_argument("--rounds", type=common.positive_int, default=15)
    parser.add_argument("--calls", type=common.positive_int, default=2000, help="calls per provider per round")
    parser.add_argument("--stem", default="call_overhead",
                        help="result file name (e.g. to keep a run of another checkout apart)")
    args = parser.parse_args(argv)
    common.use_device(args.device)
    torch.set_num_threads(1)
    cuda = args.device.startswith("cuda")
    shape = tuple(args.shape)

    rows, records = [], []
    for mode in ("fwd", "fwd+bwd", "fwd+mask"):
        calls = {p: make_call(p, mode, shape, args.device) for p in PROVIDERS}
        for fn in calls.values():  # warm-up
            for _ in range(200):
                fn()
        samples = {p: [] for p in PROVIDERS}
        for _ in range(args.rounds):
            for p, fn in calls.items():
                seconds = timeit.timeit(fn, number=args.calls) / args.calls
                if cuda:
                    torch.cuda.synchronize()
                samples[p].append(seconds)
        base = statistics.median(samples["sdpa"])
        for p in PROVIDERS:
            us = statistics.median(samples[p]) * 1e6
            spread = (max(samples[p]) - min(samples[p])) * 1e6
            records.append(dict(mode=mode, provider=p, shape=list(shape), us=us,
                                spread_us=spread, vs_sdpa=us / (base * 1e6)))
            rows.append([mode, p, f"{us:.2f}", f"{spread:.2f}", f"{us / (base * 1e6):.2f}x"])

    header = ["mode", "provider", "time per call (us, median)", "max-min over rounds (us)",
              "vs SDPA"]
    what = (f"host cost of one attention call, (B, S, H, D) = {shape}, fp32, 1 thread, "
            f"{args.rounds} interleaved rounds of {args.calls} calls")
    common.report("call_overhead", args, argv, what, header, rows, records, stem=args.stem)


if __name__ == "__main__":
    main()
