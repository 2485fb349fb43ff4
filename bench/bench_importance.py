"""Cost of an importance pass vs a plain forward+backward, on the default model (or a random
model of BERT-base's shape with --model bert-base).

Providers (one batch of GLUE-like inputs, B x S, all tokens real):
  fwd_bwd_weights   unpatched HF model: forward + loss.backward() with weight gradients (the
                    cost of a training step's backward; what the authors' scoring code pays)
  hook_gates        unpatched HF model, head/MLP gates inserted by forward hooks, then
                    torch.autograd.grad to the gate leaves only (the stock-PyTorch way with
                    head_mask gone; autograd skips the weight gradients it is not asked for)
  sb_paper          sparsebert.importance(mode="paper"): batch-level gates, weights frozen
  sb_per_example    sparsebert.importance(mode="per_example"): per-example scores
  sb_fisher         sparsebert.importance(mode="fisher")
  sb_paper_graph    sparsebert.importance(mode="paper", cuda_graph=True) (CUDA): each batch
                    replayed from a CUDA graph; every call captures anew (two eager warm-up
                    passes and a capture), which its time per batch includes, spread over
                    --graph-batches batches per call (default 32)
Every other call runs --batches batches of the same shape (default 8 on CUDA, 1 on the CPU);
times are per batch. The eager rows also count the tensor ops (views and bare allocations left
out; on a GPU about one kernel launch each) and host reads (item(), bool(): on a GPU a wait for
the device) that one more batch adds, as the dispatcher sees them (a custom op counts once).
--model bert-base-host (BERT-base's 12 layers x 12 heads at tiny widths) makes a CPU run
measure the host's share.
Each provider runs at every --precision: fp32 (plain), and bf16 (the baselines under
torch.autocast(bfloat16), the sparsebert rows with importance(precision="bf16"), which is what
importance's default precision "auto" picks on CUDA); each row's ratio is against
fwd_bwd_weights at the same precision, so a precision gain is never counted as a kernel gain.

Script:  python bench/bench_importance.py [--device cpu|cuda] [--batch 16] [--seq 128]
         [--precision fp32,bf16]   (default: fp32,bf16 on CUDA, fp32 on the CPU)
         [--batches N] [--graph-batches N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert  # noqa: E402


def load_model(name, device, dtype):
    """The default model (pre-trained), or a random model of a common.MODEL_SHAPES shape."""
    return common.load_classifier(name).to(device, dtype).eval()


def make_batch(model, batch, seq, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch,), generator=gen).to(device),
    }


@contextlib.contextmanager
def hook_gates(model):
    """Head and MLP gates as leaves inserted with forward hooks into an unpatched BERT."""
    cfg = model.config
    heads = [
        torch.ones(cfg.num_attention_heads, device=model.device, requires_grad=True)
        for _ in range(cfg.num_hidden_layers)
    ]
    mlps = [
        torch.ones((), device=model.device, requires_grad=True)
        for _ in range(cfg.num_hidden_layers)
    ]
    handles = []
    for layer, block in enumerate(model.bert.encoder.layer):

        def on_ctx(module, args, out, layer=layer):
            ctx = out[0]
            b, s, _ = ctx.shape
            return (
                (ctx.view(b, s, cfg.num_attention_heads, -1) * heads[layer][:, None]).view(
                    b, s, -1
                ),
                *out[1:],
            )

        handles.append(block.attention.self.register_forward_hook(on_ctx))
        handles.append(
            block.output.dense.register_forward_hook(lambda m, a, o, layer=layer: o * mlps[layer])
        )
    try:
        yield heads + mlps
    finally:
        for h in handles:
            h.remove()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 16 on CPU")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=common.positive_int, default=None,
                        help="batches per call, times per batch (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--graph-batches", type=common.positive_int, default=32,
                        help="batches per call of sb_paper_graph (its capture cost is spread "
                             "over them)")
    parser.add_argument("--model", default="default",
                        help="default (the pre-trained default model) or a random model of "
                             f"shape {sorted(common.MODEL_SHAPES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument(
        "--rounds", type=common.positive_int, default=3, help="interleaved rounds over the providers (median kept)"
    )
    parser.add_argument("--precision", default=None,
                        help="comma list of fp32, bf16 (default: fp32,bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top kernels of fwd_bwd_weights, "
                             "hook_gates and sb_paper")
    args = parser.parse_args(argv)
    common.use_device(args.device)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    precisions = (args.precision or ("fp32,bf16" if cuda else "fp32")).split(",")
    if not precisions or not set(precisions) <= {"fp32", "bf16"}:
        parser.error(f"--precision {args.precision!r}: expected a comma list of fp32, bf16")
    dtype = torch.float32
    batch_size = args.batch or (32 if cuda else 16)
    n_batches = args.batches or (8 if cuda else 1)
    plain = load_model(args.model, args.device, dtype)
    batch = make_batch(plain, batch_size, args.seq, args.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    patched = sparsebert.patch(copy.deepcopy(plain))

    device_type = torch.device(args.device).type

    def autocast(precision):
        return (torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def fwd_bwd_weights(precision, batches=n_batches):
        def run():
            for _ in range(batches):
                plain.zero_grad(set_to_none=True)
                with autocast(precision):
                    loss = F.cross_entropy(plain(**inputs).logits.float(), batch["labels"])
                loss.backward()
        return run

    def hooked(precision, batches=n_batches):
        def run():
            for _ in range(batches):
                with hook_gates(plain) as leaves:
                    with autocast(precision):
                        loss = F.cross_entropy(plain(**inputs).logits.float(), batch["labels"])
                    torch.autograd.grad(loss, leaves)
        return run

    def batches_per_call(name):
        """sb_paper_graph spreads its capture over --graph-batches; the others run --batches."""
        return args.graph_batches if name == "sb_paper_graph" else n_batches

    def sb(mode, precision, cuda_graph=False, batches=None):
        calls = batches or batches_per_call("sb_paper_graph" if cuda_graph else "sb_paper")
        return lambda: sparsebert.importance(patched, [batch] * calls, mode=mode,
                                             progress=False, precision=precision,
                                             cuda_graph=cuda_graph)

    def eager_providers(precision, batches=None):
        """The eager providers at one precision; batches: per call (default: --batches)."""
        runs = batches or n_batches
        return {
            ("fwd_bwd_weights", precision): fwd_bwd_weights(precision, runs),
            ("hook_gates", precision): hooked(precision, runs),
            ("sb_paper", precision): sb("paper", precision, batches=batches),
            ("sb_per_example", precision): sb("per_example", precision, batches=batches),
            ("sb_fisher", precision): sb("fisher", precision, batches=batches),
        }

    providers = {}  # (name, precision) -> call
    for precision in precisions:
        providers.update(eager_providers(precision))
        if cuda:
            providers[("sb_paper_graph", precision)] = sb("paper", precision, cuda_graph=True)
    # Interleaved rounds so that load on a shared machine hits every provider alike.
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in providers}
    failed: dict[tuple[str, str], str] = {}  # a graph capture that failed: its error
    for _ in range(args.rounds):
        for key, fn in providers.items():
            if key in failed:
                continue
            try:
                samples[key].append(common.time_call(fn, args.min_run_time)
                                    / batches_per_call(key[0]))
            except RuntimeError as error:
                if key[0] != "sb_paper_graph":
                    raise
                failed[key] = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
                print(f"{key[0]} ({key[1]}) failed: {failed[key]}", flush=True)
                torch.cuda.synchronize()
    times = {key: statistics.median(values) for key, values in samples.items() if values}
    # Tensor ops and host reads one more batch adds (two batches per call minus one), eager
    # providers only: on a GPU about one kernel launch per op, and one device wait per read.
    per_batch_ops = {}
    for precision in precisions:
        one, two = eager_providers(precision, 1), eager_providers(precision, 2)
        for key in one:
            (ops1, reads1), (ops2, reads2) = common.count_ops(one[key]), common.count_ops(two[key])
            per_batch_ops[key] = (ops2 - ops1, reads2 - reads1)
    rows, records = [], []
    for (name, precision), seconds in times.items():
        base, paper = times[("fwd_bwd_weights", precision)], times[("sb_paper", precision)]
        rec = dict(
            provider=name,
            precision=precision,
            batch=batch_size,
            seq=args.seq,
            batches_per_call=batches_per_call(name),
            ms=seconds * 1e3,
            vs_fwd_bwd_weights=seconds / base,
            vs_sb_paper=seconds / paper,
        )
        ops, reads = per_batch_ops.get((name, precision), (None, None))
        rec.update(tensor_ops_per_batch=ops, host_reads_per_batch=reads)
        records.append(rec)
        rows.append(
            [
                name,
                precision,
                f"{rec['ms']:.1f}",
                f"{rec['vs_fwd_bwd_weights']:.2f}x",
                f"{rec['vs_sb_paper']:.3f}x",
                "-" if ops is None else ops,
                "-" if reads is None else reads,
            ]
        )
    for (name, precision), error in failed.items():
        records.append(dict(provider=name, precision=precision, batch=batch_size, seq=args.seq,
                            error=error))
        rows.append([name, precision, f"failed ({error[:80]})", "-", "-", "-", "-"])
    header = ["provider", "precision", "time per batch (ms)",
              "vs fwd+bwd with weight grads (same precision)", "vs sb_paper (same precision)",
              "tensor ops per batch", "host reads per batch"]
    cfg = plain.config
    model_name = ("default model (MiniLM-L6)" if args.model == "default"
                  else f"random {args.model}-shaped model")
    what = (f"importance pass, {model_name}, {cfg.num_attention_heads} heads x "
            f"{cfg.num_hidden_layers} layers, fp32 weights, {' and '.join(precisions)} "
            f"compute, B={batch_size}, S={args.seq}, {n_batches} batch(es) per call"
            + (f" ({args.graph_batches} for sb_paper_graph)" if cuda else ""))
    stem = "importance" if args.model == "default" else f"importance_{args.model}"
    kernel = os.environ.get("SPARSEBERT_ATTENTION_KERNEL") or "default"
    if kernel != "default":  # e.g. mma: its own table, next to the default kernels'
        what, stem = f"{what}, SPARSEBERT_ATTENTION_KERNEL={kernel}", f"{stem}_{kernel}"
    common.report("importance", args, argv, what, header, rows, records, stem=stem)
    if args.profile:
        last = precisions[-1]
        profile({f"{name} ({p})": fn for (name, p), fn in providers.items()},
                [f"{name} ({last})" for name in ("fwd_bwd_weights", "hook_gates", "sb_paper")],
                cuda)


def profile(providers, names, cuda: bool, calls: int = 3) -> None:
    """Print where the time of each named provider goes (torch.profiler, `calls` calls). On
    CUDA two tables: by GPU time, and by the host's own time per op (self CPU), which is where
    a pass bound by the host (small kernels, bf16) spends its time."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    orders = ["cuda_time_total", "self_cpu_time_total"] if cuda else ["cpu_time_total"]
    for name in names:
        providers[name]()  # warm
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                providers[name]()
            if cuda:
                torch.cuda.synchronize()
        for sort_by in orders:
            print(f"\n### profile: {name} ({calls} calls), by {sort_by}\n")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=18,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
