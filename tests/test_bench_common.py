"""bench/common.py's op counter (the tensor ops and host reads bench_importance reports) and its
timer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

COMMON = Path(__file__).resolve().parents[1] / "bench" / "common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_count_ops_leaves_out_views_and_counts_host_reads(common):
    x = torch.randn(4, 6)

    def work():
        y = x.view(24).t().reshape(4, 6).detach()  # views only: no kernel
        z = torch.empty(3)  # a bare allocation: no kernel
        total = (y * 2 + 1).sum()  # three kernels
        z.fill_(float(total))  # one host read, one kernel
        return z

    assert common.count_ops(work) == (4, 1)


def test_count_ops_sees_the_backward_and_custom_ops_once(common):
    from sparsebert.ops import group_dot  # noqa: PLC0415

    x = torch.randn(2, 3, 4, requires_grad=True)
    g = torch.randn(2, 3, 4)

    def forward_only():
        return group_dot(x.detach(), g, 4)

    def forward():
        return (x * 3).sum()

    def forward_backward():
        forward().backward()

    assert common.count_ops(forward_only) == (1, 0)  # the custom op, whatever it runs inside
    assert common.count_ops(forward) == (2, 0)  # mul, sum
    ops, reads = common.count_ops(forward_backward)
    assert ops > 2 and reads == 0  # the backward's ops too (the grad seed, mul, accumulation)


def test_time_call_times_with_the_callers_threads(common):
    """The thread count a table's header reports is the one its calls ran with
    (torch.utils.benchmark.Timer times with 1 thread unless told otherwise)."""
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        common.time_call(lambda: seen.append(torch.get_num_threads()), min_run_time=0.01)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {2}


def test_time_interleaved_times_every_call_each_round_and_pairs_rounds(common, monkeypatch):
    """Each round times every call once, in order, after its before() hook; round_ratios pairs
    the same round's timings."""
    events = []
    fake_seconds = {"a": iter([1.0, 2.0, 4.0]), "b": iter([2.0, 2.0, 2.0])}

    def fake_time_call(fn, min_run_time=0.5):
        name = fn()
        events.append(("time", name))
        return next(fake_seconds[name])

    monkeypatch.setattr(common, "time_call", fake_time_call)
    calls = {"a": lambda: "a", "b": lambda: "b"}
    samples = common.time_interleaved(calls, rounds=3,
                                      before=lambda name: events.append(("before", name)))
    assert samples == {"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}
    assert events == [("before", "a"), ("time", "a"), ("before", "b"), ("time", "b")] * 3
    assert common.round_ratios(samples, "a", "b") == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        common.time_interleaved(calls, rounds=0)


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu"])
def test_use_device_without_it_is_one_line(common, device):
    """A benchmark's --device that this machine lacks ends with one line naming it, not with a
    traceback from inside torch."""
    needed = {"cuda": 1, "cuda:3": 4}.get(device)
    if needed is not None and torch.cuda.device_count() >= needed:
        pytest.skip(f"this machine has {device}")
    with pytest.raises(SystemExit) as info:
        common.use_device(device)
    assert str(info.value).startswith(f"--device {device}: ")


def test_use_device_cpu(common):
    assert common.use_device("cpu") == torch.device("cpu")


@pytest.fixture(scope="module")
def bench_masked_attention():
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(COMMON.parent))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_masked_attention", COMMON.parent / "bench_masked_attention.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(COMMON.parent))
    return bench


def test_masked_attention_benchmark_checks_outputs_before_timing(bench_masked_attention):
    """bench_masked_attention times only providers whose output is the reference's: each CPU
    provider passes; a wrong one (another gate) is refused with the difference named."""
    bench = bench_masked_attention
    _, q, k, v, gate = bench.make_inputs(2, 16, 4, 8, 2, torch.float32, "cpu")
    for name in ("reference", "sdpa", "sdpa_gate", "gather_sdpa", "sparsebert"):
        bench.check_output(name, bench.provider_fn(name, q, k, v, gate), q, k, v, gate)
    wrong = bench.provider_fn("sparsebert", q, k, v, 1 - gate)
    with pytest.raises(ValueError, match="sparsebert: output differs from the reference by"):
        bench.check_output("sparsebert", wrong, q, k, v, gate)


def test_masked_attention_benchmark_interleaves_rounds(bench_masked_attention, monkeypatch,
                                                       tmp_path):
    """Each round times every row of a shape once (the output checked in the first round only);
    a row's time is its median over rounds and its ratios the medians of per-round ratios."""
    bench = bench_masked_attention
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    calls = []
    # Seconds per round of each (provider, heads kept): the median of per-round ratios differs
    # from the ratio of medians where rounds disagree.
    seconds = {("sdpa", 4): [1.0, 3.0, 2.0], ("sparsebert", 4): [4.0, 3.0, 1.0],
               ("sparsebert", 2): [2.0, 1.0, 4.0], ("sparsebert", 1): [0.5, 0.5, 0.5]}

    def fake_timed(name, batch, seq, heads, dim, active, dtype, device, backward,
                   timing="eager", check=True):
        calls.append((name, active, check))
        return seconds[name, active][sum(c[:2] == (name, active) for c in calls) - 1]

    monkeypatch.setattr(bench, "timed", fake_timed)
    bench.main(["--device", "cpu", "--batch", "2", "--seq", "8", "--heads", "4", "--dim", "8",
                "--providers", "sdpa", "sparsebert", "--no-backward", "--rounds", "3"])
    one_round = [("sdpa", 4), ("sparsebert", 4), ("sparsebert", 2), ("sparsebert", 1)]
    assert [c[:2] for c in calls] == one_round * 3
    assert [c[2] for c in calls] == [True] * 4 + [False] * 8
    payload = json.loads((tmp_path / "masked_attention-cpu.json").read_text())
    got = {(r["provider"], r["active"]): r for r in payload["results"]}
    assert got["sdpa", 4]["us"] == pytest.approx(2e6)
    assert got["sparsebert", 4]["us"] == pytest.approx(3e6)
    assert got["sparsebert", 4]["vs_sdpa"] == pytest.approx(1.0)  # rounds 4, 1, 1/2 (not 3/2)
    assert got["sparsebert", 2]["vs_all_heads"] == pytest.approx(0.5)  # 1/2, 1/3, 4 (not 2/3)
    assert got["sparsebert", 1]["vs_sdpa"] == pytest.approx(0.25)  # 1/2, 1/6, 1/4
    assert {r["rounds"] for r in payload["results"]} == {3}
