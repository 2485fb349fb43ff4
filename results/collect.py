"""Build results/glue_finetune.{json,md} from finished runs' results.json files.

    python results/collect.py runs/glue-minilm-s42            # default: that folder
    python results/collect.py runs/lr-sweep runs/glue-minilm-s42/MRPC --out results/lr_sweep
    python results/collect.py runs/ablation runs/glue-minilm-s42/SST-2 \
        runs/glue-minilm-s42/MRPC --out results/bucket_ablation

When a (task, lr, batching) setting was run with several seeds, a second table gives each
seed's score and their mean and standard deviation.

Each <runs>/<TASK>/results.json (written by `sparsebert finetune`) becomes one row: dev metrics,
the paper's threshold metric, train/wall time, device, versions and the run's settings. The
reference numbers quoted in the GLUE issue (a plain PyTorch + transformers loop, same model,
seed 42, batch 32, max length 128, dynamic padding, 3 epochs, CPU) are listed beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparsebert.train.rundir import RunResult

# Issue's quick loop: {task: {lr: {metric: value}}}; SST-2 used an 8000-example subset, 1 epoch.
REFERENCE = {
    "RTE": {"2e-05": {"acc": 0.523}, "0.0001": {"acc": 0.556}},
    "MRPC": {"2e-05": {"acc": 0.716, "f1": 0.825}, "0.0001": {"acc": 0.804, "f1": 0.864}},
    "CoLA": {"2e-05": {"mcc": 0.200}, "0.0001": {"mcc": 0.234}},
    "SST-2": {"2e-05": {"acc": 0.810}, "0.0001": {"acc": 0.852}},
}
MAJORITY = {"RTE": {"acc": 0.527}}
ORDER = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]


def collect(runs: Path) -> list[dict]:
    """One row per finished run under `runs` (any depth), in GLUE task order."""
    rows = []
    for path in sorted(runs.rglob("results.json")):
        result = RunResult.from_json(json.loads(path.read_text()), str(path))
        if not result.finished:
            continue
        config = result.config
        first = next(iter(result.metrics))
        rows.append({
            "task": result.task, "run": str(path.parent), "metrics": result.metrics,
            "threshold_metric": result.threshold_metric, "score": result.score,
            "lr": config["lr"], "preset": config["preset"], "epochs": config["epochs"],
            "batch_size": config["batch_size"], "max_length": config["max_length"],
            "seed": config["seed"], "max_train_examples": config["max_train_examples"],
            "batching": "bucketed" if config.get("bucket", True) else "shuffled",
            "weight_decay": config.get("weight_decay", 0.0), "grad_clip": config.get("grad_clip", 1.0),
            "train_examples": result.train_examples, "steps": result.step,
            "train_time_s": round(result.train_time_s, 1),
            "wall_time_s": round(result.wall_time_s, 1),
            "train_examples_per_s": round(result.train_examples_per_s, 1),
            "device": result.device, "device_name": result.device_name,
            "threads": result.threads, "versions": result.versions,
            "git_sha": result.git_sha,
            "reference": REFERENCE.get(result.task, {}), "dev_split": first,
        })
    rows.sort(key=lambda r: (ORDER.index(r["task"]) if r["task"] in ORDER else 99, r["run"]))
    return rows


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def markdown(rows: list[dict]) -> str:
    """A table: task, dev metrics, issue reference at 2e-5 / 1e-4, lr, batching, data, time,
    device."""
    lines = [
        "| task | dev metrics (sparsebert) | issue's loop, lr 2e-5 | issue's loop, lr 1e-4 "
        "| lr | weight decay / clip | batches | seed | train examples x epochs | train time "
        "| device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        metrics = r["metrics"][r["dev_split"]]
        ref = r["reference"]
        lines.append(
            f"| {r['task']} | {_fmt(metrics)} | {_fmt(ref.get('2e-05', {})) or '-'} "
            f"| {_fmt(ref.get('0.0001', {})) or '-'} | {r['lr']:g} "
            f"| {r['weight_decay']:g} / {r['grad_clip']:g} | {r['batching']} | {r['seed']} "
            f"| {r['train_examples']} x {r['epochs']} | {r['train_time_s'] / 60:.1f} min "
            f"| {r['device_name']} ({r['threads']} threads) |")
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[dict]) -> str:
    """Markdown table over settings run with 2+ seeds: per-seed dev metrics, mean and sample
    standard deviation of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["task"], r["lr"], r["batching"], r["max_train_examples"], r["epochs"],
               r["weight_decay"], r["grad_clip"])
        groups.setdefault(key, []).append(r)
    lines = ["| task | lr | batches | seeds | per seed | mean | std |", "|---|---|---|---|---|---|---|"]
    for (task, lr, batching, *_), group in groups.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: r["seed"])
        names = list(group[0]["metrics"][group[0]["dev_split"]])
        per_seed = "; ".join(f"{r['seed']}: {_fmt(r['metrics'][r['dev_split']])}" for r in group)
        values = {n: [r["metrics"][r["dev_split"]][n] for r in group] for n in names}
        mean = {n: sum(v) / len(v) for n, v in values.items()}
        std = {n: (sum((x - mean[n]) ** 2 for x in v) / (len(v) - 1)) ** 0.5
               for n, v in values.items()}
        lines.append(f"| {task} | {lr:g} | {batching} | {len(group)} | {per_seed} "
                     f"| {_fmt(mean)} | {_fmt(std)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", default=["runs/glue-minilm-s42"],
                        help="folders searched (recursively) for results.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "glue_finetune"),
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args()
    rows = [row for folder in args.runs for row in collect(Path(folder))]
    rows.sort(key=lambda r: (ORDER.index(r["task"]) if r["task"] in ORDER else 99, r["lr"]))
    if not rows:
        raise SystemExit(f"no finished runs (results.json with status finished) under "
                         f"{args.runs}")
    out = Path(args.out)
    record = {"collected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs_dir": args.runs,
              "majority_baseline": MAJORITY, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(rows)
    summary = seed_summary(rows)
    if summary:
        text += "\nAcross seeds (the seed also draws the data order, the classifier's "
        text += "initialisation, dropout and any train subset):\n\n" + summary
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
