"""Interleaved timing of several variants on one device.

`time_interleaved({name: fn}, repeats, warmup, device)` warms every variant up, then runs
`repeats` rounds, each calling every variant once in a fresh seeded random order (so no variant
always follows the same one), so slow drift of a shared machine (other processes, frequency
changes) hits every variant alike. Sample r of every variant comes from round r: ratios of two
variants are best taken per round (`paired_ratio`), which cancels drift between rounds. One
call per sample:
wall time with perf_counter on CPU; on CUDA, device time between two events recorded around
the call on the device's current stream (what the GPU spent, launch gaps included),
synchronised per call.
Returns {name: [ms, ...]}; `summary(ms)` gives median, p20, p80.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm


def _time_once(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device, progress: bool = True) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, `repeats` samples each, interleaved."""
    cuda = device.type == "cuda"
    # On cuda:N the events and the current stream must be cuda:N's (they follow the current
    # device, which stays cuda:0 unless set).
    on_device = torch.cuda.device(device) if cuda else contextlib.nullcontext()
    names = list(fns)
    total = len(names) * (warmup + repeats)
    with on_device, tqdm(total=total, desc="timing", disable=not progress, leave=False) as bar:
        for name in names:  # warm-up: lazy init, caches, graph capture
            for _ in range(warmup):
                fns[name]()
                bar.update()
        if cuda:
            torch.cuda.synchronize(device)
        samples: dict[str, list[float]] = {name: [] for name in names}
        rng = np.random.default_rng(0)
        for _ in range(repeats):
            for i in rng.permutation(len(names)):
                samples[names[i]].append(_time_once(fns[names[i]], cuda))
                bar.update()
    return samples


def paired_ratio(reference_ms: list[float], ms: list[float]) -> dict[str, float]:
    """reference / variant per round (samples of one time_interleaved call): median, p20, p80
    of the per-round speed-ups."""
    ratios = np.asarray(reference_ms, dtype=np.float64) / np.asarray(ms, dtype=np.float64)
    return {"median": float(np.median(ratios)), "p20": float(np.percentile(ratios, 20)),
            "p80": float(np.percentile(ratios, 80))}


def summary(ms: list[float]) -> dict[str, float]:
    """median, p20, p80 of per-call milliseconds."""
    values = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(values)), "p20_ms": float(np.percentile(values, 20)),
            "p80_ms": float(np.percentile(values, 80))}
