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
import time
from pathlib import Path

import torch

from sparsebert.glue import batching
from sparsebert.glue.loading import load_split
from sparsebert.glue.tasks import get_task
from sparsebert.models import load_model
from sparsebert.runtime import device_name, git_sha, versions
from sparsebert.train import TrainConfig, autocast, make_optimizer, resolve_device, to_device

MODES = {"bucketed": (True, "dynamic"), "dynamic": (False, "dynamic"),
         "fixed": (False, "max_length")}


def run_mode(mode: str, args: argparse.Namespace, train: batching.Encoded, task,
             device: torch.device) -> dict[str, float]:
    """Time `args.steps` training steps (after `args.warmup` untimed ones) in one mode."""
    bucket, padding = MODES[mode]
    # Step 1: a fresh model and optimizer per mode, so every mode starts from the same state.
    model, _ = load_model(args.model, task.num_labels, labels=task.labels, seed=args.seed)
    model.to(device).train()
    config = TrainConfig(task=task.name, model=args.model).resolved()
    optimizer, scheduler = make_optimizer(model, config, total_steps=10_000)
    batches = batching.train_batches(train.lengths, args.batch_size, args.seed, 0, bucket)
    needed = args.warmup + args.steps
    if len(batches) < needed:
        raise SystemExit(f"{task.name} has {len(batches)} batches, fewer than warmup+steps "
                         f"{needed}")
    # Step 2: warm up, then time the steps (synchronizing the GPU at both ends).
    examples = tokens = padded = 0
    for i, indices in enumerate(batches[:needed]):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = to_device(batching.collate(train, indices, padding), device)
        with autocast(device, "auto"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            examples += len(indices)
            tokens += int(train.lengths[indices].sum())
            padded += int(batch["input_ids"].numel())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    epoch = batching.padding_stats(train, batches, padding)
    return {"examples_per_s": examples / seconds, "seconds": seconds, "steps": args.steps,
            "examples": examples, "real_tokens": tokens, "padded_tokens": padded,
            "padding_efficiency_timed": tokens / padded,
            "padding_efficiency_epoch": epoch["efficiency"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="RTE")
    parser.add_argument("--model", default="default")
    parser.add_argument("--glue-dir", default=None, help="default: $GLUE_DIR, else the hub")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="bucketed,dynamic,fixed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    task = get_task(args.task)
    _, tokenizer = load_model(args.model, task.num_labels, labels=task.labels)
    train = batching.encode(load_split(task, "train", args.glue_dir), tokenizer, args.max_length)

    rows = {mode: run_mode(mode, args, train, task, device) for mode in args.modes.split(",")}
    base = rows.get("fixed", {}).get("examples_per_s")
    print(f"\n{task.name} training throughput, {device_name(device)}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.steps} timed steps")
    print(f"{'mode':<10}{'examples/s':>12}{'vs fixed':>10}{'pad eff.':>10}")
    for mode, row in rows.items():
        ratio = f"{row['examples_per_s'] / base:.2f}x" if base else "-"
        print(f"{mode:<10}{row['examples_per_s']:>12.1f}{ratio:>10}"
              f"{row['padding_efficiency_epoch']:>10.2f}")
    record = {"benchmark": "train_throughput", "task": task.name, "device": str(device),
              "device_name": device_name(device), "threads": torch.get_num_threads(),
              "versions": versions(), "git_sha": git_sha(), "args": vars(args),
              "results": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"train_throughput_{task.name}_{device.type}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
