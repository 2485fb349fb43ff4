"""What masking heads saves in a whole patched model: an evaluation forward and a training
forward+backward (attention dropout on) of a random BERT-shaped classifier, unpatched vs patched
with every head kept vs patched with heads masked by a head mask (set_masks: gate buffers at 0),
as the lottery search's subnetworks are evaluated and retrained.

Rows (each timed in interleaved rounds, median kept):
  stock           the unpatched Hugging Face model (SDPA)
  patched         sparsebert.patch'ed, no head masked
  masked_<k>of<H> patched, k of H heads kept in every layer (evenly spread)
Ratios are against stock and against patched in the same run. Batches are padded GLUE-like
rows (lengths between S/2 and S), all B x S.

    python bench/bench_masked_model.py                       # CPU: minilm, B=16, S=128
    python bench/bench_masked_model.py --device cuda --model bert-base --batch 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert  # noqa: E402


def head_mask(layers: int, heads: int, kept: int) -> torch.Tensor:
    """(L, H) 0/1 with `kept` heads per layer, evenly spread (kept = H/2: every other head)."""
    keep = torch.zeros(heads)
    keep[torch.linspace(0, heads - 1, kept).round().long()] = 1.0
    return keep.expand(layers, heads).clone()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="minilm",
                        help=f"a random model of shape {sorted(common.MODEL_SHAPES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--kept", default="6,3",
                        help="comma list of heads kept per layer in the masked rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--rounds", type=common.positive_int, default=3)
    args = parser.parse_args(argv)
    device = common.use_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    stock = common.random_classifier(args.model).to(device)
    cfg = stock.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kept = [int(k) for k in args.kept.split(",") if k]
    if any(k < 1 or k > heads for k in kept):
        parser.error(f"--kept {args.kept!r}: expected heads kept per layer in [1, {heads}]")
    batch = common.padded_classifier_batch(args.batch, args.seq, cfg.vocab_size, args.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    models = {"stock": stock, "patched": sparsebert.patch(copy.deepcopy(stock))}
    for k in kept:
        masked = sparsebert.patch(copy.deepcopy(stock))
        sparsebert.set_masks(masked, head_mask=head_mask(layers, heads, k).to(device))
        models[f"masked_{k}of{heads}"] = masked

    def forward(model):
        def run():
            model.eval()
            with torch.no_grad():
                model(**inputs)
        return run

    def train(model):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        return run

    modes = {"eval forward": forward, "train fwd+bwd": train}
    calls = {(mode, name): make(model) for mode, make in modes.items()
             for name, model in models.items()}
    samples = common.time_interleaved(calls, args.rounds, args.min_run_time)
    times = {key: statistics.median(values) for key, values in samples.items()}
    rows, records = [], []
    for (mode, name), seconds in times.items():
        vs_stock, vs_patched = seconds / times[(mode, "stock")], seconds / times[(mode, "patched")]
        rows.append([mode, name, f"{seconds * 1e3:.1f}", f"{vs_stock:.2f}x", f"{vs_patched:.2f}x"])
        records.append(dict(mode=mode, model=name, ms=seconds * 1e3, vs_stock=vs_stock,
                            vs_patched=vs_patched))
    what = (f"whole model, random {args.model}-shaped classifier ({layers} layers x {heads} "
            f"heads), fp32, B={args.batch}, S={args.seq} (padded rows), heads masked by set_masks")
    common.report("masked_model", args, argv, what,
                  ["mode", "model", "time (ms)", "vs stock", "vs patched"], rows, records,
                  stem=f"masked_model_{args.model}")


if __name__ == "__main__":
    main()
