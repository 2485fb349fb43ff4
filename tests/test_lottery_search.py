"""The search directory end to end on a tiny random BERT and a synthetic task: outputs,
resume after an interruption at each stage, refusal of a different config, bad tasks."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import re
import shutil
import types
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsebert.atomic import run_lock
from sparsebert.cli import main
from sparsebert.errors import RunDirError, SparsebertError
from sparsebert.lottery import search
from sparsebert.lottery.config import SearchConfig
from sparsebert.lottery.search import Search

STAGES = ["full", "structured.search", "structured.pruned.good", "structured.retrained.random",
          "magnitude.search", "magnitude.pruned.bad", "magnitude.retrained.good"]


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, synthetic_glue):
    """(model dir, GLUE dir) from the shared kit."""
    return tiny_model_dir, synthetic_glue


def _options(tiny_setup, **kw):
    model, glue = tiny_setup
    base = dict(model=model, glue_dir=glue, epochs=2, batch_size=16, lr=2e-3, seed=3,
                threads=1, importance_batch_size=16, log_every=2)
    return {**base, **kw}


def _strip(summary):
    """summary.json without fields that differ between runs of the same search."""
    out = json.loads(json.dumps(summary))
    for key in ("written_at", "git_sha", "versions"):
        out.pop(key, None)
    out["full"].pop("train_time_s", None)
    for method in out["methods"].values():
        method.pop("search_time_s", None)
        for sub in method["subnetworks"].values():
            sub.pop("retrain_time_s", None)
    return out


@pytest.fixture(scope="module")
def reference(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "search"
    return out, search("SST-2", out, progress=False, **_options(tiny_setup))


@pytest.mark.parametrize("seeds", [None, "1,2"])
def test_a_damaged_data_file_leaves_no_claimed_directory(seeds, tiny_setup, tmp_path, capsys,
                                                         monkeypatch):
    """A train file that is there but cannot be parsed (truncated mid-row) fails when the full
    model's fine-tune reads it, after the search claimed --out: the claim is undone, so
    nothing is left and a rerun with other settings is not refused. Without a GLUE folder and
    without `datasets` (no way to the hub), the search is refused before it writes."""
    model, glue = tiny_setup
    bad = tmp_path / "glue" / "SST-2"
    bad.mkdir(parents=True)
    shutil.copy(Path(glue) / "SST-2" / "dev.tsv", bad / "dev.tsv")
    rows = (Path(glue) / "SST-2" / "train.tsv").read_text()
    (bad / "train.tsv").write_text(rows[:len(rows) // 2].rsplit("\t", 1)[0] + "\n")
    out = tmp_path / "search"
    args = ["search", "--task", "SST-2", "--out", str(out), "--model", model, "--epochs", "1",
            "--threads", "1", "--quiet", *(["--seeds", seeds] if seeds else [])]
    assert main([*args, "--glue-dir", str(bad.parent)]) == 2
    assert "train.tsv" in capsys.readouterr().err
    assert not list(out.rglob("config.json")), sorted(out.rglob("*"))
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    fresh = tmp_path / "no-data"
    assert main([*args[:4], str(fresh), *args[5:]]) == 2
    assert "`datasets` package is not installed" in capsys.readouterr().err
    assert not fresh.exists()


@pytest.mark.parametrize("seeds", [None, "1,2"])
def test_a_second_search_on_a_busy_directory_is_refused(seeds, tiny_setup, tmp_path, capsys):
    """Two searches on one --out raced on its files (a checkpoint's temporary file, appended
    metrics); the second is refused at once, before anything is written."""
    out = tmp_path / "search"
    args = ["search", "--task", "SST-2", "--out", str(out), "--model", tiny_setup[0],
            "--glue-dir", tiny_setup[1], "--epochs", "1", "--quiet"]
    with run_lock(out, "search"):
        assert main([*args, *(["--seeds", seeds] if seeds else [])]) == 2
    err = capsys.readouterr().err
    assert "another search is running on this directory" in err and not out.exists(), err


def test_outputs(reference):
    out, summary = reference
    assert summary["kind"] == "sparsebert-search" and summary["task"] == "SST-2"
    for method in ("structured", "magnitude"):
        result = summary["methods"][method]
        assert set(result["subnetworks"]) == {"good", "random", "bad"}
        for sub in result["subnetworks"].values():
            assert sub["pruned"] is not None and sub["retrained"] is not None
        assert result["curve"][0]["fraction_kept"] == 1.0
    assert (out / "structured" / "masks" / "good.json").is_file()
    assert (out / "magnitude" / "masks" / "good.safetensors").is_file()
    # The retrained s-pruning good run is physically pruned and reloads as such.
    masks = json.loads((out / "structured" / "retrained" / "good" / "masks.json").read_text())
    good = summary["methods"]["structured"]["subnetworks"]["good"]
    assert masks["heads_kept"] == good["heads_kept"]
    if good["heads_kept"] < 8:
        assert masks["pruned"]
    # Magnitude retraining held the mask: masked weights are zero in the saved model.
    from safetensors.torch import load_file  # noqa: PLC0415

    weights = load_file(str(out / "magnitude" / "retrained" / "good" / "model" /
                            "model.safetensors"))
    mask = load_file(str(out / "magnitude" / "masks" / "good.safetensors"))
    for name, keep in mask.items():
        assert (weights[name][~keep.bool()] == 0).all()
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"structured", "magnitude"}
    full_result = json.loads((out / "full" / "results.json").read_text())
    assert summary["full"]["train_examples"] == full_result["train_examples"] > 0
    assert summary["full"]["train_set_examples"] == full_result["train_set_examples"] > 0
    if summary["full"]["score"] <= summary["majority"]:  # the threshold is meaningless: said
        assert any("meaningless" in note for note in summary["methods"]["structured"]["notes"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_each_stage_gives_the_same_results(reference, tiny_setup, tmp_path, stage):
    _, expected = reference
    out = tmp_path / "search"
    stopped = search("SST-2", out, progress=False, stop_after=stage, **_options(tiny_setup))
    assert stopped["status"] == "stopped"
    resumed = search("SST-2", out, progress=False, **_options(tiny_setup))
    assert _strip(resumed) == _strip(expected)


def test_interrupted_retraining_resumes(reference, tiny_setup, tmp_path):
    """A re-fine-tune stopped mid-way (stop_after_steps, a runtime field) resumes from its
    checkpoint on the rerun, with the same final results."""
    _, expected = reference
    out = tmp_path / "search"
    search("SST-2", out, progress=False, stop_after="structured.pruned.good",
           **_options(tiny_setup))
    stopped = search("SST-2", out, progress=False, **_options(tiny_setup, stop_after_steps=3))
    assert stopped["status"] == "stopped"
    partial = out / "structured" / "retrained" / "good"
    assert (partial / "checkpoint.pt").is_file() and not (partial / "results.json").exists()
    resumed = search("SST-2", out, progress=False, **_options(tiny_setup))
    assert _strip(resumed) == _strip(expected)


def test_a_kill_between_paired_writes_is_repaired_on_rerun(reference, tiny_setup, tmp_path):
    """A kill between a stage's two writes: m-pruning's masks/<subnet>.safetensors without its
    .json, search.json with only part of its curve in metrics.jsonl (as written line by line
    before). The rerun rebuilds what is missing and ends with the same results and log as an
    uninterrupted search."""
    ref_out, expected = reference
    out = tmp_path / "search"
    search("SST-2", out, progress=False, stop_after="magnitude.search", **_options(tiny_setup))
    (out / "magnitude" / "masks" / "random.json").unlink()
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines()
    curve = [line for line in lines if json.loads(line)["method"] == "magnitude"]
    assert len(curve) > 1
    log.write_text("".join(line + "\n" for line in lines if line not in curve[1:]))
    resumed = search("SST-2", out, progress=False, **_options(tiny_setup))
    assert _strip(resumed) == _strip(expected)
    for name in ("random.json", "random.safetensors"):
        assert (out / "magnitude" / "masks" / name).read_bytes() == (
            ref_out / "magnitude" / "masks" / name).read_bytes()
    assert log.read_text() == (ref_out / "metrics.jsonl").read_text()


def test_a_rerun_drops_checkpoints_left_in_finished_retrainings(reference, tiny_setup,
                                                                  tmp_path):
    """A kill after a re-fine-tune's results.json but before its checkpoints went: the rerun,
    which skips that finished run, removes them."""
    ref_out, expected = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    leftovers = [out / method / "retrained" / "good" / "checkpoint.pt"
                 for method in ("structured", "magnitude")]
    for path in leftovers:
        path.write_bytes(b"left behind")
    assert _strip(search("SST-2", out, progress=False, **_options(tiny_setup))) == \
        _strip(expected)
    assert not any(path.exists() for path in leftovers)


def _write_curve(barrier, out: Path, method: str) -> None:
    records = [{"step": i, "kept": 100 - i, "fraction_kept": 1 - i / 100, "search_score": 0.5}
               for i in range(20)]
    barrier.wait()
    Search._metrics(types.SimpleNamespace(out=out), method, records)


def test_both_methods_curves_survive_parallel_writers(tmp_path):
    """A sweep runs a seed's two method searches at once: both curves end up in its
    metrics.jsonl (each writer reads and rewrites it under a lock)."""
    context = multiprocessing.get_context("fork")
    for trial in range(8):
        out = tmp_path / str(trial)
        out.mkdir()
        barrier = context.Barrier(2)
        workers = [context.Process(target=_write_curve, args=(barrier, out, method))
                   for method in ("structured", "magnitude")]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # whichever wrote first, the curves are in METHODS order: the same file every time
        assert [r["method"] for r in records] == ["structured"] * 20 + ["magnitude"] * 20
        assert [r["step"] for r in records] == [*range(20), *range(20)]


def test_redo_a_method(reference, tiny_setup, tmp_path):
    """redo="structured" sets the s-pruning results aside (out/.superseded/) and computes them
    again: the same results as the reference, no stale curve record; the full model and
    m-pruning are not touched."""
    ref_out, expected = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    found = out / "structured" / "search.json"
    found.write_text(json.dumps({**json.loads(found.read_text()), "stale": True}))
    log = out / "metrics.jsonl"
    log.write_text("".join(json.dumps({**json.loads(line), "stale": True}) + "\n"
                           if json.loads(line)["method"] == "structured" else line + "\n"
                           for line in log.read_text().splitlines()))
    untouched = {p: p.stat().st_mtime_ns for p in [*(out / "full").rglob("*"),
                                                   *(out / "magnitude").rglob("*")]}
    (out / "speed").mkdir()  # timings of the old s-pruning masks
    summary = search("SST-2", out, progress=False, redo="structured", **_options(tiny_setup))
    assert _strip(summary) == _strip(expected)
    assert "stale" not in json.loads(found.read_text())
    assert not any("stale" in line for line in log.read_text().splitlines())
    assert log.read_text() == (ref_out / "metrics.jsonl").read_text()
    aside = next((out / ".superseded").glob("redo-structured-*"))
    assert json.loads((aside / "structured" / "search.json").read_text())["stale"]
    assert (aside / "speed").is_dir() and not (out / "speed").exists()
    assert not (out / ".superseded" / "redo.json").exists()  # finished
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


def test_a_redo_of_both_methods_keeps_the_whole_curve_file_aside(tmp_path):
    """The set-aside copy of metrics.jsonl is the file before any record was dropped: the
    second method's copy replaced it with one the first had filtered, so the first method's
    curve was lost from both places."""
    from sparsebert.lottery.redo import set_aside  # noqa: PLC0415

    records = [{"method": "structured", "step": 1, "score": 0.8},
               {"method": "magnitude", "step": 1, "score": 0.7}, {"step": 5, "loss": 0.3}]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(whole)
    for method in ("structured", "magnitude"):
        (tmp_path / method).mkdir()
        (tmp_path / method / "search.json").write_text("{}")
    aside = tmp_path / ".superseded" / "redo"
    set_aside(tmp_path, [tmp_path], [tmp_path], ("structured", "magnitude"), aside)
    assert (aside / "metrics.jsonl").read_text() == whole
    assert [json.loads(line) for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == records[2:]


def test_a_run_whose_model_is_gone_is_fine_tuned_again(reference, tiny_setup, tmp_path):
    """A finished run whose model/ was deleted (results.json still says finished) is not
    done: a stage run alone names the full model's folder and how to redo it, and the rerun
    fine-tunes the full model and the re-fine-tune again (the same results on the CPU)
    rather than skipping them, or failing on a --model the user never passed."""
    from sparsebert.errors import RunDirError  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    ref_out, expected = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    gone = [out / "full" / "model", out / "structured" / "retrained" / "good" / "model"]
    for folder in gone:
        shutil.rmtree(folder)
    options = _options(tiny_setup)
    train = TrainConfig(task="SST-2", **{k: v for k, v in options.items()
                                         if k in TrainConfig.__dataclass_fields__})
    alone = Search(SearchConfig(importance_batch_size=16), train, out, progress=False)
    with pytest.raises(RunDirError, match=r"full: the full model's folder is gone \(.*full/model "
                                          r"is missing\).*delete the run directory"):
        alone.load_full()
    with pytest.warns(UserWarning, match="its model is gone"):
        resumed = search("SST-2", out, progress=False, **options)
    assert _strip(resumed) == _strip(expected)
    assert all((folder / "config.json").is_file() for folder in gone)
    assert not (out / ".superseded").exists()  # the same weights again: nothing set aside


def test_results_built_on_another_full_model_are_set_aside(reference, tiny_setup, tmp_path,
                                                            capsys):
    """A full model whose weights are not the ones the search's results were built on (fine-
    tuned again on a GPU, or replaced by hand) makes both methods' results, the summary and the
    speed timings stale: they are set aside to out/.superseded/full-model-*/ and computed again
    from the new model; a rerun then keeps everything."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    ref_out, _ = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    assert json.loads((out / "full_model.json").read_text())["weights_sha256"]
    weights = out / "full" / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(0)
    save_file({name: t + 0.05 * torch.randn(t.shape, generator=generator) if t.is_floating_point()
               else t for name, t in tensors.items()}, str(weights), metadata={"format": "pt"})
    (out / "speed").mkdir()  # timings of the old model's masks
    summary = search("SST-2", out, progress=False, **_options(tiny_setup))
    assert "set aside" in capsys.readouterr().err
    aside = next((out / ".superseded").glob("full-model-*"))
    for name in ("structured/search.json", "magnitude/search.json", "summary.superseded.json"):
        assert (aside / name).is_file(), name
    assert (aside / "structured" / "search.json").read_bytes() == (
        ref_out / "structured" / "search.json").read_bytes()
    assert (aside / "speed").is_dir() and not (out / "speed").exists()
    assert (out / "structured" / "search.json").read_bytes() != (
        ref_out / "structured" / "search.json").read_bytes()  # computed again, on the new model
    assert summary["methods"]["structured"]["subnetworks"]["good"]["retrained"] is not None
    search("SST-2", out, progress=False, **_options(tiny_setup))
    assert len(list((out / ".superseded").iterdir())) == 1  # the same model: nothing more


def test_a_rerun_says_what_it_skips_and_a_redo_of_nothing_says_so(reference, tiny_setup,
                                                                 tmp_path, capsys):
    """A finished search run again says its full model is fine-tuned already (not "fine-tuning
    the full model"); --redo where nothing was searched yet warns that there is nothing to
    redo."""
    import types  # noqa: PLC0415

    from sparsebert.lottery.search import set_aside_for_redo  # noqa: PLC0415

    out = tmp_path / "search"
    shutil.copytree(reference[0], out)
    search("SST-2", out, progress=True, **_options(tiny_setup))
    err = capsys.readouterr().err
    assert "] the full model is fine-tuned already (dev acc " in err
    assert "fine-tuning the full model" not in err
    with pytest.warns(UserWarning, match=r"--redo structured: nothing was searched in .*new yet, "
                                         r"so there is nothing to redo"):
        set_aside_for_redo([types.SimpleNamespace(out=tmp_path / "new")], tmp_path / "new",
                           ("structured",))


def test_redo_with_a_changed_method_setting(reference, tiny_setup, tmp_path):
    """A search setting that only one method uses (here m-pruning's step) may change with
    --redo of that method: its results are recomputed under the new setting, the full model
    and the other method's results kept, and config.json records the new setting."""
    ref_out, expected = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    untouched = {p: p.stat().st_mtime_ns for p in [*(out / "full").rglob("*"),
                                                   *(out / "structured").rglob("*")]}
    with pytest.raises(SparsebertError, match="--redo magnitude"):
        search("SST-2", out, progress=False, **_options(tiny_setup, magnitude_amount=0.3))
    summary = search("SST-2", out, progress=False, redo="magnitude",
                     **_options(tiny_setup, magnitude_amount=0.3))
    curve = summary["methods"]["magnitude"]["curve"]
    assert curve[1]["fraction_kept"] == pytest.approx(0.7, abs=1e-3)
    assert expected["methods"]["magnitude"]["curve"][1]["fraction_kept"] == pytest.approx(
        0.9, abs=1e-3)
    assert summary["methods"]["structured"] == expected["methods"]["structured"]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert json.loads((out / "config.json").read_text())["search"]["magnitude_amount"] == 0.3
    again = search("SST-2", out, progress=False, **_options(tiny_setup, magnitude_amount=0.3))
    assert _strip(again) == _strip(summary)  # a plain rerun with the new setting resumes


def test_interrupted_redo_resumes(reference, tiny_setup, tmp_path, capsys):
    """The same --redo rerun after an interruption resumes the redo: what it redid so far is
    kept, nothing more is set aside."""
    ref_out, expected = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    stopped = search("SST-2", out, progress=False, redo="structured",
                     stop_after="structured.search", **_options(tiny_setup))
    assert stopped["status"] == "stopped" and (out / ".superseded" / "redo.json").is_file()
    # The old summary (and the report over it) no longer passes for the search's results.
    assert not any((out / name).exists() for name in ("summary.json", "report.md", "figures"))
    aside = next((out / ".superseded").glob("redo-structured-*"))
    assert json.loads((aside / "summary.superseded.json").read_text()) == expected
    redone = (out / "structured" / "search.json").stat().st_mtime_ns
    summary = search("SST-2", out, progress=False, redo="structured", **_options(tiny_setup))
    assert _strip(summary) == _strip(expected)
    assert (out / "structured" / "search.json").stat().st_mtime_ns == redone
    assert len(list((out / ".superseded").glob("redo-*"))) == 1
    assert not (out / ".superseded" / "redo.json").exists()
    # A redo completed by a rerun without --redo is done too: the next --redo starts anew
    # (in a folder of its own, even within the same second).
    search("SST-2", out, progress=False, redo="structured", stop_after="structured.search",
           **_options(tiny_setup))
    assert len(list((out / ".superseded").glob("redo-*"))) == 2
    search("SST-2", out, progress=False, **_options(tiny_setup))
    assert not (out / ".superseded" / "redo.json").exists()
    model, glue = tiny_setup
    assert main(["search", "--task", "SST-2", "--out", str(out), "--model", model,
                 "--glue-dir", glue, "--method", "structured", "--redo", "magnitude",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--redo 'magnitude': expected comma-separated methods the search runs " \
           "(structured; --method structured)" in err


def test_interrupted_redo_with_other_settings_starts_anew(reference, tiny_setup, tmp_path):
    """A --redo magnitude interrupted under one amount and rerun under another: what it made
    under the first is set aside too, and the search runs under the second."""
    ref_out, _ = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    stopped = search("SST-2", out, progress=False, redo="magnitude",
                     stop_after="magnitude.search", **_options(tiny_setup, magnitude_amount=0.3))
    assert stopped["status"] == "stopped"
    summary = search("SST-2", out, progress=False, redo="magnitude",
                     **_options(tiny_setup, magnitude_amount=0.5))
    assert summary["methods"]["magnitude"]["curve"][1]["fraction_kept"] == pytest.approx(
        0.5, abs=1e-3)
    assert len(list((out / ".superseded").glob("redo-*"))) == 2


def test_search_resumed_on_other_data_is_refused(tiny_setup, tmp_path):
    """The search stages (importance and scores on dev) refuse a GLUE folder whose files differ
    from the ones the search started with, even once the full model is finished."""
    _, glue = tiny_setup
    out = tmp_path / "search"
    search("SST-2", out, progress=False, stop_after="full", **_options(tiny_setup))
    other = tmp_path / "other_glue"
    shutil.copytree(glue, other)
    dev = other / "SST-2" / "dev.tsv"
    dev.write_text("".join(line + "\n" for line in dev.read_text().splitlines()[:-1]))
    with pytest.raises(SparsebertError, match="other SST-2 data: the dev data"):
        search("SST-2", out, progress=False, **_options(tiny_setup, glue_dir=str(other)))
    assert not (out / "structured").exists()


def test_a_search_refused_at_its_start_records_no_data(tiny_setup, tmp_path):
    """A first call on a GLUE folder that cannot be read records nothing about the data: the
    corrected call, on another folder, runs."""
    _, glue = tiny_setup
    broken = tmp_path / "broken_glue"
    shutil.copytree(glue, broken)
    (broken / "SST-2" / "train.tsv").write_text("text\twhat\nfine\t1\n")
    out = tmp_path / "search"
    with pytest.raises(SparsebertError, match="wrong columns"):
        search("SST-2", out, progress=False, stop_after="full",
               **_options(tiny_setup, glue_dir=str(broken)))
    assert not (out / "data.json").exists()
    stopped = search("SST-2", out, progress=False, stop_after="full", **_options(tiny_setup))
    assert stopped["status"] == "stopped"
    assert json.loads((out / "data.json").read_text())["source"] == "glue_dir"


@pytest.mark.parametrize("missing", ["train", "dev"])
def test_a_search_without_a_split_writes_nothing(tiny_setup, tmp_path, missing):
    """A GLUE folder without the task's train (or dev) file is refused before --out is
    claimed: the corrected call runs, whatever its other settings."""
    _, glue = tiny_setup
    partial = tmp_path / "partial_glue"
    shutil.copytree(glue, partial)
    (partial / "SST-2" / f"{missing}.tsv").unlink()
    out = tmp_path / "search"
    with pytest.raises(SparsebertError, match=f"SST-2 {missing} split not found"):
        search("SST-2", out, progress=False, stop_after="full",
               **_options(tiny_setup, glue_dir=str(partial)))
    assert not out.exists()
    stopped = search("SST-2", out, progress=False, stop_after="full",
                     **_options(tiny_setup, lr=3e-3))
    assert stopped["status"] == "stopped"


def test_different_config_is_refused_and_nothing_lost(reference, tiny_setup, tmp_path):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    with pytest.raises(SparsebertError, match="different config.*threshold.*to keep the "
                       "fine-tuned full model, redo what the change affects: --redo "
                       "structured,magnitude"):
        search("SST-2", copy, progress=False, **_options(tiny_setup, threshold=0.8))
    with pytest.raises(SparsebertError, match="--redo structured,magnitude"):  # not enough
        search("SST-2", copy, progress=False, redo="structured",
               **_options(tiny_setup, threshold=0.8))
    with pytest.raises(SparsebertError, match="different config.*lr"):
        search("SST-2", copy, progress=False, **_options(tiny_setup, lr=1e-3))
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_cli_json_output_is_only_json(reference, tiny_setup, tmp_path, capsys):
    """`search --json` with progress on: stdout is the summary as JSON, the log lines go to
    stderr (here on the finished reference copy: nothing is recomputed)."""
    out, summary = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    model, glue = tiny_setup
    flags = ["--model", model, "--glue-dir", glue, "--epochs", "2", "--batch-size", "16",
             "--lr", "2e-3", "--seed", "3", "--threads", "1", "--importance-batch-size", "16",
             "--log-every", "2"]
    capsys.readouterr()
    assert main(["search", "--task", "SST-2", "--out", str(copy), *flags, "--json"]) == 0
    captured = capsys.readouterr()
    assert _strip(json.loads(captured.out)) == _strip(summary)
    assert "[search SST-2 seed 3]" in captured.err


def test_cli_search_errors(tiny_setup, tmp_path, capsys):
    model, glue = tiny_setup
    base = ["search", "--task", "SST-2", "--model", model, "--glue-dir", glue, "--quiet"]
    cases = [(["--method", "nope"], "--method"), (["--subnets", "good,ugly"], "--subnets"),
             (["--threshold", "1.5"], "--threshold"), (["--threshold", "0"], "--threshold"),
             (["--seeds", "1,2", "--seed", "3"], "--seeds"), (["--seeds", "1,x"], "--seeds")]
    for extra, expected in cases:
        assert main([*base, "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    file = tmp_path / "file"
    file.write_text("keep me")
    assert main([*base, "--out", str(file)]) == 2
    assert "is a file" in capsys.readouterr().err and file.read_text() == "keep me"


def test_a_seeds_other_full_model_sets_aside_its_super_survivor_scores(tiny_setup, tmp_path,
                                                                        capsys):
    """With --seeds, what the seeds' folder holds that was built on one seed's full model (the
    super-survivor controls' pruned scores on that model, the seeds' timings) goes aside with
    that seed's own results when its full model changes: to OUT/.superseded/full-model-seed_<s>-*
    (the other seeds' scores and the controls' re-fine-tunes are kept)."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from sparsebert.lottery.super_survivors import search_seeds  # noqa: PLC0415
    from sparsebert.train.config import TrainConfig  # noqa: PLC0415

    options = _options(tiny_setup)
    train = TrainConfig(**{k: v for k, v in options.items() if k != "importance_batch_size"})
    config = SearchConfig(method="structured", importance_batch_size=16, subnets="good",
                          retrain=False)
    search_seeds("SST-2", tmp_path, [3, 4], search_config=config, train_config=train,
                 progress=False)
    scores = {s: tmp_path / "super" / "pruned" / "good" / f"seed_{s}.json" for s in (3, 4)}
    old = {s: path.read_bytes() for s, path in scores.items()}
    kept = scores[4].stat().st_mtime_ns
    weights = tmp_path / "seed_3" / "full" / "model" / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({name: t + 0.05 * torch.randn(t.shape, generator=generator)
               if t.is_floating_point() else t
               for name, t in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    (tmp_path / "speed").mkdir()  # timings of the seeds' old masks
    capsys.readouterr()
    search_seeds("SST-2", tmp_path, [3, 4], search_config=config, train_config=train,
                 progress=False)
    assert "set aside" in capsys.readouterr().err
    aside = next((tmp_path / ".superseded").glob("full-model-seed_3-*"))
    assert (aside / "super" / "pruned" / "good" / "seed_3.json").read_bytes() == old[3]
    assert (aside / "seed_3" / "structured" / "search.json").is_file()
    assert (aside / "speed").is_dir() and not (tmp_path / "speed").exists()
    assert scores[3].is_file()  # scored again, on the new model
    assert scores[4].read_bytes() == old[4] and scores[4].stat().st_mtime_ns == kept
    assert not (tmp_path / "seed_4" / ".superseded").exists()


def test_seeds_and_super_survivors(tiny_setup, tmp_path):
    from sparsebert.lottery.config import SearchConfig  # noqa: PLC0415
    from sparsebert.lottery.super_survivors import search_seeds  # noqa: PLC0415
    from sparsebert.train.config import TrainConfig  # noqa: PLC0415

    options = _options(tiny_setup)
    train = TrainConfig(**{k: v for k, v in options.items() if k != "importance_batch_size"})
    config = SearchConfig(method="structured", importance_batch_size=16, masking_amount=0.25)
    summary = search_seeds("SST-2", tmp_path, [3, 4], search_config=config, train_config=train,
                           progress=False)
    assert summary["kind"] == "sparsebert-super" and summary["seeds"] == [3, 4]
    good_masks = [np.asarray(json.loads((tmp_path / f"seed_{s}" / "structured" /
                                         "search.json").read_text())["head_mask"])
                  for s in (3, 4)]
    expected = (good_masks[0] == 1) & (good_masks[1] == 1)
    assert np.array_equal(np.asarray(summary["head_mask"]) == 1, expected)
    subnets = summary["subnetworks"]
    never = (good_masks[0] == 0) & (good_masks[1] == 0)
    bad = np.asarray(subnets["bad"]["head_mask"]) == 1
    assert not (bad & ~never).any()  # bizarro heads come from those pruned in every seed
    random = np.asarray(subnets["random"]["head_mask"]) == 1
    assert not (random & (expected | never)).any()  # middling: neither set
    for sub in subnets.values():
        assert [e["seed"] for e in sub["retrained"]] == [3, 4]
        assert [e["seed"] for e in sub["pruned"]] == [3, 4]
    assert (tmp_path / "report.md").is_file()
    again = search_seeds("SST-2", tmp_path, [3, 4], search_config=config, train_config=train,
                         progress=False)
    assert again["subnetworks"] == summary["subnetworks"]  # resumed: nothing redone
    # --redo structured: every seed's s-pruning and the super-survivors again, same results.
    redone = search_seeds("SST-2", tmp_path, [3, 4], search_config=config, train_config=train,
                          progress=False, redo="structured")
    assert redone["subnetworks"] == summary["subnetworks"]
    aside = next((tmp_path / ".superseded").glob("redo-structured-*"))
    assert (aside / "super" / "summary.superseded.json").is_file()
    assert (aside / "seed_4" / "structured" / "search.json").is_file()
    assert (tmp_path / "seed_4" / "structured" / "search.json").is_file()
    # Without super-survivors, the seeds still get one report over both.
    plain = tmp_path / "plain"
    for seed in (3, 4):
        shutil.copytree(tmp_path / f"seed_{seed}", plain / f"seed_{seed}")
    last = search_seeds("SST-2", plain, [3, 4], search_config=config, train_config=train,
                        progress=False, super_survivors=False)
    assert last["seed"] == 4 and not (plain / "super").exists()
    text = (plain / "report.md").read_text()
    assert "(n=2)" in text and "| super good R | — |" in text  # super-survivors: not run


def test_seeds_reruns_with_other_seeds_order_or_subnetworks(tiny_setup, tmp_path, capsys):
    """A seeds directory run again with fewer subnetworks, more seeds without super-survivors,
    fewer seeds, or the same seeds in another order: the super-survivors' summary keeps every
    subnetwork built, the report covers the command's seeds (other seed folders and
    super-survivors of another seed list left out, with a note; nothing fails), and the same
    seeds in another order reuse the super-survivors."""
    import dataclasses  # noqa: PLC0415

    from sparsebert.lottery.super_survivors import search_seeds  # noqa: PLC0415
    from sparsebert.train.config import TrainConfig  # noqa: PLC0415

    options = _options(tiny_setup)
    train = TrainConfig(**{k: v for k, v in options.items() if k != "importance_batch_size"})
    config = SearchConfig(method="structured", importance_batch_size=16, masking_amount=0.25,
                          retrain=False)

    def run(seeds, **kw):
        return search_seeds("SST-2", tmp_path, seeds, train_config=train, progress=False,
                            **{"search_config": config, **kw})

    first = run([3, 4])
    assert set(first["subnetworks"]) == {"good", "random", "bad"}
    narrow = run([3, 4], search_config=dataclasses.replace(config, subnets="good"))
    assert narrow["subnetworks"] == first["subnetworks"]  # random and bad were built: kept
    assert "| super bad P | — |" not in (tmp_path / "report.md").read_text()
    capsys.readouterr()

    run([3, 4, 5], super_survivors=False)  # a third seed, no super-survivors of three seeds
    err = capsys.readouterr().err
    assert "super-survivors of seeds [3, 4], not [3, 4, 5]; left out" in err
    text = (tmp_path / "report.md").read_text()
    assert "(n=3)" in text and "| super good P | — |" in text

    again = run([4, 3])  # the same seeds in another order: nothing drawn or scored again
    assert again["seeds"] == [4, 3]
    for name, sub in first["subnetworks"].items():
        other = again["subnetworks"][name]
        assert other["head_mask"] == sub["head_mask"] and other["mlp_mask"] == sub["mlp_mask"]
        assert sorted(other["pruned"], key=lambda e: e["seed"]) == sub["pruned"]
    assert not (tmp_path / ".superseded").exists()
    err = capsys.readouterr().err
    assert "seed_5: not one of the seeds [4, 3]; left out" in err
    text = (tmp_path / "report.md").read_text()
    assert "(n=2)" in text and "| super good P | — |" not in text


def test_s_pruning_scores_masked_heads(tiny_setup, tmp_path, monkeypatch):
    """The s-pruning search asks for masked heads' true scores (score_masked_heads): the first
    step of phases 2 and 3 ranks the heads of the previous phase's failed step by them, as the
    authors' code does, rather than taking them first (by index) at a score of 0."""
    import sparsebert.lottery.structured_stages as stages  # noqa: PLC0415

    asked, real = [], stages.importance

    def recording(*args, **kwargs):
        asked.append(kwargs.get("score_masked_heads", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "importance", recording)
    search("SST-2", tmp_path / "search", progress=False,
           **_options(tiny_setup, method="structured", subnets="good"))
    assert asked and all(asked)


def test_a_narrower_rerun_keeps_every_finished_subnetwork(reference, tiny_setup, tmp_path):
    """--subnets and --method only say what to compute: rerunning a finished search with
    --method structured --subnets good rewrites the summary with every subnetwork of both
    methods, as they are on disk."""
    ref_out, ref_summary = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    summary = search("SST-2", out, progress=False,
                     **_options(tiny_setup, method="structured", subnets="good"))
    for method in ("structured", "magnitude"):
        assert list(summary["methods"][method]["subnetworks"]) == ["good", "random", "bad"]
    mine, ref = _strip(summary), _strip(ref_summary)
    assert mine.pop("config")["search"]["subnets"] == "good"  # this call's scope, recorded
    ref.pop("config")
    assert mine == ref


def test_a_rerun_refused_for_other_data_leaves_config_json(reference, tiny_setup, tmp_path,
                                                            monkeypatch):
    """A finished search rerun on the hub's data instead of its GLUE folder is refused before
    anything is written: config.json keeps its glue_dir (which `speed --run` reads)."""
    ref_out, _ = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    before = (out / "config.json").read_bytes()
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(SparsebertError, match="was started on a local GLUE folder"):
        search("SST-2", out, progress=False, **_options(tiny_setup, glue_dir=None))
    assert (out / "config.json").read_bytes() == before


def test_search_refuses_another_layout(reference, tiny_setup, tmp_path):
    """--out of a sweep (or inside one), a multi-seed search's folder for a single-seed search,
    and a single-seed search's folder for --seeds are refused before anything is written."""
    from sparsebert.lottery.super_survivors import search_seeds  # noqa: PLC0415

    sweep = tmp_path / "sweep"
    (sweep / "SST-2").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    for out in (sweep, sweep / "SST-2", sweep / "SST-2" / "seed_3"):
        with pytest.raises(SparsebertError, match="sweep directory"):
            search("SST-2", out, progress=False, **_options(tiny_setup))
        with pytest.raises(SparsebertError, match="sweep directory"):
            search_seeds("SST-2", out, [1, 2], progress=False)
    seeds = tmp_path / "seeds"
    (seeds / "seed_1").mkdir(parents=True)
    (seeds / "seed_1" / "config.json").write_text("{}")
    with pytest.raises(SparsebertError, match="holds a multi-seed search"):
        search("SST-2", seeds, progress=False, **_options(tiny_setup))
    # a folder of other files: a search would write beside (and over) them
    for folder, run in ((tmp_path / "docs", lambda out: search(
            "SST-2", out, progress=False, **_options(tiny_setup))),
            (tmp_path / "docs-seeds", lambda out: search_seeds(
                "SST-2", out, [1, 2], progress=False))):
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        (folder / ".keep").write_text("")  # hidden: no matter
        with pytest.raises(SparsebertError, match=rf"--out {folder}: holds files that are not "
                                                  r"a search's \(notes.txt\)"):
            run(folder)
        assert sorted(p.name for p in folder.iterdir()) == [".keep", "notes.txt"]
    single = tmp_path / "single"
    shutil.copytree(reference[0], single)
    listing = sorted(p.relative_to(single) for p in single.rglob("*"))
    with pytest.raises(SparsebertError, match="holds a single-seed search"):
        search_seeds("SST-2", single, [1, 2], progress=False)
    assert sorted(p.relative_to(single) for p in single.rglob("*")) == listing
    assert not (sweep / "SST-2" / "config.json").exists() and not (sweep / "config.json").exists()


def test_a_rerun_for_another_task_is_refused_for_the_task(reference, tiny_setup, tmp_path):
    """Another --task in a search's directory is refused as another config (naming the task),
    not as changed GLUE files."""
    out = tmp_path / "search"
    shutil.copytree(reference[0], out)
    before = (out / "config.json").read_bytes()
    with pytest.raises(SparsebertError, match=r"different config \(\{'task': \('SST-2', 'RTE'\)"):
        search("RTE", out, progress=False, **_options(tiny_setup))
    assert (out / "config.json").read_bytes() == before


def test_the_largest_seeds_run_the_magnitude_stage(tiny_setup, tmp_path):
    """Every seed the config accepts (up to 2**64 - 1) builds the m-random mask: the derived
    generator seed wraps instead of overflowing after the fine-tune and the search."""
    from sparsebert.train.config import MAX_SEED  # noqa: PLC0415

    summary = search("SST-2", tmp_path / "big-seed", progress=False, method="magnitude",
                     retrain=False, subnets="random", **_options(tiny_setup, seed=MAX_SEED))
    assert summary["methods"]["magnitude"]["subnetworks"]["random"]["pruned"]["score"] >= 0


def test_magnitude_good_keeps_the_largest_weights_and_bad_the_smallest(reference):
    """Against the fine-tuned weights: every weight the good mask keeps is at least as large
    in magnitude as every one it removes, and the reverse for bad (PAPER.md §2, §3)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    out, _ = reference
    weights = load_file(str(out / "full" / "model" / "model.safetensors"))
    for name in ("good", "bad"):
        mask = {k: v.bool() for k, v in
                load_file(str(out / "magnitude" / "masks" / f"{name}.safetensors")).items()}
        kept = torch.cat([weights[k][m].abs().flatten() for k, m in mask.items()])
        gone = torch.cat([weights[k][~m].abs().flatten() for k, m in mask.items()])
        assert len(kept) and len(gone), name
        if name == "good":
            assert kept.min() >= gone.max()
        else:
            assert kept.max() <= gone.min()


def test_magnitude_saved_mask_is_the_last_passing_step_below_the_cap(reference):
    """The authors' loop saves the mask before each prune step, so the last of its
    magnitude_max_steps iterations is evaluated but never saved (PAPER.md §2)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from sparsebert.lottery import magnitude as mag  # noqa: PLC0415

    out, _ = reference
    found = json.loads((out / "magnitude" / "search.json").read_text())
    cap = SearchConfig().magnitude_max_steps
    last_pass = max(c["step"] for c in found["curve"] if c["passed"])
    assert found["good_step"] == min(last_pass, cap - 1)
    total = found["curve"][0]["kept"]
    good = load_file(str(out / "magnitude" / "masks" / "good.safetensors"))
    assert sum(int(v.sum()) for v in good.values()) == mag.kept_count(total, found["good_step"])


def test_stsb_threshold_is_on_the_full_models_corr(tiny_setup, tmp_path):
    """STS-B searches on corr = (Pearson + Spearman) / 2 of the full model (PAPER.md §0) and
    reports Pearson."""
    out = tmp_path / "search"
    search("STS-B", out, progress=False, method="structured", subnets="good", retrain=False,
           **_options(tiny_setup, epochs=1))
    full = json.loads((out / "full" / "results.json").read_text())["metrics"]["dev"]
    found = json.loads((out / "structured" / "search.json").read_text())
    corr = (full["pearson"] + full["spearman"]) / 2  # (the search re-scores the patched model)
    assert abs(full["pearson"] - corr) > 1e-3  # the two metrics tell apart here
    assert found["full_search_score"] == pytest.approx(corr, abs=1e-4)
    assert found["threshold_score"] == pytest.approx(0.9 * corr, abs=1e-4)
    assert found["curve"][0]["score"] == pytest.approx(full["pearson"], abs=1e-4)


def test_a_search_resumed_from_changed_model_files_is_refused(tiny_setup, tmp_path):
    """The retrainings and m-pruning rewinds reload the pre-trained weights long after the
    full fine-tune: a search whose --model folder changed since it started is refused."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_setup[0], folder)
    options = _options(tiny_setup, model=str(folder), epochs=1)
    out = tmp_path / "search"
    search("SST-2", out, progress=False, method="structured", subnets="good", retrain=False,
           **options)
    assert json.loads((out / "model.json").read_text())["files"] == \
        json.loads((out / "full" / "model.json").read_text())["files"]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.5}))
    with pytest.raises(SparsebertError, match=r"other model files: config\.json"):
        search("SST-2", out, progress=False, method="structured", subnets="good",
               retrain=False, **options)


def test_the_search_scores_in_its_full_models_precision(tiny_setup, tmp_path, monkeypatch):
    """With precision auto, every score of a search is in the precision its full model was
    fine-tuned in (results.json), also when a later stage runs on another kind of device: here
    a full model recorded as trained in bf16 (on a GPU) and a search resumed on the CPU, where
    auto would pick fp32. The search says so and records it in search.json."""
    import sparsebert.lottery.scoring as scoring  # noqa: PLC0415

    out = tmp_path / "search"
    options = _options(tiny_setup, method="structured", subnets="good", retrain=False)
    search("SST-2", out, progress=False, stop_after="full", **options)
    results_file = out / "full" / "results.json"
    results = json.loads(results_file.read_text())
    assert results["precision"] == "fp32"  # trained here, on the CPU
    results_file.write_text(json.dumps({**results, "precision": "bf16"}))
    asked, real = [], scoring.evaluate_model

    def recording(*args, **kwargs):
        asked.append(args[4] if len(args) > 4 else kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "evaluate_model", recording)
    with pytest.warns(UserWarning, match="fine-tuned in bf16; the search scores in bf16"):
        search("SST-2", out, progress=False, **options)
    assert asked and set(asked) == {"bf16"}
    found = json.loads((out / "structured" / "search.json").read_text())
    assert found["precision"] == "bf16"


def test_a_magnitude_mask_that_disagrees_with_its_record_is_refused(reference, tiny_setup,
                                                                   tmp_path):
    """A kept weight's byte turned 0 (valid as a mask, so the file reads fine) gave a smaller
    mask than the search chose, retrained silently: the file's kept count must be the one its
    .json records, and the error says how to rebuild both."""
    out = tmp_path / "search"
    shutil.copytree(reference[0], out)
    mask_file = out / "magnitude" / "masks" / "random.safetensors"
    data = bytearray(mask_file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after safetensors' header
    data[data.index(1, start)] = 0
    mask_file.write_bytes(bytes(data))
    (out / "magnitude" / "pruned" / "random.json").unlink()
    with pytest.raises(RunDirError, match=r"random.safetensors: damaged \(it keeps (\d+) of (\d+) "
                                          r"weights, random.json records (?!\1 )\d+ of \2\); "
                                          r"delete both to rebuild them"):
        search("SST-2", out, progress=False, **_options(tiny_setup))
    mask_file.unlink()
    mask_file.with_suffix(".json").unlink()
    assert _strip(search("SST-2", out, progress=False, **_options(tiny_setup))) == \
        _strip(reference[1])


_DAMAGED_STAGE_FILES = [
    ("structured/search.json", {"x": 1}, r"no 'curve'"),
    ("magnitude/search.json", {"x": 1}, r"no 'curve'"),
    ("structured/masks/good.json", {"x": 1}, r"no 'head_mask'"),
    ("structured/masks/random.json", [1, 2], r"expected a JSON object, found a list"),
    ("structured/masks/bad.json", {"head_mask": [[1.0, 1.0]], "mlp_mask": [1.0]},
     r"head_mask is \(1, 2\), the search's model has \(L, H\) = "),
    ("structured/pruned/good.json", {"x": 1}, r"no 'metrics'"),
    ("magnitude/pruned/bad.json", {"metrics": 3}, r"'metrics' is a number, expected an object"),
    ("magnitude/pruned/good.json", {"metrics": {}}, r"metrics 'acc' is missing"),
    ("magnitude/masks/good.json", {"x": 1}, r"no 'fraction_kept', 'layer_kept_fraction'"),
]


@pytest.mark.parametrize("name, content, problem", _DAMAGED_STAGE_FILES,
                         ids=[f"{n}-{c}" for n, c, _ in _DAMAGED_STAGE_FILES])
def test_a_stage_file_of_the_wrong_shape_is_named(reference, tiny_setup, tmp_path, name,
                                                  content, problem):
    """A stage file that is valid JSON but not what its stage writes (a wrong object, a list,
    a mask of another shape, a score without the metric) is one error naming the file, what is
    wrong and what to do (was a KeyError, AttributeError or TypeError from a later stage)."""
    out = tmp_path / "search"
    shutil.copytree(reference[0], out)
    (out / name).write_text(json.dumps(content))
    if name.startswith("structured/masks/"):  # read again by the pruned stage
        (out / "structured" / "pruned" / Path(name).name).unlink()
    with pytest.raises(SparsebertError) as error:
        search("SST-2", out, progress=False, **_options(tiny_setup))
    assert re.fullmatch(rf"{re.escape(str(out / name))}: damaged \({problem}.*\); delete it to "
                        rf"redo that stage", str(error.value)), str(error.value)


def test_a_stage_file_of_the_wrong_shape_is_one_line_and_exit_2(reference, tiny_setup,
                                                                tmp_path, capsys):
    """From the command line, such a file is one error line and status 2, no traceback."""
    out = tmp_path / "search"
    shutil.copytree(reference[0], out)
    (out / "structured" / "search.json").write_text('{"x": 1}')
    model, glue = tiny_setup
    assert main(["search", "--task", "SST-2", "--out", str(out), "--model", model,
                 "--glue-dir", glue, "--epochs", "2", "--batch-size", "16", "--lr", "2e-3",
                 "--seed", "3", "--threads", "1", "--importance-batch-size", "16",
                 "--log-every", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsebert: error: {out / 'structured' / 'search.json'}: damaged")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_integer_masks_in_a_mask_file_are_read_as_floats(reference, tiny_setup, tmp_path):
    """A structured mask file with 0/1 integers (written by hand or by another tool) scores as
    the same mask in floats (was a TypeError: head_mask must be floating point)."""
    ref_out, expected = reference
    out = tmp_path / "search"
    shutil.copytree(ref_out, out)
    masks = out / "structured" / "masks" / "good.json"
    found = json.loads(masks.read_text())
    masks.write_text(json.dumps({k: np.asarray(v, dtype=int).tolist() for k, v in found.items()}))
    (out / "structured" / "pruned" / "good.json").unlink()
    summary = search("SST-2", out, progress=False, **_options(tiny_setup))
    good = summary["methods"]["structured"]["subnetworks"]["good"]
    assert good["pruned"] == expected["methods"]["structured"]["subnetworks"]["good"]["pruned"]
