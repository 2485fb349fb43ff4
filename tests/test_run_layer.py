"""Run directories remember what was trained: masks, pruning and data; evaluate reproduces
the recorded score exactly; resume is exact and refuses other masks; checkpoints are safe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sparsebert.atomic import _lock_path, lock_holder, run_lock
from sparsebert.errors import RunDirError, SparsebertError
from sparsebert.hf import patch, prune, set_masks
from sparsebert.hf.loading import load_model
from sparsebert.train import TrainConfig, evaluate, finetune
from sparsebert.train.checkpoint import (
    CHECKPOINT_NAME,
    DAMAGED_NAME,
    PREVIOUS_NAME,
    load_checkpoint,
)


@pytest.fixture
def setup(tiny_model_dir, synthetic_glue):
    """(model dir, GLUE dir) from the shared kit."""
    return tiny_model_dir, synthetic_glue


def _config(setup, **kw):
    model, glue = setup
    base = dict(task="SST-2", model=model, glue_dir=glue, epochs=2, batch_size=16, lr=2e-3,
                seed=5, threads=1, log_every=3)
    return TrainConfig(**{**base, **kw})


def _model(setup, kind: str):
    """(model, tokenizer, weight_masks) of one kind of run."""
    model, tokenizer = load_model(setup[0], 2, seed=5)
    weight_masks = None
    if kind in ("masked", "pruned"):
        patch(model)
        head_mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
        set_masks(model, head_mask=head_mask, mlp_mask=torch.tensor([1.0, 0.0]))
        if kind == "pruned":
            prune(model)
    elif kind == "weights":
        generator = torch.Generator().manual_seed(0)
        chosen = [model.bert.encoder.layer[0].attention.self.query.weight,
                  model.bert.encoder.layer[1].intermediate.dense.weight]
        weight_masks = [(p, torch.rand(p.shape, generator=generator) > 0.4) for p in chosen]
    return model, tokenizer, weight_masks


def test_a_runs_weight_mask_file_is_checked_against_its_record(setup, tmp_path):
    """A bit flipped in weight_masks.safetensors is still a valid mask (0 or 1): the fingerprint
    masks.json records tells, and evaluate names the file instead of scoring a model with a
    trained weight zeroed."""
    model, tokenizer, weight_masks = _model(setup, "weights")
    out = tmp_path / "run"
    finetune(_config(setup), out, model=model, tokenizer=tokenizer, weight_masks=weight_masks,
             progress=False)
    path = out / "weight_masks.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last entry of the last mask: kept <-> pruned
    path.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=r"weight_masks.safetensors: damaged \(it keeps \d+ of "
                                          r"\d+ weights, not the masks masks.json records"):
        evaluate(out, glue_dir=str(setup[1]))


@pytest.mark.parametrize("kind", ["dense", "masked", "pruned", "weights"])
def test_evaluate_reproduces_the_recorded_score(setup, tmp_path, kind, monkeypatch):
    model, tokenizer, weight_masks = _model(setup, kind)
    result = finetune(_config(setup), tmp_path / kind, model=model, tokenizer=tokenizer,
                      weight_masks=weight_masks, progress=False)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    again = evaluate(tmp_path / kind)  # no --glue-dir, no GLUE_DIR: the run's data folder
    assert again["metrics"] == result.metrics  # to the last digit
    assert again["data"]["path"] == os.path.realpath(setup[1])
    masks = json.loads((tmp_path / kind / "masks.json").read_text())
    assert masks["patched"] == (kind in ("masked", "pruned"))
    assert masks["pruned"] == (kind == "pruned")
    if kind in ("masked", "pruned"):
        assert masks["heads_kept"] == 5 and masks["mlps_kept"] == 1
    if kind == "weights":
        assert (tmp_path / kind / "weight_masks.safetensors").is_file()
        assert result.masks["weight_masks"]["kept"] < result.masks["weight_masks"]["total"]


def test_resume_with_other_masks_is_refused(setup, tmp_path):
    model, tokenizer, _ = _model(setup, "masked")
    config = _config(setup, stop_after_steps=2)
    assert finetune(config, tmp_path / "r", model=model, tokenizer=tokenizer,
                    progress=False).status == "stopped"
    other, tokenizer, _ = _model(setup, "masked")
    set_masks(other, head_mask=torch.ones(2, 4))
    with pytest.raises(SparsebertError, match="other masks.*head mask: saved keeps 5 heads, "
                                              "requested 8"):
        finetune(_config(setup), tmp_path / "r", model=other, tokenizer=tokenizer,
                 progress=False)
    plain, tokenizer, _ = _model(setup, "dense")
    with pytest.raises(SparsebertError, match="patched: saved True, requested False"):
        finetune(_config(setup), tmp_path / "r", model=plain, tokenizer=tokenizer,
                 progress=False)


def _records(path):
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("examples_per_s", None)  # timing
        out.append(record)
    return out


def test_metrics_after_resume_equal_an_uninterrupted_run(setup, tmp_path):
    """Stop at a step that is not a multiple of log_every: the first loss logged after the
    resume still averages the full window."""
    finetune(_config(setup), tmp_path / "ref", progress=False)
    assert finetune(_config(setup, stop_after_steps=4), tmp_path / "run",
                    progress=False).status == "stopped"
    finetune(_config(setup), tmp_path / "run", progress=False)
    assert _records(tmp_path / "run" / "metrics.jsonl") == _records(
        tmp_path / "ref" / "metrics.jsonl")


def test_resume_on_other_data_is_refused_and_a_copy_is_fine(setup, tmp_path, monkeypatch):
    """A run stopped on one GLUE folder and resumed with another --glue-dir whose files differ
    is refused (it would train on a mix of two datasets); a copy of the same files elsewhere
    resumes and ends as an uninterrupted run."""
    model, glue = setup
    run = tmp_path / "run"
    finetune(_config(setup, stop_after_steps=3), run, progress=False)
    recorded = json.loads((run / "data.json").read_text())
    assert recorded["task"] == "SST-2" and recorded["source"] == "glue_dir"
    assert set(recorded["files"]) == {"train", "dev"}
    other = tmp_path / "other_glue"
    shutil.copytree(glue, other)
    train_file = other / "SST-2" / "train.tsv"
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one row fewer
    with pytest.raises(SparsebertError, match=r"other SST-2 data: the train data under .*other"):
        finetune(_config(setup, glue_dir=str(other)), run, progress=False)
    assert load_checkpoint(run)["step"] == 3  # nothing lost
    same = tmp_path / "same_glue"
    shutil.copytree(glue, same)
    resumed = finetune(_config(setup, glue_dir=str(same)), run, progress=False)
    reference = finetune(_config(setup), tmp_path / "ref", progress=False)
    assert resumed.metrics == reference.metrics
    # Finished, it is still tied to its data: other files, or the hub instead of a folder, are
    # refused (before anything is loaded: the hub is not reachable here).
    with pytest.raises(SparsebertError, match=r"other SST-2 data: the train data under .*other"):
        finetune(_config(setup, glue_dir=str(other)), run, progress=False)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(SparsebertError, match=r"started on a local GLUE folder .* would go on "
                                              r"with the hub's GLUE data"):
        finetune(_config(setup, glue_dir=None), run, progress=False)
    assert finetune(_config(setup, glue_dir=str(same)), run, progress=False).metrics == \
        resumed.metrics


def test_a_refused_start_leaves_the_data_open(setup, tmp_path):
    """A first call that fails before training (here: no such model) records no data: the
    corrected call may use another GLUE folder."""
    model, glue = setup
    other = tmp_path / "other_glue"
    shutil.copytree(glue, other)
    train_file = other / "SST-2" / "train.tsv"
    train_file.write_text(train_file.read_text() + train_file.read_text().splitlines()[1] + "\n")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SparsebertError):
        finetune(_config(setup, model=str(tmp_path / "no-such-model"), glue_dir=str(other)),
                 run, progress=False)
    assert finetune(_config(setup, epochs=1), run, progress=False).finished


def test_the_data_cache_follows_the_files(setup, tmp_path):
    """With the tokenized-data cache on (a sweep's workers), a run after the GLUE files changed
    in place trains on the new files, as a run without the cache does."""
    from sparsebert.train import data_cache  # noqa: PLC0415

    model, glue = setup
    folder = tmp_path / "glue"
    shutil.copytree(glue, folder)
    config = _config(setup, glue_dir=str(folder), epochs=1)
    data_cache.enable()
    try:
        finetune(config, tmp_path / "before", progress=False)
        train_file = folder / "SST-2" / "train.tsv"
        header, *rows = train_file.read_text().splitlines()
        flipped = [f"{text}\t{1 - int(label)}" for text, label in (r.rsplit("\t", 1) for r in rows)]
        train_file.write_text("\n".join([header, *flipped]) + "\n")
        cached = finetune(config, tmp_path / "cached", progress=False)
    finally:
        data_cache.disable()
    fresh = finetune(config, tmp_path / "fresh", progress=False)
    assert _records(tmp_path / "cached" / "metrics.jsonl") == _records(
        tmp_path / "fresh" / "metrics.jsonl")
    assert cached.metrics == fresh.metrics


@pytest.mark.parametrize("name, advice", [
    ("config.json", "delete that run directory to fine-tune again"),
    ("masks.json", "delete that run directory to fine-tune again"),
    ("results.json", "fine-tune the run again (its checkpoints are gone"),
])
def test_a_damaged_run_file_is_named(setup, tmp_path, name, advice):
    """A cut-off config.json, masks.json or results.json: one error naming the file and what
    to do, not a JSON traceback."""
    run = tmp_path / "run"
    finetune(_config(setup), run, progress=False)
    text = (run / name).read_text()
    (run / name).write_text(text[: len(text) // 2])
    with pytest.raises(SparsebertError) as error:
        finetune(_config(setup), run, progress=False)
    assert str(error.value).startswith(f"{run / name}: damaged (not valid JSON: ")
    assert advice in str(error.value)


def test_a_finished_run_drops_checkpoints_left_by_a_kill(setup, tmp_path):
    """A kill between results.json and the checkpoints' removal: the next call on the finished
    run removes them (and a temporary file of an unfinished checkpoint write)."""
    run = tmp_path / "run"
    finetune(_config(setup), run, progress=False)
    leftovers = [run / "checkpoint.pt", run / "checkpoint.prev.pt", run / "checkpoint.damaged.pt",
                 run / ".checkpoint.pt.tmp"]
    for path in leftovers:
        path.write_bytes(b"left behind")
    assert finetune(_config(setup), run, progress=False).finished
    assert not any(path.exists() for path in leftovers)


@pytest.mark.parametrize("damage", [b'{"step": 3, "loss": 0.6',  # a write cut off mid-line
                                    b'{"step": 3, "lo\xddss": 0.6}\n'])  # a byte gone bad
def test_a_damaged_metrics_line_is_dropped_with_a_warning(setup, tmp_path, damage):
    """A metrics.jsonl line cut off by a power loss, or not UTF-8 (a damaged byte: that was a
    UnicodeDecodeError traceback), does not stop the resume: it is dropped with a warning that
    names the file, and the run ends as an uninterrupted one."""
    finetune(_config(setup), tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    finetune(_config(setup, stop_after_steps=4), run, progress=False)
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + damage)
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 damaged line"):
        finetune(_config(setup), run, progress=False)
    assert _records(log) == _records(tmp_path / "ref" / "metrics.jsonl")


def test_checkpoints_fall_back_and_refuse_unsafe_files(setup, tmp_path):
    run = tmp_path / "c"
    config = _config(setup, checkpoint_every=1)
    finetune(_config(setup, checkpoint_every=1, stop_after_steps=3), run, progress=False)
    assert (run / CHECKPOINT_NAME).is_file() and (run / PREVIOUS_NAME).is_file()
    assert load_checkpoint(run)["step"] == 3
    # A truncated checkpoint: the previous one is used (and the run completes the same).
    data = (run / CHECKPOINT_NAME).read_bytes()
    (run / CHECKPOINT_NAME).write_bytes(data[: len(data) // 3])
    assert load_checkpoint(run)["step"] == 2
    resumed = finetune(config, run, progress=False)
    reference = finetune(config, tmp_path / "ref", progress=False)
    assert resumed.metrics == reference.metrics
    # Both damaged: a clear error that names the file, nothing deleted.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(SparsebertError, match="checkpoint.pt: truncated or damaged.*Delete "
                                              "checkpoint.pt in"):
        load_checkpoint(broken)
    assert (broken / CHECKPOINT_NAME).exists()
    (broken / PREVIOUS_NAME).write_bytes(b"")  # both damaged: both named
    with pytest.raises(SparsebertError, match=r"checkpoint.pt: truncated.*; .*checkpoint.prev."
                                              r"pt: truncated.*Delete checkpoint.pt and "
                                              r"checkpoint.prev.pt in"):
        load_checkpoint(broken)
    # Arbitrary pickled objects are refused (weights_only loading).
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    torch.save({"step": 1, "model": {}, "evil": shutil.rmtree}, unsafe / CHECKPOINT_NAME)
    with pytest.raises(SparsebertError, match="refused"):
        load_checkpoint(unsafe)


def test_a_checkpoint_with_damaged_bytes_falls_back_to_the_previous(setup, tmp_path, capsys):
    """Bytes flipped inside checkpoint.pt's weights (a bad sector, a copy gone wrong) keep the
    file's length and layout, so torch.load reads it without complaint: the records' CRC-32
    tells, and the previous checkpoint is resumed (it was the damaged weights, silently)."""
    run = tmp_path / "c"
    finetune(_config(setup, checkpoint_every=1, stop_after_steps=3), run, progress=False)
    path = run / CHECKPOINT_NAME
    with zipfile.ZipFile(path) as archive:  # the largest record: a weight tensor's bytes
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(data[record.header_offset + at:][:2], "little")
                                 for at in (26, 28))  # from the record's local header
    start = record.header_offset + 30 + name_length + extra_length
    data[start:start + 64] = bytes(byte ^ 0xFF for byte in data[start:start + 64])
    path.write_bytes(bytes(data))
    state = load_checkpoint(run)
    assert state["step"] == 2 and state["path"].endswith(PREVIOUS_NAME)
    err = capsys.readouterr().err
    assert f"checkpoint.pt: truncated or damaged (its record {record.filename!r} fails its " \
           f"CRC-32 check); resuming from the previous checkpoint" in err


def test_checkpoints_saved_without_crcs_still_save_and_load(setup, tmp_path):
    """torch.serialization.set_crc32_options(False) writes every record's CRC as 0: there is
    nothing to check, and such checkpoints save and resume as before."""
    set_crc32 = getattr(torch.serialization, "set_crc32_options", None)
    if set_crc32 is None:
        pytest.skip("this torch has no set_crc32_options")
    run = tmp_path / "c"
    set_crc32(False)
    try:
        finetune(_config(setup, checkpoint_every=1, stop_after_steps=3), run, progress=False)
        with zipfile.ZipFile(run / CHECKPOINT_NAME) as archive:
            assert not any(info.CRC for info in archive.infolist())
        assert load_checkpoint(run)["step"] == 3
    finally:
        set_crc32(True)


def test_a_fallback_keeps_the_good_previous_checkpoint_through_the_next_save(setup, tmp_path,
                                                                            capsys):
    """After resuming from checkpoint.prev.pt (checkpoint.pt damaged), the damaged file is set
    aside, so the next save does not rotate it onto the good previous one: every step after
    the fallback leaves two loadable checkpoints, and a second damage falls back again."""
    run = tmp_path / "run"
    finetune(_config(setup, checkpoint_every=2, stop_after_steps=4), run, progress=False)
    data = (run / CHECKPOINT_NAME).read_bytes()
    (run / CHECKPOINT_NAME).write_bytes(data[:1000])
    finetune(_config(setup, checkpoint_every=2, stop_after_steps=4), run, progress=False)
    assert "the damaged file is now checkpoint.damaged.pt" in capsys.readouterr().err
    steps = [torch.load(run / name, weights_only=True)["step"]
             for name in (CHECKPOINT_NAME, PREVIOUS_NAME)]
    assert steps == [4, 2] and (run / DAMAGED_NAME).is_file()
    (run / CHECKPOINT_NAME).write_bytes(data[:1000])  # damaged again: the previous still loads
    assert load_checkpoint(run)["step"] == 2
    assert finetune(_config(setup, checkpoint_every=2), run, progress=False).finished
    assert not (run / DAMAGED_NAME).exists()


def test_another_runs_checkpoint_is_not_resumed(setup, tmp_path, capsys):
    """A checkpoint copied in from a run with other settings (seed, lr) is not this run's: with
    this run's previous checkpoint beside it, that one is used and the run ends as an
    uninterrupted one; alone, a one-line error names the file and the settings."""
    run, other = tmp_path / "run", tmp_path / "other"
    finetune(_config(setup, checkpoint_every=2, stop_after_steps=4), run, progress=False)
    finetune(_config(setup, seed=7, lr=1e-3, stop_after_steps=6), other, progress=False)
    shutil.copy(other / CHECKPOINT_NAME, run / CHECKPOINT_NAME)
    resumed = finetune(_config(setup), run, progress=False)
    assert "not this run's checkpoint (written with other settings" in capsys.readouterr().err
    assert resumed.metrics == finetune(_config(setup), tmp_path / "ref", progress=False).metrics
    alone = tmp_path / "alone"
    finetune(_config(setup, stop_after_steps=2), alone, progress=False)
    (alone / PREVIOUS_NAME).unlink(missing_ok=True)
    shutil.copy(other / CHECKPOINT_NAME, alone / CHECKPOINT_NAME)
    with pytest.raises(RunDirError, match=r"checkpoint.pt: not this run's checkpoint \(written "
                                          r"with other settings: .*'lr': \(0.001, 0.002\), "
                                          r"'seed': \(7, 5\)"):
        finetune(_config(setup), alone, progress=False)


def test_a_checkpoint_that_does_not_fit_is_named(setup, tmp_path):
    """A checkpoint without an entry the resume reads, or whose weights are another model's
    (its settings recorded as this run's): a RunDirError naming the file, not a KeyError or
    a state-dict RuntimeError."""
    run = tmp_path / "run"
    finetune(_config(setup, stop_after_steps=2), run, progress=False)
    (run / PREVIOUS_NAME).unlink(missing_ok=True)
    good = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    torch.save({k: v for k, v in good.items() if k != "scheduler"}, run / CHECKPOINT_NAME)
    with pytest.raises(RunDirError, match=r"checkpoint.pt: damaged \(no scheduler in it\)"):
        finetune(_config(setup), run, progress=False)
    torch.save({**good, "model": {**good["model"], "extra.weight": torch.zeros(1)}},
               run / CHECKPOINT_NAME)
    with pytest.raises(RunDirError, match=r"checkpoint.pt: does not fit this run's model or "
                                          r"optimizer \(.*extra.weight"):
        finetune(_config(setup), run, progress=False)


def test_a_masks_file_that_is_not_an_object_is_named(setup, tmp_path):
    run = tmp_path / "run"
    finetune(_config(setup, stop_after_steps=2), run, progress=False)
    (run / "masks.json").write_text("[]")
    with pytest.raises(RunDirError, match=r"masks.json: damaged \(expected a JSON object, "
                                          r"found list\)"):
        finetune(_config(setup), run, progress=False)


def test_out_must_be_a_directory(setup, tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(SparsebertError, match="is a file"):
        finetune(_config(setup), file, progress=False)
    assert file.read_text() == "x"


def test_study_folders_are_no_run_directories(setup, tmp_path):
    """finetune --out refuses a sweep directory, a sweep's task folder and a multi-seed
    search's root (writing nothing there), and evaluate --run names what they are with their
    finished runs instead of suggesting a fine-tune there."""
    from sparsebert.train.evaluate import evaluate  # noqa: PLC0415

    sweep = tmp_path / "sweep"
    (sweep / "SST-2").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    seeds = tmp_path / "seeds"
    (seeds / "seed_1").mkdir(parents=True)
    (seeds / "seed_1" / "config.json").write_text("{}")
    finetune(_config(setup), seeds / "seed_1" / "full", progress=False)  # a run inside: fine
    (sweep / "SST-2" / "seed_3").mkdir()
    cases = [(sweep, "is a sweep directory"), (sweep / "SST-2", "is inside a sweep directory"),
             (sweep / "SST-2" / "seed_3", "is inside a sweep directory"),
             (seeds, "holds a multi-seed search")]
    for out, what in cases:
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(SparsebertError, match=f"--out {out}: {what}"):
            finetune(_config(setup), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before
        with pytest.raises(SparsebertError, match=f"--run {out}: {what}") as error:
            evaluate(out)
        assert "sparsebert finetune" not in str(error.value)
    assert f"finished runs include {seeds / 'seed_1' / 'full'}" in str(error.value)


def test_run_lock_is_one_per_folder_however_written(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    with run_lock(folder, "search"):
        for spelling in (folder, tmp_path / "link", "runs/a", "runs/./a/"):
            with pytest.raises(RunDirError, match=rf"another search is running on this "
                                                  rf"directory \(process {os.getpid()}\)"):
                with run_lock(spelling, "search"):
                    pass
        with run_lock(tmp_path / "runs" / "b", "search"):  # another folder: its own lock
            pass
    assert not _lock_path(folder).exists()  # removed by its last holder
    with run_lock("runs/a", "search"):  # free again
        pass


def test_run_lock_of_a_killed_holder_is_free(tmp_path):
    code = ("import sys, time; from sparsebert.atomic import run_lock\n"
            "with run_lock(sys.argv[1], 'fine-tune'):\n"
            "    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"another fine-tune.*process {holder.pid}"):
            with run_lock(tmp_path, "fine-tune"):
                pass
        # a search on the fine-tune's folder names what runs there (no "rerun: it resumes")
        with pytest.raises(RunDirError, match=rf"{tmp_path}: a fine-tune is running on this "
                                              rf"directory \(process {holder.pid}\); wait for "
                                              rf"it to finish or stop it$"):
            with run_lock(tmp_path, "search"):
                pass
        assert lock_holder(tmp_path) == holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with run_lock(tmp_path, "fine-tune"):
        pass


def test_a_second_fine_tune_on_a_busy_directory_is_refused(setup, tmp_path):
    """Two fine-tunes on one --out raced on its checkpoint's temporary file and both appended
    to metrics.jsonl; the second is now refused before anything is written."""
    out = tmp_path / "run"
    with run_lock(out, "fine-tune"):
        with pytest.raises(RunDirError, match="another fine-tune is running"):
            finetune(_config(setup), out, progress=False)
    assert not out.exists()


def test_checkpoint_rng_is_the_training_devices_and_resumes_on_any_gpu(monkeypatch):
    """A checkpoint keeps the CPU generator and the training GPU's (not every visible GPU's by
    index): it resumes on another GPU index, or with fewer GPUs visible, into the resume
    device's generator. Older checkpoints (a list by index) still load. (torch.cuda's
    generator calls are replaced by recorders: this runs without a GPU.)"""
    from sparsebert.train.checkpoint import rng_state, set_rng_state  # noqa: PLC0415

    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.append((int(state[0]), str(device))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("every GPU's state saved"))
    saved = rng_state(torch.device("cuda:1"))
    assert set(saved) == {"torch", "cuda_device"} and int(saved["cuda_device"][0]) == 1
    assert set(rng_state("cpu")) == {"torch"}
    set_rng_state(saved, torch.device("cuda:0"))  # resumed on another GPU
    set_rng_state({"torch": saved["torch"], "cuda": [states[0], states[1]]}, "cuda:1")
    set_rng_state({"torch": saved["torch"], "cuda": [states[0]]}, "cuda:1")  # fewer GPUs now
    set_rng_state(saved, "cpu")
    assert restored == [(1, "cuda:0"), (1, "cuda:1")]


def test_a_relative_model_path_is_recorded_as_the_directory_it_named(setup, tmp_path,
                                                                     monkeypatch):
    """--model m (relative) names the directory seen from where the run started: a resume from
    another folder holding another ./m is refused (it would go on from other weights), while
    the same directory by its absolute path, or with a trailing slash, resumes. A run that
    recorded a relative path (older versions) resumes where that path names the model."""
    model_dir, _ = setup
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    shutil.copytree(model_dir, tmp_path / "a" / "m")
    shutil.copytree(model_dir, tmp_path / "b" / "m")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    assert finetune(_config(setup, model="m", stop_after_steps=2), run,
                    progress=False).status == "stopped"
    recorded = json.loads((run / "config.json").read_text())["model"]
    assert recorded == str((tmp_path / "a" / "m").resolve())
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(SparsebertError, match="different config.*'model'"):
        finetune(_config(setup, model="m", stop_after_steps=3), run, progress=False)
    assert finetune(_config(setup, model=recorded + "/", stop_after_steps=3), run,
                    progress=False).status == "stopped"
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "model": "m"}))  # an older record
    with pytest.raises(SparsebertError, match="different config.*'model'"):
        finetune(_config(setup, model=recorded), run, progress=False)  # ./m here is b's
    monkeypatch.chdir(tmp_path / "a")
    assert finetune(_config(setup, model=recorded), run, progress=False).status == "finished"


def test_a_recorded_model_is_the_same_folder_however_written(tmp_path, monkeypatch):
    """same_setting (resume checks of finetune, search and sweep): a model recorded through a
    link, with ~, relative, or as an absolute path to a folder since deleted, is the requested
    one when both name the same folder; other folders and hub ids are not."""
    from sparsebert.train.config import local_model_path, same_setting  # noqa: PLC0415

    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    real = local_model_path("real")
    assert real == str((tmp_path / "real").resolve()) == local_model_path("~/link/")
    for saved in (str(tmp_path / "link"), "~/real", "real", "./link/", real):
        assert same_setting("model", saved, real), saved
    assert not same_setting("model", str(tmp_path / "other"), real)
    assert not same_setting("model", "org/model", "org/other")
    assert not same_setting("lr", "real", real)  # only the model is a path
    gone = str(tmp_path / "gone")  # a run's folder since deleted, asked for relatively
    assert same_setting("model", gone, local_model_path("gone"))


def test_an_out_holding_other_files_is_refused_and_left_alone(setup, tmp_path, tiny_model_dir):
    """finetune --out into a folder of someone's files (a model/ folder, a metrics.jsonl), a
    run whose config.json was lost, a model's own folder, or a config.json that is no run's:
    refused, naming what is there, nothing changed (it replaced model/ and appended to the
    metrics before)."""
    mine = tmp_path / "project"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "notes.txt").write_text("my notes")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(SparsebertError, match=r"holds files that are not a fine-tuning run's "
                                              r"\(metrics.jsonl, model\)"):
        finetune(_config(setup), mine, progress=False)
    assert (mine / "model" / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl", "model"]

    run = tmp_path / "run"
    finetune(_config(setup, epochs=1), run, progress=False)
    (run / "config.json").unlink()
    weights = (run / "model" / "model.safetensors").read_bytes()
    with pytest.raises(SparsebertError, match="a run whose config.json is missing"):
        finetune(_config(setup, epochs=1, seed=7), run, progress=False)
    assert (run / "model" / "model.safetensors").read_bytes() == weights

    model_copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, model_copy)
    with pytest.raises(SparsebertError, match="holds a model's folder .*pass it as --model"):
        finetune(_config(setup), model_copy, progress=False)
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    with pytest.raises(SparsebertError, match="a config.json that is not a run's"):
        finetune(_config(setup), listed, progress=False)


def test_a_run_killed_before_its_config_resumes(setup, tmp_path, monkeypatch):
    """What a run writes before config.json (data.json, model.json, masks.json, a temporary
    file of one) is no foreign file: a run killed just before config.json starts again."""
    import sparsebert.train.loop as loop  # noqa: PLC0415

    real = loop.atomic_write_json

    def killed_at_config(path, obj):
        if Path(path).name == "config.json":
            Path(path).with_name(".config.json.tmp").write_text("{")
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(loop, "atomic_write_json", killed_at_config)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(setup, epochs=1), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".config.json.tmp", "data.json",
                                                     "masks.json", "model.json"]
    monkeypatch.undo()
    (out / ".gitkeep").write_text("")  # a hidden file of the user's: no run file, no harm
    assert finetune(_config(setup, epochs=1), out, progress=False).finished


def test_a_full_disk_names_the_file_and_leaves_no_temporary_file(setup, tmp_path,
                                                                    monkeypatch):
    """A checkpoint that cannot be written for lack of space (torch.save reports it without an
    errno) or a JSON file whose write fails (ENOSPC): one error naming the file, an OSError
    too, and no temporary file left to fill the disk further."""
    import errno  # noqa: PLC0415

    import sparsebert.train.checkpoint as checkpoint  # noqa: PLC0415
    from sparsebert.atomic import atomic_write_json  # noqa: PLC0415
    from sparsebert.errors import WriteError  # noqa: PLC0415

    def full_disk_save(state, path):
        path.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 19008 "
                           "vs 18902 (File write failed: No space left on device)")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    out = tmp_path / "run"
    with pytest.raises(WriteError, match=rf"{out / CHECKPOINT_NAME}: cannot write it \(No "
                                         r"space left on device\)"):
        finetune(_config(setup, checkpoint_every=1), out, progress=False)
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "results.json"
    with pytest.raises(OSError, match=rf"{target}: cannot write it \(No space left on device\)"
                       ) as error:
        atomic_write_json(target, {"a": 1})
    assert isinstance(error.value, RunDirError) and error.value.errno == errno.ENOSPC
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("code,advice", [
    ("ENOSPC", "; free some space, then rerun the same command"),
    ("EROFS", "; make the folder writable, then rerun the same command"),
    ("ENOENT", ""),  # (a file removed under the writer: no advice that does not apply)
])
def test_write_errors_advise_by_their_cause(code, advice, tmp_path):
    """Every failed write advised 'free some space or make the folder writable ... (it
    resumes)', also where neither applies and for commands that do not resume."""
    import errno  # noqa: PLC0415

    from sparsebert.atomic import write_failure  # noqa: PLC0415

    number = getattr(errno, code)
    failure = write_failure(tmp_path / "x.json", OSError(number, os.strerror(number)))
    assert str(failure) == f"{tmp_path / 'x.json'}: cannot write it ({os.strerror(number)})" \
        f"{advice}"


def test_a_name_of_up_to_255_bytes_is_written(tmp_path):
    """The temporary name (.NAME.tmp) added 5 bytes: a valid 251-255 byte name could never be
    written (File name too long)."""
    from sparsebert.atomic import atomic_save_dir, atomic_write_json  # noqa: PLC0415

    target = tmp_path / ("b" * 250 + ".json")
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    folder = tmp_path / ("c" * 255)
    atomic_save_dir(folder, lambda tmp: (tmp.mkdir(), (tmp / "f").write_text("x")))
    atomic_save_dir(folder, lambda tmp: (tmp.mkdir(), (tmp / "f").write_text("y")))  # replaced
    assert (folder / "f").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, folder.name])


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path, monkeypatch):
    """A metrics line that cannot be appended ended in a bare '[Errno 28] No space left on
    device'."""
    import builtins  # noqa: PLC0415
    import errno  # noqa: PLC0415

    from sparsebert.errors import WriteError  # noqa: PLC0415
    from sparsebert.train.metrics_log import MetricsLog  # noqa: PLC0415

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_until_step=0)
    real_open = builtins.open

    def full(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(WriteError, match=rf"{tmp_path / 'metrics.jsonl'}: cannot write it \(No "
                                         r"space left on device\); free some space"):
        log.write({"step": 1, "loss": 0.5})


def _finetune_command(setup, out: Path) -> list[str]:
    """The finetune command's arguments for a one-epoch run of the tiny setup into `out`."""
    model, glue = setup
    return ["finetune", "--task", "SST-2", "--out", str(out), "--model", model, "--glue-dir",
            glue, "--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet"]


def test_rerunning_a_finished_run_says_so(setup, tmp_path, capsys):
    from sparsebert.cli import main  # noqa: PLC0415

    out = tmp_path / "run"
    args = _finetune_command(setup, out)
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "already finished" not in first and "(fp32)" in first
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.startswith(f"{out}: already finished (step ") and "nothing to do" in again


def test_run_locks_do_not_follow_tmpdir(monkeypatch, tmp_path):
    """A job scheduler's per-job TMPDIR does not split a run's lock; SPARSEBERT_LOCK_DIR
    moves it."""
    from sparsebert.atomic import lock_root  # noqa: PLC0415

    monkeypatch.delenv("SPARSEBERT_LOCK_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "job-tmp"))
    first = _lock_path(tmp_path / "run")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "another-job-tmp"))
    assert _lock_path(tmp_path / "run") == first and lock_root() == Path("/tmp")
    monkeypatch.setenv("SPARSEBERT_LOCK_DIR", str(tmp_path / "locks"))
    assert _lock_path(tmp_path / "run").parent.parent == tmp_path / "locks"


@pytest.mark.parametrize("change, said", [
    (lambda c: c.pop("task"), "not a run's config (no task)"),
    (lambda c: c.update(bogus=1), "not a run's config (unknown"),
])
def test_evaluate_names_a_config_json_that_is_no_runs(setup, tmp_path, change, said):
    """A run config.json without its task (a default would evaluate another task) or with a
    field no run has: an error naming the file."""
    out = tmp_path / "run"
    finetune(_config(setup, epochs=1), out, progress=False)
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match=rf"{out / 'config.json'}: {re.escape(said)}"):
        evaluate(out)


@pytest.mark.parametrize(("record", "what"), [("data.json", "the GLUE data"),
                                              ("model.json", "the model files")])
def test_a_damaged_identity_record_is_refused_not_rewritten(setup, tmp_path, record, what):
    """A damaged data.json / model.json (a write cut off) was rewritten from the files in use,
    so a resume on changed data went on silently: it is named, and the run waits for it to be
    restored (or deleted, which records the files in use again); nothing else is touched.
    evaluate, which writes nothing, warns that it cannot check the dev data and goes on."""
    run = tmp_path / "run"
    finetune(_config(setup, stop_after_steps=3), run, progress=False)
    path = run / record
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    with pytest.raises(RunDirError, match=rf"{record}: damaged \(not valid JSON.*\); restore it, "
                                          rf"or delete it to go on with {what} now in use"):
        finetune(_config(setup), run, progress=False)
    assert path.read_text() == good[: len(good) // 2] and load_checkpoint(run)["step"] == 3
    path.write_text('{"task": "SST-2"}')
    with pytest.raises(RunDirError, match=rf'{record}: damaged \(expected a JSON object with a '
                                          rf'"files" object\)'):
        finetune(_config(setup), run, progress=False)
    path.unlink()
    resumed = finetune(_config(setup), run, progress=False)
    assert resumed.metrics == finetune(_config(setup), tmp_path / "ref", progress=False).metrics
    assert json.loads(path.read_text()) == json.loads(good)
    if record == "data.json":
        path.write_text("{")
        with pytest.warns(UserWarning, match=r"data.json: damaged .*cannot be checked"):
            assert evaluate(run, glue_dir=str(setup[1]))["metrics"] == resumed.metrics


def test_evaluate_on_other_dev_data_warns(setup, tmp_path):
    """evaluate on a GLUE folder whose dev file differs from the one the run was scored on
    (data.json): the metrics come with a warning; an identical copy gives none."""
    import warnings  # noqa: PLC0415

    out = tmp_path / "run"
    finetune(_config(setup, epochs=1), out, progress=False)
    copy = tmp_path / "glue-copy"
    shutil.copytree(setup[1], copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(out, glue_dir=str(copy))
    dev = copy / "SST-2" / "dev.tsv"
    lines = dev.read_text().splitlines(keepends=True)
    dev.write_text("".join(lines[:-1]))
    with pytest.warns(UserWarning, match=r"the dev data under .* differ from those .* was "
                                         r"scored on"):
        evaluate(out, glue_dir=str(copy))


def test_evaluate_on_a_run_still_training_says_so(setup, tmp_path):
    """An unfinished run whose lock a process holds is training: evaluate says so (and which
    process), rather than suggesting to resume it; without a holder, to resume it."""
    from sparsebert.atomic import lock_holder  # noqa: PLC0415

    out = tmp_path / "run"
    finetune(_config(setup, stop_after_steps=1), out, progress=False)
    assert lock_holder(out) is None
    with pytest.raises(RunDirError, match="unfinished .*rerun the same finetune command"):
        evaluate(out)
    with run_lock(out, "fine-tune"):
        assert lock_holder(out) == os.getpid()
        with pytest.raises(RunDirError, match=rf"still training \(process {os.getpid()}\)"):
            evaluate(out)
    assert lock_holder(out) is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_atomic_writes_reach_the_disk_before_they_are_published(tmp_path, monkeypatch):
    """A directory saved atomically has every file fsynced before the rename publishes it, and
    its parent folder after; a checkpoint likewise (a power loss then leaves no empty model
    files behind a results.json)."""
    import sparsebert.atomic as atomic  # noqa: PLC0415
    from sparsebert.train.checkpoint import save_checkpoint  # noqa: PLC0415

    synced, real = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording)

    def write(folder):
        folder.mkdir()
        (folder / "a.bin").write_bytes(b"a")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(b"b")

    atomic.atomic_save_dir(tmp_path / "model", write)
    tmp = str(tmp_path / ".model.tmp")
    assert {f"{tmp}/a.bin", f"{tmp}/sub/b.bin", f"{tmp}/sub", tmp} <= set(synced)
    assert synced[-1] == str(tmp_path)  # the rename, flushed
    synced.clear()
    save_checkpoint(tmp_path, {"step": 1, "model": {}})
    assert synced == [str(tmp_path / f".{CHECKPOINT_NAME}.tmp"), str(tmp_path)]


def test_the_data_cache_tells_tokenizer_settings_apart(tiny_model_dir):
    """Two tokenizers of one folder loaded with other settings (casing, the truncated side)
    tokenize differently: the cache keys them apart."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from sparsebert.train.data_cache import tokenizer_key  # noqa: PLC0415

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    keys = [tokenizer_key(tokenizer) for tokenizer in (
        plain, AutoTokenizer.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir, do_lower_case=False),
        AutoTokenizer.from_pretrained(tiny_model_dir, truncation_side="left"))]
    assert keys[0] == keys[1] and len(set(keys[1:])) == 3


@pytest.mark.parametrize(("kind", "damage"), [
    ("dense", "model"), ("dense", "model/config.json"), ("dense", "model/model.safetensors"),
    ("masked", "model/sparsebert_pruned.json"),
])
def test_a_finished_run_whose_model_is_gone_is_fine_tuned_again(setup, tmp_path, kind, damage):
    """results.json says finished but model/ was deleted or emptied by hand (no config.json,
    no weight file, a patched run's save_pruned description gone): evaluate names the folder
    and how to redo it, and finetune trains the run again (the same result on the CPU) rather
    than returning the finished result of a model that is no longer there."""
    out = tmp_path / "run"

    def train():
        model, tokenizer, weight_masks = _model(setup, kind)
        return finetune(_config(setup, epochs=1), out, model=model, tokenizer=tokenizer,
                        weight_masks=weight_masks, progress=False)

    first = train()
    records = _records(out / "metrics.jsonl")
    path = out / damage
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    run = re.escape(str(out))
    with pytest.raises(RunDirError, match=rf"--run {run}: the run finished but its model is "
                                          rf"gone \({re.escape(str(out / 'model'))}.*delete "
                                          rf"the run directory {run} to redo it"):
        evaluate(out)
    with pytest.warns(UserWarning, match=rf"{run}: the run finished, but its model is gone"):
        again = train()
    assert again.metrics == first.metrics and path.exists()
    assert evaluate(out, glue_dir=str(setup[1]))["metrics"] == first.metrics
    assert _records(out / "metrics.jsonl") == records  # one run's records, not two


def test_finetune_on_a_finished_run_whose_model_is_gone_trains_it_again(setup, tmp_path, capsys):
    """The finetune command on such a run does not say it is already finished: it fine-tunes
    it again, and its metrics.jsonl holds one run's records, not two."""
    from sparsebert.cli import main  # noqa: PLC0415

    out = tmp_path / "run"
    args = _finetune_command(setup, out)
    assert main(args) == 0
    first = capsys.readouterr().out
    records = _records(out / "metrics.jsonl")
    shutil.rmtree(out / "model")
    with pytest.warns(UserWarning, match="its model is gone"):
        assert main(args) == 0
    again = capsys.readouterr().out
    assert "already finished" not in again and again == first
    assert (out / "model" / "config.json").is_file()
    assert _records(out / "metrics.jsonl") == records
