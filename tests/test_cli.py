"""The command line as a user meets it: README's main-job command sequence run the way a shell
runs it, `sparsebert info`, and the probe list of bad inputs (one line, exit 2, no traceback,
nothing on disk lost)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsebert.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPARSEBERT = str(Path(sys.executable).parent / "sparsebert")


@pytest.fixture
def tiny(tiny_model_dir, synthetic_glue):
    """(model dir, GLUE dir) from the shared kit."""
    return tiny_model_dir, synthetic_glue


def readme_main_command() -> str:
    """Command 1 of README's quickstart, as written."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("# 1."):text.index("# 2.")]
    lines = [line for line in block.splitlines() if line.startswith("bash scripts/setup.sh")]
    assert len(lines) == 1, "README's command 1 should be one line"
    return lines[0]


def test_readme_main_command_runs_as_written(tiny, tmp_path):
    """README command 1 through bash, GLUE_DIR on the first command only (as a user types it),
    with a tiny budget: the tiny model and a few examples instead of the default model."""
    command = readme_main_command()
    task = re.search(r"--task (\S+)", command).group(1)
    glue = os.environ.get("GLUE_DIR")
    glue = os.path.abspath(glue) if glue else None  # README sets it relative; bash runs elsewhere
    if not glue or not Path(glue, task, "dev.tsv").is_file():
        pytest.skip(f"needs GLUE_DIR with {task} (README's main job)")
    assert "/sparsebert search " in command and "GLUE_DIR=" in command
    command = command.removeprefix("bash scripts/setup.sh && ")
    command = command.replace(".venv/bin/sparsebert", SPARSEBERT)
    command = re.sub(r"GLUE_DIR=\S+", f"GLUE_DIR={glue}", command)
    budget = (f" --model {tiny[0]} --max-train-examples 24 --epochs 1 --threads 1 --quiet "
              f"--magnitude-max-steps 2 --masking-amount 0.25 --eval-batch-size 256")
    command = command.replace(" search ", " search" + budget + " ", 1)
    command = command.replace(" speed ", " speed --batch 4 --seq 16 --repeats 2 --warmup 1 "
                              "--threads 1 --quiet ", 1)
    env = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"}
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = re.search(r"--out (\S+)", command).group(1)
    assert (tmp_path / out / "summary.json").is_file()
    assert f"{task} dev: acc" in done.stdout  # evaluate without GLUE_DIR: the run's data
    # The subnetworks' timings, saved in the run, land in the report next to the scores.
    assert [p.name for p in (tmp_path / out / "speed").glob("*.json")] == [
        f"cpu-t1-fp32-b4-s16-glue-{task.lower()}.json"]
    report = (tmp_path / out / "report.md").read_text()
    assert "## Speed of the subnetworks" in report and "speed_vs_score.png" in report


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for line in ("torch", "transformers", "sparsebert", "extension", "masked_attention"):
        assert line in out
    from sparsebert import ops  # noqa: PLC0415

    loaded = ops._C is not None  # the build's CPU kernels come with the extension
    assert re.search(rf"^extension +{'loaded' if loaded else 'not loaded'}$", out, re.M), out
    [native] = re.findall(r"^  masked_attention +native: (.+)$", out, re.M)
    assert ("CPU" in native) is loaded and (native == "none (reference)") is not loaded


def _probe_truncated_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    args = _finetune_args(tiny, out)
    assert main([*args, "--stop-after-steps", "1"]) == 0
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    return args, "checkpoint.pt: truncated or damaged", [out / "checkpoint.pt",
                                                         out / "config.json"]


def _probe_out_is_a_file(tiny, tmp_path):
    file = tmp_path / "existing"
    file.write_text("keep me")
    return _finetune_args(tiny, file), "--out", [file]


def _probe_device_cuda(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    return [*_finetune_args(tiny, tmp_path / "run"), "--device", "cuda"], "--device cuda", []


def _probe_offline_hub_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _finetune_args(tiny, tmp_path / "run")
    args[args.index("--model") + 1] = "org/name"
    return args, "--model 'org/name'", []


def _probe_tampered_pruned_model(tiny, tmp_path):
    from sparsebert.hf import patch, prune, set_masks  # noqa: PLC0415
    from sparsebert.hf.loading import load_model  # noqa: PLC0415
    from sparsebert.train import TrainConfig, finetune  # noqa: PLC0415

    model, tokenizer = load_model(tiny[0], 2, seed=0)
    patch(model)
    set_masks(model, head_mask=torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]))
    prune(model)
    out = tmp_path / "pruned"
    finetune(TrainConfig(task="SST-2", model=tiny[0], glue_dir=tiny[1], epochs=1,
                         batch_size=16, threads=1), out, model=model, tokenizer=tokenizer,
             progress=False)
    description = out / "model" / "sparsebert_pruned.json"
    data = json.loads(description.read_text())
    data["layers"][0]["head_ids"] = [0, 1, 2, 3]  # 4 ids, but the layer keeps 3 heads
    description.write_text(json.dumps(data))
    return ["evaluate", "--run", str(out)], "sparsebert_pruned.json", [description]


def _fake_search_dir(tmp_path) -> Path:
    """A directory that holds a lottery search's config.json (search + train)."""
    search = tmp_path / "search"
    search.mkdir()
    (search / "config.json").write_text(json.dumps({"search": {}, "train": {}}))
    return search


def _probe_evaluate_search_dir(tiny, tmp_path):
    search = _fake_search_dir(tmp_path)
    return ["evaluate", "--run", str(search)], "is a search directory, not a run", [
        search / "config.json"]


def test_a_search_directory_hint_names_current_runs_only(tmp_path):
    """--run <search>: the hint lists its finished runs, not those --redo set aside."""
    from sparsebert.errors import RunDirError  # noqa: PLC0415
    from sparsebert.train.rundir import require_finished  # noqa: PLC0415

    search = _fake_search_dir(tmp_path)
    for run in ("full", ".superseded/redo-structured-1/structured/retrained/bad"):
        (search / run / "model").mkdir(parents=True)
        (search / run / "config.json").write_text("{}")
        (search / run / "model" / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="its finished runs include ") as error:
        require_finished(search)
    assert str(search / "full") in str(error.value) and ".superseded" not in str(error.value)


def _probe_finetune_into_search_dir(tiny, tmp_path):
    search = _fake_search_dir(tmp_path)
    return (_finetune_args(tiny, search), "holds a lottery search (sparsebert search), not a "
            "fine-tuning run", [search / "config.json"])


def _probe_evaluate_batch_size(tiny, tmp_path):
    return ["evaluate", "--run", str(tmp_path), "--batch-size", "-1"], "--batch-size -1", []


def _probe_report_out_is_a_file(tiny, tmp_path):
    file = tmp_path / "existing.txt"
    file.write_text("keep me")
    return ["report", str(tmp_path), "--out", str(file)], f"--out {file}: exists and is a file", [
        file]


def _probe_out_below_a_file(tiny, tmp_path):
    file = tmp_path / "afile"
    file.write_text("keep me")
    return (_finetune_args(tiny, file / "run"), f"--out {file / 'run'}: cannot create it (Not a "
            "directory)", [file])


PROBES = {
    "out-below-a-file": _probe_out_below_a_file,
    "evaluate-a-search-directory": _probe_evaluate_search_dir,
    "finetune-into-a-search-directory": _probe_finetune_into_search_dir,
    "evaluate-batch-size-below-1": _probe_evaluate_batch_size,
    "report-out-is-a-file": _probe_report_out_is_a_file,
    "truncated-checkpoint": _probe_truncated_checkpoint,
    "out-is-a-file": _probe_out_is_a_file,
    "device-cuda-without-cuda": _probe_device_cuda,
    "offline-hub-model": _probe_offline_hub_model,
    "tampered-pruned-model": _probe_tampered_pruned_model,
}


def _finetune_args(tiny, out) -> list[str]:
    return ["finetune", "--task", "SST-2", "--out", str(out), "--model", tiny[0],
            "--glue-dir", tiny[1], "--epochs", "1", "--batch-size", "16", "--threads", "1",
            "--quiet"]


@pytest.mark.parametrize("name", list(PROBES))
def test_probe(name, tiny, tmp_path, capsys, monkeypatch):
    probe = PROBES[name]
    if "monkeypatch" in probe.__code__.co_varnames:
        args, expected, files = probe(tiny, tmp_path, monkeypatch)
    else:
        args, expected, files = probe(tiny, tmp_path)
    monkeypatch.delenv("SPARSEBERT_DEBUG", raising=False)
    before = {f: f.read_bytes() for f in files}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsebert: error: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert len(lines[0]) < 400
    for file, data in before.items():
        assert file.read_bytes() == data, f"{file} changed"
    # --debug adds the traceback.
    assert main(["--debug", *args]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "traceback"), [("1", True), ("yes", True), ("0", False),
                                               ("off", False), ("false", False), ("no", False)])
def test_debug_switch_reads_on_and_off(value, traceback, tmp_path, capsys, monkeypatch):
    """SPARSEBERT_DEBUG reads as every sparsebert switch does; an unknown value is refused."""
    monkeypatch.setenv("SPARSEBERT_DEBUG", value)
    args = ["evaluate", "--run", str(tmp_path / "missing")]
    assert main(args) == 2
    assert ("Traceback" in capsys.readouterr().err) is traceback
    monkeypatch.setenv("SPARSEBERT_DEBUG", "verbose")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "SPARSEBERT_DEBUG='verbose': expected 1/true/yes/on or 0/false/no/off" in err


@pytest.mark.parametrize("switch", ["SPARSEBERT_FULL_LAST_LAYER", "SPARSEBERT_GRAPH_FIXED_GATES",
                                    "SPARSEBERT_REQUIRE_EXT"])
def test_a_bad_switch_is_refused_before_anything_is_written(switch, tiny, tmp_path, capsys,
                                                            monkeypatch):
    """Every switch is checked when the command starts: one error line, no --out (a switch
    read mid-run failed with a traceback after the run folder was written)."""
    monkeypatch.setenv(switch, "maybe")
    out = tmp_path / "out"
    assert main(_finetune_args(tiny, out)) == 2
    err = capsys.readouterr().err
    assert f"{switch}='maybe': expected 1/true/yes/on or 0/false/no/off" in err
    assert "Traceback" not in err and not out.exists()


# A process that blocks sparsebert._C, then runs the command as its console script does
# (argv[0] is the script's path): the extension cannot load.
_COMMAND_WITHOUT_EXTENSION = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sparsebert._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
sys.argv = ["/usr/local/bin/sparsebert", *sys.argv[1:]]
from sparsebert.cli import main
sys.exit(main())
"""


def _command(args: list[str], env: dict[str, str], block_extension: bool = False):
    """The command in a fresh process (the package imported by it, as a user's shell does):
    `python -m sparsebert ...`, or the console script's way with the extension blocked."""
    launch = (["-c", _COMMAND_WITHOUT_EXTENSION] if block_extension else ["-m", "sparsebert"])
    return subprocess.run([sys.executable, *launch, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize(("switch", "value", "expected"), [
    ("SPARSEBERT_ATTENTION_KERNEL", "bogus", "expected one of default, mma, wgmma, wmma, simt (or unset)"),
    ("SPARSEBERT_REQUIRE_EXT", "maybe", "expected 1/true/yes/on or 0/false/no/off"),
])
def test_a_switch_read_while_the_package_imports_is_refused_as_the_command_refuses(
        switch, value, expected):
    """The package reads these two while it is imported, before the command's own checks run:
    still one error line and status 2 (it was a traceback and status 1); importing the package
    from Python still raises."""
    for block in (False, True):
        result = _command(["info"], {switch: value}, block_extension=block)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"sparsebert: error: {switch}={value!r}: {expected}\n"
    library = subprocess.run([sys.executable, "-c", "import sparsebert"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, switch: value})
    assert library.returncode == 1 and f"ValueError: {switch}={value!r}" in library.stderr


def test_the_command_without_its_extension_warns_or_fails_in_one_line():
    """No extension: one `sparsebert: warning:` line, then the references run; with
    SPARSEBERT_REQUIRE_EXT on, one error line and status 2 (a traceback with --debug)."""
    result = _command(["info"], {"SPARSEBERT_REQUIRE_EXT": "0"}, block_extension=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("sparsebert: warning: sparsebert native kernels unavailable")
    assert result.stderr.count("\n") == 1 and "none (reference)" in result.stdout
    result = _command(["info"], {"SPARSEBERT_REQUIRE_EXT": "1"}, block_extension=True)
    assert result.returncode == 2
    assert result.stderr.startswith("sparsebert: error: sparsebert._C failed to load and "
                                    "SPARSEBERT_REQUIRE_EXT=1: blocked for the test")
    assert result.stderr.count("\n") == 1
    result = _command(["--debug", "info"], {"SPARSEBERT_REQUIRE_EXT": "1"},
                      block_extension=True)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_every_switch_read_is_checked_up_front():
    """Each env_switch(...) in the package names a variable of switches.SWITCHES (the list the
    command line checks first)."""
    from sparsebert.switches import SWITCHES  # noqa: PLC0415

    package = Path(__file__).resolve().parents[1] / "sparsebert"
    read = set()
    for source in package.rglob("*.py"):
        text = source.read_text()
        constants = dict(re.findall(r'^(\w+) = "(SPARSEBERT_\w+)"$', text, re.M))
        for name in re.findall(r"env_switch\((\"?\w+\"?)\)", text):
            read.add(name.strip('"') if name.startswith('"') else constants.get(name, name))
    read.discard("name")  # switches.py's own parameter
    assert read and read <= set(SWITCHES), read - set(SWITCHES)


def test_version(capsys):
    from sparsebert import __version__  # noqa: PLC0415

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"sparsebert {__version__}\n"


@pytest.mark.parametrize("command", ["finetune", "search"])
@pytest.mark.parametrize("flag,value", [
    ("--log-every", "0"), ("--warmup-steps", "-5"), ("--threads", "-3"), ("--threads", "0"),
    ("--max-length", "4"), ("--max-length", "129"), ("--grad-clip", "-1"),
    ("--weight-decay", "-1"), ("--checkpoint-every", "-1"), ("--stop-after-steps", "0"),
    ("--max-train-examples", "0"), ("--adam-eps", "0"), ("--model", "MODEL_FILE"),
    ("--seed", "-1"), ("--seed", str(2**64)), ("--lr", "-1e-5"),
])
def test_bad_training_values_are_refused_before_anything_is_written(command, flag, value, tiny,
                                                                     tmp_path, capsys):
    """Each bad value is one error line naming its flag (--max-length 129: past the tiny model's
    128 positions; --model: a file, not a model directory), and --out is not created, so the
    corrected command is not refused as "another run"."""
    if value == "MODEL_FILE":
        value = str(Path(tiny[0]) / "config.json")
    out = tmp_path / "out"
    args = _finetune_args(tiny, out)
    args[0] = command
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsebert: error: ") and "Traceback" not in err, err
    assert (flag if flag != "--model" else "config.json") in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["finetune", "search", "speed"])
@pytest.mark.parametrize("field,value,needle", [
    ("num_attention_heads", "4", "expected int, got str"),  # huggingface_hub's validation
    # values transformers fails on deep inside the model's build (ZeroDivisionError, KeyError,
    # a negative tensor size, dropout's ValueError)
    ("num_attention_heads", 0, "config.json num_attention_heads 0: expected a positive integer"),
    ("vocab_size", -1, "config.json vocab_size -1: expected a positive integer"),
    ("hidden_act", "nonsense", "config.json hidden_act 'nonsense': expected one of"),
    ("hidden_dropout_prob", 5, "config.json hidden_dropout_prob 5: expected a probability"),
])
def test_a_config_value_the_model_cannot_take_is_one_line(command, field, value, needle, tiny,
                                                          tmp_path, capsys):
    """A model directory whose config.json holds a value of the wrong type or an impossible one:
    one error line naming the directory and the field, exit 2 (was a library traceback, exit
    1), before anything is written."""
    model = tmp_path / "model"
    shutil.copytree(tiny[0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    out = tmp_path / "out"
    if command == "speed":
        args = ["speed", "--model", str(model), "--prune-heads", "0.5", "--batch", "2", "--seq",
                "8", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet"]
    else:
        args = _finetune_args((str(model), tiny[1]), out)
        args[0] = command
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsebert: error: ") and "Traceback" not in err, err
    assert str(model) in err and needle in err and "\n" not in err, err
    assert not out.exists()


def test_a_tokenizer_value_of_the_wrong_type_names_the_tokenizer_file(tiny, tmp_path, capsys):
    """A TypeError reading the tokenizer names tokenizer_config.json, not config.json."""
    model = tmp_path / "model"
    shutil.copytree(tiny[0], model)
    path = model / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": 5}))
    assert main(_finetune_args((str(model), tiny[1]), tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load the tokenizer from" in err and "tokenizer_config.json" in err, err


def test_a_value_starting_with_a_dash_reaches_its_flag_and_positionals_stay():
    """argparse takes "-1,2" or "-1e-5" for an option: attached to their flag they reach its
    own check; after "--" everything stays positional."""
    from sparsebert.cli import _negative_values_attached  # noqa: PLC0415

    assert _negative_values_attached(["search", "--seeds", "-1,2", "--lr", "-1e-5", "--lr",
                                      "-.5", "--out", "runs/x"]) == [
        "search", "--seeds=-1,2", "--lr=-1e-5", "--lr=-.5", "--out", "runs/x"]
    assert _negative_values_attached(["report", "--", "--old", "-1"]) == [
        "report", "--", "--old", "-1"]
    assert _negative_values_attached(["search", "--quiet", "--seed", "-3"]) == [
        "search", "--quiet", "--seed=-3"]


@pytest.mark.parametrize("args,needle", [
    (["--seeds", ","], "--seeds ',': expected at least one integer seed"),
    (["--seeds", "1,-2"], "--seeds '1,-2': expected integers in [0, 2**64 - 1]"),
    # a value starting with "-": argparse took it for an option ("expected one argument")
    (["--seeds", "-1,2"], "--seeds '-1,2': expected integers in [0, 2**64 - 1]"),
    (["--seeds", "3_0"], "--seeds '3_0': expected comma-separated integers"),
    (["--seeds", "1;2"], "--seeds '1;2': expected comma-separated integers"),
    (["--no-super"], "--no-super applies to --seeds only"),
    (["--subnets", ""], "--subnets '': expected a comma-separated subset of good,random,bad"),
])
def test_search_seed_options_are_checked(args, needle, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    base = _finetune_args(tiny, out)
    base[0] = "search"
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and not out.exists(), err


@pytest.mark.parametrize("command", [
    ["search", "--task", "SST-2"],
    ["search", "--task", "SST-2", "--seeds", "1,2"],
    ["sweep", "--tasks", "SST-2", "--seeds", "1", "--workers", "1"],
])
def test_a_model_that_cannot_be_patched_is_refused_before_any_work(command, tiny, tmp_path,
                                                                    capsys):
    """A DistilBERT folder was fine-tuned in full, then the search died with a traceback (the
    sweep: every full unit ran, every search unit failed)."""
    from transformers import DistilBertConfig, DistilBertModel  # noqa: PLC0415

    from sparsebert.hf.loading import load_tokenizer  # noqa: PLC0415

    model_dir = tmp_path / "distilbert"
    tokenizer = load_tokenizer(tiny[0])
    DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1,
                                     n_heads=2, hidden_dim=64)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    capsys.readouterr()  # (save_pretrained's progress bar)
    out = tmp_path / "out"
    assert main([*command, "--out", str(out), "--model", str(model_dir), "--glue-dir", tiny[1],
                 "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsebert: error: unsupported model type 'distilbert'"), err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("command", [
    ["finetune", "--task", "SST-2"],
    ["search", "--task", "SST-2"],
    ["sweep", "--tasks", "SST-2", "--seeds", "1", "--workers", "1", "--devices", "cpu"],
])
def test_cuda_graphs_on_the_cpu_is_refused_before_anything_is_written(command, tiny, tmp_path,
                                                                       capsys):
    out = tmp_path / "out"
    device = [] if command[0] == "sweep" else ["--device", "cpu"]
    assert main([*command, *device, "--cuda-graphs", "on", "--out", str(out), "--model", tiny[0],
                 "--glue-dir", tiny[1], "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsebert: error: --cuda-graphs on: needs") and "CUDA" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--adam-eps"])
def test_infinite_optimizer_settings_are_refused(flag, tiny, tmp_path, capsys):
    """--lr inf trained to NaN losses, exited 0 and wrote "lr": Infinity (not JSON)."""
    out = tmp_path / "out"
    assert main([*_finetune_args(tiny, out), flag, "inf"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} inf: expected a finite number" in err and not out.exists(), err


def test_import_leaves_heavy_optional_modules_unloaded():
    """`import sparsebert` (and what a sweep worker or the CLI imports at start) does not pull in
    statsmodels/scipy.stats, torch._dynamo or matplotlib: together they cost seconds per process
    and are imported where used."""
    code = (
        "import sys, sparsebert, sparsebert.cli, sparsebert.sweep.units; "
        "print(','.join(m for m in ('statsmodels', 'scipy.stats', 'torch._dynamo', 'matplotlib') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


@pytest.mark.parametrize("argv, command, wrong", [
    (["evaluate", "--run", "x", "--foo"], "evaluate", "--foo"),
    (["sweep", "--out", "o", "--seed", "3"], "sweep", "--seed 3"),  # not an abbreviation of --seeds
    (["sweep", "--out", "o", "--task", "RTE"], "sweep", "--task RTE"),
    (["--deb", "evaluate", "--run", "x"], "evaluate", "--deb"),  # not an abbreviation of --debug
])
def test_unknown_flags_name_the_command(argv, command, wrong, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"usage: sparsebert {command}" in err
    assert f"sparsebert {command}: error: unrecognized arguments: {wrong}" in err
    assert not (tmp_path / "o").exists()


def test_file_system_errors_are_one_line(monkeypatch, capsys):
    """A read-only or full file system under --out is one error line and exit 2 (not a
    traceback), like the other user-fixable errors."""
    import errno  # noqa: PLC0415

    import sparsebert.cli as cli  # noqa: PLC0415

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out")

    monkeypatch.setitem(cli.SUBCOMMANDS, "report", (cli.SUBCOMMANDS["report"][0], read_only))
    assert main(["report", "anything"]) == 2
    assert capsys.readouterr().err.strip() == \
        "sparsebert: error: [Errno 30] Read-only file system: '/mnt/ro/out'"


@pytest.mark.parametrize("command,written,expected", [
    ("speed", True, "interrupted"),
    ("search", True, "interrupted; rerun the same command to resume"),
    ("search", False, "interrupted; nothing was written yet: rerun the same command to start it"),
])
def test_interrupt_message_says_resume_only_where_a_rerun_resumes(command, written, expected,
                                                                   monkeypatch, capsys, tmp_path):
    import sparsebert.cli as cli  # noqa: PLC0415

    def interrupted(args):
        if written:
            (tmp_path / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.SUBCOMMANDS, command, (cli.SUBCOMMANDS[command][0], interrupted))
    argv = [command, "--run", "x"] if command == "speed" else [command, "--task", "SST-2",
                                                               "--out", str(tmp_path)]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("debug", [False, True])
def test_an_interrupt_while_the_parser_is_built_is_one_line(debug, monkeypatch, capsys):
    """A Ctrl-C while the parser is built (it imports the commands' modules) prints
    "interrupted" and returns 130, with the traceback only under --debug (was a traceback)."""
    import sparsebert.cli as cli  # noqa: PLC0415

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["info", *(["--debug"] if debug else [])]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert ("Traceback" in err) is debug, err


def test_an_interrupt_closes_the_progress_bars_before_its_line(monkeypatch, capsys, tmp_path):
    """The interrupt's line starts a line of its own (not at the end of a bar's), and no bar
    is drawn again after it."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    import sparsebert.cli as cli  # noqa: PLC0415

    def interrupted(args):
        bar = tqdm(total=10, desc="work", file=sys.stderr)
        bar.update(3)
        raise KeyboardInterrupt  # the bar is never closed by its owner

    monkeypatch.setitem(cli.SUBCOMMANDS, "search", (cli.SUBCOMMANDS["search"][0], interrupted))
    assert main(["search", "--task", "SST-2", "--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted; nothing was written yet: rerun the same command to "
                        "start it\n"), err


def test_evaluate_threads_and_progress(tiny, tmp_path, capsys, monkeypatch):
    """evaluate takes --threads (refusing < 1) and shows a progress bar over the dev examples
    on stderr, none with --json."""
    out = tmp_path / "run"
    assert main(_finetune_args(tiny, out)) == 0
    capsys.readouterr()
    monkeypatch.delenv("GLUE_DIR", raising=False)  # the run's own data folder
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert main(["evaluate", "--run", str(out), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert seen == [1] and "SST-2 dev:   0%|          | 0/32 " in err  # (cleared when done)
    assert main(["evaluate", "--run", str(out), "--json"]) == 0
    assert "SST-2 dev:" not in capsys.readouterr().err
    assert main(["evaluate", "--run", str(out), "--threads", "0"]) == 2
    assert "--threads 0: expected an integer >= 1" in capsys.readouterr().err


def _search_summary(status=None):
    summary = {"kind": "sparsebert-search", "task": "SST-2", "seed": 3, "report_metric": "acc",
               "full": {"score": 0.8125}, "majority": 0.5,
               "methods": {"structured": {"notes": ["kept everything"], "subnetworks": {
                   "good": {"heads_kept": 5, "mlps_kept": 1, "fraction_kept": 0.625,
                            "pruned": {"score": 0.75}, "retrained": None}}}}}
    return {**summary, "status": status} if status else summary


def _super_summary():
    return {"kind": "sparsebert-super", "task": "SST-2", "seeds": [1, 2], "notes": ["n"],
            "subnetworks": {"good": {"heads_kept": 4, "mlps_kept": 2,
                                     "pruned": [{"score": 0.5}, {"score": 0.75}],
                                     "retrained": []}}}


@pytest.mark.parametrize("extra,function,passed,printed", [
    (["--redo", "magnitude"], "search", {"redo": "magnitude", "progress": True},
     ["SST-2 seed 3: full model dev acc 0.8125 (majority class 0.5000)",
      "  note (structured): kept everything",
      "  structured good   5 heads, 1 MLPs, 62.5% kept: pruned 0.7500, retrained -"]),
    (["--quiet", "--seeds", "1,2", "--no-super", "--redo", "structured"], "search_seeds",
     {"progress": False, "super_survivors": False, "redo": "structured"}, None),
    (["--seeds", "1,2"], "search_seeds", {"progress": True, "super_survivors": True,
                                          "redo": None},
     ["SST-2 seeds [1, 2]: super-survivors", "  note: n",
      "  super good   4 heads, 2 MLPs: pruned 0.6250, retrained - (mean over seeds)"]),
])
def test_search_passes_its_options_on_and_prints_the_summary(extra, function, passed, printed,
                                                              monkeypatch, capsys):
    """--redo, --no-super and --quiet reach the search; the summary's lines: 4 decimals, "-"
    for a subnetwork not evaluated or not retrained, a super-survivor's mean over seeds."""
    import sparsebert.lottery as lottery  # noqa: PLC0415
    import sparsebert.lottery.super_survivors as super_survivors  # noqa: PLC0415

    calls = []

    def fake(task, out, *args, **kwargs):
        calls.append((task, out, args, kwargs))
        return _search_summary() if function == "search" else (
            _super_summary() if kwargs["super_survivors"] else _search_summary())

    monkeypatch.setattr(lottery if function == "search" else super_survivors, function, fake)
    assert main(["search", "--task", "SST-2", "--out", "o", *extra]) == 0
    [(task, out, args, kwargs)] = calls
    assert (task, out) == ("SST-2", "o")
    assert args == (([1, 2],) if function == "search_seeds" else ())
    assert {k: kwargs[k] for k in passed} == passed
    if printed is not None:
        assert capsys.readouterr().out.splitlines() == printed


def test_a_regression_tasks_baseline_is_a_constant_prediction(monkeypatch, capsys):
    """STS-B has no majority class: its baseline line names the constant prediction."""
    import sparsebert.lottery as lottery  # noqa: PLC0415

    summary = {**_search_summary(), "task": "STS-B", "report_metric": "pearson", "majority": 0.0}
    monkeypatch.setattr(lottery, "search", lambda *a, **k: summary)
    assert main(["search", "--task", "STS-B", "--out", "o"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "STS-B seed 3: full model dev pearson 0.8125 (constant prediction 0.0000)")


def test_a_stopped_search_says_how_to_go_on(monkeypatch, capsys):
    import sparsebert.lottery as lottery  # noqa: PLC0415

    monkeypatch.setattr(lottery, "search", lambda *a, **k: _search_summary(status="stopped"))
    assert main(["search", "--task", "SST-2", "--out", "o", "--stop-after-steps", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "stopped (--stop-after-steps); rerun without it, or with a larger value, to go on"]


def test_seed_and_seeds_together_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["search", "--task", "SST-2", "--out", str(out), "--seeds", "1,2",
                 "--seed", "3"]) == 2
    assert capsys.readouterr().err.strip() == \
        "sparsebert: error: pass either --seed or --seeds, not both"
    assert not out.exists()


@pytest.mark.parametrize("command", ["finetune", "search", "sweep"])
def test_sigterm_stops_a_command_as_ctrl_c_does(command, monkeypatch, capsys, tmp_path):
    """SIGTERM during a command: exit status 143 and one line, also when a library turned it
    into a plain KeyboardInterrupt; the handler that was there before is put back, and a later
    Ctrl-C reads as an interrupt again."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    import sparsebert.cli as cli  # noqa: PLC0415

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not handled")

    def terminated_then_replaced(args):
        try:
            terminated(args)
        except cli.Terminated:
            raise KeyboardInterrupt from None

    def interrupted(args):
        raise KeyboardInterrupt

    def outside(signum, frame):
        raise RuntimeError("the handler from before the command ran")

    previous = signal.signal(signal.SIGTERM, outside)
    try:
        (tmp_path / "sweep.json").write_text("{}")  # the run had begun writing
        argv = ([command, "--task", "SST-2", "--out", str(tmp_path)] if command != "sweep"
                else [command, "--out", str(tmp_path)])
        for run, code, word in ((terminated, 143, "terminated"),
                                (terminated_then_replaced, 143, "terminated"),
                                (interrupted, 130, "interrupted")):
            monkeypatch.setitem(cli.SUBCOMMANDS, command, (cli.SUBCOMMANDS[command][0], run))
            assert main(argv) == code
            assert capsys.readouterr().err.strip().splitlines()[-1] == \
                f"{word}; rerun the same command to resume"
            assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("argv", [
    ["finetune", "--task", "SST-2", "--out", ""], ["search", "--task", "SST-2", "--out", " "],
    ["report", "runs", "--out", ""], ["speed", "--json", ""]])
def test_an_empty_output_path_is_refused(argv, tmp_path, monkeypatch, capsys):
    """An empty output path (an unset shell variable) would name the working directory and
    scatter a run's files there: a usage error, exit status 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "expected a path, got" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_warnings_print_as_one_line(monkeypatch):
    """During a command a warning is formatted as `sparsebert: warning: ...` (no file, line or
    source); with SPARSEBERT_DEBUG, in Python's format. The format is put back after."""
    import warnings  # noqa: PLC0415

    import sparsebert.cli as cli  # noqa: PLC0415

    seen = []

    def formats(args):
        seen.append(warnings.formatwarning("the workers compete", UserWarning, "driver.py", 7))
        return 0

    monkeypatch.setitem(cli.SUBCOMMANDS, "report", (cli.SUBCOMMANDS["report"][0], formats))
    before = warnings.formatwarning
    assert main(["report", "x"]) == 0
    assert seen[-1] == "sparsebert: warning: the workers compete\n"
    monkeypatch.setenv("SPARSEBERT_DEBUG", "1")
    assert main(["report", "x"]) == 0
    assert seen[-1].startswith("driver.py:7: UserWarning: the workers compete")
    assert warnings.formatwarning is before


def test_an_unknown_debug_value_counts_as_off(monkeypatch):
    from sparsebert.cli import debug_enabled  # noqa: PLC0415

    monkeypatch.setenv("SPARSEBERT_DEBUG", "verbose")
    assert debug_enabled() is False
    import argparse  # noqa: PLC0415

    assert debug_enabled(argparse.Namespace(debug=True)) is True


def test_output_into_a_closed_pipe_ends_quietly():
    """`sparsebert ... | head` whose reader has gone: exit 141 (SIGPIPE's status) without the
    "error: [Errno 32] Broken pipe" line and exit 2 that a user error gets."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as usual: written when the command ends
    try:
        done = subprocess.run([sys.executable, "-m", "sparsebert", "info"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_tilde_in_out_or_run_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--out=~/x` (which the shell leaves as it is) wrote a literal ./~ folder, and the model
    written there was then looked for in the home folder: a search could never finish."""
    from sparsebert.flags import input_path, output_path  # noqa: PLC0415

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert output_path("~/runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert input_path("~") == str(tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--run=~/missing"]) == 2
    assert str(tmp_path / "home" / "missing") in capsys.readouterr().err
    assert not (tmp_path / "~").exists()


def test_an_empty_model_is_refused(tmp_path, capsys):
    """--model "$MODEL" with MODEL unset trained the default model, under an identity ('')
    that the default model itself could then not resume."""
    assert main(["finetune", "--task", "RTE", "--out", str(tmp_path / "r"), "--model", ""]) == 2
    assert "--model '': expected 'default', a local model directory or a hub id" in \
        capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_names_an_out_it_cannot_create(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    summaries = Path(__file__).resolve().parents[1] / "results" / "sweep_rte_full"
    assert main(["report", str(summaries), "--out", str(blocker / "sub")]) == 2
    assert f"--out {blocker / 'sub'}: cannot create it (Not a directory)" in \
        capsys.readouterr().err


def test_a_tilde_in_a_config_or_masks_file_is_the_home_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["sweep", "--config=~/s.toml", "--out", str(tmp_path / "sw"), "--quiet"]) == 2
    assert f"--config {tmp_path / 'home' / 's.toml'}: no such file" in capsys.readouterr().err
    assert main(["speed", "--head-mask=~/m.json", "--model", "bert-base"]) == 2
    assert f"--head-mask {tmp_path / 'home' / 'm.json'}: no such file" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command,flag,value", [
    ("finetune", "--seed", "3_0"),         # int() reads 30
    ("finetune", "--max-train-examples", "١٢"),  # int() reads Arabic-Indic digits as 12
    ("search", "--seed", "1_000"),
    ("evaluate", "--threads", "0x2"),
])
def test_integer_flags_take_plain_decimal_digits_only(command, flag, value, tiny, tmp_path,
                                                      capsys):
    """`--seed 3_0` is a typo, not seed 30: the integer flags refuse what int() alone would
    read (underscores, non-ASCII digits)."""
    out = tmp_path / "out"
    args = _finetune_args(tiny, out)
    if command == "evaluate":
        args = ["evaluate", "--run", str(out)]
    args[0] = command
    with pytest.raises(SystemExit) as exit_info:
        main([*args, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a decimal integer, got {value!r}" in err, err
    assert not out.exists()


def test_decimal_int_reads_signed_decimal_integers():
    from sparsebert.flags import decimal_int  # noqa: PLC0415

    assert [decimal_int(v) for v in ("7", "-3", "+4", " 12 ", "007")] == [7, -3, 4, 12, 7]
