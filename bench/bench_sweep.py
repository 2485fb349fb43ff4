"""Sweep throughput on this machine: the same grid of tiny-model units run one after another
and as a sweep with 2 local workers (1 thread each). Target: 2 workers <= 0.6x the sequential
wall time.

Two pairs of modes per round:
  commands     `sparsebert search --seeds` against `sparsebert sweep --workers 2`, each a fresh
               process timed end to end: what a user chooses between (both pay their start-up,
               the sweep's workers theirs in parallel); the target is judged on this pair;
  in-process   search_seeds() in this process, whose torch and transformers are already
               imported, against sweep() with 1 and 2 workers (spawned, so they import again):
               the sequential side's start-up is free here, a lower bound on its time.

The units are real: a random BERT (--hidden, --layers; the default model's tokenizer) on a
synthetic SST-2-style task written to a temporary folder, every stage of the study (full
fine-tune, both searches, good/random/bad pruned and retrained, super-survivors, reports).

    python bench/bench_sweep.py --train-examples 1024 --dev-examples 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORDS = "the a film movie plot actor scene story music ending script cast".split()


def make_inputs(root: Path, args: argparse.Namespace) -> tuple[str, str]:
    """A saved random BERT with the default tokenizer, and a GLUE folder with SST-2."""
    from transformers import BertConfig, BertModel

    from sparsebert.hf.loading import load_tokenizer

    tokenizer = load_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=4,
                        intermediate_size=2 * args.hidden, max_position_embeddings=128)
    torch.manual_seed(0)
    model_dir = root / "model"
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    (root / "glue" / "SST-2").mkdir(parents=True)
    for split, n in (("train", args.train_examples), ("dev", args.dev_examples)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            words = list(rng.choice(WORDS, int(rng.integers(3, 20))))
            words.insert(int(rng.integers(0, len(words))), "good" if i % 2 else "bad")
            rows.append(f"{' '.join(words)} .\t{i % 2}")
        (root / "glue" / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(model_dir), str(root / "glue")


def configs(model: str, glue: str, args: argparse.Namespace):
    from sparsebert.lottery.config import SearchConfig
    from sparsebert.train import TrainConfig

    search = SearchConfig(importance_batch_size=16)
    train = TrainConfig(model=model, glue_dir=glue, epochs=args.epochs, batch_size=16,
                        lr=2e-3, threads=1, device="cpu", log_every=10)
    return search, train


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_sequential(out: Path, model: str, glue: str, args) -> float:
    from sparsebert.lottery.super_survivors import search_seeds

    search, train = configs(model, glue, args)
    started = time.perf_counter()
    search_seeds("SST-2", out, [int(s) for s in args.seeds.split(",")],
                 search_config=search, train_config=train, progress=False)
    return time.perf_counter() - started


def unit_times(out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds summed over the units' completion markers of a sweep directory."""
    markers = [json.loads(m.read_text()) for m in (out / ".sweep" / "done").glob("*.json")]
    return (sum(m["seconds"] for m in markers),
            sum(m.get("cpu_seconds", float("nan")) for m in markers))


def run_sweep(out: Path, model: str, glue: str, args, workers: int) -> tuple[float, int]:
    from sparsebert.sweep import SweepConfig, sweep

    search, train = configs(model, glue, args)
    train.device = "auto"  # the sweep places units on its --devices
    started = time.perf_counter()
    outcome = sweep(out, SweepConfig(tasks="SST-2", seeds=args.seeds, workers=workers,
                                     devices="cpu"), search, train, progress=False)
    assert not outcome.failed, outcome.failed
    return time.perf_counter() - started, len(outcome.done)


# (mode, label, workers, the mode it is compared with in its round)
MODES = [("search-cmd", "command: sparsebert search --seeds", 1, "search-cmd"),
         ("sweep-2-cmd", "command: sparsebert sweep --workers 2", 2, "search-cmd"),
         ("sequential", "in-process: search_seeds()", 1, "sequential"),
         ("sweep-1", "in-process: sweep(), 1 worker", 1, "sequential"),
         ("sweep-2", "in-process: sweep(), 2 workers", 2, "sequential")]
WORKERS = {mode: workers for mode, _, workers, _ in MODES}


def command_flags(model: str, glue: str, args) -> list[str]:
    """The flags of configs() for the search and sweep commands."""
    return ["--model", model, "--glue-dir", glue, "--epochs", str(args.epochs),
            "--batch-size", "16", "--lr", "2e-3", "--threads", "1", "--log-every", "10",
            "--importance-batch-size", "16", "--seeds", args.seeds, "--quiet"]


def run_command(out: Path, model: str, glue: str, args, workers: int) -> float:
    """Wall seconds of `python -m sparsebert search` (workers 1) or `sweep --workers N`."""
    if workers == 1:
        head = ["search", "--task", "SST-2", "--device", "cpu"]
    else:
        head = ["sweep", "--tasks", "SST-2", "--workers", str(workers), "--devices", "cpu"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sparsebert", *head, "--out", str(out),
                    *command_flags(model, glue, args)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_round(root: Path, model: str, glue: str, args, order: list[str]) -> dict[str, dict]:
    """Every mode once, in `order`: {mode: {wall_s, cpu_s[, unit_wall_s, unit_cpu_s, units]}}."""
    out = {}
    for mode in order:
        before = cpu_seconds()
        if mode == "sequential":
            wall = run_sequential(root / mode, model, glue, args)
            out[mode] = {"wall_s": wall}
        elif mode.endswith("-cmd"):
            wall = run_command(root / mode, model, glue, args, WORKERS[mode])
            out[mode] = {"wall_s": wall}
            if WORKERS[mode] > 1:
                out[mode]["unit_wall_s"], out[mode]["unit_cpu_s"] = unit_times(root / mode)
        else:
            wall, units = run_sweep(root / mode, model, glue, args, workers=WORKERS[mode])
            unit_wall, unit_cpu = unit_times(root / mode)
            out[mode] = {"wall_s": wall, "units": units, "unit_wall_s": unit_wall,
                         "unit_cpu_s": unit_cpu}
        out[mode]["cpu_s"] = cpu_seconds() - before  # workers included
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--dev-examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=common.positive_int, default=1,
                        help="times every mode runs (order rotated per round); the table gives "
                             "each round and the median ratio")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    names = [m for m, _, _, _ in MODES]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, glue = make_inputs(root, args)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rounds.append(run_round(root / f"round-{r}", model, glue, args, order))
    load_after = os.getloadavg()
    units = rounds[0]["sweep-1"]["units"]
    rows, records = [], []
    for r, result in enumerate(rounds):
        for mode, label, workers, base in MODES:
            m = result[mode]
            ratio = m["wall_s"] / result[base]["wall_s"]
            rows.append([r + 1, label, workers, f"{m['wall_s']:.1f}", f"{ratio:.2f}x",
                         f"{m['cpu_s']:.1f}", f"{m['cpu_s'] / m['wall_s']:.2f}",
                         f"{m['unit_wall_s']:.1f}" if "unit_wall_s" in m else "",
                         f"{m['unit_cpu_s']:.1f}" if "unit_cpu_s" in m else ""])
            records.append({"round": r + 1, "mode": mode, "workers": workers, **m,
                            "compared_with": base, "ratio": ratio})
    commands = statistics.median([res["sweep-2-cmd"]["wall_s"] / res["search-cmd"]["wall_s"]
                                  for res in rounds])
    in_process = statistics.median([res["sweep-2"]["wall_s"] / res["sequential"]["wall_s"]
                                    for res in rounds])
    rows.append(["median", "commands: sweep --workers 2 vs search --seeds", 2, "",
                 f"{commands:.2f}x", "", "", "", ""])
    rows.append(["median", "in-process: 2 workers vs search_seeds()", 2, "",
                 f"{in_process:.2f}x", "", "", "", ""])
    records.append({"units": units, "cpu_count": os.cpu_count(), "rounds": args.rounds,
                    "median_ratio_commands": commands, "median_ratio_in_process": in_process,
                    "target": 0.6, "load_average_before": load_before,
                    "load_average_after": load_after})
    what = (f"Sweep of {units} units (SST-2-style synthetic task, seeds {args.seeds}, both "
            f"methods, good/random/bad, super-survivors; random BERT hidden {args.hidden}, "
            f"{args.layers} layers; {args.train_examples} train / {args.dev_examples} dev "
            f"examples, {args.epochs} epochs), 1 torch thread per worker, {os.cpu_count()} "
            f"cores, {args.rounds} round(s) with the order of the modes rotated; load average "
            f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared machine). "
            f"Target: 2 workers <= 0.6x one after another. Commands (fresh processes, as a "
            f"user runs them): median {commands:.2f}x "
            f"({'met' if commands <= 0.6 else 'not met'}); in-process (the sequential side's "
            f"imports already done): median {in_process:.2f}x")
    common.report("sweep", args, argv, what,
                  ["round", "mode", "workers", "wall (s)", "vs one after another (same round)",
                   "CPU (s)", "cores used (CPU / wall)", "units' wall sum (s)",
                   "units' CPU sum (s)"],
                  rows, records)


if __name__ == "__main__":
    main()
