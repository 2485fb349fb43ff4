"""Hardware counters of the default CUDA attention forward (the mma.sync kernel) at B=32, H=12,
D=64, fp16, all heads kept, S=128 and S=512, for Nsight Compute: two warm-up calls, then one call
at each length. bench/gpu_check.sh's ncu-mma step profiles those two calls:

  ncu --clock-control none -k regex:mma_forward_kernel --launch-skip 2 --launch-count 2 \\
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
      python3 bench/ncu_attention.py

With --dense-vs-compact the two profiled calls are instead the dense and the compact output
(masked_attention, masked_attention_compact over every head) at S=128, whose difference of about
2 us in graph-replay GPU time the sections should explain (gpu_check's ncu-dense-compact step).

Script:  python bench/ncu_attention.py [--dense-vs-compact]   (CUDA only; on its own it only
         runs the calls)
"""

from __future__ import annotations

import argparse

import torch

from sparsebert import ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-vs-compact", action="store_true",
                        help="profile the dense and the compact output at S=128")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_attention.py needs a CUDA device")
    batch, heads, dim = 32, 12, 64
    gate = torch.ones(heads, device="cuda")
    kept = torch.arange(heads, device="cuda")
    inputs = {}
    for seq in (128, 512):
        fused = torch.randn(batch, seq, 3 * heads * dim, device="cuda", dtype=torch.float16)
        inputs[seq] = [t.view(batch, seq, heads, dim) for t in fused.split(heads * dim, dim=-1)]
    calls = [lambda: ops.masked_attention(*inputs[128], gate)] * 2  # warm-up
    if args.dense_vs_compact:
        calls += [lambda: ops.masked_attention(*inputs[128], gate),
                  lambda: ops.masked_attention_compact(*inputs[128], gate, kept)]
    else:
        calls += [lambda: ops.masked_attention(*inputs[seq], gate) for seq in (128, 512)]
    for call in calls:  # two warm-up calls, then the profiled ones
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
