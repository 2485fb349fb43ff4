"""Training steps per second: a stock Hugging Face eager loop vs sparsebert's training step.

Every loop runs the paper's recipe (PAPER.md §0) on BertForSequenceClassification with random
weights (no download needed): batch 32, AdamW, linear decay, gradient clipping at 1.0, bf16
autocast on a GPU (fp32 on a CPU). Batches are built on the host (pinned) and copied in, as a
data loader would deliver them. Loops:
  stock          the loop a user writes: torch.optim.AdamW (its default foreach
                 implementation), transformers' get_linear_schedule_with_warmup, eager
  eager          sparsebert's step (fused AdamW, sparsebert.train.step.EagerStep)
  graphs         sparsebert's step captured as a CUDA graph per batch shape (what
                 `sparsebert finetune` does on a GPU)
  graphs_patched the same on the model patched with sparsebert's masked attention
  eager_patched  sparsebert's eager step on the patched model (the CPU path of `finetune`)
  *_half         the patched loops with every other head of every layer masked (a head
                 mask as the lottery search gives, retrained): masked heads cost no product
                 in the eager loop on the CPU (on a GPU eager and graphs compute every head)
  graphs_patched_fixed, graphs_patched_half_fixed
                 the patched graphs loops with fixed gates (CudaGraphStep(fixed_gates=True)):
                 no gate multiplies, the masked_attention op, masked heads' products left out
Widths: fixed sequence lengths, and "mixed" (widths 16, 32, ..., 128 in turn: one graph
per width, as bucketed GLUE batches padded to a multiple of 16 give). Loops are timed in
interleaved rounds so machine noise hits all alike.

    python bench/bench_train_step.py --device cuda                  # both model shapes
    python bench/bench_train_step.py --device cpu --models minilm --lengths 64 --steps 6
    python bench/bench_train_step.py --device cpu --models minilm --lengths 128 --steps 9 \
        --loops stock,eager,eager_patched,eager_patched_half
    python bench/bench_train_step.py --device cuda --models bert-base --stem train_step_masked \
        --loops graphs,graphs_patched,graphs_patched_fixed,graphs_patched_half,graphs_patched_half_fixed
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert.hf as sbhf  # noqa: E402
from sparsebert.train import TrainConfig, autocast, make_optimizer  # noqa: E402
from sparsebert.train.step import CudaGraphStep, EagerStep, StepSettings  # noqa: E402

LOOPS = ("stock", "eager", "graphs", "graphs_patched", "eager_patched", "eager_patched_half",
         "graphs_patched_half", "graphs_patched_fixed", "graphs_patched_half_fixed")
DEFAULT_LOOPS = LOOPS[:4]  # the others with --loops
MIXED_WIDTHS = tuple(range(16, 129, 16))


def make_batches(widths: tuple[int, ...], batch_size: int, count: int, device: str,
                 ) -> list[dict[str, torch.Tensor]]:
    """`count` host batches cycling through `widths`; rows have random lengths in
    [width/2, width] (the first row is full width), pinned when the device is a GPU."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        width = widths[i % len(widths)]
        lengths = torch.randint(width // 2, width + 1, (batch_size,), generator=gen)
        lengths[0] = width
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, S)
        batch = {"input_ids": torch.randint(1000, 30000, (batch_size, width), generator=gen) * mask,
                 "attention_mask": mask, "token_type_ids": torch.zeros_like(mask),
                 "labels": torch.randint(0, 2, (batch_size,), generator=gen)}
        if device.startswith("cuda"):
            batch = {k: v.pin_memory() for k, v in batch.items()}
        out.append(batch)
    return out


class StockLoop:
    """The plain loop with stock parts only."""

    def __init__(self, model, device: torch.device, total_steps: int) -> None:
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 0, total_steps)

    def __call__(self, batch) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast(self.device, "auto"):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()


class SparsebertLoop:
    """sparsebert's training step (eager or CUDA graphs) with its schedule."""

    def __init__(self, model, device: torch.device, total_steps: int, graphs: bool,
                 fixed_gates: bool = False) -> None:
        config = TrainConfig(lr=2e-5).resolved()
        optimizer, self.schedule = make_optimizer(model, config, total_steps, capturable=graphs)
        settings = StepSettings(1.0, lambda: autocast(device, "auto", cache_enabled=not graphs))
        if graphs:
            self.step = CudaGraphStep(model, optimizer, settings, device, fixed_gates=fixed_gates)
        else:
            self.step = EagerStep(model, optimizer, settings, device)

    def __call__(self, batch) -> None:
        self.step(batch)
        self.schedule.step()


def make_loop(name: str, base_model, device: torch.device, total_steps: int):
    model = copy.deepcopy(base_model).to(device)
    if name == "stock":
        return StockLoop(model, device, total_steps)
    if "patched" in name:
        model = sbhf.patch(model)
    if "_half" in name:  # every other head of every layer masked
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        keep = (torch.arange(heads) % 2 == 1).float()
        sbhf.set_masks(model, head_mask=keep.expand(layers, heads).clone())
    return SparsebertLoop(model, device, total_steps, graphs=name.startswith("graphs"),
                          fixed_gates=name.endswith("_fixed"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_round(args) -> int:
    """Steps timed per loop and round: --steps split evenly over --rounds (at least one)."""
    return max(1, args.steps // args.rounds)


def measure(shape: str, widths: tuple[int, ...], args, device: torch.device
            ) -> tuple[dict[str, float], dict[str, str]]:
    """Examples/s of every loop on one (model shape, widths) setting, and {loop: error} of the
    loops that failed to build or warm up (they are reported, not timed)."""
    base = common.random_classifier(shape).train()
    total = args.warmup + args.steps
    batches = make_batches(widths, args.batch_size, max(len(widths), 8), args.device)
    loops, seconds, failed = {}, {}, {}
    for name in args.loops.split(","):
        try:
            loops[name] = make_loop(name, base, device, total)
            for i in range(max(args.warmup, len(widths))):  # every width seen (captured) once
                loops[name](batches[i % len(batches)])
            sync(device)
            seconds[name] = 0.0
        except Exception as error:  # noqa: BLE001 - report the loop as failed, keep going
            print(f"{shape} {widths} {name}: failed: {type(error).__name__}: {error}")
            failed[name] = f"{type(error).__name__}: {error}"
            loops.pop(name, None)
    per_round = steps_per_round(args)
    for round_index in range(args.rounds):
        for name, loop in loops.items():
            sync(device)
            start = time.perf_counter()
            for i in range(per_round):
                loop(batches[(round_index * per_round + i) % len(batches)])
            sync(device)
            seconds[name] += time.perf_counter() - start
    examples = per_round * args.rounds * args.batch_size
    return {name: examples / s for name, s in seconds.items()}, failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--lengths", default="32,64,128,mixed",
                        help="comma-separated sequence lengths, and/or 'mixed'")
    parser.add_argument("--loops", default=",".join(DEFAULT_LOOPS),
                        help=f"comma list of {', '.join(LOOPS)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per loop, split evenly over the rounds (rounded down "
                        "to a multiple of --rounds)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per loop")
    parser.add_argument("--rounds", type=common.positive_int, default=3)
    parser.add_argument("--stem", default="train_step",
                        help="result files' name in bench/results (default train_step)")
    args = parser.parse_args(argv)
    common.use_device(args.device)
    device = torch.device(args.device)
    if device.type != "cuda":
        args.loops = ",".join(n for n in args.loops.split(",") if not n.startswith("graphs"))
        if not args.loops:
            parser.error("--loops: the graphs loops need a CUDA device")
    unknown = set(args.loops.split(",")) - set(LOOPS)
    if unknown:
        parser.error(f"--loops: unknown {sorted(unknown)}; expected a comma list of {LOOPS}")
    names = args.loops.split(",")
    baseline = "stock" if "stock" in names else names[0]  # the ratios' denominator
    for shape in args.models.split(","):  # every entry checked before anything is timed
        if shape not in common.MODEL_SHAPES:
            parser.error(f"--models: unknown model shape {shape!r}; expected "
                         f"{sorted(common.MODEL_SHAPES)}")
    for length in args.lengths.split(","):
        if length != "mixed" and not (length.isdigit() and int(length) > 0):
            parser.error(f"--lengths: {length!r} is neither a positive integer nor 'mixed'")
    rows, records, failures = [], [], 0
    for shape in args.models.split(","):
        for length in args.lengths.split(","):
            widths = MIXED_WIDTHS if length == "mixed" else (int(length),)
            rates, failed = measure(shape, widths, args, device)
            base = rates.get(baseline)
            for name, rate in rates.items():
                ratio = f"{rate / base:.2f}x" if base else "-"
                rows.append([shape, length, name, f"{rate:.0f}",
                             f"{1000 * args.batch_size / rate:.2f}", ratio])
                records.append({"model": shape, "length": length, "loop": name,
                                "examples_per_s": rate,
                                f"vs_{baseline}": rate / base if base else None})
            for name, error in failed.items():  # a row, so that a failure is not a gap
                rows.append([shape, length, name, "failed", "-", error[:100]])
                records.append({"model": shape, "length": length, "loop": name,
                                "failed": error})
            failures += len(failed)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    common.report("train_step", args, argv,
                  f"Training step throughput, batch {args.batch_size}, {precision}, "
                  f"{steps_per_round(args) * args.rounds} timed steps per loop in {args.rounds} interleaved rounds",
                  ["model", "seq len", "loop", "examples/s", "ms/step", f"vs {baseline}"], rows,
                  records, stem=args.stem)
    if failures:
        sys.exit(f"{failures} loop(s) failed (rows marked 'failed')")


if __name__ == "__main__":
    main()
