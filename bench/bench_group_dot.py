"""group_dot (fused segmented x*g reduction) vs the plain PyTorch expression, in GB/s.

Each row: median time per call over interleaved rounds (each round times both providers), the
speed-up as the median of per-round ratios and their range over rounds.

Script:  python bench/bench_group_dot.py [--device cpu|cuda] [--rounds 5]
         prints a table and writes bench/results/group_dot-<device>.{json,md}
pytest:  pytest bench/bench_group_dot.py --benchmark-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sparsebert import ops  # noqa: E402


def make_inputs(batch, seq, dim, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, dim, generator=gen).to(device, dtype)
    g = torch.randn(batch, seq, dim, generator=gen).to(device, dtype)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(device)
    return x, g, mask


def torch_expression(x, g, group_size, mask):
    batch, seq, dim = x.shape
    prod = (x * g) * mask[:, :, None].to(x.dtype)
    return prod.float().view(batch, seq, dim // group_size, group_size).sum(dim=(1, 3))


PROVIDERS = {
    "torch": torch_expression,
    "sparsebert": lambda x, g, gs, m: ops.group_dot(x, g, gs, m),
}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("group_size", [1, 1536])
def test_group_dot_cpu(benchmark, provider, group_size):
    torch.set_num_threads(2)
    x, g, mask = make_inputs(16, 128, 1536, torch.float32, "cpu")
    benchmark(PROVIDERS[provider], x, g, group_size, mask)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 16 on CPU")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--dim", type=int, nargs="+", default=None, help="default: 3072 on CUDA, 1536 on CPU"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=common.positive_int, default=5,
                        help="interleaved rounds over the providers (medians kept)")
    args = parser.parse_args(argv)
    bad = [d for d in args.dim or () if d < 64 or d % 64]
    if bad:
        parser.error(f"--dim {' '.join(map(str, bad))}: expected multiples of 64 (the groups "
                     f"timed are 1, 64 and the whole dim)")
    common.use_device(args.device)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batch = args.batch or (32 if cuda else 16)
    dims = args.dim or ([3072] if cuda else [1536])

    rows, records = [], []
    for dim in dims:
        for group_size in dict.fromkeys((1, 64, dim)):  # --dim 64: group 64 once
            x, g, mask = make_inputs(batch, args.seq, dim, dtype, args.device)
            bytes_moved = 2 * x.numel() * x.element_size()
            calls = {name: (lambda fn=fn: fn(x, g, group_size, mask))
                     for name, fn in PROVIDERS.items()}
            samples = common.time_interleaved(calls, args.rounds)
            for name, values in samples.items():
                seconds = statistics.median(values)
                speedups = [1 / r for r in common.round_ratios(samples, name, "torch")]
                rec = dict(
                    provider=name,
                    batch=batch,
                    seq=args.seq,
                    dim=dim,
                    group_size=group_size,
                    dtype=str(dtype).replace("torch.", ""),
                    us=seconds * 1e6,
                    gb_per_s=bytes_moved / seconds / 1e9,
                    speedup_vs_torch=statistics.median(speedups),
                    speedup_min=min(speedups),
                    speedup_max=max(speedups),
                    rounds=args.rounds,
                    samples_s=values,  # per round, paired with torch's by position
                )
                records.append(rec)
                rows.append(
                    [
                        name,
                        batch,
                        args.seq,
                        dim,
                        group_size,
                        f"{rec['us']:.1f}",
                        f"{rec['gb_per_s']:.1f}",
                        f"{rec['speedup_vs_torch']:.2f}x",
                        f"{rec['speedup_min']:.2f}x-{rec['speedup_max']:.2f}x",
                    ]
                )
    header = ["provider", "B", "S", "D", "group", "time (us)",
              "effective GB/s (x+g, all tokens)", "speedup vs torch (median of rounds)",
              "range over rounds"]
    what = (f"group_dot, {str(dtype).replace('torch.', '')}, padding mask ~25% tokens, "
            f"{args.rounds} interleaved rounds")
    common.report("group_dot", args, argv, what, header, rows, records)


if __name__ == "__main__":
    main()
