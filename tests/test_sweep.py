"""The sweep (sparsebert.sweep) on a tiny random BERT and a synthetic task: grid expansion and
dependency order; an uninterrupted sweep as the reference; a sweep whose worker and driver are
killed with SIGKILL, then rerun, ends with the same summaries; a failing unit is retried and
reported; the same search directories as `sparsebert search`; the Ray backend gives the same
results as the local one; bad input fails with one line and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sparsebert.cli import main
from sparsebert.lottery.config import SearchConfig
from sparsebert.sweep import Grid, SweepConfig, SweepError, expand, sweep
from sparsebert.sweep.grid import check_order, upward_rank
from sparsebert.train import TrainConfig

SEEDS = "3,4"


def test_grid_expansion_and_order():
    grid = Grid(("RTE", "MRPC"), (1, 2, 3), ("structured", "magnitude"),
                ("good", "random", "bad"), True, True)
    units = expand(grid)
    check_order(units)  # every dependency listed before its unit
    kinds = Counter(u.kind for u in units)
    assert kinds == {"full": 6, "search": 12, "pruned": 36, "retrained": 36, "summary": 6,
                     "super-masks": 2, "super-pruned": 18, "super-retrained": 18,
                     "super-summary": 2, "report": 1}
    by_id = {u.id: u for u in units}
    # One full fine-tune per task x seed, shared by both methods' searches.
    assert by_id["search/RTE/2/structured"].deps == ["full/RTE/2"]
    assert by_id["search/RTE/2/magnitude"].deps == ["full/RTE/2"]
    assert by_id["retrained/MRPC/1/magnitude/bad"].deps == ["search/MRPC/1/magnitude"]
    assert set(by_id["super-masks/MRPC"].deps) == {f"search/MRPC/{s}/structured"
                                                    for s in (1, 2, 3)}
    assert set(by_id["summary/RTE/3"].deps) >= {"full/RTE/3", "pruned/RTE/3/magnitude/good",
                                                "retrained/RTE/3/structured/bad"}
    assert units[-1].id == "report" and len(units[-1].deps) == 8  # 6 seeds + 2 super
    rank = upward_rank(units)
    assert rank["full/RTE/1"] > rank["search/RTE/1/structured"] > \
        rank["retrained/RTE/1/structured/good"] > rank["report"]
    # No super-survivors with one seed or without s-pruning; no retraining units when off.
    assert not [u for u in expand(Grid(("RTE",), (1,), ("structured",), ("good",), True, True))
                if u.kind.startswith("super")]
    assert not [u for u in expand(Grid(("RTE",), (1, 2), ("magnitude",), ("good",), False,
                                       True)) if u.kind.startswith("super")
                or u.kind == "retrained"]


# --------------------------------------------------------------------------------------------
# Real sweeps of tiny models
# --------------------------------------------------------------------------------------------

def _configs(tiny_model_dir, synthetic_glue, **sweep_options):
    sweep_config = SweepConfig(tasks="SST-2", seeds=SEEDS, workers=2, devices="cpu",
                               reports=False, **sweep_options)
    search = SearchConfig(subnets="good,random", importance_batch_size=16)
    train = TrainConfig(model=tiny_model_dir, glue_dir=synthetic_glue, epochs=1,
                        batch_size=16, lr=2e-3, threads=1, log_every=2)
    return sweep_config, search, train


def _argv(tiny_model_dir, synthetic_glue, out):
    return ["sweep", "--tasks", "SST-2", "--seeds", SEEDS, "--workers", "2", "--devices",
            "cpu", "--no-reports", "--subnets", "good,random", "--importance-batch-size", "16",
            "--model", tiny_model_dir, "--glue-dir", synthetic_glue, "--epochs", "1",
            "--batch-size", "16", "--lr", "2e-3", "--threads", "1", "--log-every", "2",
            "--out", str(out), "--quiet"]


def _results(out: Path) -> dict:
    """Every summary.json under `out`, without the fields that differ between runs."""
    found = {}
    for path in sorted(out.rglob("summary.json")):
        data = json.loads(path.read_text())
        for key in ("written_at", "git_sha", "versions"):
            data.pop(key, None)
        data.get("full", {}).pop("train_time_s", None)
        for method in data.get("methods", {}).values():
            method.pop("search_time_s", None)
            for sub in method["subnetworks"].values():
                sub.pop("retrain_time_s", None)
        found[str(path.relative_to(out))] = data
    return found


@pytest.fixture(scope="module")
def reference(tiny_model_dir, synthetic_glue, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "reference"
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    return out, outcome


def test_reference_sweep(reference, tiny_model_dir, synthetic_glue):
    out, outcome = reference
    assert not outcome.failed and not outcome.skipped
    results = _results(out)
    assert set(results) == {"SST-2/seed_3/summary.json", "SST-2/seed_4/summary.json",
                            "SST-2/super/summary.json"}
    seed = results["SST-2/seed_3/summary.json"]
    assert seed["kind"] == "sparsebert-search" and seed["seed"] == 3
    for method in ("structured", "magnitude"):
        for sub in seed["methods"][method]["subnetworks"].values():
            assert sub["pruned"] is not None and sub["retrained"] is not None
    assert results["SST-2/super/summary.json"]["seeds"] == [3, 4]
    assert (out / "report.md").is_file()
    # A rerun of the finished sweep runs nothing and changes nothing.
    again = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert not again.done and len(again.skipped) == len(outcome.done)
    assert _results(out) == results
