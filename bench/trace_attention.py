"""One profiled call of each CUDA attention forward (default: the mma.sync forward; wmma: the WMMA
kernel before it; SDPA) at B=32, S=128, H=12, D=64, fp16, 6 of 12 heads kept, and the same in fp32
(default: the 3xTF32 mma.sync forward; wmma: the SIMT kernel): prints the kernels each launches with
their GPU time and writes one Chrome trace per call to
bench/results/profiles/attention_trace_<call>-<gpu>.json.

Script:  python bench/trace_attention.py   (CUDA only)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sparsebert import ops, runtime  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("trace_attention.py needs a CUDA device")
    batch, seq, heads, dim = 32, 128, 12, 64
    fused = torch.randn(batch, seq, 3 * heads * dim, device="cuda", dtype=torch.float16)
    q, k, v = (t.view(batch, seq, heads, dim) for t in fused.split(heads * dim, dim=-1))
    gate = torch.zeros(heads, device="cuda")
    gate[: heads // 2] = 1.0
    kept = gate.nonzero().squeeze(1)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    calls = {
        "default": lambda: ops.masked_attention(q, k, v, gate),
        "wmma": lambda: ops.masked_attention(q, k, v, gate),
        "compact": lambda: ops.masked_attention_compact(q, k, v, gate, kept),
        "sdpa": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ),
        "default_fp32": lambda: ops.masked_attention(q32, k32, v32, gate),
        "wmma_fp32": lambda: ops.masked_attention(q32, k32, v32, gate),
        "sdpa_fp32": lambda: F.scaled_dot_product_attention(
            q32.transpose(1, 2), k32.transpose(1, 2), v32.transpose(1, 2)
        ),
    }
    out_dir = common.RESULTS_DIR / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", runtime.device_label("cuda").lower()).strip("-")
    for name, fn in calls.items():
        os.environ["SPARSEBERT_ATTENTION_KERNEL"] = "wmma" if "wmma" in name else "default"
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        print(f"{name}: {len(kernels)} kernel(s)")
        for e in kernels:
            print(f"  {e.name[:90]:<90} {e.device_time:8.1f} us")
        prof.export_chrome_trace(str(out_dir / f"attention_trace_{name}-{slug}.json"))
    os.environ.pop("SPARSEBERT_ATTENTION_KERNEL", None)


if __name__ == "__main__":
    main()
