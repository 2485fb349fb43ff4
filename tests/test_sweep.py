"""The sweep (sparsebert.sweep) on a tiny random BERT and a synthetic task: grid expansion and
dependency order; an uninterrupted sweep as the reference; a sweep whose worker and driver are
killed with SIGKILL, then rerun, ends with the same summaries; a failing unit is retried and
reported; the same search directories as `sparsebert search`; the Ray backend gives the same
results as the local one; bad input fails with one line and exit status 2."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from sparsebert.cli import main
from sparsebert.lottery.config import SearchConfig
from sparsebert.sweep import Grid, SweepConfig, SweepError, expand, sweep
from sparsebert.sweep.grid import check_order, upward_rank
from sparsebert.train import TrainConfig
from tests.processes import pid_alive

SEEDS = "3,4"


def test_grid_expansion_and_order():
    grid = Grid(("RTE", "MRPC"), (1, 2, 3), ("structured", "magnitude"),
                ("good", "random", "bad"), True, True)
    units = expand(grid)
    check_order(units)  # every dependency listed before its unit
    kinds = Counter(u.kind for u in units)
    assert kinds == {"full": 6, "search": 12, "pruned": 36, "retrained": 36, "summary": 6,
                     "super-masks": 2, "super-pruned": 18, "super-retrained": 18,
                     "super-summary": 2, "task-report": 2, "report": 1}
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
    # The task's report waits for every summary of the task; the sweep's report does not wait
    # for it (both read only summary files), so the two run side by side at the end.
    assert set(by_id["task-report/RTE"].deps) == {"super-summary/RTE", "summary/RTE/1",
                                                  "summary/RTE/2", "summary/RTE/3"}
    assert not [d for d in by_id["super-summary/RTE"].deps if d.startswith("summary/")]
    assert "task-report/RTE" not in units[-1].deps
    rank = upward_rank(units)
    assert rank["full/RTE/1"] > rank["search/RTE/1/structured"] > \
        rank["retrained/RTE/1/structured/good"] > rank["report"]
    # No super-survivors with one seed or without s-pruning; no retraining units when off.
    assert not [u for u in expand(Grid(("RTE",), (1,), ("structured",), ("good",), True, True))
                if u.kind.startswith("super")]
    no_super = expand(Grid(("RTE",), (1, 2), ("magnitude",), ("good",), False, True))
    assert not [u for u in no_super if u.kind.startswith("super") or u.kind == "retrained"]
    # A task report over two or more seeds, with or without super-survivors; none for one seed.
    assert [u.deps for u in no_super if u.kind == "task-report"] == [["summary/RTE/1",
                                                                       "summary/RTE/2"]]
    assert not [u for u in expand(Grid(("RTE",), (1,), ("magnitude",), ("good",), True, True))
                if u.kind == "task-report"]


def test_eta_estimates_from_finished_units():
    """A kind's estimate is its finished units' mean time; a kind not seen yet gets its weight
    times the seconds per weight over everything finished (a weighted mean, so cheap units
    with a fixed cost do not swing it)."""
    from sparsebert.sweep.scheduler import Scheduler  # noqa: PLC0415

    units = expand(Grid(("RTE",), (1, 2), ("structured",), ("good",), True, True))
    scheduler = Scheduler(units, state=None, backend=None, base={}, retries=0, progress=False)
    by_id = {u.id: u for u in units}
    assert scheduler._estimate(by_id["full/RTE/2"]) is None  # nothing finished yet
    scheduler._record(by_id["full/RTE/1"], 600.0)
    scheduler._record(by_id["search/RTE/1/structured"], 300.0)
    scheduler._record(by_id["pruned/RTE/1/structured/good"], 30.0)  # weight 0.03: 1000 s/weight
    assert scheduler._estimate(by_id["full/RTE/2"]) == 600.0
    per_weight = (600 + 300 + 30) / (1.0 + 0.5 + 0.03)
    assert scheduler._estimate(by_id["retrained/RTE/2/structured/good"]) == \
        pytest.approx(per_weight)
    assert scheduler._eta(["full/RTE/2", "retrained/RTE/2/structured/good"], {}) == \
        f"{(600 + per_weight) / 60:.0f} min"
    # With 4 slots, work that cannot spread over them takes as long as its longest chain: one
    # fine-tune left, a full fine-tune then its search (one after the other).
    scheduler.backend = types.SimpleNamespace(slots=[object()] * 4)
    assert scheduler._eta(["full/RTE/2"], {}) == "10 min"
    assert scheduler._eta(["full/RTE/2"], {"full/RTE/2": time.perf_counter() - 60}) == "9 min"
    assert scheduler._eta(["full/RTE/2", "search/RTE/2/structured"], {}) == "15 min"
    # A running unit past its estimate: the bound says so rather than standing still unmarked.
    overdue = {"full/RTE/2": time.perf_counter() - 700}
    assert scheduler._eta(["full/RTE/2", "search/RTE/2/structured"], overdue) == ">5 min"


def test_worker_data_cache(tiny_model_dir, synthetic_glue, tmp_path):
    """A worker's fine-tunes tokenize a split once; the cache is off by default."""
    from sparsebert.train import data_cache, finetune  # noqa: PLC0415

    calls = []

    def build():
        calls.append(1)
        return object()

    assert data_cache.cached("k", build) is not data_cache.cached("k", build)  # off
    data_cache.enable(size=2)
    try:
        first = data_cache.cached("a", build)
        assert data_cache.cached("a", build) is first and len(calls) == 3
        data_cache.cached("b", build), data_cache.cached("c", build)  # evicts "a"
        assert data_cache.cached("a", build) is not first
        config = TrainConfig(task="SST-2", model=tiny_model_dir, glue_dir=synthetic_glue,
                             epochs=1, batch_size=16, lr=2e-3, threads=1, seed=5,
                             max_train_examples=48)
        cached_run = finetune(config, tmp_path / "a", progress=False)
        assert len(data_cache._entries) == 2  # ("train", ...) and ("dev", ...) of this run
    finally:
        data_cache.disable()
    plain_run = finetune(config, tmp_path / "b", progress=False)
    assert cached_run.metrics == plain_run.metrics


# --------------------------------------------------------------------------------------------
# Real sweeps of tiny models
# --------------------------------------------------------------------------------------------

def _configs(tiny_model_dir, synthetic_glue, **sweep_options):
    options = {"tasks": "SST-2", "seeds": SEEDS, "workers": 2, "devices": "cpu",
               "reports": False, **sweep_options}
    sweep_config = SweepConfig(**options)
    search = SearchConfig(subnets="good", importance_batch_size=16)
    train = TrainConfig(model=tiny_model_dir, glue_dir=synthetic_glue, epochs=1,
                        batch_size=16, lr=2e-3, threads=1, log_every=2)
    return sweep_config, search, train


def _argv(tiny_model_dir, synthetic_glue, out):
    return ["sweep", "--tasks", "SST-2", "--seeds", SEEDS, "--workers", "2", "--devices",
            "cpu", "--no-reports", "--subnets", "good", "--importance-batch-size", "16",
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


def test_reports_turned_on_later_are_written(reference, tiny_model_dir, synthetic_glue,
                                             tmp_path):
    """A sweep run with --no-reports, rerun with reports on, writes the reports it skipped
    (the summaries and the task's report) and redoes nothing else."""
    out = tmp_path / "reports"
    shutil.copytree(reference[0], out)
    assert not list(out.glob("SST-2/**/report.md")) and (out / "report.md").is_file()
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue, reports=True),
                    progress=False)
    assert set(outcome.done) == {"summary/SST-2/3", "summary/SST-2/4", "task-report/SST-2",
                                 "report"}
    for where in ("SST-2/seed_3", "SST-2/seed_4", "SST-2"):
        assert (out / where / "report.md").is_file(), where
    assert _results(out) == _results(reference[0])
    # Done with reports now: neither a rerun with them nor one without redoes anything.
    for reports in (True, False):
        again = sweep(out, *_configs(tiny_model_dir, synthetic_glue, reports=reports),
                      progress=False)
        assert not again.done


def test_outputs_deleted_or_damaged_by_hand_are_made_again(reference, tiny_model_dir,
                                                           synthetic_glue, tmp_path):
    """A done unit whose output is gone (the super-survivors' folder deleted, a pruned score
    deleted, a summary damaged, a re-fine-tune's results deleted) runs again with what is
    built on it, and the sweep ends as the uninterrupted one; the run says so."""
    out = tmp_path / "deleted"
    shutil.copytree(reference[0], out)
    shutil.rmtree(out / "SST-2" / "super")
    (out / "SST-2" / "seed_3" / "structured" / "pruned" / "good.json").unlink()
    (out / "SST-2" / "seed_4" / "summary.json").write_text("{trunc")
    (out / "SST-2" / "seed_4" / "magnitude" / "retrained" / "good" / "results.json").unlink()
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert not outcome.failed
    assert {"super-masks/SST-2", "pruned/SST-2/3/structured/good", "summary/SST-2/3",
            "summary/SST-2/4", "retrained/SST-2/4/magnitude/good", "super-summary/SST-2",
            "report"} <= set(outcome.done)
    assert "full/SST-2/3" not in outcome.done and "search/SST-2/4/magnitude" not in outcome.done
    assert any("done unit(s) whose output is gone (deleted or damaged) run again" in note
               for note in outcome.notes)
    assert _results(out) == _results(reference[0])
    assert not sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False).done


def test_a_run_whose_model_is_gone_is_fine_tuned_again(reference, tiny_model_dir,
                                                       synthetic_glue, tmp_path):
    """A finished run whose model/ folder was deleted or emptied (results.json still says
    finished) is not done: a full model's folder deleted (with a stage file built on it) is
    fine-tuned again with everything built on it, a re-fine-tune without its weight file is
    fine-tuned again, and the sweep ends as the uninterrupted one (fp32 on the CPU)."""
    out = tmp_path / "model-gone"
    shutil.copytree(reference[0], out)
    shutil.rmtree(out / "SST-2" / "seed_3" / "full" / "model")
    (out / "SST-2" / "seed_3" / "structured" / "pruned" / "good.json").unlink()
    retrained = out / "SST-2" / "seed_4" / "structured" / "retrained" / "good"
    (retrained / "model" / "model.safetensors").unlink()
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert not outcome.failed
    assert {"full/SST-2/3", "search/SST-2/3/structured", "pruned/SST-2/3/structured/good",
            "retrained/SST-2/4/structured/good", "summary/SST-2/3",
            "summary/SST-2/4"} <= set(outcome.done)
    assert "full/SST-2/4" not in outcome.done
    assert (out / "SST-2" / "seed_3" / "full" / "model" / "config.json").is_file()
    assert (retrained / "model" / "model.safetensors").is_file()
    assert _results(out) == _results(reference[0])
    assert not sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False).done


def test_a_full_model_replaced_by_hand_redoes_what_was_built_on_it(reference, tiny_model_dir,
                                                                  synthetic_glue, tmp_path):
    """A seed's full model replaced by hand (other weights, its run still finished) makes its
    done full unit stale: the unit runs again, sets aside the searches and scores built on the
    old model (full_model.json records its digest) and everything built on them runs again
    on the new one; the other seed is kept, and a rerun runs nothing."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    out = tmp_path / "model-replaced"
    shutil.copytree(reference[0], out)
    seed = out / "SST-2" / "seed_3"
    weights = seed / "full" / "model" / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({name: t + 0.05 * torch.randn(t.shape, generator=generator)
               if t.is_floating_point() else t for name, t in load_file(str(weights)).items()},
              str(weights), metadata={"format": "pt"})
    old_search = (seed / "structured" / "search.json").read_bytes()
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert not outcome.failed
    assert {"full/SST-2/3", "search/SST-2/3/structured", "search/SST-2/3/magnitude",
            "pruned/SST-2/3/structured/good", "summary/SST-2/3", "super-pruned/SST-2/3/good",
            "super-summary/SST-2"} <= set(outcome.done)
    assert not any(unit.startswith(("full/SST-2/4", "search/SST-2/4"))
                   for unit in outcome.done)
    aside = next((out / "SST-2" / ".superseded").glob("full-model-seed_3-*"))
    assert (aside / "seed_3" / "structured" / "search.json").read_bytes() == old_search
    assert (aside / "super" / "pruned" / "good" / "seed_3.json").is_file()
    model = json.loads((seed / "full_model.json").read_text())["weights_sha256"]
    assert model["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    results, expected = _results(out), _results(reference[0])
    assert results["SST-2/seed_4/summary.json"] == expected["SST-2/seed_4/summary.json"]
    assert not sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False).done


def test_a_summary_replaced_by_another_json_object_is_made_again(reference, tiny_model_dir,
                                                               synthetic_glue, tmp_path):
    """A seed's summary.json replaced by a JSON object that is not a search's summary (no kind
    or version, as written by hand) is a damaged summary: its unit runs again (it was taken as
    done, "nothing to do", and the report failed on it)."""
    out = tmp_path / "replaced"
    shutil.copytree(reference[0], out)
    (out / "SST-2" / "seed_3" / "summary.json").write_text('{"x": 1}')
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert not outcome.failed and "summary/SST-2/3" in outcome.done
    assert _results(out) == _results(reference[0])


def test_only_a_summary_of_the_units_kind_and_version_counts_as_its_output(tmp_path):
    """A summary unit's output is there when summary.json holds a summary of the kind and
    version it writes; any other JSON object (or another kind's summary) is not."""
    from sparsebert.sweep.units import output_present  # noqa: PLC0415

    seed, sup = tmp_path / "SST-2" / "seed_3", tmp_path / "SST-2" / "super"
    seed.mkdir(parents=True)
    sup.mkdir()
    unit = types.SimpleNamespace(kind="summary", task="SST-2", seed=3, method=None, subnet=None)
    super_unit = types.SimpleNamespace(kind="super-summary", task="SST-2", seed=None,
                                       method=None, subnet=None)
    for content, present in [({"x": 1}, False), ([1], False),
                             ({"kind": "sparsebert-search", "version": 2}, False),
                             ({"kind": "sparsebert-super", "version": 1}, False),
                             ({"kind": "sparsebert-search", "version": 1}, True)]:
        (seed / "summary.json").write_text(json.dumps(content))
        assert output_present(tmp_path, unit, {}) is present, content
    for content, present in [({"x": 1}, False),
                             ({"kind": "sparsebert-search", "version": 1}, False),
                             ({"kind": "sparsebert-super", "version": 1}, True)]:
        (sup / "summary.json").write_text(json.dumps(content))
        assert output_present(tmp_path, super_unit, {}) is present, content


def test_seeds_listed_in_another_order_draw_as_the_first_run(reference, tiny_model_dir,
                                                              synthetic_glue, tmp_path):
    """The same seeds in another order are the same sweep, and its super-survivors (whose draw
    follows the seed order) are drawn in the order the sweep recorded: here after its super/
    folder was lost, a rerun listing the seeds backwards makes what the first run made."""
    from sparsebert.sweep.driver import _in_saved_order  # noqa: PLC0415

    out = tmp_path / "reordered"
    shutil.copytree(reference[0], out)
    shutil.rmtree(out / "SST-2" / "super")
    backwards = ",".join(reversed(SEEDS.split(",")))
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue, seeds=backwards),
                    progress=False)
    assert "super-masks/SST-2" in outcome.done and not outcome.failed
    assert _results(out) == _results(reference[0])  # super/summary.json: seeds [3, 4]
    assert _in_saved_order(out, [9, 4, 3]) == [3, 4, 9]  # added seeds after
    assert _in_saved_order(tmp_path / "new", [4, 3]) == [4, 3]


def test_report_units_without_plotting_say_so(reference, monkeypatch, tmp_path):
    """Where sparsebert.report cannot be imported (no matplotlib), the summary, task-report and
    report units warn and record reports=False, so a later run with reports redoes them."""
    from sparsebert.sweep.units import run_unit  # noqa: PLC0415

    out = tmp_path / "no-plotting"
    shutil.copytree(reference[0], out)
    for old in out.rglob("report.md"):
        old.unlink()
    monkeypatch.setitem(sys.modules, "sparsebert.report", None)  # import raises ImportError
    base = {"out": str(out), "reports": True, "attempt": 1, "device": "cpu", "threads": 1,
            "task": "SST-2", "seed": None, "method": None, "subnet": None}
    for unit in ({"id": "task-report/SST-2", "kind": "task-report"},
                 {"id": "report", "kind": "report"}):
        with pytest.warns(UserWarning, match="no report written .*matplotlib"):
            info = run_unit({**base, **unit})
        assert info["reports"] is False, unit
    assert not list(out.rglob("report.md"))


def test_report_units_under_no_reports_leave_no_stale_report(reference, tmp_path):
    """A summary or task report made again under --no-reports (after an extended grid or a
    redo) removes the report.md that described the results before, instead of keeping it."""
    from sparsebert.sweep.units import run_unit  # noqa: PLC0415

    out = tmp_path / "stale"
    shutil.copytree(reference[0], out)
    base = {"out": str(out), "reports": False, "attempt": 1, "device": "cpu", "threads": 1,
            "task": "SST-2", "seed": None, "method": None, "subnet": None}
    stale = out / "SST-2" / "report.md"
    stale.write_text("# the report over seeds 3 and 4 only\n")
    (out / "SST-2" / "figures").mkdir(exist_ok=True)
    (out / "SST-2" / "figures" / "pruning_curves.png").write_bytes(b"old")
    info = run_unit({**base, "id": "task-report/SST-2", "kind": "task-report"})
    assert info["reports"] is False and not stale.exists()
    assert not (out / "SST-2" / "figures").exists()  # its figures with it
    assert (out / "SST-2" / "seed_3" / "summary.json").is_file()  # the results stay


def test_sweep_report_missed_for_lack_of_plotting_is_written_on_rerun(reference, tiny_model_dir,
                                                                      synthetic_glue, tmp_path):
    """The sweep's report.md is always written: a report unit that could not write it (no
    matplotlib) runs again on a rerun, even with --no-reports."""
    out = tmp_path / "late-report"
    shutil.copytree(reference[0], out)
    marker = out / ".sweep" / "done" / "report.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "reports": False}))
    (out / "report.md").unlink()
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert set(outcome.done) == {"report"} and (out / "report.md").is_file()


def test_same_directories_as_search(reference, tiny_model_dir, synthetic_glue, tmp_path):
    """A seed's directory in the sweep is the one `sparsebert search` writes."""
    from sparsebert.lottery import search  # noqa: PLC0415

    _, search_config, train = _configs(tiny_model_dir, synthetic_glue)[:3]
    train.device, train.seed = "cpu", 3
    search("SST-2", tmp_path / "search", search_config=search_config, train_config=train,
           progress=False)
    mine = _results(tmp_path)["search/summary.json"]
    assert mine == _results(reference[0])["SST-2/seed_3/summary.json"]


def _wait_for(condition, timeout: float = 300.0, what: str = ""):
    """The condition's first true value; AssertionError after `timeout` seconds (a liveness
    bound, not a speed check: a loaded 2-core machine starts Ray and a first unit slowly)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _status(out: Path) -> dict:
    try:
        return json.loads((out / ".sweep" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _done(out: Path) -> dict:
    found = {}
    for path in (out / ".sweep" / "done").glob("*.json"):
        info = json.loads(path.read_text())
        found[info["id"]] = info
    return found


@contextlib.contextmanager
def _sweep_process(tiny_model_dir, synthetic_glue, out: Path, *flags: str):
    """`python -m sparsebert sweep ... [flags]` running on `out` (stderr piped); killed on the
    way out if still running."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    driver = subprocess.Popen([sys.executable, "-m", "sparsebert",
                               *_argv(tiny_model_dir, synthetic_glue, out), *flags], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.communicate()


def _rerun_gives_the_reference(reference, tiny_model_dir, synthetic_glue, out: Path) -> None:
    """Rerunning the interrupted sweep skips what was done and ends with the reference's
    results."""
    before = _done(out)
    assert 0 < len(before) < len(reference[1].done)
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    assert not outcome.failed and set(outcome.skipped) == set(before)
    assert _results(out) == _results(reference[0])


def test_kill_worker_and_driver_then_rerun(reference, tiny_model_dir, synthetic_glue,
                                           tmp_path):
    """SIGKILL a worker while it runs a unit (it is retried on a fresh worker), then the
    driver (its workers exit with it); the rerun ends with the reference's results."""
    out = tmp_path / "killed"
    with _sweep_process(tiny_model_dir, synthetic_glue, out) as driver:
        # A full fine-tune is running (its worker is still importing torch, or training).
        victim_unit, where = _wait_for(lambda: next(
            ((u, w) for u, w in _status(out).get("running", {}).items()
             if u.startswith("full/")), None), what="a running full fine-tune")
        os.kill(where["pid"], signal.SIGKILL)
        marker = _wait_for(lambda: _done(out).get(victim_unit), what="the retried unit")
        assert marker["attempts"] == 2  # failed once (worker died), then done
        _wait_for(lambda: len(_done(out)) >= 8, what="more units")
        workers = [w["pid"] for w in _status(out).get("running", {}).values()]
        driver.kill()
        driver.wait(timeout=30)
        _wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=20,
                  what="the workers to exit with the driver")
    assert len(_done(out)) >= 8
    _rerun_gives_the_reference(reference, tiny_model_dir, synthetic_glue, out)


def test_sigterm_stops_the_sweep_cleanly_then_rerun(reference, tiny_model_dir, synthetic_glue,
                                                   tmp_path):
    """SIGTERM to the driver (kill, a scheduler's time limit) stops it as Ctrl-C does: its
    busy workers are stopped at once, sweep.json records the run as interrupted, exit status
    143 with a one-line message; the rerun ends with the reference's results."""
    out = tmp_path / "terminated"
    with _sweep_process(tiny_model_dir, synthetic_glue, out) as driver:
        _wait_for(lambda: len(_done(out)) >= 4 and _status(out).get("running"),
                  what="units done and running")
        workers = [w["pid"] for w in _status(out)["running"].values()]
        stopped_at = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=30)
        assert time.monotonic() - stopped_at < 15  # no wait for the running units to end
        _wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10,
                  what="the workers to stop")
    assert driver.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated; rerun the same command to resume"
    assert "Traceback" not in stderr and "leaked" not in stderr
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs[-1]["status"] == "interrupted" and "finished_at" in runs[-1]
    assert _status(out)["running"] == {} and _status(out)["sweep"] == "interrupted"
    _rerun_gives_the_reference(reference, tiny_model_dir, synthetic_glue, out)


def _forget(out: Path, *unit_ids: str) -> None:
    """Delete units' outputs and markers; the sweep itself redoes what was done after them
    (the summaries and reports: SweepDir.drop_stale)."""
    for unit_id in unit_ids:
        kind, task, seed, *rest = unit_id.split("/")
        if kind == "retrained":
            shutil.rmtree(out / task / f"seed_{seed}" / rest[0] / "retrained" / rest[1])
        elif kind == "super-retrained":
            shutil.rmtree(out / task / "super" / "retrained" / rest[0] / f"seed_{seed}")
        (out / ".sweep" / "done" / (unit_id.replace("/", "~") + ".json")).unlink()


def test_no_more_workers_than_units_left(reference, tiny_model_dir, synthetic_glue, tmp_path,
                                        monkeypatch):
    """--workers 8 with two units left to run (the task's report and the sweep's): two worker
    processes start, not eight."""
    import sparsebert.sweep.driver as driver  # noqa: PLC0415

    out = tmp_path / "few"
    shutil.copytree(reference[0], out)
    for unit_id in ("task-report/SST-2", "report"):
        (out / ".sweep" / "done" / (unit_id.replace("/", "~") + ".json")).unlink()
    started = []
    real = driver.LocalBackend

    def counting(slots):
        started.append(len(slots))
        return real(slots)

    monkeypatch.setattr(driver, "LocalBackend", counting)
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue, workers=8), progress=False)
    assert set(outcome.done) == {"task-report/SST-2", "report"} and started == [2]


def test_failing_unit_is_retried_and_reported(reference, tiny_model_dir, synthetic_glue,
                                              tmp_path, monkeypatch, capsys):
    out = tmp_path / "failing"
    shutil.copytree(reference[0], out)
    flaky, broken = "retrained/SST-2/4/magnitude/good", "super-retrained/SST-2/4/good"
    _forget(out, flaky, broken)
    # flaky fails on its first attempt only (retried, done); broken on every attempt
    # (reported, exit status 1); the seed's summary, made before flaky was forgotten, is redone
    # after it; the super summary and both reports (the task's, the sweep's) wait.
    monkeypatch.setenv("SPARSEBERT_SWEEP_FAIL", f"{flaky}:1, super-retrained/*:9")
    assert main(_argv(tiny_model_dir, synthetic_glue, out) + ["--retries", "2", "--workers",
                                                               "1"]) == 1
    printed = capsys.readouterr().out
    assert "2 units done, 18 already done, 1 failed, 3 blocked by failures, 2 retried" in printed
    assert f"failed {broken} (3 attempts): InjectedFailure" in printed
    failed = json.loads((out / ".sweep" / "failed" / f"{broken.replace('/', '~')}.json")
                        .read_text())
    assert "SPARSEBERT_SWEEP_FAIL" in failed["error"] and failed["attempts"] == 3
    done = _done(out)
    assert done[flaky]["attempts"] == 2 and "summary/SST-2/4" in done
    assert "super-summary/SST-2" not in done and "report" not in done
    # Fixed: the rerun does only what is left, and ends as the reference.
    monkeypatch.delenv("SPARSEBERT_SWEEP_FAIL")
    outcome = sweep(out, *_configs(tiny_model_dir, synthetic_glue, workers=1), progress=False)
    assert set(outcome.done) == {broken, "super-summary/SST-2", "task-report/SST-2", "report"}
    assert not (out / ".sweep" / "failed" / f"{broken.replace('/', '~')}.json").exists()
    assert _results(out) == _results(reference[0])


# --------------------------------------------------------------------------------------------
# The sweep directory's grid, and bad input
# --------------------------------------------------------------------------------------------

def test_changed_grid_refused_added_seeds_extend(reference, tiny_model_dir, synthetic_glue,
                                                 tmp_path, capsys):
    out = tmp_path / "grid"
    shutil.copytree(reference[0], out)
    before = sorted(p.name for p in (out / ".sweep" / "done").iterdir())
    argv = _argv(tiny_model_dir, synthetic_glue, out)
    changed = [a if a != "1" or argv[i - 1] != "--epochs" else "2" for i, a in enumerate(argv)]
    assert main(changed + ["--seeds", "4", "--methods", "structured"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another grid" in err
    for part in ("methods: ['structured', 'magnitude'] -> ['structured']", "epochs: 1 -> 2",
                 "seeds: [3, 4] -> [4] ([3] missing)"):
        assert part in err
    assert sorted(p.name for p in (out / ".sweep" / "done").iterdir()) == before
    # The refused call did not keep the directory's lock (the Python API, refused then fixed).
    from sparsebert.sweep.state import SweepDir, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    search.method = "both"
    train = train.resolved()
    refused = SweepDir(out)
    with pytest.raises(SweepError, match="holds another grid"):
        refused.open(identity(Grid(("SST-2",), (4,), ("structured", "magnitude"), ("good",),
                                   True, True), search, train))
    assert refused._lock is None
    # Added seeds extend it: the old super-survivors move aside (to be redone), said so.
    grid = Grid(("SST-2",), (3, 4, 5), ("structured", "magnitude"), ("good",), True, True)
    state = SweepDir(out)
    notes = state.open(identity(grid, search, train))
    done = state.drop_stale(expand(grid))
    state.close("finished")
    assert notes[0] == "extending the sweep: adding tasks none, seeds [5]"
    assert "super-survivors of seeds [3, 4] moved" in notes[1]
    assert not (out / "SST-2" / "super").exists()
    assert not [p for p in (out / ".sweep" / "done").iterdir() if p.name.startswith("super")]
    assert (out / ".sweep" / "done" / "summary~SST-2~4.json").is_file()
    # What was made from the old seeds' results is redone; the seeds' own results are kept.
    assert "summary/SST-2/4" in done and "full/SST-2/3" in done
    assert "task-report/SST-2" not in done and "report" not in done
    assert not (out / ".sweep" / "done" / "report.json").exists()


def test_a_failed_unit_leaves_no_changed_model_behind(tiny_model_dir, synthetic_glue, tmp_path,
                                                     monkeypatch):
    """A magnitude search that raises half-way (a CUDA OOM, say) restores the fine-tuned
    weights it had pruned, and the worker drops its warm searches, so a retry on the same
    worker starts from the fine-tuned model."""
    from sparsebert.lottery.search import Search  # noqa: PLC0415
    from sparsebert.sweep import units  # noqa: PLC0415

    search = SearchConfig(method="magnitude", subnets="good", importance_batch_size=16)
    train = TrainConfig(model=tiny_model_dir, glue_dir=synthetic_glue, epochs=1,
                        batch_size=16, lr=2e-3, threads=1).resolved()
    base = {"out": str(tmp_path), "search": search.to_json(), "train": train.to_json(),
            "seeds": [3], "reports": False, "device": "cpu", "threads": 1, "task": "SST-2",
            "seed": 3, "method": "magnitude", "subnet": None, "attempt": 1}
    units.run_unit({**base, "id": "full/SST-2/3", "kind": "full", "method": None})
    spec = {**base, "id": "search/SST-2/3/magnitude", "kind": "search"}
    model = units._search(spec, 3).fine_tuned_plain()  # the worker's warm fine-tuned model
    before = {name: value.clone() for name, value in model.state_dict().items()}

    scored, real_score = [], Search.score

    def out_of_memory(self, scored_model):  # the first score of a pruned model (the full
        scored.append(True)  # model's comes first)
        if len(scored) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_score(self, scored_model)

    monkeypatch.setattr(Search, "score", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        units.run_unit(spec)
    assert not units._warm
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not (tmp_path / "SST-2" / "seed_3" / "magnitude" / "search.json").exists()


def test_repeated_subnets_are_one_unit_each():
    assert SearchConfig(subnets="good,bad,good").subnet_list() == ["good", "bad"]
    grid = Grid(("SST-2",), (3,), ("magnitude",),
                tuple(SearchConfig(subnets="good,good").subnet_list()), True, False)
    ids = [u.id for u in expand(grid)]
    assert len(ids) == len(set(ids))


def test_the_same_subnets_in_another_order_are_the_same_grid(tiny_model_dir, synthetic_glue):
    """--subnets bad,good and good,bad build the same units: a sweep directory written with one
    order (or by an older version, which kept the order given) accepts the other."""
    from sparsebert.sweep.state import compare, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    train = train.resolved()

    def ident(subnets):
        return identity(Grid(("SST-2",), (3,), ("magnitude",), subnets, True, False), search,
                        train)

    assert compare(ident(("good", "bad")), ident(("bad", "good"))) == ([], [])
    with pytest.raises(SweepError, match=r"subnets: \['good', 'bad'\] -> \['good'\]"):
        compare(ident(("good", "bad")), ident(("good",)))


def test_redo_a_method(reference, tiny_model_dir, synthetic_glue, tmp_path, capsys):
    """--redo structured sets the s-pruning results aside and computes them (and the
    super-survivors, summaries and reports built on them) again, keeping the full models and
    m-pruning; the redone results equal the reference's and no stale curve record survives."""
    out = tmp_path / "redo"
    shutil.copytree(reference[0], out)
    for seed in SEEDS.split(","):  # mark the old s-pruning curve so that leftovers show
        log = out / "SST-2" / f"seed_{seed}" / "metrics.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(r.get("method") == "structured" for r in records)
        log.write_text("".join(json.dumps({**r, "stale": True} if r.get("method") ==
                                          "structured" else r) + "\n" for r in records))
    (out / "SST-2" / "speed").mkdir()  # timings of the old subnetworks
    argv = [a for a in _argv(tiny_model_dir, synthetic_glue, out) if a != "--quiet"]
    assert main(argv + ["--redo", "structured"]) == 0  # not quiet: the notes are printed
    err = capsys.readouterr().err
    assert "--redo structured: set aside 2 searches and SST-2/super, SST-2/speed in " in err
    assert "re-time the subnetworks with `sparsebert speed --run`" in err
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs[-1]["redo"] == ["structured"] and runs[-1]["status"] == "finished"
    def finish_times(sweep_dir):
        markers = [json.loads(p.read_text()) for p in (sweep_dir / ".sweep" / "done").iterdir()]
        return {m["id"]: m["time"] for m in markers}

    done, before = finish_times(out), finish_times(reference[0])
    assert set(done) == set(before)
    redone = {u for u in done if done[u] != before[u]}
    expected = {f"{kind}/SST-2/{seed}/structured{sub}" for seed in SEEDS.split(",")
                for kind, sub in (("search", ""), ("pruned", "/good"), ("retrained", "/good"))}
    expected |= {f"{kind}/SST-2/{seed}{sub}" for seed in SEEDS.split(",")
                 for kind, sub in (("summary", ""), ("super-pruned", "/good"),
                                   ("super-retrained", "/good"))}
    expected |= {"super-masks/SST-2", "super-summary/SST-2", "task-report/SST-2", "report"}
    assert redone == expected  # not the full models, nor m-pruning
    assert _results(out) == _results(reference[0])
    aside = next((out / ".sweep" / "superseded").glob("redo-structured-*"))
    assert (aside / "SST-2" / "seed_3" / "structured" / "search.json").is_file()
    assert (aside / "SST-2" / "super" / "summary.superseded.json").is_file()
    assert (aside / "SST-2" / "speed").is_dir() and not (out / "SST-2" / "speed").exists()
    for seed in SEEDS.split(","):
        records = [json.loads(line) for line in
                   (out / "SST-2" / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(line) for line in (reference[0] / "SST-2" / f"seed_{seed}" /
                                              "metrics.jsonl").read_text().splitlines()]
        assert not any(r.get("stale") for r in records)
        assert records == ref  # the curves in METHODS order, whichever search ended first
        assert len(records) == len(ref)  # the m-pruning curve kept, the s one written anew


def test_redo_with_changed_method_settings(reference, tiny_model_dir, synthetic_glue, tmp_path,
                                           capsys):
    """A search setting that only one method uses may change along with --redo of that method:
    its results are redone under the new setting, recorded in sweep.json and in the searches'
    config.json; without the --redo the change is refused, naming the --redo it needs."""
    out = tmp_path / "redo-settings"
    shutil.copytree(reference[0], out)
    argv = _argv(tiny_model_dir, synthetic_glue, out) + ["--magnitude-amount", "0.3"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "magnitude_amount: 0.1 -> 0.3" in err and "add --redo magnitude" in err
    assert main(argv + ["--redo", "structured"]) == 2  # not the method the setting belongs to
    assert "add --redo magnitude" in capsys.readouterr().err
    assert main(argv + ["--redo", "magnitude"]) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["identity"]["search"]["magnitude_amount"] == 0.3
    assert saved["runs"][-1]["status"] == "finished"
    results, before = _results(out), _results(reference[0])
    for seed in SEEDS.split(","):
        folder = out / "SST-2" / f"seed_{seed}"
        config = json.loads((folder / "config.json").read_text())
        assert config["search"]["magnitude_amount"] == 0.3
        assert config["train"] == json.loads((reference[0] / "SST-2" / f"seed_{seed}" /
                                              "config.json").read_text())["train"]
        summary, old = (r[f"SST-2/seed_{seed}/summary.json"] for r in (results, before))
        assert summary["config"]["search"]["magnitude_amount"] == 0.3
        assert summary["full"] == old["full"]
        assert summary["methods"]["structured"] == old["methods"]["structured"]
        steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["method"] == "magnitude"]
        assert steps[1]["fraction_kept"] == pytest.approx(0.7, abs=0.01)  # 30% per step
    assert main(_argv(tiny_model_dir, synthetic_glue, out)) == 2  # the new setting is the grid's
    assert main(argv) == 0  # and a rerun with it has nothing to do


def _copied_sweep(reference, tiny_model_dir, synthetic_glue, out):
    """(out, identity): a copy of the reference sweep in `out` and the identity of its grid."""
    from sparsebert.sweep.state import identity  # noqa: PLC0415

    shutil.copytree(reference[0], out)
    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    search.method = "both"
    grid = Grid(("SST-2",), (3, 4), ("structured", "magnitude"), ("good",), True, True)
    return out, identity(grid, search, train.resolved())


def test_foreign_files_among_the_done_markers_are_ignored(tmp_path):
    """A file in .sweep/done that is no marker (not JSON, not UTF-8, JSON without a unit id)
    is ignored: its unit, if any, runs again; the markers beside it are read."""
    from sparsebert.sweep.state import SweepDir, marker_name  # noqa: PLC0415

    done = tmp_path / ".sweep" / "done"
    done.mkdir(parents=True)
    (done / marker_name("full/SST-2/3")).write_text(json.dumps({"id": "full/SST-2/3"}))
    (done / "notes.json").write_text(json.dumps({"written": "by hand"}))
    (done / "list.json").write_text("[1, 2]")
    (done / "binary.json").write_bytes(b"\xff\xfe\x00")
    (done / "cut.json").write_text('{"id": "search/SST-2/3/structu')
    assert list(SweepDir(tmp_path).done()) == ["full/SST-2/3"]


def test_interrupted_redo_resumes(reference, tiny_model_dir, synthetic_glue, tmp_path):
    """Rerunning the same --redo after an interrupted one resumes it (nothing more is set
    aside); a --redo after a finished run starts a new one (here with nothing left to redo)."""
    from sparsebert.sweep.state import SweepDir  # noqa: PLC0415

    out, ident = _copied_sweep(reference, tiny_model_dir, synthetic_glue, tmp_path / "redo")
    superseded = out / ".sweep" / "superseded"
    for status, expect_note in (("interrupted", "set aside 2 searches"),
                                ("finished", "resuming the redo started at"),
                                ("finished", "no finished structured results to redo")):
        state = SweepDir(out)
        notes = state.open(ident, ("structured",))
        state.close(status)
        assert expect_note in notes[-1], notes
        assert len(list(superseded.glob("redo-structured-*"))) == 1
        assert not (out / "SST-2" / "seed_3" / "structured").exists()
        assert not (out / ".sweep" / "done" / "search~SST-2~3~structured.json").exists()
        assert (out / ".sweep" / "done" / "search~SST-2~3~magnitude.json").exists()


def test_a_redo_resumes_across_unfinished_runs_without_redo(reference, tiny_model_dir,
                                                             synthetic_glue, tmp_path):
    """--redo interrupted, then a plain rerun that fails or is interrupted, then the same --redo:
    the redo resumes (nothing more set aside); once a plain rerun finishes, it is done."""
    from sparsebert.sweep.state import SweepDir  # noqa: PLC0415

    out, ident = _copied_sweep(reference, tiny_model_dir, synthetic_glue, tmp_path / "redo")
    superseded = out / ".sweep" / "superseded"

    def start(redo: tuple[str, ...], status: str) -> list[str]:
        state = SweepDir(out)
        notes = state.open(ident, redo)
        state.close(status)
        return notes

    assert "set aside 2 searches" in start(("structured",), "interrupted")[-1]
    start((), "failed")
    start((), "interrupted")
    assert "resuming the redo started at" in start(("structured",), "interrupted")[-1]
    assert len(list(superseded.glob("redo-structured-*"))) == 1
    start((), "finished")
    assert "no finished structured results to redo" in start(("structured",), "finished")[-1]


def test_a_redo_resumes_only_under_its_own_settings(reference, tiny_model_dir, synthetic_glue,
                                                      tmp_path):
    """An interrupted --redo magnitude under one amount, rerun with another: the results made
    under the first are set aside too (not resumed); rerun under the same: resumed."""
    from sparsebert.sweep.state import SweepDir, identity  # noqa: PLC0415

    out = tmp_path / "redo-amounts"
    shutil.copytree(reference[0], out)
    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    search.method = "both"
    grid = Grid(("SST-2",), (3, 4), ("structured", "magnitude"), ("good",), True, True)

    def open_with(amount: float) -> list[str]:
        search.magnitude_amount = amount
        state = SweepDir(out)
        notes = state.open(identity(grid, search, train.resolved()), ("magnitude",))
        state.close("interrupted")
        return notes

    assert "set aside 2 searches" in open_with(0.3)[-1]
    # Units of the interrupted redo had searched seed 3 again, under 0.3.
    shutil.copytree(reference[0] / "SST-2" / "seed_3" / "magnitude",
                    out / "SST-2" / "seed_3" / "magnitude")
    assert "--redo magnitude: set aside 1 searches" in open_with(0.5)[-1]
    assert "resuming the redo" in open_with(0.5)[-1]


def test_a_redo_cut_short_is_completed_on_the_next_start(reference, tiny_model_dir,
                                                         synthetic_glue, tmp_path):
    """A kill after the redo was recorded but before its results were all aside and the
    searches' config.json rewritten: the next start completes it, even without --redo."""
    from sparsebert.sweep.state import SweepDir, identity  # noqa: PLC0415

    out = tmp_path / "redo-cut"
    shutil.copytree(reference[0], out)
    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    search.method, search.magnitude_amount = "both", 0.3
    grid = Grid(("SST-2",), (3, 4), ("structured", "magnitude"), ("good",), True, True)
    ident = identity(grid, search, train.resolved())
    recorded = []

    def killed(methods):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SweepDir(out).open(ident, ("magnitude",), after_redo=killed)
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs[-1]["redo"] == ["magnitude"] and runs[-1]["set_aside"] is False
    state = SweepDir(out)
    notes = state.open(ident, (), after_redo=recorded.append)
    state.close("finished")
    assert "completing the --redo magnitude started at" in notes[0]
    assert recorded == [("magnitude",)]
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs[-1]["set_aside"] is True and runs[-1]["redo"] == ["magnitude"]
    assert not (out / "SST-2" / "seed_3" / "magnitude").exists()


def test_a_redo_killed_while_moving_results_aside_is_completed(reference, tiny_model_dir,
                                                                synthetic_glue, tmp_path,
                                                                monkeypatch):
    """A kill after one seed's s-pruning results were moved aside and before the rest: the
    rerun redoes that seed too (its completion markers went before its results did) and ends
    with the reference's results."""
    import sparsebert.sweep.state as state_module  # noqa: PLC0415

    out = tmp_path / "redo-killed"
    shutil.copytree(reference[0], out)
    real_set_aside = state_module.set_aside

    def killed_midway(root, roots, searches, methods, aside):
        real_set_aside(root, roots, searches[:1], methods, aside)
        raise KeyboardInterrupt

    monkeypatch.setattr(state_module, "set_aside", killed_midway)
    argv = _argv(tiny_model_dir, synthetic_glue, out) + ["--redo", "structured"]
    assert main(argv) == 130  # interrupted
    monkeypatch.setattr(state_module, "set_aside", real_set_aside)
    assert not (out / "SST-2" / "seed_3" / "structured").exists()
    assert main(argv) == 0
    assert _results(out) == _results(reference[0])


def test_a_sweep_killed_in_its_first_write_starts_afresh(tiny_model_dir, synthetic_glue,
                                                          tmp_path):
    """A kill before the first sweep.json was in place leaves .sweep/lock and .sweep.json.tmp:
    the rerun starts the sweep; any other content is still refused."""
    from sparsebert.sweep.state import SweepDir, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    search.method = "both"
    ident = identity(Grid(("SST-2",), (3,), ("structured", "magnitude"), ("good",), True, True),
                     search, train.resolved())
    out = tmp_path / "cut"
    (out / ".sweep").mkdir(parents=True)
    (out / ".sweep" / "lock").touch()
    (out / ".sweep.json.tmp").write_text('{"kind": "sparsebert-sw')
    state = SweepDir(out)
    assert state.open(ident) == []
    state.close("finished")
    assert json.loads((out / "sweep.json").read_text())["identity"] == ident
    other = tmp_path / "other"
    (other / ".sweep").mkdir(parents=True)
    (other / ".sweep" / "lock").touch()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="not empty and not a sweep directory"):
        SweepDir(other).open(ident)


def test_sweep_json_is_read_under_the_lock(tiny_model_dir, synthetic_glue, tmp_path,
                                           monkeypatch):
    """A driver that finished (and released the lock) between this one's first look at
    sweep.json and its lock: its run is kept on record, not overwritten by the older read."""
    from sparsebert.sweep.state import SweepDir, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    search.method = "both"
    ident = identity(Grid(("SST-2",), (3,), ("structured", "magnitude"), ("good",), True, True),
                     search, train.resolved())
    out = tmp_path / "raced"
    first = SweepDir(out)
    first.open(ident)
    first.close("finished")
    take_lock = SweepDir._take_lock

    def other_driver_runs_first(self):
        other = SweepDir(self.out)
        take_lock(other)
        other._claim(other._read_saved(), ident, (), None)
        other.close("finished by the other driver")
        take_lock(self)

    monkeypatch.setattr(SweepDir, "_take_lock", other_driver_runs_first)
    state = SweepDir(out)
    state.open(ident)
    state.close("finished")
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["finished", "finished by the other driver",
                                                "finished"]


def test_report_skips_hidden_folders(reference, tmp_path):
    """A summary under a hidden folder (a sweep's .sweep/superseded/) is not a report input."""
    from sparsebert.report.summaries import find_summaries  # noqa: PLC0415

    out = tmp_path / "hidden"
    shutil.copytree(reference[0], out)
    hidden = out / ".sweep" / "superseded" / "old" / "summary.json"
    hidden.parent.mkdir(parents=True)
    shutil.copy(out / "SST-2" / "super" / "summary.json", hidden)
    found = find_summaries([out])
    assert hidden.resolve() not in found and len(found) == 3
    assert find_summaries([hidden]) == [hidden.resolve()]  # named explicitly: read


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "RTE,FOO"], "--tasks 'RTE,FOO': unknown GLUE task 'FOO'"),
    (["--methods", "structured,lottery"], "--methods 'structured,lottery': unknown"),
    (["--devices", "cuda:7"], "--devices 'cuda:7': cuda:7: "),
    (["--seeds", "1,1"], "expected distinct seeds"),
    (["--seeds", "3_0,4"], "--seeds '3_0,4': expected comma-separated integers"),
    (["--seeds", "1,\u0663"], "expected comma-separated integers"),  # Arabic-Indic 3
    (["--seeds", "1,-2"], "--seeds '1,-2': expected integers in [0, 2**64 - 1]"),
    (["--backend", "spark"], "--backend 'spark'"),
    (["--methods", "structured", "--redo", "magnitude"],
     "--redo 'magnitude': ['magnitude'] not among the sweep's --methods (structured)"),
    (["--redo", ","], "--redo ',': expected a comma-separated list"),
    (["--unit-memory-gb", "nan"], "--unit-memory-gb nan: expected a finite number >= 0"),
    (["--unit-memory-gb", "inf"], "--unit-memory-gb inf: expected a finite number >= 0"),
    (["--per-gpu", "20000"], "--per-gpu 20000: expected 1 to 256 units per GPU"),
    (["--unit-timeout", "soon"], "--unit-timeout 'soon': expected a positive number of "
                                 "seconds, or one with s, m or h (e.g. 90m, 2h)"),
    (["--unit-timeout", "0m"], "--unit-timeout '0m': expected a positive number"),
    (["--unit-timeout", "h"], "--unit-timeout 'h': expected a positive number"),
    (["--unit-timeout", "inf"], "--unit-timeout 'inf': expected a positive number"),
])
def test_bad_input_one_line_exit_2(flags, message, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["sweep", "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("text, seconds", [
    (None, None), ("45", 45.0), ("45s", 45.0), ("90m", 5400.0), ("1.5h", 5400.0),
    (" 2H ", 7200.0), (3600, 3600.0)])
def test_unit_timeout_units(text, seconds):
    assert SweepConfig(unit_timeout=text).validate().timeout_seconds() == seconds


def test_an_out_that_cannot_be_made_is_named(tmp_path, tiny_model_dir, synthetic_glue,
                                             capsys):
    """--out below a file: one line naming --out and why, exit status 2."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    argv = _argv(tiny_model_dir, synthetic_glue, out)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--out {out}: cannot create it (Not a directory)"), err


def test_flags_without_effect_on_this_backend_are_named(monkeypatch):
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415

    with pytest.warns(UserWarning, match=r"--unit-memory-gb 5: reserved by Ray tasks only "
                                         r"\(--backend ray\); ignored with --backend local"):
        SweepConfig(unit_memory_gb=5.0).validate()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with pytest.warns(UserWarning, match=r"--per-gpu 8: no GPU among --devices \(cpu\); "
                                         r"ignored"):
        make_slots(SweepConfig(per_gpu=8, devices="cpu", workers=1), TrainConfig())


def test_slots_are_no_more_than_the_units(monkeypatch):
    """A huge --workers makes no more slots than the grid has units (it used to build them
    all first); their threads stay those of the full width."""
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # (where there is no affinity API)
    with pytest.warns(UserWarning, match="compete for the cores"):
        slots = make_slots(SweepConfig(workers=10**20, devices="cpu"), TrainConfig(), None, 3)
    assert [(s.index, s.threads) for s in slots] == [(0, 1), (1, 1), (2, 1)]
    slots = make_slots(SweepConfig(workers=4, devices="cpu"), TrainConfig(), None, 1)
    assert [(s.index, s.threads) for s in slots] == [(0, 1)]


def test_the_closing_status_counts_the_markers(tmp_path):
    """A unit that finished after the last status.json was written (an interrupt between the
    two) is counted when the sweep closes."""
    from sparsebert.sweep.state import SweepDir  # noqa: PLC0415

    state = SweepDir(tmp_path / "s")
    state.open({"grid": 1})
    state.write_status({"running": {"full/SST-2/3": {"slot": 0}}, "done": 0, "failed": [],
                        "total": 3})
    state.mark_done("full/SST-2/3", {"seconds": 1.0})
    state.close("interrupted")
    status = json.loads((tmp_path / "s" / ".sweep" / "status.json").read_text())
    assert status["done"] == 1 and status["running"] == {} and status["sweep"] == "interrupted"


def test_a_script_that_calls_sweep_unguarded_gets_the_way_out(tmp_path, tiny_model_dir,
                                                             synthetic_glue):
    """Workers are spawned: each imports the main script. One that calls sweep() at its top
    level used to fail every unit with "worker died with exit code 1" (the nested sweep only
    met the lock); now the sweep stops at once and says what to do, no unit marked failed."""
    out = tmp_path / "unguarded"
    script = tmp_path / "run_sweep.py"
    script.write_text(
        "from sparsebert.lottery.config import SearchConfig\n"
        "from sparsebert.sweep import SweepConfig, sweep\n"
        "from sparsebert.train import TrainConfig\n"
        f"sweep({str(out)!r}, SweepConfig(tasks='SST-2', seeds='3', workers=1, "
        "devices='cpu', reports=False), SearchConfig(subnets='good'), "
        f"TrainConfig(model={tiny_model_dir!r}, glue_dir={synthetic_glue!r}, epochs=1, "
        "threads=1), progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert ("SweepError: sweep() was called again while a worker imported the script that "
            "calls it") in done.stderr and 'under `if __name__ == "__main__":`' in done.stderr
    assert not list((out / ".sweep").glob("failed/*.json"))
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs[-1]["status"].startswith("refused: sweep() was called again")


def test_sweep_help_says_what_workers_and_devices_mean_on_a_ray_cluster():
    """--help of --workers and --devices as they behave on a Ray cluster (--ray-address): the
    default width is the cluster's CPUs / --threads, not capped at 4 as on this machine, and
    only cpu, cuda or auto are devices there (the example cuda:0,cuda:1 is refused)."""
    from sparsebert.cli import build_parser  # noqa: PLC0415
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415

    actions = build_parser().command_parsers["sweep"]._actions
    helps = {a.option_strings[0]: " ".join(a.help.split()) for a in actions if a.option_strings}
    assert "on a Ray cluster (--ray-address): its CPUs / --threads, not capped" \
        in helps["--workers"]
    assert "on a Ray cluster (--ray-address) cpu, cuda (Ray assigns the GPUs) or auto" \
        in helps["--devices"]
    cluster = {"CPU": 16.0}  # what the help says, as the sweep does it
    assert len(make_slots(SweepConfig(devices="cpu", ray_address="h:6379"),
                          TrainConfig(threads=2), cluster)) == 8
    with pytest.raises(SweepError, match="Ray assigns the GPUs; pass --devices cuda"):
        make_slots(SweepConfig(devices="cuda:0,cuda:1", ray_address="h:6379"), TrainConfig(),
                   {"CPU": 16.0, "GPU": 2.0})
    assert len(make_slots(SweepConfig(devices="cuda", ray_address="h:6379", per_gpu=2),
                          TrainConfig(), {"CPU": 16.0, "GPU": 2.0})) == 4


def test_stop_after_steps_refused(tmp_path, capsys):
    """Every fine-tune would stop at that step and fail for good: not a sweep flag, and
    refused by the Python API before anything is written."""
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--out", str(tmp_path / "s"), "--stop-after-steps", "5"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --stop-after-steps 5" in capsys.readouterr().err
    with pytest.raises(SweepError, match="stop_after_steps does not apply to a sweep"):
        sweep(tmp_path / "s", SweepConfig(tasks="SST-2", seeds="3"),
              train_config=TrainConfig(stop_after_steps=2), progress=False)
    assert not (tmp_path / "s").exists()


def test_config_file(tmp_path):
    from sparsebert.sweep.config import read_config_file  # noqa: PLC0415

    path = tmp_path / "sweep.toml"
    path.write_text('tasks = ["RTE", "MRPC"]\nseeds = [1, 2]\n[train]\nepochs = 1\n')
    assert read_config_file(path) == {"tasks": "RTE,MRPC", "seeds": "1,2", "epochs": 1}
    path.write_text('tasks = "RTE"\nlearning_rate = 3\n')
    with pytest.raises(SweepError, match=r"unknown keys \['learning_rate'\]"):
        read_config_file(path)


def test_more_cpu_workers_than_cores_warn(monkeypatch):
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with pytest.warns(UserWarning, match=r"--workers 3 x 1 thread\(s\) each on 2 cores"):
        assert len(make_slots(SweepConfig(workers=3, devices="cpu"), TrainConfig())) == 3
    with pytest.warns(UserWarning, match=r"--workers 2 x 2 thread\(s\) each on 2 cores"):
        make_slots(SweepConfig(workers=2, devices="cpu"), TrainConfig(threads=2))


def test_cpu_slots_count_the_cores_this_process_may_use(monkeypatch):
    """A cpuset (a cluster job's, taskset's) of 4 of 64 cores: 4 workers x 1 thread, not the
    machine's count (4 x 16)."""
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 9, 10, 11}, raising=False)
    slots = make_slots(SweepConfig(devices="cpu"), TrainConfig())
    assert [(slot.device, slot.threads) for slot in slots] == [("cpu", 1)] * 4


def test_one_gpu_named_twice_is_refused(monkeypatch):
    """"cuda" is the current GPU, cuda:0: "cuda,cuda:0" put 2 x --per-gpu workers on it."""
    import torch  # noqa: PLC0415

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert SweepConfig(devices="cuda,cuda:1").device_list() == ["cuda:0", "cuda:1"]
    for devices in ("cuda,cuda:0", "cuda:0,cuda"):
        with pytest.raises(SweepError, match="a device is listed twice"):
            SweepConfig(devices=devices).device_list()


def test_a_config_key_set_twice_is_refused(tmp_path):
    """tasks at the top and in [sweep], epochs in [search] and [train]: the table read last
    won without a word."""
    from sparsebert.sweep.config import read_config_file  # noqa: PLC0415

    path = tmp_path / "sweep.toml"
    path.write_text('tasks = "SST-2"\n[sweep]\ntasks = "STS-B"\n')
    with pytest.raises(SweepError, match=r"'tasks' is set twice \(top-level tasks and \[sweep\] "
                                         r"tasks\)"):
        read_config_file(path)
    path.write_text('[search]\nepochs = 5\n[train]\nepochs = 1\n')
    with pytest.raises(SweepError, match=r"'epochs' is set twice \(\[search\] epochs and "
                                         r"\[train\] epochs\)"):
        read_config_file(path)


def test_a_sweep_inside_a_sweep_is_refused(tiny_model_dir, synthetic_glue, tmp_path):
    """An --out inside a sweep directory (as search and finetune refuse): its summaries broke
    the outer sweep's report for good. Nothing is written."""
    from sparsebert.sweep.state import KIND, SweepDir, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    ident = identity(Grid(("SST-2",), (3,), ("structured",), ("good",), True, True),
                     search, train.resolved())
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "sweep.json").write_text(json.dumps({"kind": KIND, "runs": []}))
    for inner in (outer / "inner", outer / "SST-2" / "deeper" / "inner"):
        with pytest.raises(SweepError, match=f"--out {inner}: is inside the sweep directory "
                                             f"{outer}; use a folder outside it"):
            SweepDir(inner).open(ident)
        assert not inner.exists()
    # Another tool's sweep.json above (a wandb sweep's, say) is not a sweep directory.
    (outer / "sweep.json").write_text('{"name": "my wandb sweep"}')
    state = SweepDir(outer / "inner")
    assert state.open(ident) == []
    state.close("finished")


@pytest.mark.parametrize("saved", [{}, {"runs": []}, {"runs": [], "identity": {}},
                                   {"runs": [], "identity": {"grid": {"tasks": ["SST-2"]}}}])
def test_a_sweep_json_missing_its_parts_is_damaged(saved, tiny_model_dir, synthetic_glue,
                                                   tmp_path):
    """A sweep.json of the right kind without its runs or grid ended in a KeyError."""
    from sparsebert.sweep.state import KIND, SweepDir, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    ident = identity(Grid(("SST-2",), (3,), ("structured",), ("good",), True, True),
                     search, train.resolved())
    (tmp_path / "sweep.json").write_text(json.dumps({"kind": KIND, **saved}))
    with pytest.raises(SweepError, match=r"sweep.json: damaged \(no '(runs|identity)"):
        SweepDir(tmp_path).open(ident)


def test_a_sweep_folder_without_its_record_says_so(tiny_model_dir, synthetic_glue, tmp_path):
    """sweep.json deleted, replaced or cut off in a folder whose .sweep/ holds the sweep's
    records: the error names sweep.json and says to restore it (it said "not a sweep
    directory" or "holds something other than a sweep", and that the work was to be left)."""
    from sparsebert.sweep.state import SweepDir, identity  # noqa: PLC0415

    _, search, train = _configs(tiny_model_dir, synthetic_glue)
    ident = identity(Grid(("SST-2",), (3,), ("structured",), ("good",), True, True),
                     search, train.resolved())
    out = tmp_path / "sweep"
    state = SweepDir(out)
    assert state.open(ident) == []
    state.write_status({"running": {}})  # (what a sweep that ran leaves in .sweep/)
    state.close("finished")
    record = out / "sweep.json"
    good = record.read_text()
    record.unlink()
    with pytest.raises(SweepError, match=rf"--out {out}: a sweep's folder \(.sweep/ is there\) "
                                         r"without its sweep.json, .*restore it"):
        SweepDir(out).open(ident)
    record.write_text('{"name": "something else"}')
    with pytest.raises(SweepError, match=r"sweep.json: damaged \(not a sweep's record, though "
                                         r".sweep/ is there\); restore it"):
        SweepDir(out).open(ident)
    record.write_text(good[:20])
    with pytest.raises(SweepError, match=r"sweep.json: damaged \(.*\); restore it, or use "
                                         r"another --out"):
        SweepDir(out).open(ident)


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """An empty --out (an unset shell variable) or `out = ""` in --config would name the
    working directory: refused, nothing written there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--out", "", "--quiet", "--tasks", "RTE"])
    assert stop.value.code == 2
    assert "argument --out: expected a path, got ''" in capsys.readouterr().err
    config = tmp_path / "sweep.toml"
    config.write_text('out = ""\ntasks = "RTE"\n')
    assert main(["sweep", "--quiet", "--config", str(config)]) == 2
    assert "out = '': expected a directory path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------

def test_ray_unreachable_address_fails_fast(tmp_path, capsys):
    pytest.importorskip("ray")
    started = time.monotonic()
    out = tmp_path / "ray-bad"
    assert main(["sweep", "--out", str(out), "--quiet", "--tasks", "RTE", "--seeds", "1",
                 "--backend", "ray", "--ray-address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Ray cluster reachable" in err
    assert "--backend local" in err and time.monotonic() - started < 10
    assert not out.exists()  # refused before anything is written


@contextlib.contextmanager
def _ray_head(cpus: int, heads: list | None = None):
    """A running Ray cluster of one node with `cpus` CPUs (`ray start --head`, token
    authentication off); yields its GCS address and stops every process of it at the end.
    heads: a list that gets the head's process (its group holds the whole cluster)."""
    import socket  # noqa: PLC0415

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="ray-head-")  # (short: Ray's sockets live there)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head",
                             "--block", f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if heads is not None:
        heads.append(head)
    try:
        _wait_for(lambda: _listening(port), what="the Ray head's GCS port")
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # raylet, GCS, workers: one group
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket  # noqa: PLC0415

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_ray_cluster_same_results(reference, tiny_model_dir, synthetic_glue, tmp_path,
                                  monkeypatch, capsys):
    """Ray tasks on a running cluster (--ray-address; one node, 2 CPUs) compute what the
    local backend did: a one-seed s-pruning sweep against the same units of the reference
    sweep. A unit no node can hold is refused before anything is written."""
    pytest.importorskip("ray")
    from sparsebert.sweep.ray_backend import probe_cluster  # noqa: PLC0415

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the head was started
    with _ray_head(cpus=2) as address:
        _wait_for(lambda: probe_cluster(address).nodes, what="the head's node")
        refused = tmp_path / "ray-infeasible"
        assert main(_argv(tiny_model_dir, synthetic_glue, refused)
                    + ["--backend", "ray", "--ray-address", address,
                       "--unit-memory-gb", "100000"]) == 2
        err = capsys.readouterr().err
        assert ("no node of the Ray cluster can run a unit: each needs CPU 1, memory "
                "100000.0 GB (--threads, --per-gpu, --unit-memory-gb), the nodes have CPU 2, "
                "memory ") in err
        assert not refused.exists()
        out = tmp_path / "ray"
        config, search, train = _configs(tiny_model_dir, synthetic_glue, backend="ray",
                                         ray_address=address)
        config.seeds, config.methods = "3", "structured"
        outcome = sweep(out, config, search, train, progress=False)
    assert not outcome.failed and len(outcome.done) == 6  # full, search, P, R, summary, report
    assert any(n.startswith("one seed: no super-survivors") for n in outcome.notes)
    assert {m["backend"] for m in _done(out).values()} == {"ray"}
    assert {m["host"] for m in _done(out).values()} == {socket.gethostname()}
    assert all(m["pid"] != os.getpid() for m in _done(out).values())  # a Ray worker's
    mine = _results(out)["SST-2/seed_3/summary.json"]
    local = _results(reference[0])["SST-2/seed_3/summary.json"]
    assert mine["full"] == local["full"]
    assert mine["methods"]["structured"] == local["methods"]["structured"]


def test_a_lost_cluster_ends_the_live_line_before_the_error(tiny_model_dir, synthetic_glue,
                                                            tmp_path, monkeypatch, capsys):
    """The cluster lost while units run, with the live line on: the command's error starts a
    line of its own and nothing is drawn after it (it was glued to the end of the bar, which
    was then drawn again after it)."""
    import gc  # noqa: PLC0415

    from sparsebert.sweep import driver  # noqa: PLC0415
    from sparsebert.sweep.config import ClusterLost  # noqa: PLC0415

    lost = "--ray-address 10.0.0.5:6379: the Ray cluster stopped answering"

    class LostBackend:  # a Ray backend whose cluster is gone once the first units run
        name = "ray"

        def __init__(self, slots):
            self.slots = slots

        def idle(self):
            return [s for s in self.slots if s.busy is None]

        def submit(self, slot, spec, warm_key):
            slot.busy = spec["id"]

        def poll(self, timeout):
            raise ClusterLost(lost)

        def close(self):
            pass

    monkeypatch.setattr(driver, "_backend", lambda config, slots: LostBackend(slots))
    argv = [a for a in _argv(tiny_model_dir, synthetic_glue, tmp_path / "lost") if a != "--quiet"]
    assert main(argv) == 2
    gc.collect()  # (a bar left open is drawn again when it is collected)
    err = capsys.readouterr().err
    before, found, after = err.rpartition(f"sparsebert: error: {lost}")
    assert found and "sweep:" in before, err  # the live line was shown
    assert before.endswith("\n") and after == "\n", err


_CLUSTER_DRIVER = """
import sys, time
from sparsebert.sweep.config import ClusterLost
from sparsebert.sweep.local import Slot
from sparsebert.sweep.ray_backend import RayBackend
from tests.test_sweep_local import trivial_unit
backend = RayBackend([Slot(0, "cpu", 1)], sys.argv[1], 1, 0.0, runner=trivial_unit)
backend.submit(backend.slots[0], {"id": "long", "sleep": 600.0}, None)
print("SUBMITTED", flush=True)
sys.stdin.readline()  # the cluster is gone
start = time.monotonic()
try:
    while time.monotonic() - start < 50:
        backend.poll(timeout=1.0)
except ClusterLost as error:
    backend.close()
    print(f"LOST {time.monotonic() - start:.1f} {error}", flush=True)
"""


def test_ray_cluster_lost_mid_sweep_is_named(tmp_path):
    """The cluster a sweep joined dies while a unit runs: within seconds the backend raises
    ClusterLost naming --ray-address (Ray itself ends such a driver after 60 s, with a log
    line and exit status 1, as if units had failed)."""
    pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[1]
    heads: list[subprocess.Popen] = []
    with _ray_head(cpus=1, heads=heads) as address:
        driver = subprocess.Popen(
            [sys.executable, "-c", _CLUSTER_DRIVER, address], cwd=root, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(root)},
            start_new_session=True)
        try:
            ready, _, _ = select.select([driver.stdout], [], [], 180)
            line = driver.stdout.readline() if ready else "(nothing within 180 s)"
            assert line.startswith("SUBMITTED"), line
            os.killpg(heads[0].pid, signal.SIGKILL)  # the whole cluster
            heads[0].wait(timeout=30)
            driver.stdin.write("\n")
            driver.stdin.flush()
            ready, _, _ = select.select([driver.stdout], [], [], 120)
            line = driver.stdout.readline() if ready else "(nothing within 120 s)"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert line.startswith("LOST "), line
    _, seconds, message = line.split(" ", 2)
    assert float(seconds) < 30  # well before Ray's own 60 s exit
    assert message.startswith(f"--ray-address {address}: the Ray cluster stopped answering")
    assert "with 1 unit(s) running; rerun the same command once it is back" in message


def test_ray_backend_tells_queued_units_from_started_ones(tmp_path, monkeypatch):
    """Two units on a 1-CPU cluster: the second waits in Ray's queue until the first ends.
    begun() says which has begun (from the marker its task writes in OUT/.sweep/started/),
    so that --unit-timeout counts from there; markers go when their units end."""
    pytest.importorskip("ray")
    from sparsebert.sweep.local import Slot  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import RayBackend, start_marker  # noqa: PLC0415
    from tests.test_sweep_local import trivial_unit  # noqa: PLC0415

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the head was started
    with _ray_head(cpus=1) as address:
        backend = RayBackend([Slot(0, "cpu", 1), Slot(1, "cpu", 1)], address, 1, 0.0,
                             runner=trivial_unit)
        try:
            specs = [{"id": f"u/{i}", "out": str(tmp_path), "sleep": 4.0} for i in range(2)]
            for slot, spec in zip(backend.slots, specs, strict=True):
                backend.submit(slot, spec, None)
            first = _wait_for(lambda: next((s["id"] for s in specs
                                            if backend.begun(s["id"])), None),
                              what="a unit to begin")
            second = next(s["id"] for s in specs if s["id"] != first)
            assert not backend.begun(second)  # queued behind the first
            events = []
            while not events:
                events = backend.poll(timeout=1.0)
            assert [(e.unit_id, e.ok) for e in events] == [(first, True)]
            assert not start_marker(specs[int(first[-1])]).exists()
            _wait_for(lambda: backend.begun(second), what="the queued unit to begin")
            events = []
            while not events:
                events = backend.poll(timeout=1.0)
            assert [(e.unit_id, e.ok) for e in events] == [(second, True)]
            assert not list((tmp_path / ".sweep" / "started").iterdir())
        finally:
            backend.close()


def _fake_ray(gcs_address: str) -> types.ModuleType:
    """A stand-in for the ray module: joins anything, one 8-CPU node, tasks that never end,
    and `gcs_address` as the runtime context's GCS (in Ray Client mode, the address as seen
    inside the cluster)."""
    ray = types.ModuleType("ray")
    joined = []
    ray.is_initialized = lambda: bool(joined)
    ray.init = lambda address=None, **options: joined.append(address)
    ray.shutdown = lambda: joined.clear()
    ray.cancel = lambda *args, **kwargs: None
    ray.nodes = lambda: [{"Alive": True, "Resources": {"CPU": 8.0}}]

    class Ref:  # a task's object ref (hashable, as Ray's)
        def task_id(self):
            return types.SimpleNamespace(hex=lambda: "t1")

    def wait(refs, num_returns=1, timeout=None):  # nothing ever ends
        time.sleep(timeout or 0)
        return [], refs

    options = types.SimpleNamespace(remote=lambda *args: Ref())
    ray.remote = lambda fn: types.SimpleNamespace(options=lambda **kw: options)
    ray.wait = wait
    ray.get_runtime_context = lambda: types.SimpleNamespace(gcs_address=gcs_address)
    return ray


def test_ray_cluster_check_targets_what_the_driver_reached(monkeypatch):
    """The health check connects where the driver joined (for ray://, the Ray Client server),
    not to the GCS address Ray reports (inside the cluster, unreachable from a client): no
    false ClusterLost while that address answers; ClusterLost once it stops. With `auto`, a
    reported GCS that does not answer from here turns the check off."""
    from sparsebert.sweep import ray_backend  # noqa: PLC0415
    from sparsebert.sweep.config import ClusterLost  # noqa: PLC0415
    from sparsebert.sweep.local import Slot  # noqa: PLC0415

    monkeypatch.setattr(ray_backend, "HEALTH_CHECK_S", 0.2)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        inside = f"127.0.0.1:{closed.getsockname()[1]}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"ray://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(inside))
    backend = ray_backend.RayBackend([Slot(0, "cpu", 1)], address, 1, 0.0)
    backend.submit(backend.slots[0], {"id": "full/SST-2/1"}, None)
    for _ in range(5):  # past several checks
        assert backend.poll(timeout=0.1) == []
    server.close()
    time.sleep(0.3)
    with pytest.raises(ClusterLost, match=f"--ray-address {address}: the Ray cluster stopped "
                                          r"answering \(Connection refused"):
        backend.poll(timeout=0.1)
    backend.close()
    auto = ray_backend.RayBackend([Slot(0, "cpu", 1)], "auto", 1, 0.0)
    assert auto.gcs is None  # the reported GCS does not answer from here: no check
    auto.close()


def test_ray_task_refuses_another_sparsebert_than_the_drivers(tmp_path):
    """A Ray task checks that its worker imports the driver's sparsebert (a cluster's nodes use
    their own environment): another version, or another commit where both are checkouts, fails
    the unit naming both; the same code runs it (a missing commit on one side does not count)."""
    from sparsebert.sweep.ray_backend import _run_unit, code_identity  # noqa: PLC0415
    from tests.test_sweep_local import trivial_unit  # noqa: PLC0415

    mine = code_identity()
    spec = {"id": "full/SST-2/3", "out": str(tmp_path)}
    assert _run_unit({**spec, "driver_code": dict(mine)}, trivial_unit)["pid"] == os.getpid()
    assert _run_unit({**spec, "driver_code": {**mine, "git_sha": None}}, trivial_unit)
    with pytest.raises(RuntimeError, match=r"runs sparsebert .* the sweep's driver sparsebert "
                                           r"0\.0\.1 from /elsewhere: install the driver's"):
        _run_unit({**spec, "driver_code": {"version": "0.0.1", "git_sha": None,
                                           "path": "/elsewhere"}}, trivial_unit)
    if mine["git_sha"] is not None:
        with pytest.raises(RuntimeError, match=r"\(0{40}\) from"):
            _run_unit({**spec, "driver_code": {**mine, "git_sha": "0" * 40}}, trivial_unit)


def test_ray_backend_starts_its_own_instance(monkeypatch):
    """Without --ray-address the backend starts a local instance as wide as its slots, even
    when RAY_ADDRESS (or the machine's last `ray start`) names a cluster: here one that is
    gone, which Ray's default would try to join."""
    ray = pytest.importorskip("ray")
    from sparsebert.sweep.local import Slot  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    backend = RayBackend([Slot(0, "cpu", 1), Slot(1, "cpu", 2)], None, 1, 0.0)
    watchdog = backend.watchdog
    try:
        assert backend.started and ray.cluster_resources()["CPU"] == 3
        assert (watchdog is not None) == sys.platform.startswith("linux")
    finally:
        backend.close()
    assert not ray.is_initialized()
    if watchdog is not None:  # told the instance is shut down, it ended at once
        assert watchdog.process.poll() == 0 and backend.watchdog is None


def test_ray_backend_stops_a_unit_past_its_time():
    """stop() of a running Ray task cancels it (its worker is killed) and reports the unit
    failed with the given info; the slot then runs the next unit."""
    pytest.importorskip("ray")
    from sparsebert.sweep.local import Slot  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415
    from tests.test_sweep_local import trivial_unit  # noqa: PLC0415

    backend = RayBackend([Slot(0, "cpu", 1)], None, 1, 0.0, runner=trivial_unit)
    slot = backend.slots[0]
    try:
        backend.submit(slot, {"id": "stuck", "sleep": 600.0}, None)
        assert backend.poll(timeout=1.0) == []
        assert backend.stop("never/given", {"error": "late"}) == []
        events = backend.stop("stuck", {"error": "timed out", "timed_out": True})
        assert [(e.unit_id, e.ok, e.info) for e in events] == [
            ("stuck", False, {"error": "timed out", "timed_out": True})]
        assert slot.busy is None and not backend.pending
        backend.submit(slot, {"id": "after"}, None)
        events, deadline = [], time.monotonic() + 120
        while not events and time.monotonic() < deadline:
            events = backend.poll(timeout=1.0)
        assert [(e.unit_id, e.ok) for e in events] == [("after", True)], [e.info for e in events]
    finally:
        backend.close()


def test_ray_watchdog_stops_only_its_instances_processes(tmp_path):
    """The watchdog's choice of processes: one it saw, only while its start time is the one
    seen (a reused pid is left alone), and one it never saw with a file open in the instance's
    log folder, started after the watchdog in the driver's session; not an older one, one of
    another session, nor one with files elsewhere."""
    from sparsebert.sweep import ray_watchdog  # noqa: PLC0415

    if not Path("/proc/self/stat").is_file():
        pytest.skip("the watchdog reads /proc (Linux)")
    logs = tmp_path / "session_2026-01-01_00-00-00_000000_1" / "logs"
    logs.mkdir(parents=True)
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    started = []

    def process(name, start_new_session=False):
        with open(logs.parent / name if name.startswith("elsewhere") else logs / name,
                  "w") as out:
            started.append(subprocess.Popen(sleep, stdout=out,
                                            start_new_session=start_new_session))
        return started[-1]

    try:
        older = process("older.out")
        time.sleep(0.1)  # (start times count in clock ticks of 10 ms)
        since = ray_watchdog.start_time(older.pid) + 1
        time.sleep(0.1)
        seen, agent = process("seen.out"), process("agent.out")
        reused = process("elsewhere-reused")  # (only its start time could make it one seen)
        others = [older, reused, process("other.out", start_new_session=True),
                  process("elsewhere")]
        folders = ray_watchdog.log_folders(agent.pid)
        assert folders == {f"{logs}/"}
        given = {seen.pid: ray_watchdog.start_time(seen.pid),
                 reused.pid: ray_watchdog.start_time(reused.pid) + 1}
        assert ray_watchdog.instance(given, set(), None, None) == {seen.pid}
        found = ray_watchdog.instance(given, folders, ray_watchdog.session(os.getpid()), since)
        assert found == {seen.pid, agent.pid}
        ray_watchdog.stop(found)
        assert seen.wait(10) == agent.wait(10) == -signal.SIGTERM
        assert all(other.poll() is None for other in others)
    finally:
        for each in started:
            each.kill()
            each.wait()


_RAY_DRIVER = """
import sys, time
import ray._private.worker
from sparsebert.sweep.local import Slot
from sparsebert.sweep.ray_backend import RayBackend
if sys.argv[1] == "starting":  # held inside ray.init, the instance's processes running
    def connect(*args, **kwargs):
        print("STARTING", flush=True)
        time.sleep(300)
    ray._private.worker.connect = connect
backend = RayBackend([Slot(0, "cpu", 1)], None, 1, 0.0)
print("STARTED", flush=True)
time.sleep(300)
"""


def _below(pid: int) -> dict[int, int]:
    """Every live process below `pid`: pid -> parent."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if stat[0] != b"Z":
                parents[int(entry)] = int(stat[1])
    below, grown = {}, True
    while grown:
        grown = False
        for child, parent in parents.items():
            if child not in below and (parent == pid or parent in below):
                below[child], grown = parent, True
    return below


def _comm(pid: int) -> str:
    """The program name of process `pid` ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _with_files_in(folder: str) -> set[int]:
    """The live processes with a file open in `folder`."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(folder):
                        found.add(int(entry))
                        break
    return {pid for pid in found if pid_alive(pid)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog needs /proc")
@pytest.mark.parametrize("when", ["started", "starting"])
def test_a_killed_sweep_driver_leaves_no_ray_process(when, tmp_path):
    """kill -9 of a driver that started a local Ray instance (`started`), or is starting one
    (`starting`: held inside ray.init once its processes run): Ray's raylet, GCS and workers
    exit on their own, its agents (ray::DashboardAgent, ray::RuntimeEnvAgent) did not; the
    watchdog stops every process of that instance, and ends."""
    pytest.importorskip("ray")
    from sparsebert.sweep import ray_watchdog  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    driver = subprocess.Popen([sys.executable, "-c", _RAY_DRIVER, when], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)},
                              start_new_session=True)
    instance: set[int] = set()
    logs = None

    def left() -> set[int]:
        return {p for p in instance if pid_alive(p)} | (_with_files_in(logs) if logs else set())

    try:
        # the driver's one line, once its instance runs (not waited for forever if Ray hangs)
        ready, _, _ = select.select([driver.stdout], [], [], 180)
        line = driver.stdout.readline().split() if ready else ["(nothing within 180 s)"]
        assert line == [when.upper()], line
        agents = {"ray::DashboardA", "ray::RuntimeEnv"}  # (names cut to 15 characters)
        deadline = time.monotonic() + 60  # the raylet starts its agents
        while time.monotonic() < deadline and not agents <= {_comm(p) for p in _below(driver.pid)}:
            time.sleep(0.2)
        below = _below(driver.pid)
        watchdogs = [p for p, parent in below.items() if parent == driver.pid
                     and "ray_watchdog" in Path(f"/proc/{p}/cmdline").read_text()]
        instance = set(below) - set(watchdogs)
        assert agents <= {_comm(p) for p in instance}
        raylet = next(p for p in instance if _comm(p) == "raylet")
        logs = next(str(Path(target).parent) + "/" for target in (
            os.readlink(f"/proc/{raylet}/fd/{fd}") for fd in os.listdir(f"/proc/{raylet}/fd"))
            if Path(target).parent.name == "logs")  # Ray's <session dir>/logs/
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and left():
            time.sleep(0.5)
        assert not {p: _comm(p) for p in left()}
        assert len(watchdogs) == 1, {p: _comm(p) for p in below}
        while time.monotonic() < deadline and pid_alive(watchdogs[0]):
            time.sleep(0.2)
        assert not pid_alive(watchdogs[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        ray_watchdog.stop(left())


def test_ray_backend_sigterm_while_its_instance_starts(monkeypatch):
    """SIGTERM inside ray.init (Ray's own handler exits with SystemExit(15)): the half-started
    instance is shut down and the command sees a termination (exit 143, its message), not a
    bare exit status 15."""
    ray = pytest.importorskip("ray")
    from sparsebert.errors import Terminated  # noqa: PLC0415
    from sparsebert.sweep.local import Slot  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415

    shut = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls) and not shut)
    calls = []

    def init(**options):
        calls.append(options)
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    with pytest.raises(Terminated):
        RayBackend([Slot(0, "cpu", 1)], None, 1, 0.0)
    assert calls and shut == [True]


def test_ray_task_errors_keep_the_workers_traceback():
    """A unit that failed on a Ray worker: the one-line error of its own exception, and the
    traceback as the worker formatted it (the cause's frames are lost in pickling)."""
    from sparsebert.sweep.ray_backend import _task_error_info  # noqa: PLC0415

    class FakeTaskError(Exception):
        cause = RuntimeError("the unit failed")
        traceback_str = 'Traceback (most recent call last):\n  File "units.py", line 9\nboom'

    info = _task_error_info(FakeTaskError("wrapped"))
    assert info["error"] == "RuntimeError: the unit failed"
    assert info["traceback"].endswith('File "units.py", line 9\nboom')


def _failing_unit(spec):
    raise RuntimeError(f"the unit {spec['id']} failed")


def test_ray_task_errors_keep_the_workers_traceback_from_ray_get():
    """What ray.get raises for a failed task (Ray 2.60): the RayTaskError the worker built,
    pickled, as an instance of the cause's class, which has no traceback_str of its own (its
    attributes are the cause's) and shows the worker's frames, in colour, only in its text.
    The unit's failure record keeps those frames, as the local backend's does, uncoloured."""
    pytest.importorskip("ray")
    import pickle  # noqa: PLC0415
    import traceback  # noqa: PLC0415

    from ray.exceptions import RayTaskError  # noqa: PLC0415

    from sparsebert.sweep.ray_backend import _task_error_info  # noqa: PLC0415

    try:
        _failing_unit({"id": "full/RTE/1"})
    except RuntimeError as error:  # in the worker: the task's exception and its traceback
        sent = pickle.dumps(RayTaskError("_run_unit", traceback.format_exc(), error,
                                         proctitle="ray::_run_unit", pid=4242,
                                         ip="10.0.0.7"))
    raised = pickle.loads(sent).as_instanceof_cause()  # in the driver, from ray.get
    assert isinstance(raised, RayTaskError) and isinstance(raised, RuntimeError)
    assert getattr(raised, "traceback_str", None) is None and "\x1b[" in str(raised)
    info = _task_error_info(raised)
    assert info["error"] == "RuntimeError: the unit full/RTE/1 failed"
    assert info["traceback"].startswith("ray::_run_unit() (pid=4242, ip=10.0.0.7)\n")
    assert "in _failing_unit\n" in info["traceback"] and "\x1b" not in info["traceback"]
    assert info["traceback"].endswith("RuntimeError: the unit full/RTE/1 failed\n")


def test_ray_probe_names_an_authentication_failure(monkeypatch):
    """A cluster with token authentication refuses a client without the token: the probe's
    error names that cause (not the ConnectionError it led to) and how to fix it."""
    from sparsebert.sweep import ray_backend  # noqa: PLC0415

    monkeypatch.setattr(ray_backend, "_PROBE", (
        "import sys; sys.stderr.write('ray.exceptions.AuthenticationError: InvalidAuthToken: "
        "RAY_AUTH_MODE is currently disabled\\nConnectionError: Failed to connect to Ray "
        "cluster\\n'); sys.exit(1)"))
    with pytest.raises(SweepError, match=r"cannot connect \(ray.exceptions.AuthenticationError"
                                         r".*RAY_AUTH_MODE=token"):
        ray_backend.probe_cluster("127.0.0.1:6390", timeout=60)


def test_injected_failures_travel_in_the_unit_spec(monkeypatch):
    """SPARSEBERT_SWEEP_FAIL is read in the driver and passed in each unit's spec: workers on a
    Ray cluster do not share the driver's environment."""
    from sparsebert.sweep.units import InjectedFailure, _check_injected_failure  # noqa: PLC0415

    monkeypatch.delenv("SPARSEBERT_SWEEP_FAIL", raising=False)
    spec = {"id": "full/RTE/1", "attempt": 1, "fail_injection": "full/*:1"}
    with pytest.raises(InjectedFailure):
        _check_injected_failure(spec)
    _check_injected_failure({**spec, "attempt": 2})
    _check_injected_failure({**spec, "fail_injection": ""})  # the driver had none set


@pytest.mark.parametrize("rules", ["SST-2*:two", "full/*:0", ":3", "a:1,:", "x:-1"])
def test_a_malformed_failure_rule_is_refused_when_the_sweep_starts(rules, tmp_path,
                                                                   monkeypatch):
    """SPARSEBERT_SWEEP_FAIL is parsed once, up front: a rule whose count is no integer >= 1
    (or that has no pattern) is an error naming the variable, before the sweep writes
    anything (it failed with int()'s message, and only in a unit it matched)."""
    from sparsebert.errors import ConfigError  # noqa: PLC0415
    from sparsebert.sweep import SweepConfig, sweep  # noqa: PLC0415
    from sparsebert.sweep.units import fail_rules  # noqa: PLC0415

    assert fail_rules(" full/*:2 , super-*, ") == [("full/*", 2), ("super-*", 1)]
    monkeypatch.setenv("SPARSEBERT_SWEEP_FAIL", rules)
    with pytest.raises(ConfigError, match=r"SPARSEBERT_SWEEP_FAIL=.*PATTERN\[:N\]"):
        sweep(tmp_path / "sweep", SweepConfig(tasks="RTE", seeds="1"), progress=False)
    assert not (tmp_path / "sweep").exists()


def test_ray_backend_sigterm_stops_cleanly(tiny_model_dir, synthetic_glue, tmp_path):
    """Ray installs its own SIGTERM handler in the driver: the sweep keeps the command's, so
    SIGTERM still stops it as Ctrl-C does (exit 143, one line, the run recorded as
    interrupted, no Ray crash report)."""
    pytest.importorskip("ray")
    out = tmp_path / "ray-terminated"
    with _sweep_process(tiny_model_dir, synthetic_glue, out, "--backend", "ray") as driver:
        _wait_for(lambda: _done(out) and _status(out).get("running"),
                  what="a unit done and others running")
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated; rerun the same command to resume"
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs[-1]["status"] == "interrupted"


def test_ray_backend_refuses_what_no_node_holds_and_cancels_on_close(tiny_model_dir,
                                                                    synthetic_glue, tmp_path,
                                                                    capsys):
    """A unit request no live node can hold (here --unit-memory-gb 100000) is refused with the
    nodes' resources, not left waiting forever (more memory than the machine has: before the
    sweep directory is written); closing the backend on a Ray instance the caller started
    (and keeps) cancels the units still running."""
    ray = pytest.importorskip("ray")
    from sparsebert.sweep.local import Slot  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415

    out = tmp_path / "ray-infeasible"
    assert main(_argv(tiny_model_dir, synthetic_glue, out) + ["--backend", "ray",
                                                              "--unit-memory-gb", "100000"]) == 2
    assert "--unit-memory-gb 100000: more than this machine's memory (" \
        in capsys.readouterr().err
    assert not out.exists()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(SweepError, match="no node of the Ray cluster can run a unit: each "
                                             "needs CPU 1, memory 100000.0 GB"):
            RayBackend([Slot(0, "cpu", 1)], None, 1, 100000.0)
        backend = RayBackend([Slot(0, "cpu", 1)], None, 1, 0.0)
        assert not backend.started  # the caller's instance

        @ray.remote
        def long_unit(spec):
            time.sleep(120)

        backend.remote = long_unit
        backend.submit(backend.slots[0], {"id": "full/SST-2/3"}, None)
        ref = next(iter(backend.pending))
        time.sleep(2)
        backend.close()
        started = time.monotonic()
        with pytest.raises((ray.exceptions.TaskCancelledError,
                            ray.exceptions.WorkerCrashedError)):
            ray.get(ref, timeout=30)
        assert time.monotonic() - started < 30 and ray.is_initialized()
    finally:
        ray.shutdown()


def test_ray_backend_reports_a_unit_as_soon_as_it_ends():
    """poll() returns when one unit ends (so its slot is refilled at once), not when every
    running unit has ended or the poll's timeout has passed."""
    ray = pytest.importorskip("ray")
    from sparsebert.sweep.local import Slot  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import RayBackend  # noqa: PLC0415

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        backend = RayBackend([Slot(0, "cpu", 1), Slot(1, "cpu", 1)], None, 1, 0.0)

        @ray.remote
        def sleeping_unit(spec):
            time.sleep(spec["seconds"])
            return {"seconds": spec["seconds"]}

        backend.remote = sleeping_unit
        backend.submit(backend.slots[0], {"id": "short", "seconds": 0.5}, None)
        backend.submit(backend.slots[1], {"id": "long", "seconds": 120}, None)
        # status.json names a running Ray unit by its task (its worker is Ray's choice)
        tasks = {ref.task_id().hex(): slot.index for ref, slot in backend.pending.items()}
        assert {s.where()["ray_task"]: s.index for s in backend.slots} == tasks
        started = time.monotonic()
        events = []
        while not events:
            events = backend.poll(timeout=60)
        assert [(e.unit_id, e.ok) for e in events] == [("short", True)]
        assert time.monotonic() - started < 45  # waiting for every unit: the whole 60 s
        assert backend.slots[0].busy is None and backend.slots[1].busy == "long"
        assert backend.slots[0].where() == {"pid": None} and backend.slots[1].task
        backend.close()
    finally:
        ray.shutdown()


def test_ray_cluster_probe_and_slots():
    """--ray-address: a child process connects to the running cluster and reads its resources,
    which size the slots (CPU slots of --threads CPUs, or GPUs x --per-gpu)."""
    ray = pytest.importorskip("ray")
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415
    from sparsebert.sweep.ray_backend import probe_cluster  # noqa: PLC0415

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        cluster = probe_cluster(address, timeout=60)
    finally:
        ray.shutdown()
    resources = cluster.resources
    assert resources["CPU"] == 3 and resources.get("GPU", 0) == 0
    assert [node["CPU"] for node in cluster.nodes] == [3]
    config = SweepConfig(backend="ray", ray_address=address)
    slots = make_slots(config, TrainConfig(), resources)
    assert [(s.device, s.threads) for s in slots] == [("cpu", 1)] * 3
    assert len(make_slots(config, TrainConfig(threads=2), resources)) == 1
    gpus = {"CPU": 32.0, "GPU": 2.0}
    slots = make_slots(SweepConfig(backend="ray", ray_address=address, per_gpu=3),
                       TrainConfig(), gpus)
    assert [(s.device, s.threads) for s in slots] == [("cuda", 5)] * 6
    with pytest.raises(SweepError, match="has no GPUs"):
        make_slots(SweepConfig(backend="ray", ray_address=address, devices="cuda"),
                   TrainConfig(), resources)
    with pytest.raises(SweepError, match="'cuda:1': on the Ray cluster .* Ray assigns the GPUs"):
        make_slots(SweepConfig(backend="ray", ray_address=address, devices="cuda:1"),
                   TrainConfig(), gpus)


def test_ray_address_that_is_not_ray_fails_within_the_deadline(tmp_path, capsys, monkeypatch):
    """Something else listens at the address (here: a socket that accepts and never answers):
    the probe is killed at its deadline, one line, exit 2, nothing written."""
    pytest.importorskip("ray")
    import socket  # noqa: PLC0415

    from sparsebert.sweep import ray_backend  # noqa: PLC0415

    monkeypatch.setattr(ray_backend, "PROBE_TIMEOUT_S", 8.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    out = tmp_path / "not-ray"
    started = time.monotonic()
    try:
        code = main(["sweep", "--out", str(out), "--quiet", "--tasks", "RTE", "--seeds", "1",
                     "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"])
    finally:
        listener.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--ray-address 127.0.0.1:{port}" in err and "--backend local" in err
    assert time.monotonic() - started < 30
    assert not out.exists()


def test_an_interrupted_ray_probe_leaves_no_process(monkeypatch):
    """Ctrl-C (or SIGTERM) while the driver waits for the probe: the probe, in its own session
    out of the signal's reach, is killed with its process group before the interrupt goes on."""
    pytest.importorskip("ray")
    import signal  # noqa: PLC0415
    import socket  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from sparsebert.sweep import ray_backend  # noqa: PLC0415

    started = []

    class InterruptedWait(subprocess.Popen):
        def communicate(self, *args, **kwargs):
            if "timeout" in kwargs and not getattr(self, "interrupted", False):
                self.interrupted = True
                time.sleep(1.0)  # the probe is connecting, and keeps retrying
                raise KeyboardInterrupt
            return super().communicate(*args, **kwargs)

    def popen(*args, **kwargs):
        child = InterruptedWait(*args, **kwargs)
        started.append(child)
        return child

    monkeypatch.setattr(ray_backend.subprocess, "Popen", popen)
    listener = socket.socket()  # accepts and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        with pytest.raises(KeyboardInterrupt):
            ray_backend.probe_cluster(f"127.0.0.1:{listener.getsockname()[1]}", timeout=60)
    finally:
        listener.close()
    (child,) = started
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(child.pid, 0)


def test_failed_unit_blocks_every_dependent(tiny_model_dir, synthetic_glue, tmp_path,
                                            monkeypatch):
    """A full fine-tune that fails for good blocks everything after it, transitively."""
    monkeypatch.setenv("SPARSEBERT_SWEEP_FAIL", "full/*:9")
    config, search, train = _configs(tiny_model_dir, synthetic_glue, seeds="3",
                                     methods="structured", workers=1, retries=0)
    outcome = sweep(tmp_path / "blocked", config, search, train, progress=False)
    assert list(outcome.failed) == ["full/SST-2/3"]
    # a failed marker an earlier run left for a unit a later run blocks: not that run's error
    stale = tmp_path / "blocked" / ".sweep" / "failed" / "summary~SST-2~3.json"
    stale.write_text('{"id": "summary/SST-2/3", "error": "from an earlier run"}')
    outcome = sweep(tmp_path / "blocked", config, search, train, progress=False)
    assert list(outcome.failed) == ["full/SST-2/3"]
    assert sorted(p.name for p in stale.parent.iterdir()) == ["full~SST-2~3.json"]
    assert sorted(outcome.blocked) == sorted(["search/SST-2/3/structured",
                                              "pruned/SST-2/3/structured/good",
                                              "retrained/SST-2/3/structured/good",
                                              "summary/SST-2/3", "report"])


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--tasks", "SST-2,RTE"], "RTE train split not found"),
])
def test_missing_inputs_refused_before_anything_is_written(flags, message, tiny_model_dir,
                                                           synthetic_glue, tmp_path, capsys):
    out = tmp_path / "inputs"
    argv = _argv(tiny_model_dir, synthetic_glue, out)
    assert main(argv + flags) == 2  # a later flag wins
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_no_data_source_is_refused_before_anything_is_written(tiny_model_dir, synthetic_glue,
                                                              tmp_path, capsys, monkeypatch):
    """No GLUE folder and no `datasets` package to reach the hub: refused at once (status 2,
    one line), not a failed unit per seed after workers started."""
    import importlib.util  # noqa: PLC0415

    find_spec = importlib.util.find_spec
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    out = tmp_path / "no-data"
    argv = _argv(tiny_model_dir, synthetic_glue, out)
    at = argv.index("--glue-dir")
    assert main(argv[:at] + argv[at + 2:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`datasets` package is not installed" in err, err
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ('workers = "two"', "workers = 'two': expected an integer"),
    ('super_survivors = "no"', "super_survivors = 'no': expected true or false"),
    ("epochs = 1.5", "epochs = 1.5: expected an integer"),
    ("lr = true", "lr = True: expected a number"),
    ("out = 3", "out = 3: expected a directory path"),
    ('device = "cuda:7"', "'device' is set per unit by the sweep; use devices = ... instead"),
    ("stop_after_steps = 3", "stop_after_steps does not apply to a sweep"),
])
def test_config_file_values_are_type_checked(text, message, tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text(text + "\n")
    assert main(["sweep", "--out", str(tmp_path / "s"), "--quiet", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert main(["sweep", "--out", str(tmp_path / "s"), "--config", str(tmp_path)]) == 2
    assert "--config" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_a_sweep_resumed_on_other_data_is_refused(reference, tiny_model_dir, synthetic_glue,
                                                   tmp_path, capsys):
    """A rerun (or an extension by seeds) of a sweep with a GLUE folder whose files differ from
    those its started seeds began with is refused before anything is written; a copy of the
    same files in another folder resumes."""
    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out)
    same, other = tmp_path / "glue-copy", tmp_path / "glue-other"
    shutil.copytree(synthetic_glue, same)
    shutil.copytree(synthetic_glue, other)
    train = other / "SST-2" / "train.tsv"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:-1]))  # one row less
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for seeds in (SEEDS, SEEDS + ",9"):
        argv = _argv(tiny_model_dir, str(other), out) + ["--seeds", seeds]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "started on other SST-2 data: the train data" \
            in err and "the sweep's other seeds must use the same data" in err, err
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main(_argv(tiny_model_dir, str(same), out)) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_sweep_resumed_from_changed_model_files_is_refused(reference, tiny_model_dir,
                                                              synthetic_glue, tmp_path, capsys):
    """A started seed whose model.json records other model files than --model's folder now
    holds (its weights were overwritten since) refuses the rerun before anything is written."""
    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out)
    record = out / "SST-2" / f"seed_{SEEDS.split(',')[0]}" / "model.json"
    saved = json.loads(record.read_text())
    assert saved["source"] == "local" and "model.safetensors" in saved["files"]
    saved["files"]["model.safetensors"] = "0" * 64  # as if the weights had been other ones
    record.write_text(json.dumps(saved))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(_argv(tiny_model_dir, synthetic_glue, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "other model files: model.safetensors" in err and \
        "the sweep's other seeds must use the same model" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_out_in_the_config_file_expands_the_home_folder(reference, tiny_model_dir,
                                                        synthetic_glue, tmp_path, capsys,
                                                        monkeypatch):
    """`out = "~/..."` in --config names a folder of the home directory (no shell expands it),
    not a literal ./~ folder."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    shutil.copytree(reference[0], home / "sweep")
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    path = tmp_path / "sweep.toml"
    path.write_text('out = "~/sweep"\n')
    argv = [a for a in _argv(tiny_model_dir, synthetic_glue, "unused") if a != "--quiet"]
    at = argv.index("--out")
    assert main(argv[:at] + argv[at + 2:] + ["--config", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not (cwd / "~").exists()


def test_out_from_the_config_file_and_json_alone_on_stdout(reference, tiny_model_dir,
                                                           synthetic_glue, tmp_path, capsys):
    """`out` may come from --config; with --json, stdout is the outcome only (progress and
    notes go to stderr); a finished sweep has nothing to do."""
    out = tmp_path / "from-config"
    shutil.copytree(reference[0], out)
    path = tmp_path / "sweep.toml"
    path.write_text(f'out = "{out}"\n')
    argv = [a for a in _argv(tiny_model_dir, synthetic_glue, out) if a != "--quiet"]
    at = argv.index("--out")
    argv = argv[:at] + argv[at + 2:] + ["--config", str(path)]
    assert main(argv + ["--json"]) == 0
    total = len(reference[1].done)
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["done"] == [] and len(outcome["skipped"]) == total
    assert main(argv) == 0
    assert f"nothing to do: all {total} units" in capsys.readouterr().out


def test_a_shared_setting_in_a_one_method_sweep_needs_only_that_methods_redo():
    """In a --methods magnitude sweep, a setting both methods use (threshold) affects only
    magnitude: refused with the hint "--redo magnitude", accepted with it."""
    from sparsebert.sweep.state import compare  # noqa: PLC0415

    grid = {"tasks": ["SST-2"], "seeds": [1], "methods": ["magnitude"]}
    saved = {"grid": grid, "search": {"threshold": 0.9}, "train": {}}
    mine = {"grid": grid, "search": {"threshold": 0.8}, "train": {}}
    with pytest.raises(SweepError, match=r"add --redo magnitude;"):
        compare(saved, mine)
    assert compare(saved, mine, ("magnitude",)) == ([], [])
    both = {**grid, "methods": ["structured", "magnitude"]}
    with pytest.raises(SweepError, match=r"add --redo structured,magnitude;"):
        compare({**saved, "grid": both}, {**mine, "grid": both}, ("magnitude",))


def test_one_method_sweep_redoes_a_shared_setting(tiny_model_dir, synthetic_glue, tmp_path,
                                                  capsys):
    """End to end: a --methods magnitude sweep rerun with another --threshold is refused naming
    --redo magnitude, and runs with it (the searches' config.json take the new threshold)."""
    out = tmp_path / "magnitude-only"
    argv = [a if a != SEEDS else SEEDS.split(",")[0] for a in
            _argv(tiny_model_dir, synthetic_glue, out)] + ["--methods", "magnitude"]
    assert main(argv) == 0
    assert main(argv + ["--threshold", "0.8"]) == 2
    assert "add --redo magnitude" in capsys.readouterr().err
    assert main(argv + ["--threshold", "0.8", "--redo", "magnitude"]) == 0
    (folder,) = (out / "SST-2").glob("seed_*")
    assert json.loads((folder / "config.json").read_text())["search"]["threshold"] == 0.8
    assert json.loads((out / "sweep.json").read_text())["runs"][-1]["status"] == "finished"


# Grid priorities, the scheduler's estimate and placement, slots, flags over the file
# --------------------------------------------------------------------------------------------
def test_upward_rank_is_the_heaviest_chain_by_brute_force():
    """rank = own weight + the heaviest chain of dependents (critical path), not their sum."""
    units = expand(Grid(("RTE",), (1, 2), ("structured", "magnitude"), ("good", "bad"),
                        True, True))
    children = {u.id: [] for u in units}
    for u in units:
        for d in u.deps:
            children[d].append(u.id)
    weight = {u.id: u.weight for u in units}

    def longest(i):  # every path enumerated: independent of the memoised pass
        return weight[i] + max((longest(c) for c in children[i]), default=0.0)

    rank = upward_rank(units)
    for u in units:
        if u.kind in ("full", "search", "summary", "super-masks", "report"):
            assert rank[u.id] == pytest.approx(longest(u.id)), u.id


def test_estimate_is_the_mean_of_the_kinds_finished_times():
    from sparsebert.sweep.scheduler import Scheduler  # noqa: PLC0415

    units = expand(Grid(("RTE",), (1, 2, 3), ("magnitude",), ("good",), False, False))
    by_id = {u.id: u for u in units}
    scheduler = Scheduler(units, state=None, backend=None, base={}, retries=0, progress=False)
    scheduler._record(by_id["full/RTE/1"], 100.0)
    scheduler._record(by_id["full/RTE/2"], 300.0)
    assert scheduler._estimate(by_id["full/RTE/3"]) == pytest.approx((100 + 300) / 2)


def test_pick_prefers_a_warm_unit_only_at_similar_rank():
    """A worker with (RTE, 1) loaded takes RTE/1's unit only when its rank is at least
    AFFINITY (0.5) of the best ready unit's; else the critical path wins."""
    from sparsebert.sweep.scheduler import AFFINITY, Scheduler  # noqa: PLC0415

    units = expand(Grid(("RTE",), (1, 2), ("magnitude",), ("good",), True, False))
    scheduler = Scheduler(units, state=None, backend=None, base={}, retries=0, progress=False)
    warm = types.SimpleNamespace(warm_key=("RTE", 1))
    low, high = "pruned/RTE/1/magnitude/good", "full/RTE/2"
    assert scheduler.rank[low] < AFFINITY * scheduler.rank[high]  # the premise
    assert scheduler._pick([low, high], warm).id == high
    assert scheduler._pick(["full/RTE/2", "full/RTE/1"], warm).id == "full/RTE/1"  # same rank


def test_cpu_slots_take_the_threads_flag():
    from sparsebert.sweep import SweepConfig  # noqa: PLC0415
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    slots = make_slots(SweepConfig(workers=2, devices="cpu"), TrainConfig(threads=3))
    assert [s.threads for s in slots] == [3, 3]


def test_gpu_slots_go_round_robin_over_the_devices(monkeypatch):
    from sparsebert.sweep import SweepConfig  # noqa: PLC0415
    from sparsebert.sweep.driver import make_slots  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    monkeypatch.setattr(SweepConfig, "device_list", lambda self: ["cuda:0", "cuda:1"])
    slots = make_slots(SweepConfig(workers=4, devices="cuda:0,cuda:1"), TrainConfig(threads=1))
    assert [s.device for s in slots] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_sweep_flags_override_the_config_file(tmp_path, monkeypatch):
    """`--config` help: "flags override it"."""
    import sparsebert.sweep as sweep_pkg  # noqa: PLC0415
    from sparsebert.cli import main  # noqa: PLC0415
    from sparsebert.sweep.scheduler import Outcome  # noqa: PLC0415

    seen = {}

    def fake_sweep(out, sweep_config, search_config, train_config, **kw):
        seen.update(sweep=sweep_config, search=search_config, train=train_config)
        return Outcome()

    monkeypatch.setattr(sweep_pkg, "sweep", fake_sweep)
    path = tmp_path / "sweep.toml"
    path.write_text('tasks = "RTE"\nworkers = 1\n[train]\nepochs = 1\nlr = 0.001\n')
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet",
                 "--epochs", "2", "--workers", "3", "--tasks", "MRPC"]) == 0
    assert seen["train"].epochs == 2 and seen["train"].lr == 0.001  # flag wins, file fills
    assert seen["sweep"].workers == 3 and seen["sweep"].tasks == "MRPC"


def test_a_number_of_seconds_in_a_config_file_is_a_unit_timeout(tmp_path):
    """`unit_timeout = 1.5` in a config file was refused with "expected a string", while
    --unit-timeout 1.5 was taken."""
    from sparsebert.sweep.config import read_config_file  # noqa: PLC0415

    path = tmp_path / "sweep.toml"
    for text, seconds in (("90", 90.0), ("1.5", 1.5), ('"2m"', 120.0)):
        path.write_text(f"unit_timeout = {text}\n")
        value = read_config_file(path)["unit_timeout"]
        assert SweepConfig(unit_timeout=value).validate().timeout_seconds() == seconds
    path.write_text("unit_timeout = true\n")
    with pytest.raises(SweepError, match="unit_timeout = True: expected a string or a number"):
        read_config_file(path)


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever ran before."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_signals_held_delivers_a_ctrl_c_after_the_block(ctrl_c_raises):
    from sparsebert.sweep.state import signals_held  # noqa: PLC0415

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a handler runs between bytecodes: it had its chance)
            reached.append("end of block")
    assert reached == ["end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_the_run_closes_still_records_its_end(tmp_path, monkeypatch,
                                                             ctrl_c_raises):
    """A second Ctrl-C while sweep.json and status.json were being written left them saying
    that the run was still running, on workers that no longer existed."""
    from sparsebert.sweep import state as state_module  # noqa: PLC0415

    state = state_module.SweepDir(tmp_path / "s")
    state.open({"grid": 1})
    state.write_status({"running": {"full/SST-2/3": {"slot": 0}}, "done": 0, "failed": [],
                        "total": 3})
    written = state_module.atomic_write_json

    def interrupted_write(path, payload, *args, **kwargs):  # Ctrl-C in the first write
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return written(path, payload, *args, **kwargs)

    monkeypatch.setattr(state_module, "atomic_write_json", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        state.close("interrupted")
    monkeypatch.undo()
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["runs"][-1]["status"] == \
        "interrupted"
    status = json.loads((tmp_path / "s" / ".sweep" / "status.json").read_text())
    assert status["running"] == {} and status["sweep"] == "interrupted"


def test_an_interrupt_before_the_units_start_is_recorded(tiny_model_dir, synthetic_glue,
                                                         tmp_path, monkeypatch):
    """A Ctrl-C between opening the sweep and starting its workers (while done units were
    checked) left sweep.json's run "running" with no end."""
    from sparsebert.sweep.state import SweepDir  # noqa: PLC0415

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SweepDir, "drop_stale", interrupted)
    out = tmp_path / "early"
    with pytest.raises(KeyboardInterrupt):
        sweep(out, *_configs(tiny_model_dir, synthetic_glue), progress=False)
    run = json.loads((out / "sweep.json").read_text())["runs"][-1]
    assert run["status"] == "interrupted" and "finished_at" in run


def test_json_output_is_the_outcome_alone_whatever_the_sweep_prints(tmp_path, monkeypatch,
                                                                   capsys):
    """Ray prints a dead worker's note on stdout, before --json's outcome: stdout was no
    longer JSON. What the sweep prints now goes to stderr."""
    from sparsebert.sweep import command  # noqa: PLC0415
    from sparsebert.sweep.scheduler import Outcome  # noqa: PLC0415

    def noisy_sweep(*args, **kwargs):
        print("(raylet) A worker died or was killed while executing a task")
        return Outcome(done=["full/SST-2/3"], wall_s=1.0)

    monkeypatch.setattr("sparsebert.sweep.sweep", noisy_sweep)
    assert command.run_sweep(types.SimpleNamespace(
        config=None, out=str(tmp_path / "s"), json=True, quiet=True, redo=None)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["done"] == ["full/SST-2/3"]
    assert "A worker died" in captured.err
