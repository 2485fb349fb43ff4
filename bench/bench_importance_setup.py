"""What keeping the importance pass's scoring setup between batches saves: the gate leaves in
place of every block's gates and the first-token readout, set up once per set of leaves
(BatchScorer.held(), what sparsebert.importance does) against set up and undone around every
batch (held() replaced by a block that holds nothing, so each batch enters the setup itself).

A host-side saving (attribute writes and context managers per block), so the default model is
BERT-base's 12 layers x 12 heads at tiny widths (bench/common.py's bert-base-host), where the
time per batch is almost all host work: the part a GPU does not make faster. Each row: median
time per batch over interleaved rounds of one pass over --batches batches, and the median of
the per-round ratios (held / per batch) with their range.

    python bench/bench_importance_setup.py --threads 1 --rounds 15
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert  # noqa: E402

# the module (sparsebert.pruning's `importance` attribute is the function)
importance_module = importlib.import_module("sparsebert.pruning.importance")


@contextlib.contextmanager
def setup_per_batch(scorer):
    """BatchScorer.held() holding nothing: each batch sets up and undoes the scoring setup."""
    yield scorer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="bert-base-host",
                        help=f"a random model of shape {sorted(common.MODEL_SHAPES)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed pass")
    parser.add_argument("--mode", default="paper", choices=importance_module.MODES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches < 1:
        parser.error(f"--rounds {args.rounds} / --batches {args.batches}: expected at least 1")
    device = common.use_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = sparsebert.patch(common.random_classifier(args.model)).to(device)
    batch = common.padded_classifier_batch(args.batch, args.seq, model.config.vocab_size,
                                           args.device)
    batches = [batch] * args.batches
    held = importance_module.BatchScorer.held

    def scoring_pass(holder):
        def run():
            importance_module.BatchScorer.held = holder
            try:
                sparsebert.importance(model, batches, mode=args.mode, progress=False)
            finally:
                importance_module.BatchScorer.held = held
        return run

    calls = {"held": scoring_pass(held), "per batch": scoring_pass(setup_per_batch)}
    samples = common.time_interleaved(calls, args.rounds, args.min_run_time)
    ratios = common.round_ratios(samples, "held", "per batch")
    rows, records = [], []
    for name, values in samples.items():
        ms = statistics.median(values) / args.batches * 1e3
        rec = dict(setup=name, ms_per_batch=ms, rounds=args.rounds, batches=args.batches)
        if name == "held":
            rec.update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios))
        records.append(rec)
        rows.append([name, f"{ms:.2f}",
                     f"{rec['ratio']:.3f}x" if "ratio" in rec else "1.000x",
                     f"{rec['ratio_min']:.3f}x-{rec['ratio_max']:.3f}x" if "ratio" in rec
                     else "-"])
    cfg = model.config
    what = (f"importance pass ({args.mode}, fp32), scoring setup held between batches vs set up "
            f"per batch, random {args.model}-shaped model ({cfg.num_hidden_layers} layers x "
            f"{cfg.num_attention_heads} heads), B={args.batch}, S={args.seq}, {args.batches} "
            f"batches per pass, {args.rounds} interleaved rounds")
    common.report("importance_setup", args, argv, what,
                  ["setup", "time per batch (ms)", "vs per batch (median of rounds)",
                   "range over rounds"], rows, records)


if __name__ == "__main__":
    main()
