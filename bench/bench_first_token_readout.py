"""What the first-token readout saves: the last layer of a patched sequence classifier at [CLS]
only (sparsebert.hf.first_token_readout) against the full last layer (SPARSEBERT_FULL_LAST_LAYER=1),
in the three places sparsebert's loops use it:

  eval        predict(): forward without gradients, eval mode (`evaluate`, the search's dev
              scores)
  importance  sparsebert.importance(mode="paper", precision="fp32"): forward + backward to the
              gates, eval mode (the search's head/MLP scores)
  train       sparsebert's eager training step (forward, backward, clipping, fused AdamW), dropout
              on (what `finetune` runs on a patched model: the s-pruning subnetworks' retraining);
              the last layer's attention still computes every row there (its dropout), its FFN one

The model is the default model (pre-trained MiniLM-L6, 6 layers) patched, or a random model of a
bench/common.py shape (--model minilm | bert-base). Batches of B padded rows of lengths in
[S/2, S]. Each row: median time per call of each setting over interleaved rounds, and the
median of the per-round ratios (readout / full).

    python bench/bench_first_token_readout.py --threads 2 --lengths 32,64,128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert  # noqa: E402
from sparsebert.glue import batching  # noqa: E402
from sparsebert.hf.readout import FULL_LAST_LAYER_ENV, first_token_readout  # noqa: E402
from sparsebert.train import TrainConfig, make_optimizer  # noqa: E402
from sparsebert.train.evaluate import predict  # noqa: E402
from sparsebert.train.step import EagerStep, StepSettings  # noqa: E402

WORKLOADS = ("eval", "importance", "train")


def encoded_batch(batch: dict[str, torch.Tensor]) -> batching.Encoded:
    """The batch's rows as a tokenized split (what predict() reads)."""
    lengths = batch["attention_mask"].sum(1)
    rows = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], lengths)]
    return batching.Encoded(input_ids=rows, token_type_ids=None,
                            labels=batch["labels"].numpy(), lengths=lengths.numpy().astype(np.int64),
                            pad_token_id=0, max_length=int(lengths.max()))


def workload(name: str, model, batch: dict[str, torch.Tensor]):
    """A call that runs one batch of `name`; the readout is on unless the switch says full."""
    if name == "eval":
        encoded = encoded_batch(batch)
        return lambda: predict(model, encoded, regression=False, batch_size=len(encoded),
                               precision="fp32")
    if name == "importance":
        return lambda: sparsebert.importance(model, [batch], mode="paper", precision="fp32",
                                             progress=False)
    optimizer, _ = make_optimizer(model, TrainConfig(lr=1e-7).resolved(), total_steps=10 ** 6)
    step = EagerStep(model, optimizer, StepSettings(grad_clip=1.0), torch.device("cpu"))

    def train():
        model.train()
        with first_token_readout(model):
            step(batch)
    return train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help=f"default, or a random model of shape {sorted(common.MODEL_SHAPES)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", default="32,64,128", help="comma list of S")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=common.positive_int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.device = "cpu"
    torch.set_num_threads(args.threads)
    workloads = args.workloads.split(",")
    if not set(workloads) <= set(WORKLOADS):
        parser.error(f"--workloads {args.workloads!r}: expected a comma list of {WORKLOADS}")
    lengths = [int(s) for s in args.lengths.split(",")]
    model = sparsebert.patch(common.load_classifier(args.model))
    if os.environ.get(FULL_LAST_LAYER_ENV):
        parser.error(f"unset {FULL_LAST_LAYER_ENV}: this script sets it per call")
    rows, records = [], []
    for seq in lengths:
        batch = common.padded_classifier_batch(args.batch, seq, model.config.vocab_size, "cpu")
        for name in workloads:
            call = workload(name, model, batch)
            samples = {"full": [], "readout": []}
            for _ in range(args.rounds):
                for setting in ("full", "readout"):
                    if setting == "full":
                        os.environ[FULL_LAST_LAYER_ENV] = "1"
                    try:
                        samples[setting].append(common.time_call(call, args.min_run_time))
                    finally:
                        os.environ.pop(FULL_LAST_LAYER_ENV, None)
            full, short = (statistics.median(samples[k]) for k in ("full", "readout"))
            ratio = statistics.median(common.round_ratios(samples, "readout", "full"))
            records.append(dict(workload=name, batch=args.batch, seq=seq, full_ms=full * 1e3,
                                readout_ms=short * 1e3, ratio=ratio, rounds=args.rounds,
                                samples_s=samples))  # per round: ratio = median of pairs
            rows.append([name, args.batch, seq, f"{full * 1e3:.1f}", f"{short * 1e3:.1f}",
                         f"{ratio:.3f}x"])
            print(rows[-1], flush=True)
    cfg = model.config
    model_name = ("default model (MiniLM-L6, pre-trained)" if args.model == "default"
                  else f"random {args.model}-shaped model")
    what = (f"first-token readout vs the full last layer, {model_name} patched, "
            f"{cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, fp32, "
            f"B={args.batch} padded rows of lengths in [S/2, S], {args.threads} thread(s), "
            f"{args.rounds} interleaved rounds")
    header = ["workload", "B", "S", "full last layer (ms)", "readout (ms)",
              "readout / full (median of rounds)"]
    stem = "first_token_readout" if args.model == "default" else f"first_token_readout_{args.model}"
    common.report("first_token_readout", args, argv, what, header, rows, records, stem=stem)


if __name__ == "__main__":
    main()
