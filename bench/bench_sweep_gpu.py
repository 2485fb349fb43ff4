"""Sweep training throughput on one GPU against one stock fine-tune process (DESIGN.md §7).

Stock baseline: one process fine-tuning HF BertForSequenceClassification (random weights) with
a plain eager loop: AdamW, bf16 autocast (fp32 on the CPU), batch 32, sequence 128 (every
batch full length), gradient clipping at 1.0; examples/s over --baseline-steps steps after
--baseline-warmup steps. Shapes: BERT-base and the default model's (MiniLM: 6 layers, 384).

Sweep: `sparsebert.sweep.sweep` on --device with --per-gpu K workers, for each K of the list:
max(2, K x --seeds-per-worker) seeds of one task (full fine-tune, both methods' searches,
good/random/bad pruned and re-fine-tuned; no super-survivors, no per-seed reports), batch 32,
sequence 128 (--padding max_length: the baseline's shape), --train-examples examples per
fine-tune. Models: a random BERT-base saved with the default model's tokenizer, and the
default model (or --default-model DIR, e.g. a copy with fp16-rounded weights). Total training
examples/s = sum over the finished fine-tunes (results.json) of train_examples x epochs / the
sweep's wall time (worker start-up, searches, evaluation and saving included); the column
"in fine-tune window" divides by the span from the first fine-tune's start to the last one's
end instead. GPU utilisation is sampled every 0.5 s during each measurement (nvidia-smi, else
torch.cuda.utilization).

    python bench/bench_sweep_gpu.py --device cuda:0 --glue-dir ../shared/data/glue
    python bench/bench_sweep_gpu.py --device cpu --tiny          # smoke test (tiny models)
    python bench/bench_sweep_gpu.py --prepare-inputs .gpu-sweep  # what the GPU machine needs

--prepare-inputs DIR writes DIR/model (the default model with its weights rounded to fp16:
the transfer to a GPU machine is limited to 64 MiB; sparsebert loads them back as fp32) and
DIR/glue.tar.gz (the six GLUE tasks of the study); bench/gpu_sweep.sh reads them there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STUDY_TASKS = ("CoLA", "SST-2", "MRPC", "STS-B", "RTE", "WNLI")
TARGETS = {"bert-base": 4.0, "default": 6.0}  # sweep / one stock process (the issue)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128)
WORDS = "the a film movie plot actor scene story music ending script cast".split()


# ----- accounting (pure: tested in tests/test_bench_sweep_gpu.py) -----

def _timestamp(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def training_totals(sweep_dir: str | Path) -> dict:
    """Training done by the finished fine-tunes (results.json) under a sweep directory.

    Returns runs, examples (sum of train_examples x config epochs), train_s (sum of
    train_time_s), window_s (first fine-tune's start to the last one's end, from finished_at
    and wall_time_s; None without timestamps).
    """
    runs, examples, train_s, starts, ends = 0, 0, 0.0, [], []
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("status") != "finished" or data.get("train_examples") is None:
            continue
        runs += 1
        examples += int(data["train_examples"]) * int(data.get("config", {}).get("epochs", 1))
        train_s += float(data.get("train_time_s") or 0.0)
        if data.get("finished_at") and data.get("wall_time_s") is not None:
            end = _timestamp(data["finished_at"])
            ends.append(end)
            starts.append(end - float(data["wall_time_s"]))
    window = max(ends) - min(starts) if ends else None
    return {"runs": runs, "examples": examples, "train_s": train_s, "window_s": window}


FINE_TUNE_KINDS = ("full", "retrained", "super-retrained")


def study_examples(identity: dict, train_sizes: dict[str, int]) -> int:
    """Training examples (x epochs) of every fine-tune of a sweep: `identity` as saved in its
    sweep.json, `train_sizes` {task: train split size}."""
    from sparsebert.sweep.grid import Grid, expand

    grid = Grid(**{k: tuple(v) if isinstance(v, list) else v
                   for k, v in identity["grid"].items()})
    train = identity["train"]
    cap = train.get("max_train_examples")
    total = 0
    for unit in expand(grid):
        if unit.kind in FINE_TUNE_KINDS:
            n = train_sizes[unit.task]
            total += (min(n, cap) if cap else n) * int(train.get("epochs", 3))
    return total


def parse_smi(text: str) -> tuple[float, float] | None:
    """(utilization %, memory used MiB) from one line of `nvidia-smi --query-gpu=
    utilization.gpu,memory.used --format=csv,noheader,nounits`; None if unreadable."""
    parts = [p.strip() for p in text.strip().splitlines()[0].split(",")] if text.strip() else []
    try:
        return float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None


def summarize_samples(samples: list[tuple[float, float]]) -> dict:
    """Mean / max utilization (%) and max memory (MiB) of (util, mem) samples."""
    if not samples:
        return {"util_mean": None, "util_max": None, "mem_max_mib": None, "samples": 0}
    util = [u for u, _ in samples]
    return {"util_mean": sum(util) / len(util), "util_max": max(util),
            "mem_max_mib": max(m for _, m in samples), "samples": len(samples)}


def study_record(study: str | Path, dest: str | Path, rc: str, seconds: int, limit: int,
                 per_gpu: int, smi_csv: str | Path, glue_dir: str, model: str = "default",
                 ) -> dict:
    """time.json of a study run by bench/gpu_sweep.sh, written to `dest` with units.json (the
    completion markers by time): wall time, exit status, units done of total, training
    examples and their rate, the whole study's examples and the seconds they would take at
    that rate, GPU utilisation from the nvidia-smi CSV samples."""
    from sparsebert.glue.loading import load_split

    study, dest = Path(study), Path(dest)
    markers = [json.loads(m.read_text()) for m in (study / ".sweep" / "done").glob("*.json")]
    (dest / "units.json").write_text(
        json.dumps(sorted(markers, key=lambda u: u["time"]), indent=1) + "\n")
    status = study / ".sweep" / "status.json"
    total = json.loads(status.read_text()).get("total") if status.is_file() else None
    lines = Path(smi_csv).read_text().splitlines() if Path(smi_csv).is_file() else []
    samples = [s for s in map(parse_smi, lines) if s is not None]
    totals = training_totals(study)
    rate = totals["examples"] / max(seconds, 1)
    whole = None
    if (study / "sweep.json").is_file():
        ident = json.loads((study / "sweep.json").read_text())["identity"]
        sizes = {t: len(load_split(t, "train", glue_dir)) for t in ident["grid"]["tasks"]}
        needed = study_examples(ident, sizes)
        whole = {"train_examples": needed, "seconds_at_this_rate": needed / rate if rate else None}
    record = {"model": model, "wall_s": seconds, "exit": rc, "time_limit_s": limit, "per_gpu": per_gpu,
              "finished": rc == "0", "units_done": len(markers), "units_total": total,
              "fine_tunes": totals["runs"], "train_examples": totals["examples"],
              "train_examples_per_s": rate, "whole_study": whole,
              "gpu": summarize_samples(samples)}
    if model != "default":
        record["note"] = ("the default model travelled with its weights rounded to fp16 (the "
                          "transfer limit); sparsebert loads them as fp32")
    (dest / "time.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


class GpuSampler:
    """Samples the GPU's utilization and memory every `interval` s in a thread."""

    def __init__(self, device: str, interval: float = 0.5) -> None:
        self.index = torch.device(device).index or 0
        self.interval = interval
        self.cuda = device.startswith("cuda")
        self.source = None
        if self.cuda and shutil.which("nvidia-smi") and self._smi() is not None:
            self.source = "nvidia-smi"
        elif self.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.utilization(self.index)
                self.source = "torch.cuda.utilization"
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _smi(self) -> tuple[float, float] | None:
        try:
            text = subprocess.run(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True,
                timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_smi(text)

    def _sample(self) -> tuple[float, float] | None:
        if self.source == "nvidia-smi":
            return self._smi()
        with contextlib.suppress(Exception):
            return (float(torch.cuda.utilization(self.index)),
                    torch.cuda.device_memory_used(self.index) / 2**20)
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            sample = self._sample()
            if sample is not None:
                self.samples.append(sample)

    def __enter__(self) -> GpuSampler:
        self.samples, self._stop = [], threading.Event()
        if self.source is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        return {**summarize_samples(self.samples), "source": self.source}


# ----- inputs -----

def shape_of(model: str, tiny: bool) -> dict:
    if tiny:
        return TINY_SHAPE
    return common.MODEL_SHAPES["bert-base" if model == "bert-base" else "minilm"]


def write_synthetic_glue(root: Path, task: str, train: int, dev: int) -> str:
    """A GLUE folder with an SST-2-style task (two classes, a cue word) under `task`."""
    rng = np.random.default_rng(0)
    (root / task).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            words = list(rng.choice(WORDS, int(rng.integers(3, 20))))
            words.insert(int(rng.integers(0, len(words))), "good" if i % 2 else "bad")
            rows.append(f"{' '.join(words)} .\t{i % 2}")
        (root / task / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(root)


def save_random_bert(path: Path, shape: dict, tokenizer_source: str) -> str:
    """A random BertModel with `shape` and the tokenizer of `tokenizer_source`, saved."""
    from transformers import BertConfig, BertModel

    from sparsebert.hf.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **shape)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def prepare_inputs(dest: Path, glue_dir: str | None, model: str = "default") -> None:
    """DEST/model: `model` with floating weights rounded to fp16 (+ tokenizer, config);
    DEST/glue.tar.gz: the study's tasks from `glue_dir`."""
    from safetensors.torch import load_file, save_file

    from sparsebert.hf.loading import resolve_model

    source = Path(resolve_model(model))
    out = dest / "model"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "README.md":
            shutil.copy2(item, out / item.name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    if glue_dir:
        with tarfile.open(dest / "glue.tar.gz", "w:gz") as tar:
            for task in STUDY_TASKS:
                tar.add(Path(glue_dir) / task, arcname=f"glue/{task}")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"wrote {dest} ({size / 2**20:.1f} MiB)")


# ----- measurements -----

def stock_baseline(shape: dict, device: str, args) -> dict:
    """One stock fine-tune process: HF model, AdamW, bf16 autocast on CUDA, eager loop."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=2,
                        attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 30522, (args.batch, args.seq),
                                           generator=generator),
                "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch,), generator=generator)}
               for _ in range(4)]
    cuda = device.startswith("cuda")

    def step(i: int) -> None:
        batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        context = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                   else contextlib.nullcontext())
        with context:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.baseline_warmup):
        step(i)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    sync()
    with GpuSampler(device) as sampler:
        started = time.perf_counter()
        for i in range(args.baseline_steps):
            step(i)
        sync()
        seconds = time.perf_counter() - started
    examples = args.baseline_steps * args.batch
    return {"examples": examples, "wall_s": seconds, "examples_per_s": examples / seconds,
            "ms_per_step": 1e3 * seconds / args.baseline_steps, "gpu": sampler.summary()}


def run_sweep(out: Path, model_dir: str, glue_dir: str, k: int, args) -> dict:
    """One sweep with --per-gpu k (workers k on the CPU); training totals and GPU use."""
    from sparsebert.lottery.config import SearchConfig
    from sparsebert.sweep import SweepConfig, sweep
    from sparsebert.train import TrainConfig

    cpu = args.device == "cpu"
    seeds = list(range(1, max(2, math.ceil(k * args.seeds_per_worker)) + 1))
    search = SearchConfig(subnets=args.subnets)
    train = TrainConfig(model=model_dir, glue_dir=glue_dir, epochs=args.epochs,
                        batch_size=args.batch, max_length=args.seq, padding=args.padding,
                        max_train_examples=args.train_examples, log_every=50,
                        threads=1 if cpu else None, device="auto")
    config = SweepConfig(tasks=args.task, seeds=",".join(map(str, seeds)),
                         methods=args.methods, super_survivors=False, reports=False,
                         devices=args.device, per_gpu=k, workers=k if cpu else None)
    with GpuSampler(args.device) as sampler:
        started = time.perf_counter()
        outcome = sweep(out, config, search, train, progress=False)
        wall = time.perf_counter() - started
    totals = training_totals(out)
    return {"per_gpu": k, "seeds": len(seeds), "units": len(outcome.done),
            "failed": sorted(outcome.failed), "wall_s": wall, **totals,
            "examples_per_s": totals["examples"] / wall,
            "window_examples_per_s": (totals["examples"] / totals["window_s"]
                                      if totals["window_s"] else None),
            "gpu": sampler.summary()}


# ----- the report -----

def _gpu_cells(gpu: dict) -> list[str]:
    if not gpu.get("samples"):
        return ["n/a", "n/a"]
    return [f"{gpu['util_mean']:.0f} / {gpu['util_max']:.0f}",
            f"{gpu['mem_max_mib'] / 1024:.1f}"]


def table_rows(records: list[dict]) -> list[list[object]]:
    """Rows of the result table from stock and sweep records."""
    stock = {r["model"]: r["examples_per_s"] for r in records if r["mode"] == "stock"}
    rows = []
    for r in records:
        base = stock.get(r["model"])
        ratio = f"{r['examples_per_s'] / base:.2f}x" if base else "n/a"
        if r["mode"] == "stock":
            rows.append([r["model"], "stock HF loop, 1 process", "-", "-",
                         r["examples"], f"{r['wall_s']:.1f}", f"{r['examples_per_s']:.0f}",
                         "1.00x", "-", *_gpu_cells(r["gpu"])])
        else:
            window = r.get("window_examples_per_s")
            failed = f", {len(r['failed'])} failed" if r.get("failed") else ""
            rows.append([r["model"], f"sweep, {r['per_gpu']} per GPU",
                         f"{r['units']} ({r['runs']} fine-tunes{failed})", r["seeds"],
                         r["examples"],
                         f"{r['wall_s']:.1f}", f"{r['examples_per_s']:.0f}", ratio,
                         f"{window:.0f}" if window else "n/a", *_gpu_cells(r["gpu"])])
    return rows


def target_lines(records: list[dict]) -> list[str]:
    """The issue's targets: best sweep examples/s over one stock process, per model."""
    lines = []
    for model, target in TARGETS.items():
        stock = [r for r in records if r["model"] == model and r["mode"] == "stock"]
        sweeps = [r for r in records if r["model"] == model and r["mode"] == "sweep"]
        if not stock or not sweeps:
            continue
        best = max(sweeps, key=lambda r: r["examples_per_s"])
        ratio = best["examples_per_s"] / stock[0]["examples_per_s"]
        lines.append(f"target {model}: sweep >= {target:.0f}x one stock process: best "
                     f"{ratio:.2f}x at {best['per_gpu']} per GPU "
                     f"({'met' if ratio >= target else 'not met'})")
    return lines


HEADER = ["model", "mode", "units", "seeds", "train examples", "wall (s)", "examples/s",
          "vs stock", "examples/s in fine-tune window", "GPU util mean / max (%)",
          "GPU mem max (GiB)"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--models", default="default,bert-base",
                        help="comma-separated: default (the default model), bert-base (random)")
    parser.add_argument("--default-model", default="default",
                        help="the default model's directory (e.g. an fp16 copy)")
    parser.add_argument("--per-gpu", default="8,4,1", help="comma-separated K values")
    parser.add_argument("--seeds-per-worker", type=float, default=1.0)
    parser.add_argument("--task", default="SST-2")
    parser.add_argument("--glue-dir", default=None,
                        help="GLUE folder (default: a synthetic task in a temporary folder)")
    parser.add_argument("--train-examples", type=int, default=2048)
    parser.add_argument("--dev-examples", type=int, default=512, help="synthetic task only")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--methods", default="structured,magnitude")
    parser.add_argument("--subnets", default="good,random,bad")
    parser.add_argument("--padding", default="max_length")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--baseline-steps", type=int, default=150)
    parser.add_argument("--baseline-warmup", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no sweep expected to end after this many seconds")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: tiny random models for both shapes, synthetic data")
    parser.add_argument("--work-dir", default=None,
                        help="where the temporary models and sweep directories go")
    parser.add_argument("--name", default="sweep-gpu")
    parser.add_argument("--prepare-inputs", metavar="DIR", default=None,
                        help="write DIR/model (fp16 default model) and DIR/glue.tar.gz; exit")
    args = parser.parse_args(argv)
    if args.prepare_inputs:
        prepare_inputs(Path(args.prepare_inputs), args.glue_dir, args.default_model)
        return
    if args.tiny:
        args.train_examples, args.dev_examples = min(args.train_examples, 32), 32
        args.baseline_steps, args.baseline_warmup = min(args.baseline_steps, 3), 1
        args.seq, args.glue_dir = min(args.seq, 32), None
    common.use_device(args.device)  # a clear exit when it is not there
    if args.device == "cpu":
        torch.set_num_threads(1)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(TARGETS):
        parser.error(f"--models {args.models!r}: expected a comma-separated subset of "
                     f"{','.join(TARGETS)}")
    try:
        ks = [common.positive_int(k) for k in args.per_gpu.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--per-gpu {args.per_gpu!r}: comma-separated counts, each {error}")
    if args.work_dir is not None:  # checked before the baselines spend their time
        work_dir = Path(args.work_dir)
        if not work_dir.is_dir() or not os.access(work_dir, os.W_OK | os.X_OK):
            parser.error(f"--work-dir {args.work_dir!r}: expected an existing folder this user "
                         "can write to")
    started = time.perf_counter()
    records: list[dict] = []

    def save_partial() -> None:  # a run cut short still leaves what it measured
        env = common.environment(args.device)
        title = common.result_title("sweep_gpu", env, argv, "Partial results (the run was cut "
                                    "short or is still running) of the sweep throughput bench")
        common.write_results(args.name, args.device, {
            "env": env, "args": vars(args), "results": records, "partial": True},
            title + "\n" + common.markdown_table(HEADER, table_rows(records)))

    # Step 1: the stock baselines (before any sweep worker holds the GPU).
    for model in models:
        result = stock_baseline(shape_of(model, args.tiny), args.device, args)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the baseline's model and optimizer are gone
        records.append({"model": model, "mode": "stock", **result})
        print(f"stock {model}: {result['examples_per_s']:.0f} examples/s "
              f"({result['ms_per_step']:.1f} ms/step)", flush=True)
        save_partial()

    # Step 2: inputs of the sweeps: models and data.
    with tempfile.TemporaryDirectory(prefix="bench-sweep-gpu-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        glue = args.glue_dir or write_synthetic_glue(root / "glue", args.task,
                                                     args.train_examples, args.dev_examples)
        dirs = {}
        for model in models:
            if model == "default" and not args.tiny:
                dirs[model] = args.default_model
            else:
                dirs[model] = save_random_bert(root / f"model-{model}",
                                               shape_of(model, args.tiny), args.default_model)
        # Step 3: the sweeps, K by K; each directory is removed once measured (disk).
        last: dict[str, float] = {}
        for k in ks:
            for model in models:
                elapsed = time.perf_counter() - started
                if args.budget_s is not None and elapsed + last.get(model, 0) > args.budget_s:
                    print(f"skipped sweep {model} K={k}: {elapsed:.0f} s gone, the last took "
                          f"{last.get(model, 0):.0f} s, budget {args.budget_s:.0f} s")
                    continue
                out = root / f"sweep-{model}-{k}"
                result = run_sweep(out, dirs[model], glue, k, args)
                shutil.rmtree(out, ignore_errors=True)
                last[model] = result["wall_s"]
                records.append({"model": model, "mode": "sweep", **result})
                print(f"sweep {model} K={k}: {result['examples_per_s']:.0f} examples/s "
                      f"({result['units']} units, {result['runs']} fine-tunes, "
                      f"{result['wall_s']:.1f} s)", flush=True)
                save_partial()

    def described(model: str) -> str:
        if args.tiny:
            return f"{model} (tiny random)"
        return f"{model} ({'random weights' if model == 'bert-base' else args.default_model})"

    shapes = ", ".join(described(m) for m in models)
    what = (f"Sweep training throughput vs one stock fine-tune process; models {shapes}; "
            f"batch {args.batch}, sequence {args.seq}; stock: HF eager loop, AdamW, "
            f"{'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}, "
            f"{args.baseline_steps} steps after {args.baseline_warmup}; sweeps: {args.task} "
            f"({'GLUE' if args.glue_dir else 'synthetic'}), {args.train_examples} train "
            f"examples x {args.epochs} epoch(s) per fine-tune, padding {args.padding}, "
            f"methods {args.methods}, subnets {args.subnets}, no super-survivors, "
            f"max(2, K x {args.seeds_per_worker:g}) seeds; examples/s = train examples x "
            f"epochs of the finished fine-tunes / the sweep's wall time")
    rows = table_rows(records)
    # the targets are about GPUs at real widths: a CPU or --tiny run (a smoke test) judges none
    targets = target_lines(records) if args.device.startswith("cuda") and not args.tiny else []
    records.append({"targets": targets, "total_s": time.perf_counter() - started})
    path = common.report("sweep_gpu", args, argv, what, HEADER, rows, records, stem=args.name)
    if targets:
        with open(path.with_suffix(".md"), "a") as md:
            md.write("\n" + "\n".join(targets) + "\n")
    for line in targets:
        print(line)


if __name__ == "__main__":
    main()
