"""What two host-side choices of the importance pass save, each against the pass without it, side
by side in one process (--compare):

  setup        the scoring setup kept between batches: the gate leaves in place of every block's
               gates and the first-token readout, set up once per set of leaves
               (BatchScorer.held(), what sparsebert.importance does) against set up and undone
               around every batch (held() replaced by a block that holds nothing, so each batch
               enters the setup itself). fp32.
  bf16-weights under bf16 autocast, the frozen linears' weights cast to bf16 once per pass
               (sparsebert.precision.bf16_linears, what sparsebert.importance does)
               against autocast casting them on every use (its weight cache skips frozen
               weights): two casts fewer per linear per batch, bitwise the same scores.

Host-side savings (attribute writes, context managers, small tensor ops), so the default model is
BERT-base's 12 layers x 12 heads at tiny widths (bench/common.py's bert-base-host), where the
time per batch is almost all host work: the part a GPU does not make faster. Each row: median
time per batch over interleaved rounds of one pass over --batches batches, and the median of
the per-round ratios (with / without) with their range.

    python bench/bench_importance_setup.py --threads 1 --rounds 15
    python bench/bench_importance_setup.py --compare bf16-weights --threads 1 --rounds 15
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

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


def casts_per_batch(model, precision, device):
    """weights_cast_once copying nothing: autocast casts the weights on every use."""
    return contextlib.nullcontext(0)


class Comparison(NamedTuple):
    """One --compare choice: `attribute` of `owner` swapped for `without` (the pass without the
    saving), timed at `precision`; the rows' names; the results file; the table's title part."""

    owner: object
    attribute: str
    without: object
    precision: str
    with_name: str
    without_name: str
    results: str
    title: str


COMPARISONS = {
    "setup": Comparison(importance_module.BatchScorer, "held", setup_per_batch, "fp32",
                        "held", "per batch", "importance_setup",
                        "scoring setup held between batches vs set up per batch"),
    "bf16-weights": Comparison(importance_module.numerics, "weights_cast_once", casts_per_batch,
                               "bf16", "cast once per pass", "cast per batch",
                               "importance_bf16_weights", "linear weights cast to bf16 once per "
                               "pass vs by autocast per batch"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="bert-base-host",
                        help=f"a random model of shape {sorted(common.MODEL_SHAPES)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batches", type=common.positive_int, default=20, help="batches per timed pass")
    parser.add_argument("--mode", default="paper", choices=importance_module.MODES)
    parser.add_argument("--compare", default="setup", choices=sorted(COMPARISONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=common.positive_int, default=15)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    device = common.use_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = sparsebert.patch(common.random_classifier(args.model)).to(device)
    batch = common.padded_classifier_batch(args.batch, args.seq, model.config.vocab_size,
                                           args.device)
    batches = [batch] * args.batches
    comparison = COMPARISONS[args.compare]
    owner, attribute, precision = comparison.owner, comparison.attribute, comparison.precision
    with_name, without_name = comparison.with_name, comparison.without_name
    saving = getattr(owner, attribute)

    def scoring_pass(variant):
        def run():
            setattr(owner, attribute, variant)
            try:
                sparsebert.importance(model, batches, mode=args.mode, progress=False,
                                      precision=precision)
            finally:
                setattr(owner, attribute, saving)
        return run

    calls = {with_name: scoring_pass(saving), without_name: scoring_pass(comparison.without)}
    samples = common.time_interleaved(calls, args.rounds, args.min_run_time)
    ratios = common.round_ratios(samples, with_name, without_name)
    rows, records = [], []
    for name, values in samples.items():
        ms = statistics.median(values) / args.batches * 1e3
        rec = dict(setup=name, precision=precision, ms_per_batch=ms, rounds=args.rounds,
                   batches=args.batches, samples_s=values)  # per round (a whole pass)
        if name == with_name:
            rec.update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios))
        records.append(rec)
        rows.append([name, f"{ms:.2f}",
                     f"{rec['ratio']:.3f}x" if "ratio" in rec else "1.000x",
                     f"{rec['ratio_min']:.3f}x-{rec['ratio_max']:.3f}x" if "ratio" in rec
                     else "-"])
    cfg = model.config
    what = (f"importance pass ({args.mode}, {precision}), {comparison.title}, random {args.model}-shaped "
            f"model ({cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads), "
            f"B={args.batch}, S={args.seq}, {args.batches} batches per pass, {args.rounds} "
            "interleaved rounds")
    common.report("importance_setup", args, argv, what,
                  ["variant", "time per batch (ms)", f"vs {without_name} (median of rounds)",
                   "range over rounds"], rows, records, stem=comparison.results)


if __name__ == "__main__":
    main()
