"""The interleaved-round benchmarks (group_dot, attention backend, importance setup) run end
to end at tiny sizes and write tables whose ratios are medians of per-round ratios, with their
range."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """Imports a bench script with its results written under tmp_path (not bench/results)."""
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "time_call", lambda fn, min_run_time=0.5: _timed_once(fn))
    threads = torch.get_num_threads()
    yield lambda name: importlib.reload(importlib.import_module(name))
    torch.set_num_threads(threads)
    for name in [*{script for script, _ in COUNTS}, "bench_group_dot",
                 "bench_attention_backend", "bench_importance_setup", "bench_sweep_gpu",
                 "common"]:
        sys.modules.pop(name, None)


def _timed_once(fn):
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_group_dot_bench_reports_medians_and_ranges(bench, tmp_path):
    bench("bench_group_dot").main(["--device", "cpu", "--batch", "2", "--seq", "8",
                                   "--dim", "128", "--rounds", "3", "--threads", "1"])
    records = json.loads((tmp_path / "group_dot-cpu.json").read_text())["results"]
    assert [(r["provider"], r["group_size"]) for r in records] == [
        (p, g) for g in (1, 64, 128) for p in ("torch", "sparsebert")]
    for rec in records:
        assert rec["rounds"] == 3
        assert rec["speedup_min"] <= rec["speedup_vs_torch"] <= rec["speedup_max"]
        if rec["provider"] == "torch":
            assert rec["speedup_vs_torch"] == rec["speedup_min"] == rec["speedup_max"] == 1.0
    assert "range over rounds" in (tmp_path / "group_dot-cpu.md").read_text()


COUNTS = [("bench_attention_backend", "--rounds"), ("bench_call_overhead", "--rounds"),
          ("bench_call_overhead", "--calls"), ("bench_first_token_readout", "--rounds"),
          ("bench_group_dot", "--rounds"), ("bench_importance", "--rounds"),
          ("bench_importance", "--batches"), ("bench_importance_setup", "--rounds"),
          ("bench_masked_attention", "--rounds"), ("bench_masked_model", "--rounds"),
          ("bench_speed", "--repeats"), ("bench_sweep", "--rounds"),
          ("bench_train_step", "--rounds"), ("bench_train_throughput", "--rounds")]


@pytest.mark.parametrize("script,flag", COUNTS)
@pytest.mark.parametrize("value", ["0", "-2"])
def test_counts_below_one_are_usage_errors(script, flag, value, bench, tmp_path, capsys):
    """bench_importance --rounds 0 wrote an empty table over the recorded one (exit 0); the
    others ended in a ZeroDivisionError or StatisticsError traceback, some after minutes."""
    with pytest.raises(SystemExit) as stop:
        bench(script).main([f"{flag}={value}"])
    assert stop.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got {value}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script,argv,needle", [
    ("bench_speed", ["--cases", "full,unifrom"], "--cases 'full,unifrom': 'unifrom': expected "
                                                 "full, uniform or glue:TASK"),
    ("bench_train_step", ["--models", "minilm,bert-bse", "--device", "cpu"],
     "--models: unknown model shape 'bert-bse'"),
    ("bench_train_step", ["--lengths", "32,6x4", "--device", "cpu"],
     "--lengths: '6x4' is neither a positive integer nor 'mixed'"),
    ("bench_train_throughput", ["--modes", "bucketed,fixd"], "--modes 'bucketed,fixd': unknown "
                                                             "['fixd']"),
    ("bench_masked_attention", ["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    ("bench_masked_attention", ["--heads", "2", "--active", "2", "3"],
     "--active 3: more heads kept than --heads 2"),
    ("bench_masked_attention", ["--active", "0"], "argument --active: expected an integer >= 1, "
                                                  "got 0"),
    ("bench_speed", ["--cases", ""], "--cases '': no case to time"),
    ("bench_attention_backend", ["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    ("bench_sweep_gpu", ["--tiny", "--device", "cpu", "--work-dir", "/nonexistent/work"],
     "--work-dir '/nonexistent/work': expected an existing folder"),
    ("bench_sweep_gpu", ["--tiny", "--device", "cpu", "--per-gpu", "2,0"],
     "--per-gpu '2,0': comma-separated counts, each expected an integer >= 1, got 0"),
])
def test_a_bad_later_entry_is_refused_before_anything_is_timed(script, argv, needle, bench,
                                                               monkeypatch, capsys):
    """A typo in the last --cases / --models entry was found after the ones before it had been
    timed (minutes, then thrown away); --modes and --dtype typos ended in tracebacks."""
    module = bench(script)
    for name in ("run_speed", "measure", "stock_baseline"):  # nothing timed before the refusal
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("timed first"))
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    assert needle in capsys.readouterr().err


def test_attention_backend_bench_sets_each_variants_masks(bench, tmp_path, monkeypatch):
    import sparsebert

    kept_per_timing = []
    set_masks = sparsebert.set_masks

    def recording_set_masks(model, head_mask=None, **kwargs):
        kept_per_timing.append(sorted({int(k) for k in head_mask.sum(-1)}))
        return set_masks(model, head_mask=head_mask, **kwargs)

    monkeypatch.setattr(sparsebert, "set_masks", recording_set_masks)
    bench("bench_attention_backend").main(["--device", "cpu", "--batch", "2", "--seq", "16",
                                           "--heads", "4", "--models", "distilbert",
                                           "--rounds", "2", "--threads", "1"])
    records = json.loads((tmp_path / "attention_backend-cpu.json").read_text())["results"]
    rows = [(r["level"], r["variant"], r["heads_kept"]) for r in records]
    assert rows == [(level, variant, kept) for level in ("attention", "model")
                    for variant, kept in (("sdpa", 4), ("sparsebert", 4), ("sparsebert", 2),
                                          ("sparsebert", 1))]
    for rec in records:
        assert rec["rounds"] == 2
        assert rec["vs_sdpa_min"] <= rec["vs_sdpa"] <= rec["vs_sdpa_max"]
    # before each sparsebert timing (2 rounds x 2 levels), its own heads kept in every layer
    assert kept_per_timing == [[4], [2], [1]] * 4


def test_importance_setup_bench_times_both_setups_and_restores_the_scorer(bench, tmp_path):
    scorer_class = importlib.import_module("sparsebert.pruning.importance").BatchScorer
    held = scorer_class.held
    bench("bench_importance_setup").main(["--device", "cpu", "--batches", "2", "--rounds", "2",
                                          "--threads", "1"])
    assert scorer_class.held is held  # the per-batch variant is undone after each timing
    records = json.loads((tmp_path / "importance_setup-cpu.json").read_text())["results"]
    assert [r["setup"] for r in records] == ["held", "per batch"]
    assert records[0]["ratio_min"] <= records[0]["ratio"] <= records[0]["ratio_max"]


def test_importance_bf16_weights_bench_times_both_and_restores_the_copies(bench, tmp_path):
    numerics = importlib.import_module("sparsebert.precision")
    weights_cast_once = numerics.weights_cast_once
    bench("bench_importance_setup").main(["--device", "cpu", "--compare", "bf16-weights",
                                          "--batches", "2", "--rounds", "2", "--threads", "1"])
    assert numerics.weights_cast_once is weights_cast_once  # undone after each timing
    records = json.loads((tmp_path / "importance_bf16_weights-cpu.json").read_text())["results"]
    assert [r["setup"] for r in records] == ["cast once per pass", "cast per batch"]
    assert {r["precision"] for r in records} == {"bf16"}
    command = (tmp_path / "importance_bf16_weights-cpu.md").read_text().splitlines()[2]
    assert command.startswith("Command: python bench/bench_importance_setup.py --device cpu "
                              "--compare bf16-weights")
    assert records[0]["ratio_min"] <= records[0]["ratio"] <= records[0]["ratio_max"]


def test_attention_backend_bench_gives_llama_a_kv_head_count_that_divides_the_heads(bench):
    kv_heads = bench("bench_attention_backend").kv_heads
    assert [kv_heads(h) for h in (1, 2, 3, 10, 12, 16)] == [1, 1, 1, 2, 4, 4]


def test_attention_backend_bench_names_the_sdpa_backend(bench, tmp_path):
    bench("bench_attention_backend").main(["--device", "cpu", "--batch", "1", "--seq", "8",
                                           "--heads", "2", "--threads", "1", "--rounds", "1",
                                           "--min-run-time", "0.01"])
    records = json.loads((tmp_path / "attention_backend-cpu.json").read_text())["results"]
    assert {r["model"] for r in records} == {"distilbert", "llama"}  # llama at 2 heads: 1 kv head
    assert {r["sdpa_backend"] for r in records} == {"cpu"}
    assert "SDPA ran distilbert: cpu, llama: cpu" in (tmp_path / "attention_backend-cpu.md"
                                                      ).read_text()


def test_masked_attention_bench_keeps_no_zero_head_row(bench, tmp_path):
    """With --heads 2 the default H/4 is 0 heads: compact's empty output ended the run in a
    traceback (max() of an empty tensor); the rows are 2 and 1 heads kept."""
    bench("bench_masked_attention").main(["--batch", "1", "--seq", "8", "--heads", "2", "--dim",
                                          "32", "--rounds", "1", "--threads", "1",
                                          "--no-backward", "--device", "cpu"])
    records = json.loads((tmp_path / "masked_attention-cpu.json").read_text())["results"]
    assert sorted({r["active"] for r in records}) == [1, 2]


def test_speed_bench_names_a_model_directory_it_cannot_load_in_one_line(bench, tmp_path,
                                                                         tiny_model_dir, capsys):
    """A model directory without tokenizer files gave ModelLoadError's traceback (sparsebert
    speed gives one line)."""
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for file in Path(tiny_model_dir).iterdir():
        if file.name in ("config.json", "model.safetensors"):
            (no_tokenizer / file.name).write_bytes(file.read_bytes())
    with pytest.raises(SystemExit) as stop:
        bench("bench_speed").main(["--model", str(no_tokenizer), "--batch", "2", "--seq", "16",
                                   "--threads", "1", "--repeats", "1"])
    assert stop.value.code == 2
    assert "no tokenizer files" in capsys.readouterr().err
