"""`sparsebert speed` as a user meets it: the table and --json on a tiny model, masks from files
and run directories, real GLUE lengths, and bad input (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sparsebert.cli import main
from sparsebert.speed.command import check_dtype
from sparsebert.speed.workload import SpeedError

FAST = ["--batch", "3", "--seq", "12", "--repeats", "1", "--warmup", "0", "--threads", "1",
        "--quiet"]


def _speed(model_dir, *extra, tmp_path=None):
    args = ["speed", "--model", model_dir, *FAST, *extra]
    out = None
    if tmp_path is not None:
        out = tmp_path / "speed.json"
        args += ["--json", str(out)]
    assert main(args) == 0
    return None if out is None else json.loads(out.read_text())


def test_speed_table_and_json(tiny_model_dir, tmp_path, capsys):
    result = _speed(tiny_model_dir, "--prune-heads", "0.5", "--prune-ffn", "0.5", "--lengths",
                    "uniform", tmp_path=tmp_path)
    out = capsys.readouterr().out
    assert "| variant |" in out and "masked" in out and "pruned" in out
    assert {"device", "versions", "git_sha", "args", "rows"} <= set(result)
    variants = [(r["variant"], r["unpad"]) for r in result["rows"]]
    assert variants == [("hf_eager", False), ("dense", True), ("dense", False),
                        ("patched", False), ("masked", True), ("masked", False),
                        ("pruned", False)]
    rows = {(r["variant"], r["unpad"]): r for r in result["rows"]}
    for row in result["rows"]:
        assert {"variant", "heads_kept", "ffn_kept", "median_ms", "p20_ms", "p80_ms",
                "examples_per_s", "samples_ms"} <= set(row)
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        # speed-ups are medians of per-round ratios against the dense (fast path) row
        dense = np.asarray(rows[("dense", True)]["samples_ms"])
        assert row["speedup_vs_dense"] == pytest.approx(
            float(np.median(dense / np.asarray(row["samples_ms"]))), rel=1e-3)
        if row["variant"] != "hf_eager":
            assert row["max_abs_diff"] < 1e-5  # same logits as the masked model
        if row["variant"] in ("masked", "pruned"):
            assert row["heads_kept"] == 0.5 and row["ffn_kept"] == 0.5
    pruned, patched = rows[("pruned", False)], rows[("patched", False)]
    assert pruned["speedup_vs_patched"] == pytest.approx(float(np.median(
        np.asarray(patched["samples_ms"]) / np.asarray(pruned["samples_ms"]))), rel=1e-3)


def test_speed_masks_from_files_and_runs(tiny_model_dir, synthetic_glue, tmp_path):
    layers, heads = 2, 4
    head_mask = np.ones((layers, heads), dtype=np.float32)
    head_mask[0, :2] = 0
    np.save(tmp_path / "heads.npy", head_mask)
    result = _speed(tiny_model_dir, "--head-mask", str(tmp_path / "heads.npy"),
                    tmp_path=tmp_path)
    masked = next(r for r in result["rows"] if r["variant"] == "masked")
    assert masked["heads_kept"] == 0.75 and masked["ffn_kept"] == 1.0
    # A search directory: every subnetwork, good/random/bad first.
    search = tmp_path / "search"
    (search / "structured" / "masks").mkdir(parents=True)
    for name, mlp in (("bad", [1.0, 0.0]), ("good", [1.0, 1.0]), ("random", [0.0, 1.0])):
        (search / "structured" / "masks" / f"{name}.json").write_text(
            json.dumps({"head_mask": head_mask.tolist(), "mlp_mask": mlp}))
    result = _speed(tiny_model_dir, "--run", str(search), "--lengths", "glue:sst2",
                    "--glue-dir", synthetic_glue, tmp_path=tmp_path)
    assert result["args"]["lengths"] == "glue:SST-2"  # one setting, one file name per task
    subnets = [r["subnetwork"] for r in result["rows"] if r["variant"] == "pruned"]
    assert subnets == ["good", "random", "bad"]
    assert result["rows"][0]["variant"] == "hf_eager" and "native_kernels" in result
    assert result["lengths"]["max"] <= 12
    # A multi-seed search: every seed's subnetworks.
    seeds = tmp_path / "seeds"
    (seeds / "seed_7" / "structured" / "masks").mkdir(parents=True)
    (seeds / "seed_7" / "structured" / "masks" / "good.json").write_text(
        json.dumps({"head_mask": head_mask.tolist(), "mlp_mask": [1.0, 1.0]}))
    result = _speed(tiny_model_dir, "--run", str(seeds), tmp_path=tmp_path)
    assert [m["name"] for m in result["masks"]] == ["seed_7/good"]
    # A fine-tune run of a masked model: masks.json.
    run = tmp_path / "run"
    run.mkdir()
    (run / "masks.json").write_text(json.dumps({"patched": True, "head_mask":
                                                head_mask.tolist(), "mlp_mask": [1.0, 0.0]}))
    result = _speed(tiny_model_dir, "--run", str(run), tmp_path=tmp_path)
    masked = next(r for r in result["rows"] if r["variant"] == "masked")
    assert masked["ffn_kept"] == 0.5


def test_glue_lengths_read_the_runs_recorded_data_folder(tiny_model_dir, synthetic_glue,
                                                       tmp_path, monkeypatch, capsys):
    """--run with --lengths glue:TASK and neither --glue-dir nor $GLUE_DIR: the folder the run
    recorded in its config.json, as `evaluate` does (not the hub)."""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    search = tmp_path / "search"
    (search / "structured" / "masks").mkdir(parents=True)
    (search / "structured" / "masks" / "good.json").write_text(
        json.dumps({"head_mask": np.ones((2, 4)).tolist(), "mlp_mask": [1.0, 1.0]}))
    config = {"search": {}, "train": {"model": str(tiny_model_dir), "glue_dir": synthetic_glue,
                                      "task": "STS-B"}}
    (search / "config.json").write_text(json.dumps(config))
    args = ["speed", "--run", str(search), *FAST, "--batch", "40", "--lengths", "glue:SST-2",
            "--json", str(tmp_path / "speed.json")]
    # another task's lengths than the run's: timed, with a word on where they are reported
    with pytest.warns(UserWarning, match=r"--lengths glue:SST-2: the run in --run .* is a STS-B "
                                         r"run; its timings at SST-2's lengths are saved with "
                                         r"it and reported beside STS-B's scores"):
        assert main(args) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["lengths"]["min"] < result["lengths"]["max"] <= 12  # real, padded lengths
    # A recorded folder without the task's file: the error names where the folder came from.
    config["train"]["glue_dir"] = str(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (search / "config.json").write_text(json.dumps(config))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "glue:SST-2" in err and "recorded data folder" in err and "Traceback" not in err


def test_unsupported_dtype_is_one_line():
    with pytest.raises(SpeedError, match="--dtype int32 is not supported on cpu"):
        check_dtype("int32", torch.int32, torch.device("cpu"))


def _mask_file(tmp_path, shape):
    path = tmp_path / "masks.json"
    path.write_text(json.dumps({"head_mask": np.ones(shape).tolist()}))
    return str(path)


def _sweep_dir(tmp_path):
    masks = tmp_path / "sweep" / "RTE" / "seed_1" / "structured" / "masks"
    masks.mkdir(parents=True)
    (masks / "good.json").write_text(json.dumps({"head_mask": np.ones((2, 4)).tolist()}))
    return tmp_path / "sweep"


def _sweep_results_copy(tmp_path):
    """A sweep's results as committed: each seed keeps only its summary.json."""
    seed = tmp_path / "runs" / "RTE" / "seed_1"
    seed.mkdir(parents=True)
    (seed / "summary.json").write_text(json.dumps({"kind": "sparsebert-search", "methods": {}}))
    return tmp_path / "runs"


def _unreadable_pt(tmp_path):
    path = tmp_path / "masks.pt"
    path.write_text("not a torch file")
    return str(path)


def _gpt2_dir(tmp_path):
    """A saved config of a model type the fast path does not support."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(folder)


def _pruned_model_dir(tiny_model_dir, tmp):
    """A physically pruned save of the tiny model (save_pruned)."""
    import sparsebert  # noqa: PLC0415
    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    model, _ = load_model(tiny_model_dir, num_labels=2, seed=0)
    model = sparsebert.patch(model.eval())
    sparsebert.set_masks(model, head_mask=torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]]))
    sparsebert.save_pruned(sparsebert.prune(model), tmp / "pruned")
    return str(tmp / "pruned")


def _config_copy(tiny_model_dir, tmp, **fields):
    """A copy of the tiny model whose config.json has `fields` changed."""
    folder = tmp / "edited"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return str(folder)


def _run_with_json(tmp, relative, text):
    """A run directory whose file `relative` holds `text`."""
    file = tmp / "run" / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return str(tmp / "run")


def _search_with_speed_file(tmp, model):
    """A search directory whose speed/ (where the result goes) is a file."""
    search = tmp / "search"
    (search / "structured" / "masks").mkdir(parents=True)
    (search / "structured" / "masks" / "good.json").write_text(
        json.dumps({"head_mask": np.ones((2, 4)).tolist(), "mlp_mask": [1.0, 1.0]}))
    (search / "config.json").write_text(json.dumps({"search": {}, "train": {"model": model}}))
    (search / "speed").write_text("")
    return str(search)


PROBES = {  # name: (extra args (tmp_path -> list), expected text in the one error line)
    "cuda-without-cuda": (lambda tmp: ["--device", "cuda"], "--device cuda"),
    "mask-wrong-shape": (lambda tmp: ["--head-mask", _mask_file(tmp, (3, 4))], "--head-mask"),
    "mask-of-another-model": (lambda tmp: ["--head-mask", _mask_file(tmp, (6, 12))],
                              "another model"),
    "mask-file-missing": (lambda tmp: ["--head-mask", str(tmp / "nope.json")], "--head-mask"),
    "seq-past-position-limit": (lambda tmp: ["--seq", "4096"], "--seq 4096"),
    "run-without-masks": (lambda tmp: ["--run", str(tmp)], "--run"),
    "run-on-a-sweep-directory": (lambda tmp: ["--run", str(_sweep_dir(tmp))],
                                 "a sweep directory; time one task's subnetworks at a time, "
                                 "e.g. --run"),
    "run-on-a-sweep-results-copy": (lambda tmp: ["--run", str(_sweep_results_copy(tmp))],
                                    "a sweep directory; time one task's subnetworks at a "
                                    "time, e.g. --run"),
    "two-mask-sources": (lambda tmp: ["--run", str(tmp), "--prune-heads", "0.5"],
                         "one source of masks"),
    "bad-lengths": (lambda tmp: ["--lengths", "zipf"], "--lengths"),
    "negative-seed": (lambda tmp: ["--seed", "-1"], "--seed -1: expected an integer in [0, 2**64"),
    "seed-past-64-bits": (lambda tmp: ["--seed", str(2**64)], f"--seed {2**64}: expected"),
    "run-is-a-file": (lambda tmp: ["--run", _mask_file(tmp, (2, 4))],
                      "is a file, not a run directory"),
    "unknown-glue-task": (lambda tmp: ["--lengths", "glue:FOO"],
                          "--lengths 'glue:FOO': unknown GLUE task 'FOO'"),
    "bad-fraction": (lambda tmp: ["--prune-heads", "1.5"], "--prune-heads"),
    "bad-ffn-fraction": (lambda tmp: ["--prune-ffn", "-0.5"], "--prune-ffn -0.5: expected a "
                         "fraction in [0, 1]"),
    "glue-lengths-without-task": (lambda tmp: ["--lengths", "glue:"], "--lengths 'glue:'"),
    "run-whose-speed-folder-is-a-file": (
        lambda tmp, model: ["--run", _search_with_speed_file(tmp, model)],
        "; pass --no-save to time it without saving"),
    "mask-file-unreadable": (lambda tmp: ["--head-mask", _unreadable_pt(tmp)],
                             "cannot read it as a masks file"),
    "mask-file-is-a-directory": (lambda tmp: ["--head-mask", str(tmp)], "is a directory"),
    "json-is-a-directory": (lambda tmp: ["--json", str(tmp)], "--json"),
    "json-under-a-file": (lambda tmp: ["--json", _mask_file(tmp, (2, 4)) + "/out.json"],
                          "is not a directory"),
    "unsupported-model-type": (lambda tmp: ["--model", _gpt2_dir(tmp)],
                               "model type 'gpt2' is not supported"),
    "model-dir-without-config": (lambda tmp: ["--model", str(tmp)], "no config.json"),
    "model-dir-physically-pruned": (lambda tmp, model: ["--model", _pruned_model_dir(model, tmp)],
                                    "a masked or physically pruned model"),
    "decoder-model": (lambda tmp, model: ["--model", _config_copy(model, tmp, is_decoder=True)],
                      "config.is_decoder=True is not supported"),
    "mask-file-null-head-mask": (lambda tmp: ["--head-mask", _run_with_json(
        tmp, "m.json", '{"head_mask": null}') + "/m.json"], "no head_mask in it"),
    "run-masks-json-null": (lambda tmp: ["--run", _run_with_json(tmp, "masks.json", "null")],
                            "masks.json is damaged (expected a JSON object, found NoneType)"),
    "run-mask-file-a-list": (lambda tmp: ["--run", _run_with_json(
        tmp, "structured/masks/good.json", "[]")], "good.json is damaged (expected a JSON object"),
    "run-summary-null": (lambda tmp: ["--run", _run_with_json(tmp, "summary.json", "null")],
                         "summary.json is damaged (expected a JSON object"),
    "run-summary-methods-a-list": (lambda tmp: ["--run", _run_with_json(
        tmp, "summary.json", '{"kind": "sparsebert-search", "methods": []}')], "no masks found"),
    "run-of-an-unmasked-model": (lambda tmp: ["--run", _run_with_json(
        tmp, "masks.json", '{"patched": false, "pruned": false}')],
        "masks.json holds no head mask (a run of an unpatched model, unmasked or with weight "
        "masks only): nothing to time but the full model"),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_speed_bad_input(name, tiny_model_dir, tmp_path, capsys, monkeypatch):
    if name == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    monkeypatch.delenv("SPARSEBERT_DEBUG", raising=False)
    extra, expected = PROBES[name]
    extra = (extra(tmp_path, tiny_model_dir) if extra.__code__.co_argcount == 2
             else extra(tmp_path))
    args = ["speed", "--model", tiny_model_dir, *FAST, *extra]  # a later flag wins
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsebert: error: "), err
    assert expected in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("name", ["bad-fraction", "bad-lengths",
                                  "run-whose-speed-folder-is-a-file"])
def test_speed_refuses_bad_input_before_loading_the_model(name, tiny_model_dir, tmp_path,
                                                            capsys, monkeypatch):
    """Arguments that can be checked without the model are, before it loads (and, for where
    a --run result goes, before minutes of timing)."""
    import sparsebert.speed.command as command  # noqa: PLC0415

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "load_speed_model", no_model)
    extra, expected = PROBES[name]
    extra = (extra(tmp_path, tiny_model_dir) if extra.__code__.co_argcount == 2
             else extra(tmp_path))
    assert main(["speed", "--model", tiny_model_dir, *FAST, *extra]) == 2
    assert expected in capsys.readouterr().err


def test_speed_fails_when_a_rows_logits_differ(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A pruned model that computes another function (here its classifier scaled by 3) is not
    a speed-up: the row is marked, a note says so, and the command exits 1 (result written)."""
    import sparsebert  # noqa: PLC0415

    real_prune = sparsebert.prune

    def wrong_prune(model, *args, **kwargs):
        model = real_prune(model, *args, **kwargs)
        with torch.no_grad():
            model.classifier.weight.mul_(3)
        return model

    monkeypatch.setattr(sparsebert, "prune", wrong_prune)
    out = tmp_path / "speed.json"
    assert main(["speed", "--model", tiny_model_dir, *FAST, "--prune-heads", "0.5",
                 "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "pruned: logits differ from the reference beyond rounding" in captured.err
    assert "note: pruned: its logits differ from its reference's" in captured.out
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["pruned"]["outputs_match"] is False
    assert rows["pruned"]["max_abs_diff"] > rows["pruned"]["tolerance"]
    assert rows["masked"]["outputs_match"] is True and rows["hf_eager"]["outputs_match"] is None


def test_small_logits_do_not_widen_the_half_precision_check(tiny_model_dir, tmp_path, capsys,
                                                             monkeypatch):
    """bf16 rows may differ by rounding, a quarter of the logits' own scale: a pruned model
    whose logits are 1.5x the masked model's is caught although they are far below 1 (the
    tolerance had a floor of 1, a quarter of a logit, which let it pass); every honest row
    passes, and the full rows are checked against the stock model."""
    import sparsebert  # noqa: PLC0415

    real_prune = sparsebert.prune

    def wrong_prune(model, *args, **kwargs):
        model = real_prune(model, *args, **kwargs)
        with torch.no_grad():
            model.classifier.weight.mul_(1.5)
            model.classifier.bias.mul_(1.5)
        return model

    monkeypatch.setattr(sparsebert, "prune", wrong_prune)
    out = tmp_path / "speed.json"
    assert main(["speed", "--model", tiny_model_dir, *FAST, "--prune-heads", "0.5",
                 "--dtype", "bf16", "--json", str(out)]) == 1
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["pruned"]["outputs_match"] is False
    assert rows["pruned"]["tolerance"] < 0.25 * 0.5  # the logits' scale, not 1
    assert all(r["outputs_match"] for name, r in rows.items()
               if name not in ("pruned", "hf_eager"))
    assert rows["patched"]["max_abs_diff"] > 0  # against the stock model, not a copy of itself
    capsys.readouterr()


def test_speed_without_masks_says_what_it_times(tiny_model_dir, capsys):
    _speed(tiny_model_dir)
    assert "note: no masks given" in capsys.readouterr().out


def test_speed_of_a_search_is_saved_in_it_with_the_runs_model(tiny_model_dir, tmp_path, capsys):
    head_mask = np.ones((2, 4), dtype=np.float32)
    head_mask[1, 1:] = 0
    search = tmp_path / "search"
    (search / "structured" / "masks").mkdir(parents=True)
    (search / "structured" / "masks" / "good.json").write_text(
        json.dumps({"head_mask": head_mask.tolist(), "mlp_mask": [1.0, 1.0]}))
    # The run's own model (no --model): a tiny model, which the default model's masks would
    # not fit.
    (search / "config.json").write_text(json.dumps({"search": {}, "train": {
        "model": tiny_model_dir}}))
    assert main(["speed", "--run", str(search), *FAST]) == 0
    saved = list((search / "speed").glob("*.json"))
    assert [p.name for p in saved] == ["cpu-t1-fp32-b3-s12-full.json"]
    assert f"wrote {saved[0]}" in capsys.readouterr().out
    result = json.loads(saved[0].read_text())
    assert result["args"]["model"] == tiny_model_dir
    # One subnetwork is still named, so the report can match it with its scores.
    assert [r["subnetwork"] for r in result["rows"] if r["variant"] == "masked"] == ["good"]
    # Another thread count is another setting: its own file, the first one kept.
    assert main(["speed", "--run", str(search), *FAST, "--threads", "2"]) == 0
    assert sorted(p.name for p in (search / "speed").glob("*.json")) == [
        "cpu-t1-fp32-b3-s12-full.json", "cpu-t2-fp32-b3-s12-full.json"]
    # So are another seed and another --model than the run's (it replaced the run's file).
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    assert main(["speed", "--run", str(search), *FAST, "--seed", "1"]) == 0
    assert main(["speed", "--run", str(search), *FAST, "--model", str(other)]) == 0
    assert main(["speed", "--run", str(search), *FAST, "--model", tiny_model_dir]) == 0
    assert sorted(p.name for p in (search / "speed").glob("*.json")) == [
        "cpu-t1-fp32-b3-s12-full-model-other-model.json", "cpu-t1-fp32-b3-s12-full-seed1.json",
        "cpu-t1-fp32-b3-s12-full.json", "cpu-t2-fp32-b3-s12-full.json"]
    for file in (search / "speed").glob("*.json"):
        file.unlink()
    assert main(["speed", "--run", str(search), *FAST, "--no-save"]) == 0
    assert not list((search / "speed").glob("*.json"))
    # A run whose model is not a local directory here: one line naming --run and --model.
    (search / "config.json").write_text(json.dumps({"train": {"model": "org/some-hub-model"}}))
    assert main(["speed", "--run", str(search), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--run" in err and "pass --model" in err and "Traceback" not in err


def test_run_masks_from_summaries_of_a_results_copy(tmp_path):
    """A results copy keeps only summary.json per seed: --run reads the s-pruning masks there
    (and writes its timings beside them, as for a search directory)."""
    from sparsebert.speed.workload import is_search_dir, masks_from_run  # noqa: PLC0415

    shape = {"layers": 2, "heads": 4, "intermediate": 8}
    head = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    for seed in (1, 2):
        subnetworks = {name: {"head_mask": head, "mlp_mask": [1.0, float(i % 2)]}
                       for i, name in enumerate(("good", "random", "bad"))}
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "summary.json").write_text(json.dumps(
            {"kind": "sparsebert-search", "methods": {"structured": {"subnetworks": subnetworks}}}))
    assert is_search_dir(str(tmp_path)) and not is_search_dir(str(tmp_path / "missing"))
    sets = masks_from_run(str(tmp_path), shape)
    assert [m.name for m in sets] == [f"seed_{s}/{n}" for s in (1, 2)
                                      for n in ("good", "random", "bad")]
    assert sets[0].kept() == (0.625, 0.5)  # 5 of 8 heads; one of two MLPs


def test_a_results_copy_times_with_the_model_its_summary_names(tiny_model_dir, tmp_path):
    """A results copy (summary.json, no config.json) of a search on a local model: --run
    without --model loads the model the summary records, not the default model."""
    head_mask = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    subnetworks = {"good": {"head_mask": head_mask, "mlp_mask": [1.0, 1.0]}}
    (tmp_path / "summary.json").write_text(json.dumps({
        "kind": "sparsebert-search", "methods": {"structured": {"subnetworks": subnetworks}},
        "config": {"search": {}, "train": {"model": tiny_model_dir}}}))
    assert main(["speed", "--run", str(tmp_path), *FAST]) == 0
    saved = json.loads(next((tmp_path / "speed").glob("*.json")).read_text())
    assert saved["args"]["model"] == tiny_model_dir


def test_threads_apply_for_the_call_only(tiny_model_dir, capsys):
    """--threads sets torch's thread count while the command runs, then restores it (also
    when the command fails)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["speed", "--model", tiny_model_dir, *FAST]) == 0  # FAST has --threads 1
        assert torch.get_num_threads() == 2
        assert main(["speed", "--model", tiny_model_dir, *FAST, "--seq", "4096"]) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("extra,said", [
    (["--glue-dir", "."], "--glue-dir is read for --lengths glue:TASK only"),
    (["--no-save"], "--no-save applies to a search directory's --run only"),
])
def test_speed_flags_without_effect_are_named(extra, said, tiny_model_dir):
    with pytest.warns(UserWarning, match=said):
        _speed(tiny_model_dir, *extra)


@pytest.mark.parametrize("num_labels", [1, 3])
def test_a_fine_tuned_head_of_any_size_is_timed_with_its_own_weights(num_labels, tiny_model_dir,
                                                                      tmp_path):
    """An STS-B (1 output) or MNLI (3 outputs) fine-tune is timed as saved: its classifier
    keeps its size and weights instead of being refused as 'not a 2-label classifier'."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir,
                                                               num_labels=num_labels)
    model.save_pretrained(tmp_path / "fine-tuned")
    shutil.copy(f"{tiny_model_dir}/tokenizer.json", tmp_path / "fine-tuned")
    result = _speed(str(tmp_path / "fine-tuned"), tmp_path=tmp_path)
    assert {row["variant"] for row in result["rows"]} >= {"dense", "masked", "pruned"}
    from sparsebert.speed.workload import load_speed_model  # noqa: PLC0415

    loaded, _ = load_speed_model(str(tmp_path / "fine-tuned"))
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_a_bfloat16_mask_file_is_read(tiny_model_dir, tmp_path):
    """torch.save of a bf16 (or bool) head mask: numpy has no bfloat16, the file still reads."""
    for dtype in (torch.bfloat16, torch.bool):
        path = tmp_path / f"mask-{dtype}.pt"
        torch.save({"head_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=dtype)}, path)
        result = _speed(tiny_model_dir, "--head-mask", str(path), tmp_path=tmp_path)
        assert {row["heads_kept"] for row in result["rows"]
                if row["variant"] == "pruned"} == {0.625}


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 7 TiB"),
                                   torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_is_one_line_naming_the_batch(error, tiny_model_dir, capsys, monkeypatch):
    import sparsebert.speed.command as command  # noqa: PLC0415

    def fail(*args, **kwargs):
        raise error

    monkeypatch.delenv("SPARSEBERT_DEBUG", raising=False)
    monkeypatch.setattr(command, "make_batch", fail)
    assert main(["speed", "--model", tiny_model_dir, *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "out of memory for --batch 3 x --seq 12" in err and "lower --batch or --seq" in err


def test_other_runtime_errors_are_not_called_out_of_memory(tiny_model_dir, monkeypatch):
    import sparsebert.speed.command as command  # noqa: PLC0415

    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(command, "make_batch", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["speed", "--model", tiny_model_dir, *FAST])


def test_a_result_that_cannot_be_written_is_named_once(tmp_path, monkeypatch):
    """A full disk under --json read '--json P: cannot write it (P: cannot write it (No space
    left on device); free some space ... (it resumes))': nested, and speed does not resume."""
    import errno  # noqa: PLC0415

    from sparsebert.speed import command  # noqa: PLC0415

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(command.os, "fsync", full)
    target = tmp_path / "speed.json"
    with pytest.raises(command.SpeedError) as refused:
        command.write_result("--json", target, {"rows": []})
    assert str(refused.value) == f"--json {target}: cannot write it (No space left on device)"
