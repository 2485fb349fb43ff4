"""`sparsebert evaluate` (and `finetune --model`) on broken inputs: a model folder without
tokenizer files, damaged run files, a run whose data folder is gone, and --run pointing at the
wrong kind of path. Each gives one `sparsebert: error:` line and exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sparsebert.cli import main
from sparsebert.hf.loading import ModelLoadError, load_tokenizer


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, synthetic_glue, tmp_path_factory) -> Path:
    """A finished plain SST-2 run of the tiny model on the synthetic data."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["finetune", "--task", "SST-2", "--out", str(run), "--model", tiny_model_dir,
                 "--glue-dir", synthetic_glue, "--epochs", "1", "--batch-size", "32",
                 "--threads", "1", "--quiet"]) == 0
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run that a test may damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv("SPARSEBERT_DEBUG", raising=False)
    monkeypatch.delenv("GLUE_DIR", raising=False)


def fails(args: list[str], capsys) -> str:
    """The one error line of a command that must exit with status 2."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsebert: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_model_folder_without_tokenizer_files(run_copy, tiny_model_dir, synthetic_glue,
                                              tmp_path, capsys):
    model_dir = run_copy / "model"
    for file in model_dir.glob("tokenizer*"):
        file.unlink()
    line = fails(["evaluate", "--run", str(run_copy)], capsys)
    assert str(model_dir) in line and "no tokenizer files found" in line
    assert "tokenizer.json" in line and "vocab.txt" in line

    # What model.save_pretrained() alone writes: config.json and weights.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dir) / name, bare / name)
    out = tmp_path / "out"
    line = fails(["finetune", "--task", "SST-2", "--out", str(out), "--model", str(bare),
                  "--glue-dir", synthetic_glue, "--epochs", "1", "--threads", "1", "--quiet"],
                 capsys)
    assert str(bare) in line and "no tokenizer files found" in line
    assert not out.exists()

    # A vocabulary far smaller than the model's embedding: not this model's tokenizer.
    (bare / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nfilm\n")
    with pytest.raises(ModelLoadError, match="the tokenizer has 7 tokens .* vocab_size 30522"):
        load_tokenizer(bare)


def test_a_tokenizer_larger_than_the_embedding_or_a_model_without_a_classifier(
        tiny_model_dir, synthetic_glue, tmp_path, capsys):
    """A model folder whose tokenizer knows more tokens than its embedding has rows (the
    first forward would fail on an id past the last row), or whose architecture has no
    sequence-classification model: one line naming it, before anything is written."""
    import json as json_module  # noqa: PLC0415

    from transformers import BertConfig, BertModel  # noqa: PLC0415

    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    small = tmp_path / "small-vocab"  # a model of 1000 ids, saved with a 30522-token tokenizer
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(small)
    for file in Path(tiny_model_dir).iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(file, small / file.name)
    with pytest.raises(ModelLoadError, match=r"the tokenizer has 30522 tokens but the model's "
                                             r"embedding has only vocab_size 1000 rows"):
        load_model(small, 2, seed=0)
    out = tmp_path / "out"
    finetune = ["finetune", "--task", "SST-2", "--out", str(out), "--glue-dir", synthetic_glue,
                "--epochs", "1", "--threads", "1", "--quiet", "--model"]
    assert "vocab_size 1000 rows" in fails([*finetune, str(small)], capsys)
    assert not out.exists()
    vit = tmp_path / "vit"
    shutil.copytree(tiny_model_dir, vit)
    (vit / "config.json").write_text(json_module.dumps(
        {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 64, "image_size": 8, "patch_size": 4}))
    line = fails([*finetune, str(vit)], capsys)
    assert "model type 'vit' has no sequence-classification model in transformers" in line
    assert not out.exists()
    with pytest.raises(ModelLoadError, match=r"labels \('a', 'b'\) name 2 classes, but "
                                             r"num_labels is 3"):
        load_model(tiny_model_dir, 3, labels=("a", "b"))


def test_damaged_run_files(run_copy, tmp_path, capsys):
    config = run_copy / "config.json"
    good = config.read_text()
    config.write_text('{"task": "SST-2",\n')
    line = fails(["evaluate", "--run", str(run_copy)], capsys)
    assert str(config) in line and "not valid JSON" in line
    config.write_text("[1, 2]")
    line = fails(["evaluate", "--run", str(run_copy)], capsys)
    assert str(config) in line and "expected a JSON object" in line
    config.write_text(good)

    weights = run_copy / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = fails(["evaluate", "--run", str(run_copy)], capsys)
    assert str(weights) in line and "damaged" in line


def test_recorded_data_folder_missing(run_copy, tmp_path, capsys):
    config = run_copy / "config.json"
    saved = json.loads(config.read_text())
    gone = tmp_path / "glue_gone"
    saved["glue_dir"] = str(gone)
    config.write_text(json.dumps(saved))
    line = fails(["evaluate", "--run", str(run_copy)], capsys)
    assert f"not found under {gone}" in line
    assert f"the run's recorded data folder, recorded in {config}" in line
    assert "Pass --glue-dir or set GLUE_DIR" in line
    assert "from --glue-dir" not in line and "unset" not in line


def test_run_is_a_model_folder_or_a_file(finished_run, capsys):
    line = fails(["evaluate", "--run", str(finished_run / "model")], capsys)
    assert f"is the model folder of the run {finished_run}" in line
    assert f"pass --run {finished_run}" in line and "unfinished" not in line
    results = finished_run / "results.json"
    line = fails(["evaluate", "--run", str(results)], capsys)
    assert f"--run {results}: is a file, not a run directory" in line
    assert "no such directory" not in line


def test_model_folders_load_model_cannot_use(finished_run, tiny_model_dir, tmp_path,
                                             monkeypatch, capsys):
    """load_model (finetune --model): a folder written by save_pruned is refused (from_pretrained
    would drop its masks or re-initialise its removed parts), as is a classifier of another
    label count; a ~/ path is expanded."""
    import sparsebert  # noqa: PLC0415
    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    with pytest.raises(ModelLoadError, match="3-label classifier .* holds a classifier for 2 "
                       "labels"):
        load_model(finished_run / "model", 3)
    model, _ = load_model(finished_run / "model", 2)
    sparsebert.patch(model)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    head_mask = torch.ones(layers, heads)
    head_mask[:, 0] = 0
    sparsebert.set_masks(model, head_mask=head_mask)
    sparsebert.prune(model)
    sparsebert.save_pruned(model, tmp_path / "pruned")
    with pytest.raises(ModelLoadError, match="written by sparsebert's save_pruned .* load it "
                       "with sparsebert.load_pruned"):
        load_model(tmp_path / "pruned", 2)
    line = fails(["finetune", "--task", "SST-2", "--out", str(tmp_path / "run"), "--model",
                  str(tmp_path / "pruned"), "--quiet"], capsys)
    assert "save_pruned" in line
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny").symlink_to(tiny_model_dir)
    model, _ = load_model("~/tiny", 2)
    assert type(model).__name__ == "BertForSequenceClassification"


@pytest.mark.parametrize("saved, reordered", [
    (("contradiction", "neutral", "entailment"), True),     # e.g. roberta-large-mnli's order
    (("ENTAILMENT", "Neutral", "contradiction"), False),    # the task's order, other case
    (("LABEL_0", "LABEL_1", "LABEL_2"), False),             # no names: rows kept
    (("yes", "maybe", "no"), False),                        # other classes: rows kept
])
def test_a_head_saved_in_another_label_order_keeps_its_meaning(tiny_model_dir, tmp_path, saved,
                                                               reordered):
    """load_model writes the task's id2label over the checkpoint's: a head trained on the same
    classes in another order has its output rows permuted to match, so a prediction keeps its
    class (an MNLI head saying "contradiction" must not come back saying "entailment")."""
    from transformers import BertForSequenceClassification  # noqa: PLC0415

    from sparsebert.glue import get_task  # noqa: PLC0415
    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    task = get_task("MNLI")
    torch.manual_seed(0)
    source = BertForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=dict(enumerate(saved)),
        label2id={name: i for i, name in enumerate(saved)})
    source.save_pretrained(tmp_path / "mnli")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "mnli")
    model, _ = load_model(tmp_path / "mnli", task.num_labels, labels=task.labels)
    assert model.config.id2label == dict(enumerate(task.labels))
    # the saved row of each task class (task order: entailment, neutral, contradiction)
    order = [saved.index(label) for label in task.labels] if reordered else [0, 1, 2]
    torch.testing.assert_close(model.classifier.weight, source.classifier.weight[order])
    torch.testing.assert_close(model.classifier.bias, source.classifier.bias[order])
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    source.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, source(**inputs).logits[:, order])


@pytest.mark.parametrize("trained_on, recorded, precision, expected", [
    ("cpu", None, "auto", "fp32"), ("cuda:0", None, "auto", "bf16"),
    ("cuda:0", None, "fp32", "fp32"), ("cpu", None, "bf16", "bf16"), (None, None, "auto", "auto"),
    ("cpu", "bf16", "auto", "bf16"), ("cuda:0", "fp32", "auto", "fp32")])
def test_evaluate_scores_in_the_precision_the_run_trained_with(run_copy, monkeypatch, trained_on,
                                                                recorded, precision, expected):
    """precision "auto" means bf16 on CUDA and fp32 elsewhere: `evaluate` uses the precision
    results.json records (a run resumed on another device keeps the one it began in), and for
    older results.json files resolves it on the device the run trained on, not on the one it
    evaluates on, so that its scores are the run's; unknown (no device recorded): "auto" on the
    evaluating device."""
    import importlib  # noqa: PLC0415

    evaluate_module = importlib.import_module("sparsebert.train.evaluate")  # (not the function)

    results = json.loads((run_copy / "results.json").read_text())
    results["precision"] = recorded  # None: a results.json from before it was recorded
    if trained_on is None:
        results.pop("device")
    else:
        results["device"] = trained_on
    (run_copy / "results.json").write_text(json.dumps(results))
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "precision": precision}))
    seen = []
    real = evaluate_module.evaluate_model
    monkeypatch.setattr(evaluate_module, "evaluate_model",
                        lambda *args, **kwargs: seen.append(args[4]) or real(*args, **kwargs))
    evaluate_module.evaluate(run_copy, device="cpu")
    assert seen and set(seen) == {expected}


def test_metrics_log_keeps_seven_significant_digits(tmp_path):
    """A learning rate of 2e-5's schedule keeps its steps in metrics.jsonl (6 decimal places
    flattened 1.94e-5 and 1.89e-5 alike to 1.9e-5)."""
    from sparsebert.train.metrics_log import MetricsLog  # noqa: PLC0415

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_until_step=0)
    log.write({"step": 1, "lr": 1.9444444444e-05, "loss": 0.123456789, "n": 3})
    log.write({"step": 2, "lr": 1.8888888888e-05, "loss": float("nan")})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "lr": 1.944444e-05, "loss": 0.1234568, "n": 3}
    assert lines[1]["lr"] == 1.888889e-05


def test_a_weights_file_this_process_may_not_read_is_named(tiny_model_dir, monkeypatch):
    """safetensors reports a denied read as 'No such file or directory': the error adds which
    files of the folder may not be read (os.access, as a non-root user meets it)."""
    import sparsebert.hf.loading as loading  # noqa: PLC0415

    real_access = loading.os.access
    monkeypatch.setattr(loading.os, "access", lambda path, mode: (
        not str(path).endswith("model.safetensors") and real_access(path, mode)))

    def load(offline):
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(ModelLoadError, match=r"No such file or directory \(this process may "
                                             r"not read .*model.safetensors\)"):
        loading._offline_first(load, tiny_model_dir, True, "model")
    monkeypatch.setattr(loading.os, "access", real_access)
    with pytest.raises(ModelLoadError, match="No such file or directory") as refused:
        loading._offline_first(load, tiny_model_dir, True, "model")
    assert "may not read" not in str(refused.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_pytorch_model_bin_is_named(tiny_model_dir, tmp_path, damage):
    """A damaged pytorch_model.bin ended in torch.load's RuntimeError or UnpicklingError,
    naming no file (a damaged model.safetensors is a ModelLoadError naming it)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    folder = tmp_path / "bin_model"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    load_model(folder)  # an intact .bin loads
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"\x80\x02garbage" * 64)
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin is damaged \(truncated or not "
                                             r"a torch file"):
        load_model(folder)


def test_an_intact_bin_that_the_safe_loader_refuses_keeps_torchs_explanation(tiny_model_dir,
                                                                            tmp_path):
    """A whole pytorch_model.bin holding an object torch's weights_only loader refuses is not
    'damaged': torch's own error (what it refused, the two ways out) stays."""
    import pickle  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from sparsebert.hf.loading import load_model  # noqa: PLC0415

    folder = tmp_path / "bin_model"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": np.arange(3)}, folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(folder)


@pytest.mark.parametrize("blank", [" ", "\t"])
def test_a_blank_glue_dir_counts_as_unset(blank, monkeypatch):
    """GLUE_DIR of spaces is unset, as the data loader reads it: evaluate uses the run's
    recorded data folder (it used the blank value, which meant the hub)."""
    from sparsebert.train.evaluate import choose_data  # noqa: PLC0415

    monkeypatch.setenv("GLUE_DIR", blank)
    assert choose_data("/data/glue", None)[0] == "/data/glue"
    assert choose_data("/data/glue", blank)[0] == "/data/glue"
    assert choose_data("/data/glue", Path("/other/glue"))[0] == Path("/other/glue")  # PathLike
