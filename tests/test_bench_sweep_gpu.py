"""The accounting of bench/bench_sweep_gpu.py: training examples from a sweep directory's
results.json files, nvidia-smi samples, the table and the targets (no training here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_sweep_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sweep_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(path: Path, **fields) -> None:
    path.mkdir(parents=True, exist_ok=True)
    data = {"status": "finished", "task": "SST-2", "run": str(path), "step": 10, **fields}
    (path / "results.json").write_text(json.dumps(data))


def test_training_totals_counts_finished_fine_tunes(bench, tmp_path):
    seed = tmp_path / "SST-2" / "seed_1"
    _result(seed / "full", train_examples=100, config={"epochs": 3}, train_time_s=2.0,
            finished_at="2026-12-01T10:00:10+00:00", wall_time_s=5.0)
    _result(seed / "structured" / "retrained" / "good", train_examples=50,
            config={"epochs": 2}, train_time_s=1.0, finished_at="2026-12-01T10:00:20+00:00",
            wall_time_s=4.0)
    _result(seed / "magnitude" / "retrained" / "bad", status="stopped", train_examples=None)
    (seed / "magnitude" / "retrained" / "random").mkdir(parents=True)
    (seed / "magnitude" / "retrained" / "random" / "results.json").write_text("{broken")
    totals = bench.training_totals(tmp_path)
    assert totals["runs"] == 2
    assert totals["examples"] == 100 * 3 + 50 * 2
    assert totals["train_s"] == pytest.approx(3.0)
    assert totals["window_s"] == pytest.approx(15.0)  # 10:00:05 to 10:00:20


def test_training_totals_of_an_empty_directory(bench, tmp_path):
    assert bench.training_totals(tmp_path) == {"runs": 0, "examples": 0, "train_s": 0.0,
                                               "window_s": None}


def test_nvidia_smi_samples(bench):
    assert bench.parse_smi("87, 40960\n") == (87.0, 40960.0)
    assert bench.parse_smi("[N/A], 1000") is None
    assert bench.parse_smi("") is None
    summary = bench.summarize_samples([(50.0, 1000.0), (100.0, 3000.0)])
    assert summary == {"util_mean": 75.0, "util_max": 100.0, "mem_max_mib": 3000.0,
                       "samples": 2}
    assert bench.summarize_samples([])["util_mean"] is None
    assert bench.GpuSampler("cpu").source is None


def test_rows_and_targets(bench):
    gpu = {"util_mean": 90.0, "util_max": 99.0, "mem_max_mib": 2048.0, "samples": 3}
    records = [
        {"model": "default", "mode": "stock", "examples": 3200, "wall_s": 1.0,
         "examples_per_s": 2000.0, "gpu": gpu},
        {"model": "default", "mode": "sweep", "per_gpu": 4, "seeds": 4, "units": 40, "runs": 28,
         "examples": 1000, "wall_s": 1.0, "examples_per_s": 10000.0,
         "window_examples_per_s": 12000.0, "gpu": gpu},
        {"model": "default", "mode": "sweep", "per_gpu": 8, "seeds": 8, "units": 80, "runs": 56,
         "examples": 1000, "wall_s": 1.0, "examples_per_s": 13000.0,
         "window_examples_per_s": None, "gpu": {"samples": 0}},
    ]
    rows = bench.table_rows(records)
    assert [row[7] for row in rows] == ["1.00x", "5.00x", "6.50x"]
    assert rows[1][-2:] == ["90 / 99", "2.0"] and rows[2][-3:] == ["n/a", "n/a", "n/a"]
    assert len(rows[0]) == len(bench.HEADER)
    lines = bench.target_lines(records)
    assert lines == ["target default: sweep >= 6x one stock process: best 6.50x at 8 per GPU "
                     "(met)"]


def _identity(**train) -> dict:
    return {"grid": {"tasks": ["RTE", "WNLI"], "seeds": [1, 2],
                     "methods": ["structured", "magnitude"], "subnets": ["good", "random", "bad"],
                     "retrain": True, "super_survivors": True},
            "train": {"epochs": 3, "max_train_examples": None, **train}}


def test_study_examples_counts_every_fine_tune(bench):
    # Per task x seed: the full fine-tune, 2 methods x 3 re-fine-tunes, 3 super-survivor ones.
    sizes = {"RTE": 2490, "WNLI": 635}
    assert bench.study_examples(_identity(), sizes) == 2 * 10 * 3 * (2490 + 635)
    assert bench.study_examples(_identity(epochs=1, max_train_examples=1000), sizes) == \
        2 * 10 * (1000 + 635)


def test_study_record_of_an_unfinished_study(bench, tmp_path):
    study, dest = tmp_path / "study", tmp_path / "dest"
    (study / ".sweep" / "done").mkdir(parents=True)
    dest.mkdir()
    (study / ".sweep" / "status.json").write_text(json.dumps({"total": 40}))
    for i, unit in enumerate(["full/RTE/1", "full/RTE/2"]):
        (study / ".sweep" / "done" / f"{i}.json").write_text(
            json.dumps({"id": unit, "time": 10.0 - i, "seconds": 5.0}))
    _result(study / "RTE" / "seed_1" / "full", train_examples=2490, config={"epochs": 3},
            train_time_s=9.0)
    (tmp_path / "smi.csv").write_text("50, 1000\n100, 2000\n")
    record = bench.study_record(study, dest, "124", 100, 100, 8, tmp_path / "smi.csv", "")
    assert record["finished"] is False and record["units_done"] == 2
    assert record["units_total"] == 40 and record["whole_study"] is None
    assert record["train_examples_per_s"] == pytest.approx(2490 * 3 / 100)
    assert record["gpu"]["util_mean"] == 75.0
    assert json.loads((dest / "time.json").read_text()) == record
    assert [u["id"] for u in json.loads((dest / "units.json").read_text())] == \
        ["full/RTE/2", "full/RTE/1"]
