"""Masked attention: sparsebert vs stock PyTorch alternatives, forward and forward+backward.

Providers (all compute gated multi-head attention over (B, S, H, D) inputs):
  reference    sparsebert.reference.masked_attention_ref (fp32 math, the test oracle)
  sdpa         torch SDPA over all heads (dense; ignores the gate: the speed to beat)
  sdpa_gate    torch SDPA then multiply by the head gate (the old head_mask way)
  gather_sdpa  index_select the kept heads, SDPA, scatter back (stock way to skip heads)
  sparsebert   sparsebert.ops.masked_attention (pruned heads skipped inside the kernel; on CUDA
               the mma.sync forward and backward, for float32 their 3xTF32 variants)
  sparsebert_wmma     the same with SPARSEBERT_ATTENTION_KERNEL=wmma: the kernels before the
                      mma.sync ones (WMMA for fp16/bf16, SIMT for float32; CUDA)
  sparsebert_wgmma    the same with SPARSEBERT_ATTENTION_KERNEL=wgmma: the forward on Hopper's
                      wgmma (fp16/bf16; CUDA; on a build with sm_90a code and a compute
                      capability 9.0 GPU, else the row repeats the mma.sync kernel and is left out)
  sparsebert_compact  sparsebert.ops.masked_attention_compact over the kept heads, output
                      (B, S, H_kept, D) (on CUDA the mma.sync forward; on the CPU its own
                      kernel)
The SDPA backend torch picked (cuDNN, flash, memory-efficient, math) is named in the table title.
Columns: "vs SDPA" (all heads, same shape), and "vs its kernel, all heads": each row against the
same kernel with every head kept (sparsebert_compact against sparsebert, the mma.sync forward
it runs), which is what "pruning k of H heads costs k/H" reads from. Each provider's output is
checked against the reference before it is timed (a mismatch stops the run). Rows are timed
in interleaved rounds (--rounds; each round times every row of one shape once, so load on a
shared machine hits all alike): a time is the median over rounds, a ratio the median of the
per-round ratios.

Script:  python bench/bench_masked_attention.py [--device cpu|cuda] [--dtype ...]
         prints a table and writes bench/results/masked_attention-<device>.{json,md}
         (masked_attention_<dtype>-<device> when --dtype is given)
         --timing graph (CUDA): GPU time per call, replayed from a CUDA graph, so the host's
         per-call overhead (Python, dispatcher, launches) is left out; written to
         bench/results/masked_attention_graph_<dtype>-<device>.{json,md}; without
         --no-backward also forward+backward (autograd.grad captured in the graph: a provider
         whose capture fails gets a row naming the error instead of a time)
pytest:  pytest bench/bench_masked_attention.py --benchmark-only
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sparsebert import ops  # noqa: E402
from sparsebert.reference import masked_attention_ref  # noqa: E402

PROVIDERS = (
    "reference", "sdpa", "sdpa_gate", "gather_sdpa", "sparsebert", "sparsebert_wmma",
    "sparsebert_wgmma", "sparsebert_compact",
)
CUDA_ONLY = ("sparsebert_wmma", "sparsebert_wgmma")
# Providers timed under a kernel choice (SPARSEBERT_ATTENTION_KERNEL) of their own.
KERNEL_CHOICE = {"sparsebert_wmma": "wmma", "sparsebert_wgmma": "wgmma"}
# The all-heads time each provider is compared with (default: its own at every head kept).
ALL_HEADS_BASELINE = {"sparsebert_compact": "sparsebert"}
SWITCH = "SPARSEBERT_ATTENTION_KERNEL"


@contextlib.contextmanager
def kernel_switch(choice):
    """SPARSEBERT_ATTENTION_KERNEL=choice while the block runs (the CUDA host code reads it per
    call, the backward's included; under graph timing the choice made at capture is replayed).
    Set once around a whole timing, so the timed calls pay no environment writes."""
    old = os.environ.get(SWITCH)
    os.environ[SWITCH] = choice
    try:
        yield
    finally:
        if old is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = old


def make_inputs(batch, seq, heads, dim, active, dtype, device, requires_grad=False):
    """q, k, v as views of one fused QKV projection (B, S, 3*H*D); gate with `active` heads on."""
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(batch, seq, 3 * heads * dim, generator=gen).to(device, dtype)
    fused.requires_grad_(requires_grad)
    q, k, v = (t.view(batch, seq, heads, dim) for t in fused.split(heads * dim, dim=-1))
    gate = torch.zeros(heads, device=device, dtype=torch.float32)
    gate[torch.randperm(heads, generator=gen)[:active].to(device)] = 1.0
    gate.requires_grad_(requires_grad)
    return fused, q, k, v, gate


def provider_fn(name, q, k, v, gate):
    scale = q.shape[-1] ** -0.5
    if name == "reference":
        return lambda: masked_attention_ref(q, k, v, gate, None, scale)[0]
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
    if name == "sdpa_gate":
        return lambda: (
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            * gate.to(q.dtype)[None, :, None, None]
        )
    if name == "gather_sdpa":
        kept = gate.detach().nonzero().squeeze(1)

        def gather():
            qh, kh, vh = (t.index_select(2, kept).transpose(1, 2) for t in (q, k, v))
            ctx = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)
            out = q.new_zeros(q.shape)
            return out.index_copy(2, kept, ctx * gate[kept].to(q.dtype)[None, None, :, None])

        return gather
    if name in ("sparsebert", "sparsebert_wmma", "sparsebert_wgmma"):  # (timed() sets the switch)
        return lambda: ops.masked_attention(q, k, v, gate)
    if name == "sparsebert_compact":
        kept = gate.detach().nonzero().squeeze(1)
        return lambda: ops.masked_attention_compact(q, k, v, gate, kept)
    raise ValueError(name)


# Largest |difference| from the fp32 reference a provider's output may show before timing
# (fp32 on CUDA: the 3xTF32 kernels; fp16/bf16: their rounding of inputs and outputs).
OUTPUT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 5e-2


def check_output(name, fn, q, k, v, gate) -> None:
    """The provider's forward output equals the fp32 reference's (sdpa: with every head kept, as
    it ignores the gate; sparsebert_compact: the kept heads' slice), else ValueError: a row of
    the table times only what computes the same attention."""
    with torch.no_grad():
        if name in KERNEL_CHOICE:
            with kernel_switch(KERNEL_CHOICE[name]):
                got = fn()
        else:
            got = fn()
        used = torch.ones_like(gate) if name == "sdpa" else gate
        want = masked_attention_ref(q.float(), k.float(), v.float(), used.float(), None,
                                    q.shape[-1] ** -0.5)[0]  # (B, S, H, D)
    if name in ("sdpa", "sdpa_gate"):
        got = got.transpose(1, 2)  # (B, H, S, D) -> (B, S, H, D)
    if name == "sparsebert_compact":
        want = want[:, :, gate.detach().nonzero().squeeze(1)]
    worst = float((got.float() - want).abs().max())
    if not worst <= OUTPUT_TOLERANCE.get(q.dtype, HALF_TOLERANCE):
        raise ValueError(f"{name}: output differs from the reference by {worst:.3g} "
                         f"(B={q.shape[0]}, S={q.shape[1]}, D={q.shape[-1]}, {q.dtype}); not "
                         "timed")


def wanted(name, active, mode, args, cuda, dtype=None) -> bool:
    """Whether the table has a row for provider `name` with `active` heads kept in `mode`."""
    if name in CUDA_ONLY and not cuda:
        return False
    if name == "sparsebert_wgmma" and (not ops.wgmma_forward_available()
                                       or dtype not in (torch.float16, torch.bfloat16)):
        return False  # it would time the mma.sync kernel (fp32: the 3xTF32 one) again
    if name == "sparsebert_compact" and mode != "fwd":
        return False  # timed forward only: the inference fast path (its backward is
        # masked_attention's on the gathered kept heads)
    if name == "sdpa" and active != args.heads:
        return False  # dense SDPA does not depend on the gate
    # The fp32 oracle is no contender, and not capturable.
    return not (name == "reference" and args.timing == "graph")


def median_ratio(samples, key, base):
    """Median over rounds of samples[key] / samples[base] (same round paired); None when the
    base row was not timed (left out, or its capture failed)."""
    if not samples.get(base):
        return None
    return statistics.median(common.round_ratios(samples, key, base))


def timed(name, batch, seq, heads, dim, active, dtype, device, backward, timing="eager",
          check=True):
    """Seconds per call of one provider on fresh inputs; check: compare its output with the
    reference first (the first round does, later rounds time the same computation)."""
    fused, q, k, v, gate = make_inputs(batch, seq, heads, dim, active, dtype, device, backward)
    fn = provider_fn(name, q, k, v, gate)
    if check:
        check_output(name, fn, q, k, v, gate)
    timer = common.time_call_graph if timing == "graph" else common.time_call
    if name in KERNEL_CHOICE:  # the switch is on for every call it makes

        def time_call(f, **kwargs):
            with kernel_switch(KERNEL_CHOICE[name]):
                return timer(f, **kwargs)
    else:
        time_call = timer
    if not backward:
        with torch.no_grad():
            return time_call(fn)
    dout = torch.randn(batch, seq, heads, dim, device=device, dtype=dtype)

    def fwd_bwd():
        out = fn()
        if out.shape != dout.shape:  # sdpa providers return (B, H, S, D)
            out = out.transpose(1, 2)
        if out.shape != dout.shape:  # compact output: the kept heads' slice of dout
            kept = gate.detach().nonzero().squeeze(1)
            torch.autograd.grad(out, (fused,), dout[:, :, kept], allow_unused=True)
            return
        inputs = (fused, gate) if name not in ("sdpa",) else (fused,)
        torch.autograd.grad(out, inputs, dout, allow_unused=True)

    if timing != "graph":
        return time_call(fwd_bwd)
    # The backward runs on autograd's device thread: if a global-mode capture fails, try again
    # with only the capturing thread checked, and report both errors if that fails too.
    try:
        return time_call(fwd_bwd)
    except RuntimeError as first:
        torch.cuda.synchronize()
        try:
            return time_call(fwd_bwd, capture_error_mode="thread_local")
        except RuntimeError as second:
            raise RuntimeError(f"global capture: {str(first).strip().splitlines()[0]}; "
                               f"thread_local: {str(second).strip().splitlines()[0]}") from second


# ---------------------------------------------------------------- pytest-benchmark entry points
@pytest.mark.parametrize("provider", ["sdpa", "sdpa_gate", "sparsebert"])
@pytest.mark.parametrize("active", [12, 6])
def test_forward_cpu(benchmark, provider, active):
    torch.set_num_threads(2)
    _, q, k, v, gate = make_inputs(8, 128, 12, 64, active, torch.float32, "cpu")
    fn = provider_fn(provider, q, k, v, gate)
    with torch.no_grad():
        benchmark(fn)


# ---------------------------------------------------------------------------- script mode
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=common.positive_int, nargs="+", default=None)
    parser.add_argument("--seq", type=common.positive_int, nargs="+", default=[128])
    parser.add_argument("--heads", type=common.positive_int, default=12)
    parser.add_argument("--dim", type=common.positive_int, nargs="+", default=None)
    parser.add_argument(
        "--active", type=common.positive_int, nargs="+", default=None,
        help="heads kept, each in [1, --heads] (default H, H/2, H/4, those >= 1)"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS,
                        help="default: every provider this device and build can run")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--rounds", type=common.positive_int, default=3,
                        help="interleaved rounds over the rows of one shape (medians kept)")
    parser.add_argument("--tag", default="",
                        help="appended to the results file name (a run with other providers "
                             "keeps the full tables)")
    parser.add_argument("--timing", choices=("eager", "graph"), default="eager",
                        help="eager: wall time per call (host overhead included); graph: GPU "
                             "time per call replayed from a CUDA graph (CUDA only)")
    args = parser.parse_args(argv)
    common.use_device(args.device)
    if args.timing == "graph" and not args.device.startswith("cuda"):
        parser.error("--timing graph needs --device cuda")

    cuda = args.device.startswith("cuda")
    named = args.providers is not None
    args.providers = args.providers or list(PROVIDERS)
    if cuda and named and "sparsebert_wgmma" in args.providers and not (
            ops.wgmma_forward_available()):
        parser.error("--providers sparsebert_wgmma: this build has no wgmma forward (build with "
                     "TORCH_CUDA_ARCH_LIST=9.0a for a compute capability 9.0 GPU); its rows "
                     "would be left out")
    if not cuda and set(args.providers) <= set(CUDA_ONLY):
        parser.error(f"--providers {' '.join(args.providers)}: CUDA-only; on the CPU add "
                     f"others (nothing would be timed, and the CPU results file overwritten)")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    batches = args.batch or ([32] if cuda else [8])
    dims = args.dim or ([64, 32] if cuda else [64])
    if args.active and max(args.active) > args.heads:
        parser.error(f"--active {max(args.active)}: more heads kept than --heads {args.heads}")
    # (no row keeps 0 heads: compact's output would be empty, and nothing timed worth a row)
    actives = args.active or sorted({args.heads, args.heads // 2, args.heads // 4} - {0},
                                    reverse=True)
    modes = ["fwd"] + ([] if args.no_backward else ["fwd+bwd"])

    rows, records = [], []
    for mode, batch, seq, dim in itertools.product(modes, batches, args.seq, dims):
        keys = [(name, active) for active in actives for name in args.providers
                if wanted(name, active, mode, args, cuda, dtype)]
        samples = {key: [] for key in keys}  # (provider, heads kept) -> seconds per round
        errors = {}  # (provider, heads kept) -> why its graph capture failed
        for round_index in range(args.rounds):  # each round times every row once
            for name, active in keys:
                if (name, active) in errors:
                    continue
                try:
                    samples[name, active].append(
                        timed(name, batch, seq, args.heads, dim, active, dtype, args.device,
                              mode != "fwd", args.timing, check=round_index == 0))
                except RuntimeError as error:  # a graph capture that failed: say how
                    if args.timing != "graph":
                        raise
                    samples[name, active] = []  # a row is timed in every round or not at all
                    errors[name, active] = (f"{type(error).__name__}: "
                                            f"{str(error).strip().splitlines()[0]}")
                    print(f"{mode} {name} B={batch} S={seq} D={dim} {active}/{args.heads}: "
                          f"capture failed: {errors[name, active]}", flush=True)
        for name, active in keys:
            rec = dict(mode=mode, provider=name, batch=batch, seq=seq, heads=args.heads, dim=dim,
                       active=active, dtype=str(dtype).replace("torch.", ""), rounds=args.rounds)
            records.append(rec)
            if (name, active) in errors:
                rec.update(us=None, error=errors[name, active])
                rows.append([mode, name, batch, seq, dim, f"{active}/{args.heads}",
                             f"capture failed ({errors[name, active][:80]})", "-", "-"])
                continue
            rec["us"] = statistics.median(samples[name, active]) * 1e6
            rec["samples_s"] = samples[name, active]  # per round: ratios pair rounds by position
            rec["vs_sdpa"] = median_ratio(samples, (name, active), ("sdpa", args.heads))
            rec["vs_all_heads"] = median_ratio(
                samples, (name, active), (ALL_HEADS_BASELINE.get(name, name), args.heads))
            rows.append([mode, name, batch, seq, dim, f"{active}/{args.heads}",
                         f"{rec['us']:.1f}",
                         "-" if rec["vs_sdpa"] is None else f"{rec['vs_sdpa']:.2f}x",
                         "-" if rec["vs_all_heads"] is None else f"{rec['vs_all_heads']:.2f}x"])

    header = ["mode", "provider", "B", "S", "D", "heads kept", "time (us)", "vs SDPA",
              "vs its kernel, all heads"]
    timing = ("GPU time per call, replayed from a CUDA graph (no host overhead)"
              if args.timing == "graph" else "wall time per call")
    timing += f", median of {args.rounds} interleaved rounds"
    _, q0, k0, v0, _ = make_inputs(batches[0], args.seq[0], args.heads, dims[0], args.heads, dtype,
                                   args.device)
    backend = common.sdpa_backend(lambda: F.scaled_dot_product_attention(
        q0.transpose(1, 2), k0.transpose(1, 2), v0.transpose(1, 2)), q0.is_cuda)
    for rec in records:
        rec["sdpa_backend"] = backend
    what = (f"masked attention, {str(dtype).replace('torch.', '')}, H={args.heads}, {timing}; "
            f"SDPA backend: {backend}")
    dtype_name = str(dtype).replace("torch.", "")
    if args.timing == "graph":  # the forward-only tables keep their name
        stem = ("masked_attention_graph_" + ("" if args.no_backward else "fwd_bwd_")
                + dtype_name)
    else:  # eager: the device's default dtype keeps the plain name
        stem = "masked_attention" + ("" if args.dtype is None else f"_{dtype_name}")
    if args.tag:
        stem = f"{stem}_{args.tag}"
    common.report("masked_attention", args, argv, what, header, rows, records, stem=stem)


if __name__ == "__main__":
    main()
