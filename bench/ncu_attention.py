"""Hardware counters of the default CUDA attention forward (the mma.sync kernel) at B=32, H=12,
D=64, fp16, all heads kept, S=128 and S=512, for Nsight Compute: two warm-up calls, then one call
at each length. bench/gpu_check.sh's ncu-mma step profiles those two calls:

  ncu --clock-control none -k regex:mma_forward_kernel --launch-skip 2 --launch-count 2 \\
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
      python3 bench/ncu_attention.py

Script:  python bench/ncu_attention.py   (CUDA only; on its own it only runs the calls)
"""

from __future__ import annotations

import torch

from sparsebert import ops


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ncu_attention.py needs a CUDA device")
    batch, heads, dim = 32, 12, 64
    gate = torch.ones(heads, device="cuda")
    inputs = {}
    for seq in (128, 512):
        fused = torch.randn(batch, seq, 3 * heads * dim, device="cuda", dtype=torch.float16)
        inputs[seq] = [t.view(batch, seq, heads, dim) for t in fused.split(heads * dim, dim=-1)]
    for seq in (128, 128, 128, 512):  # two warm-up calls, then the profiled ones
        ops.masked_attention(*inputs[seq], gate)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
