"""Training throughput (examples/s) with length-bucketed dynamic padding vs fixed padding.

Runs the real training step of sparsebert.train (AdamW, linear schedule, grad clip, bf16 on
GPU) for the default model on a GLUE task's train split, in three modes:
  bucketed  length-bucketed batches, each padded to its longest row (sparsebert's default)
  dynamic   plain shuffled batches, each padded to its longest row
  fixed     plain shuffled batches, all padded to max_length (the paper's run_glue setup)
Prints a table and writes JSON (device, versions, git SHA, args) to bench/results/.

    GLUE_DIR=../shared/data/glue python bench/bench_train_throughput.py --task RTE --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sparsebert.errors import SparsebertError  # noqa: E402
from sparsebert.glue import batching  # noqa: E402
from sparsebert.glue.loading import load_split  # noqa: E402
from sparsebert.glue.tasks import get_task  # noqa: E402
from sparsebert.hf.loading import load_model  # noqa: E402
from sparsebert.runtime import device_name, git_sha, versions  # noqa: E402
from sparsebert.train import TrainConfig, autocast, make_optimizer, resolve_device  # noqa: E402
from sparsebert.train.evaluate import data_source  # noqa: E402
from sparsebert.train.step import EagerStep, StepSettings  # noqa: E402

MODES = {"bucketed": (True, "dynamic"), "dynamic": (False, "dynamic"),
         "fixed": (False, "max_length")}


class ModeRunner:
    """One mode's model, optimizer and batch stream; `run(n)` trains n steps and times them."""

    def __init__(self, mode: str, args: argparse.Namespace, train: batching.Encoded, task,
                 device: torch.device) -> None:
        bucket, self.padding = MODES[mode]
        # A fresh model and optimizer per mode, so every mode starts from the same state.
        self.model, _ = load_model(args.model, task.num_labels, labels=task.labels,
                                   seed=args.seed)
        self.model.to(device).train()
        config = TrainConfig(task=task.name, model=args.model).resolved()
        optimizer, self.scheduler = make_optimizer(self.model, config, total_steps=10_000)
        settings = StepSettings(config.grad_clip, lambda: autocast(device, "auto"))
        self.step = EagerStep(self.model, optimizer, settings, device)
        self.batches = batching.train_batches(train.lengths, args.batch_size, args.seed, 0,
                                              bucket)
        self.train, self.device, self.next = train, device, 0
        self.stats = {"seconds": 0.0, "steps": 0, "examples": 0, "real_tokens": 0,
                      "padded_tokens": 0}

    def run(self, steps: int, timed: bool = True) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            indices = self.batches[self.next % len(self.batches)]
            self.next += 1
            batch = batching.collate(self.train, indices, self.padding)
            batch.pop("index")
            self.step(batch)  # forward, backward, clip, AdamW
            self.scheduler.step()
            if timed:
                self.stats["steps"] += 1
                self.stats["examples"] += len(indices)
                self.stats["real_tokens"] += int(self.train.lengths[indices].sum())
                self.stats["padded_tokens"] += int(batch["input_ids"].numel())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.stats["seconds"] += time.perf_counter() - start

    def result(self) -> dict[str, float]:
        s = self.stats
        epoch = batching.padding_stats(self.train, self.batches, self.padding)
        return {**s, "examples_per_s": s["examples"] / s["seconds"],
                "padding_efficiency_timed": s["real_tokens"] / s["padded_tokens"],
                "padding_efficiency_epoch": epoch["efficiency"]}


def steps_per_round(args) -> int:
    """Steps timed per mode and round: --steps split evenly over --rounds (at least one)."""
    return max(1, args.steps // args.rounds)


def measure(args: argparse.Namespace, train: batching.Encoded, task, device: torch.device,
            ) -> dict[str, dict[str, float]]:
    """Step 1: warm every mode up; Step 2: time them in interleaved rounds, so load from
    other processes on the machine hits every mode alike."""
    runners = {mode: ModeRunner(mode, args, train, task, device)
               for mode in args.modes.split(",")}
    for runner in runners.values():
        runner.run(args.warmup, timed=False)
    per_round = steps_per_round(args)
    for _ in range(args.rounds):
        for runner in runners.values():
            runner.run(per_round)
    return {mode: runner.result() for mode, runner in runners.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="RTE")
    parser.add_argument("--model", default="default")
    parser.add_argument("--glue-dir", default=None, help="default: $GLUE_DIR, else the hub")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    parser.add_argument("--rounds", type=common.positive_int, default=5,
                        help="interleaved rounds (steps are split across them)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="bucketed,dynamic,fixed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        parser.error(f"--modes {args.modes!r}: unknown {unknown}; expected a comma list of "
                     f"{', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        task = get_task(args.task)
    except SparsebertError as error:  # a bad --device or --task: one line
        parser.error(str(error))
    _, tokenizer = load_model(args.model, task.num_labels, labels=task.labels)
    train = batching.encode(load_split(task, "train", args.glue_dir), tokenizer, args.max_length)

    rows = measure(args, train, task, device)
    base = rows.get("fixed", {}).get("examples_per_s")
    print(f"\n{task.name} training throughput, {device_name(device)}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, max_length "
          f"{args.max_length}, {steps_per_round(args) * args.rounds} timed steps "
          f"per mode in {args.rounds} rounds")
    print(f"{'mode':<10}{'examples/s':>12}{'vs fixed':>10}{'pad eff.':>10}")
    for mode, row in rows.items():
        ratio = f"{row['examples_per_s'] / base:.2f}x" if base else "-"
        print(f"{mode:<10}{row['examples_per_s']:>12.1f}{ratio:>10}"
              f"{row['padding_efficiency_epoch']:>10.2f}")
    record = {"benchmark": "train_throughput", "task": task.name, "device": str(device),
              "device_name": device_name(device), "threads": torch.get_num_threads(),
              "versions": versions(), "git_sha": git_sha(), "args": vars(args),
              "data": data_source(args.glue_dir),  # the folder read ($GLUE_DIR too)
              "results": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"train_throughput_{task.name}_{device.type}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
