"""Fine-tuning loop on a tiny random BERT: determinism, resume, fixed masks, bad input, CLI."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparsebert.cli import main
from sparsebert.errors import SparsebertError
from sparsebert.flags import add_dataclass_arguments, dataclass_to_argv, overrides
from sparsebert.glue.tasks import GlueError
from sparsebert.hf.loading import ModelLoadError, load_model
from sparsebert.train import PRESETS, TrainConfig, TrainError, evaluate, finetune
from sparsebert.train.config import use_cuda_graphs


def _config(tiny_model_dir, synthetic_glue, **kw) -> TrainConfig:
    base = dict(task="sst2", model=tiny_model_dir, glue_dir=synthetic_glue, epochs=2,
                batch_size=16,
                lr=1e-3, log_every=2, seed=7, threads=1)
    return TrainConfig(**{**base, **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_half_precision_checkpoint_loads_as_float32(tiny_model_dir, tmp_path):
    """Hub checkpoints are often stored in fp16; training needs fp32 master weights."""
    model, tokenizer = load_model(tiny_model_dir, 2)
    model.half().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), 2)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight,
                       model.bert.embeddings.word_embeddings.weight.float())
    kept, _ = load_model(str(tmp_path), 2, dtype=torch.float16)
    assert next(kept.parameters()).dtype == torch.float16


def test_config_round_trips():
    config = TrainConfig(task="MRPC", lr=3e-5, bucket=False, max_train_examples=100)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    argv = dataclass_to_argv(config)
    assert "--no-bucket" in argv and "--lr" in argv
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    assert TrainConfig(**overrides(parser.parse_args(argv), TrainConfig)) == config
    with pytest.raises(TrainError, match="unknown TrainConfig fields"):
        TrainConfig.from_json({"task": "RTE", "learning_rate": 1.0})


def test_presets(tiny_model_dir):
    assert TrainConfig().resolved().lr == PRESETS["minilm"]["lr"]  # default model
    assert TrainConfig(model=tiny_model_dir).resolved().lr == 2e-5  # any other model: the paper
    assert TrainConfig(preset="paper").resolved().lr == 2e-5
    assert TrainConfig(preset="paper", lr=1e-3).resolved().lr == 1e-3
    assert TrainConfig(task="sts-b").resolved().task == "STS-B"
    with pytest.raises(TrainError, match="--preset 'fast': expected auto or one of minilm, paper"):
        TrainConfig(preset="fast").resolved()
    with pytest.raises(TrainError, match="--batch-size 0: expected an integer >= 1"):
        TrainConfig(batch_size=0).resolved()
    # NumPy scalars (e.g. seeds from np.arange) are accepted and become Python numbers.
    resolved = TrainConfig(seed=np.int64(3), epochs=np.int32(2)).resolved()
    assert (resolved.seed, resolved.epochs) == (3, 2) and type(resolved.seed) is int


def test_determinism_and_outputs(tiny_model_dir, synthetic_glue, tmp_path):
    threads = torch.get_num_threads()
    a = finetune(_config(tiny_model_dir, synthetic_glue), tmp_path / "a", progress=False)
    b = finetune(_config(tiny_model_dir, synthetic_glue), tmp_path / "b", progress=False)
    finetune(_config(tiny_model_dir, synthetic_glue, seed=8), tmp_path / "c", progress=False)
    assert a.metrics == b.metrics and a.step == 12
    assert torch.get_num_threads() == threads  # config.threads is restored afterwards
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["epoch"] for r in records if r.get("split") == "dev"] == [1, 2]
    for name in ("config.json", "results.json", "model/config.json", "model/tokenizer.json"):
        assert (tmp_path / "a" / name).is_file()
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    assert a.wall_time_s > 0 and a.device == "cpu" and a.versions and a.score is not None
    again = finetune(_config(tiny_model_dir, synthetic_glue), tmp_path / "a", progress=False)
    assert again.finished_at == a.finished_at  # a finished run is not redone


def test_gradients_the_given_model_holds_are_not_trained_on(tiny_model_dir, synthetic_glue,
                                                            tmp_path):
    """finetune(model=...) of a model that holds gradients (the caller's own backward) trains
    as the same model without them: the first step starts from zero gradients."""
    config = _config(tiny_model_dir, synthetic_glue, epochs=1)
    runs = []
    for name, stale in (("clean", False), ("stale", True)):
        model, tokenizer = load_model(tiny_model_dir, 2, seed=0)
        if stale:
            ids = torch.randint(5, 50, (4, 8), generator=torch.Generator().manual_seed(0))
            (model(input_ids=ids).logits.sum() * 1000).backward()
        finetune(config, tmp_path / name, model=model, tokenizer=tokenizer, progress=False)
        runs.append(_weights(tmp_path / name))
    assert _same_weights(*runs)


def _without_dropout(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, 2, seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


def test_gradient_accumulation_is_the_batch_update(tiny_model_dir, synthetic_glue, tmp_path):
    """--grad-accum 3 runs each batch of 16 as micro-batches of 6, 5 and 5 (the last batch's
    too): without dropout the weights, losses and scores are those of whole batches, up to
    rounding; a run of other --grad-accum is another run, and a whole-batch run records no
    grad_accum (as runs did before it existed)."""
    runs = {}
    for accum in (1, 3):
        config = _config(tiny_model_dir, synthetic_glue, epochs=1, grad_accum=accum)
        model, tokenizer = _without_dropout(tiny_model_dir)
        runs[accum] = finetune(config, tmp_path / f"accum{accum}", model=model,
                               tokenizer=tokenizer, progress=False)
    whole, split = (_weights(tmp_path / f"accum{a}") for a in (1, 3))
    assert not _same_weights(whole, split)  # really computed another way
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert runs[1].step == runs[3].step
    assert runs[3].score == pytest.approx(runs[1].score, abs=1e-6)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / f"accum{a}" / "metrics.jsonl")
               .read_text().splitlines() if "loss" in json.loads(line)] for a in (1, 3)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    saved = {a: json.loads((tmp_path / f"accum{a}" / "config.json").read_text()) for a in (1, 3)}
    assert "grad_accum" not in saved[1] and saved[3]["grad_accum"] == 3
    config = _config(tiny_model_dir, synthetic_glue, epochs=1)
    with pytest.raises(TrainError, match=r"'grad_accum': \(3, 1\)"):
        finetune(config, tmp_path / "accum3", progress=False)
    with pytest.raises(TrainError, match=r"'grad_accum': \(1, 2\)"):
        finetune(_config(tiny_model_dir, synthetic_glue, epochs=1, grad_accum=2),
                 tmp_path / "accum1", progress=False)


def test_gradient_accumulation_settings():
    assert TrainConfig().to_json().get("grad_accum") is None
    assert TrainConfig.from_json(TrainConfig(grad_accum=4).to_json()).grad_accum == 4
    assert TrainConfig.from_json(TrainConfig().to_json()).grad_accum == 1
    with pytest.raises(TrainError, match=re.escape("--grad-accum 33: expected at most "
                                                   "--batch-size (32) micro-batches")):
        TrainConfig(grad_accum=33).resolved()
    with pytest.raises(TrainError, match=re.escape("--cuda-graphs on: not with --grad-accum 2")):
        use_cuda_graphs(TrainConfig(grad_accum=2, cuda_graphs="on"), torch.device("cuda"))
    assert not use_cuda_graphs(TrainConfig(grad_accum=2), torch.device("cuda"))


def test_resume_after_interruption(tiny_model_dir, synthetic_glue, tmp_path):
    config = _config(tiny_model_dir, synthetic_glue, checkpoint_every=4)
    finetune(config, tmp_path / "ref", progress=False)

    def crash(step: int, loss: float) -> None:
        if step == 10:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(config, tmp_path / "run", on_step=crash, progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 8
    resumed = finetune(config, tmp_path / "run", progress=False)
    assert resumed.step == 12
    assert _same_weights(_weights(tmp_path / "ref"), _weights(tmp_path / "run"))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if "loss" in json.loads(x)]
    assert steps == [2, 4, 6, 8, 10, 12]  # records after the checkpoint were not duplicated


def test_weight_masks_stay_zero_and_buffers_untouched(tiny_model_dir, synthetic_glue, tmp_path):
    model, tokenizer = load_model(tiny_model_dir, 2, seed=0)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    ffn = model.bert.encoder.layer[1].intermediate.dense.weight
    generator = torch.Generator().manual_seed(0)
    masks = [(p, torch.rand(p.shape, generator=generator) > 0.5) for p in (query, ffn)]
    attention = model.bert.encoder.layer[0].attention
    attention.register_buffer("head_gate", torch.tensor([1.0, 0.0]))
    before = {name: p.detach().clone() for name, p in (("q", query), ("f", ffn))}
    config = _config(tiny_model_dir, synthetic_glue, weight_decay=0.1, epochs=1)
    finetune(config, tmp_path / "m", model=model, tokenizer=tokenizer, weight_masks=masks,
             progress=False)
    for (param, mask), name in zip(masks, ("q", "f")):
        assert (param[~mask] == 0).all()
        assert not torch.equal(param[mask], before[name][mask])  # the rest trained
    assert attention.head_gate.tolist() == [1.0, 0.0]
    saved = _weights(tmp_path / "m")
    assert (saved["bert.encoder.layer.0.attention.self.query.weight"][~masks[0][1]] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        finetune(config, tmp_path / "bad", model=model, tokenizer=tokenizer,
                 weight_masks=[(query, torch.ones(3))], progress=False)


def test_regression_task(tiny_model_dir, synthetic_glue, tmp_path):
    results = finetune(_config(tiny_model_dir, synthetic_glue, task="STS-B", epochs=1),
                       tmp_path / "s", progress=False)
    assert set(results.metrics["dev"]) == {"pearson", "spearman", "corr"}
    assert results.score == results.metrics["dev"]["corr"]


def test_bad_inputs(tiny_model_dir, synthetic_glue, tmp_path):
    with pytest.raises(GlueError, match="known tasks: CoLA"):
        finetune(_config(tiny_model_dir, synthetic_glue, task="imdb"), tmp_path / "x",
                 progress=False)
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        finetune(_config(str(tmp_path / "empty_model"), synthetic_glue), tmp_path / "y")
    assert not (tmp_path / "y").exists()  # nothing written for a run that never started
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "missing"), 2)
    empty = tmp_path / "glue_empty" / "SST-2"
    empty.mkdir(parents=True)
    (empty / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(GlueError, match="empty dataset"):
        finetune(_config(tiny_model_dir, str(empty.parent)), tmp_path / "z", progress=False)
    finetune(_config(tiny_model_dir, synthetic_glue, epochs=1, stop_after_steps=2), tmp_path / "w",
             progress=False)
    with pytest.raises(TrainError, match="different config"):
        finetune(_config(tiny_model_dir, synthetic_glue, epochs=1, lr=5e-4), tmp_path / "w")
    with pytest.raises(SparsebertError, match="not a run directory"):
        evaluate(tmp_path / "z")
    with pytest.raises(SparsebertError, match="unfinished"):
        evaluate(tmp_path / "w")


def test_cli_finetune_stop_resume_evaluate(tiny_model_dir, synthetic_glue, tmp_path, capsys,
                                           monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # evaluate: the run's own data folder
    out = str(tmp_path / "cli")
    args = ["finetune", "--task", "sst2", "--out", out, "--model", tiny_model_dir, "--glue-dir",
            synthetic_glue, "--epochs", "1", "--lr", "1e-3", "--batch-size", "16", "--threads", "1",
            "--quiet"]
    assert main([*args, "--stop-after-steps", "3"]) == 0
    assert ("stopped at step 3 (--stop-after-steps); rerun without it, or with a larger value, "
            "to go on") in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["status"] == "finished" and results["step"] == 6
    assert main(["evaluate", "--run", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == results["metrics"]
    assert main(["evaluate", "--run", out]) == 0
    assert capsys.readouterr().out.startswith("SST-2 dev: acc ")
    assert main(["finetune", "--task", "nope", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--task 'nope': unknown GLUE task 'nope'" in err and "Traceback" not in err
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_saved_tokenizer_does_not_depend_on_use(tiny_model_dir, tmp_path):
    """Tokenizers are saved without the backend's padding/truncation call state (the default
    model's tokenizer.json pads to 128; each call sets them), so a tokenizer saved before and
    after use writes the same tokenizer.json (a sweep's cached data leaves tokenizers unused)."""
    from sparsebert.hf.loading import load_tokenizer, save_tokenizer  # noqa: PLC0415

    unused, used = load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir)
    used(["a few words"], ["and a pair"], truncation=True, max_length=16, padding=False)
    save_tokenizer(unused, tmp_path / "unused")
    save_tokenizer(used, tmp_path / "used")
    assert ((tmp_path / "unused" / "tokenizer.json").read_text()
            == (tmp_path / "used" / "tokenizer.json").read_text())


def test_rerun_at_or_past_the_stop_step_does_not_advance(tiny_model_dir, synthetic_glue,
                                                          tmp_path):
    """stop_after_steps N on a run already at step >= N stops there (no extra step per rerun),
    and the same run still finishes exactly like an uninterrupted one."""
    out = tmp_path / "run"
    first = finetune(_config(tiny_model_dir, synthetic_glue, stop_after_steps=3), out,
                     progress=False)
    assert (first.status, first.step) == ("stopped", 3)
    for stop in (3, 1):
        again = finetune(_config(tiny_model_dir, synthetic_glue, stop_after_steps=stop), out,
                         progress=False)
        assert (again.status, again.step) == ("stopped", 3)
    done = finetune(_config(tiny_model_dir, synthetic_glue), out, progress=False)
    whole = finetune(_config(tiny_model_dir, synthetic_glue), tmp_path / "whole", progress=False)
    assert done.metrics == whole.metrics
    assert _same_weights(_weights(out), _weights(tmp_path / "whole"))


def test_a_resumed_run_keeps_the_precision_it_started_with(tiny_model_dir, synthetic_glue,
                                                             tmp_path):
    """precision auto resolves per device (bf16 on CUDA, fp32 on the CPU), and the device may
    change on resume: the run goes on in the precision its checkpoint records (a run begun in
    bf16 on a GPU, resumed on the CPU, stays bf16), with a warning, and results.json and
    evaluate say which."""
    from sparsebert.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: PLC0415
    from sparsebert.train.evaluate import trained_precision  # noqa: PLC0415

    out = tmp_path / "run"
    stopped = finetune(_config(tiny_model_dir, synthetic_glue, stop_after_steps=2), out,
                       progress=False)
    assert stopped.status == "stopped"
    state = load_checkpoint(out)
    assert state["precision"] == "fp32"  # auto on the CPU
    save_checkpoint(out, {**state, "precision": "bf16"})  # as if begun on a GPU
    with pytest.warns(UserWarning, match="started in bf16 and resumes on cpu in bf16"):
        done = finetune(_config(tiny_model_dir, synthetic_glue), out, progress=False)
    assert done.precision == "bf16"
    assert json.loads((out / "results.json").read_text())["precision"] == "bf16"
    assert trained_precision(out, _config(tiny_model_dir, synthetic_glue)) == "bf16"
    whole = finetune(_config(tiny_model_dir, synthetic_glue), tmp_path / "whole", progress=False)
    assert whole.precision == "fp32"
    assert not _same_weights(_weights(out), _weights(tmp_path / "whole"))  # bf16 did run


@pytest.mark.parametrize("value", [0.5, 2.0, float("nan"), -1.0])
def test_weight_masks_must_be_zero_or_one(value):
    """apply() runs after every step: a mask value other than 0/1 would compound (0.5 -> 0.5**n)
    and be saved as True, so it is refused, naming the mask."""
    from sparsebert.pruning.weight_masks import WeightMaskError, WeightMasks  # noqa: PLC0415

    layer = torch.nn.Linear(2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, value]])
    with pytest.raises(WeightMaskError, match=r"weight mask 0: values must be 0 or 1"):
        WeightMasks([(layer.weight, mask)])
    with pytest.raises(WeightMaskError, match=r"weight mask 'weight': values must be 0 or 1"):
        WeightMasks.from_named(layer, {"weight": mask})
    assert len(WeightMasks([(layer.weight, mask != 0), (layer.bias, torch.ones(2))])) == 2


def test_predict_restores_each_submodule_mode(tiny_bert):
    """predict runs in eval mode and gives every submodule its own mode back (a part the caller
    keeps in eval mode, such as frozen embeddings, stays in eval mode)."""
    from sparsebert.glue.batching import Encoded  # noqa: PLC0415
    from sparsebert.train.evaluate import predict  # noqa: PLC0415

    model = tiny_bert(num_labels=2)
    model.train()
    model.bert.embeddings.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    encoded = Encoded(input_ids=[[2, 5, 7, 3], [2, 9, 3]], token_type_ids=None,
                      labels=np.array([0, 1]), lengths=np.array([4, 3]), pad_token_id=0,
                      max_length=8)
    first = predict(model, encoded, regression=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    np.testing.assert_array_equal(first, predict(model, encoded, regression=False))


def _gpt2_folder(path: Path) -> Path:
    """A tiny random GPT-2 classifier with a character-level tokenizer that has an
    end-of-sequence token but, as GPT-2's own, no padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<eos>", " "] + [chr(i) for i in range(33, 127)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>",
                                        unk_token="<eos>")
    config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_decoder_model_without_padding_token(synthetic_glue, tmp_path):
    """GPT-2 has no padding token: it pads with its end-of-sequence token, the classifier is
    told that id, and the saved run evaluates to the same score."""
    folder = str(_gpt2_folder(tmp_path / "gpt2"))
    model, tokenizer = load_model(folder, 2)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id
    config = TrainConfig(task="sst2", model=folder, glue_dir=synthetic_glue, epochs=1,
                         batch_size=16, max_length=32, threads=1, seed=3)
    results = finetune(config, tmp_path / "run", progress=False)
    assert results.finished
    assert evaluate(tmp_path / "run", glue_dir=synthetic_glue)["metrics"] == results.metrics
    # A caller's own model and tokenizer are refused before anything is written.
    model, tokenizer = load_model(folder, 2)
    tokenizer.pad_token = None
    with pytest.raises(TrainError, match="no padding token"):
        finetune(config, tmp_path / "own", model=model, tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "own").exists()


def test_each_step_uses_the_scheduled_lr(tiny_model_dir, synthetic_glue, tmp_path):
    """The learning rate each optimizer step of finetune actually uses is transformers'
    linear schedule with warmup: step i of T with warmup W has lr = peak * i / W, then
    peak * (T - i) / (T - W). SST-2: 96 examples, batch 16 -> T = 6."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: PLC0415

    peak, warmup, total = 1e-3, 2, 6
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(float(optimizer.param_groups[0]["lr"])))
    try:
        finetune(_config(tiny_model_dir, synthetic_glue, epochs=1, lr=peak,
                         warmup_steps=warmup), tmp_path / "run", progress=False)
    finally:
        handle.remove()
    assert seen == pytest.approx([peak * (i / warmup if i < warmup else
                                          (total - i) / (total - warmup))
                                  for i in range(total)], rel=1e-12)
    # metrics.jsonl's lr at step s (log_every 2) is the rate step s itself used
    logged = [json.loads(line) for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert sorted(logged) == [2, 4, 6]
    assert all(logged[s] == pytest.approx(seen[s - 1], rel=1e-12) for s in logged)


def test_no_weight_decay_on_biases_and_layer_norms(tiny_bert):
    """As transformers' run_glue: no decay for biases and LayerNorm weights."""
    from sparsebert.train.optim import make_optimizer  # noqa: PLC0415

    model = tiny_bert()
    optimizer, _ = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01).resolved(), 10)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0
               for p in group["params"]}
    assert decayed == {n for n in names.values()
                       if not (n.endswith("bias") or "LayerNorm" in n)}


def test_mnli_score_is_dev_matched(tiny_model_dir, tmp_path):
    """MNLI's run score is on dev_matched (PAPER.md §0); the two dev sets hold the same
    inputs with other gold labels, so they score differently."""
    glue = tmp_path / "glue" / "MNLI"
    glue.mkdir(parents=True)
    words = ["good", "bad", "cat", "dog", "runs", "sits", "a", "the"]
    classes = ("entailment", "neutral", "contradiction")
    rows = [f"{words[i % 8]} {words[(i * 3) % 8]} .\t{words[(i * 5) % 8]} .\t{classes[i % 3]}"
            for i in range(24)]
    head = "sentence1\tsentence2\tgold_label"
    (glue / "train.tsv").write_text("\n".join([head, *rows]) + "\n")
    inputs = [row.rsplit("\t", 1)[0] for row in rows[:12]]
    gold = {"dev_matched": [classes[0]] * 6 + [classes[1]] * 4 + [classes[2]] * 2,
            "dev_mismatched": [classes[0]] * 2 + [classes[1]] * 6 + [classes[2]] * 4}
    for split, labels in gold.items():
        lines = [f"{text}\t{label}" for text, label in zip(inputs, labels)]
        (glue / f"{split}.tsv").write_text("\n".join([head, *lines]) + "\n")
    result = finetune(TrainConfig(task="mnli", model=tiny_model_dir,
                                  glue_dir=str(tmp_path / "glue"), epochs=1, batch_size=8,
                                  lr=1e-3, seed=7, threads=1), tmp_path / "run", progress=False)
    matched = result.metrics["dev_matched"]["acc"]
    assert matched != result.metrics["dev_mismatched"]["acc"]
    assert result.score == matched


def test_a_run_resumed_from_changed_model_files_is_refused(tiny_model_dir, synthetic_glue,
                                                           tmp_path):
    """model.json records the model folder's files: a run stopped early and resumed after
    the folder's weights were overwritten is refused (naming the file) before anything is
    written; with the original files back it resumes."""
    import shutil  # noqa: PLC0415

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = _config(str(folder), synthetic_glue, epochs=1, stop_after_steps=2)
    finetune(config, tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / "model.json").read_text())
    assert recorded["source"] == "local" and "model.safetensors" in recorded["files"]
    original = (folder / "model.safetensors").read_bytes()
    weights = load_file(str(folder / "model.safetensors"))
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({k: v + 1 for k, v in weights.items()}, str(folder / "model.safetensors"))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(SparsebertError, match=r"other model files: model\.safetensors in "
                                              r"--model .* differ from what it began with"):
        finetune(_config(str(folder), synthetic_glue, epochs=1), tmp_path / "run",
                 progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    (folder / "model.safetensors").write_bytes(original)  # the same files again: resumes
    (folder / "README.md").write_text("notes")  # (documentation is not fingerprinted)
    assert finetune(_config(str(folder), synthetic_glue, epochs=1), tmp_path / "run",
                    progress=False).finished


def test_cli_evaluate_options_and_output(tiny_model_dir, synthetic_glue, tmp_path, capsys,
                                         monkeypatch):
    """evaluate's --glue-dir, --batch-size and --device reach the evaluation; the plain output
    is one line per dev split with each metric to 4 decimals, and names the data folder on
    stderr; --quiet finetune shows no progress, without it a progress bar goes to stderr."""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    out = str(tmp_path / "run")
    args = ["finetune", "--task", "SST-2", "--out", out, "--model", tiny_model_dir,
            "--glue-dir", synthetic_glue, "--epochs", "1", "--batch-size", "16", "--threads", "1",
            "--max-train-examples", "32"]
    assert main([*args, "--stop-after-steps", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert "SST-2 run: 100%" in captured.err
    assert main(["evaluate", "--run", out]) == 0
    captured = capsys.readouterr()
    [line] = captured.out.splitlines()
    assert re.fullmatch(r"SST-2 dev: acc \d\.\d{4}", line), line
    assert float(line.split()[-1]) == round(results["metrics"]["dev"]["acc"], 4)
    assert f"data: the run's data folder ({synthetic_glue})" in captured.err
    copy = tmp_path / "glue-copy"
    shutil.copytree(synthetic_glue, copy)
    assert main(["evaluate", "--run", out, "--glue-dir", str(copy), "--device", "cpu",
                 "--batch-size", "5", "--json"]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert again["data"]["chosen_by"] == f"--glue-dir {copy}" and again["device"] == "cpu"
    assert again["metrics"] == results["metrics"] and "data: " not in captured.err
    assert main(["evaluate", "--run", out, "--device", "meta"]) == 2
    assert "--device 'meta': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_config_values_at_their_bounds_are_accepted():
    """The edge values each flag's error message allows (and the other choices) resolve."""
    for values in ({"seed": 0}, {"seed": 2**64 - 1}, {"max_length": 8}, {"epochs": 1},
                   {"eval_batch_size": 1}, {"grad_clip": 0.0}, {"weight_decay": 0.0},
                   {"warmup_steps": 0}, {"checkpoint_every": 0}, {"stop_after_steps": 1},
                   {"padding": "max_length"}, {"precision": "bf16"}, {"precision": "fp32"},
                   {"cuda_graphs": "off"}, {"cuda_graphs": "on"}):
        config = TrainConfig(**values).resolved()
        assert {name: getattr(config, name) for name in values} == values


@pytest.mark.parametrize("values,message", [
    ({"lr": 0.0}, "--lr 0.0: expected a finite number > 0"),
    ({"lr": -1e-5}, "--lr -1e-05: expected a finite number > 0"),
    ({"lr": True}, "--lr True: expected a finite number > 0"),  # was trained at lr 1.0
    ({"lr": "2e-5"}, "--lr '2e-5': expected a finite number > 0"),  # was a ValueError
    ({"grad_clip": float("nan")}, "--grad-clip nan: expected a finite number >= 0"),
    ({"epochs": 0}, "--epochs 0: expected an integer >= 1"),
    ({"grad_accum": 0}, "--grad-accum 0: expected an integer >= 1"),
    ({"epochs": True}, "--epochs True: expected an integer >= 1"),
    ({"epochs": 1.5}, "--epochs 1.5: expected an integer >= 1"),
    ({"eval_batch_size": 0}, "--eval-batch-size 0: expected an integer >= 1"),
    ({"max_length": 7}, "--max-length 7: expected an integer >= 8"),
    ({"seed": True}, "--seed True: expected an integer in [0, 2**64 - 1]"),
    ({"padding": "longest"}, "--padding 'longest': expected one of dynamic, max_length"),
    ({"precision": "fp16"}, "--precision 'fp16': expected one of auto, fp32, bf16"),
    ({"cuda_graphs": "yes"}, "--cuda-graphs 'yes': expected one of auto, on, off"),
])
def test_bad_config_values_name_their_flag(values, message):
    with pytest.raises(TrainError, match=re.escape(message)):
        TrainConfig(**values).resolved()


def test_numpy_floats_become_python_floats():
    config = TrainConfig(weight_decay=np.float32(0.25), grad_clip=np.float16(2.0)).resolved()
    assert type(config.weight_decay) is float and type(config.grad_clip) is float
    assert json.loads(json.dumps(config.to_json()))["weight_decay"] == 0.25


def test_resolve_device(monkeypatch):
    from sparsebert.train import resolve_device  # noqa: PLC0415

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TrainError, match=re.escape("--device 'meta': expected auto, cpu")):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(TrainError, match=re.escape("--device cuda:2: only 2 CUDA device(s) "
                                                   "visible (cuda:0..cuda:1)")):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(TrainError, match="--device cuda: no CUDA device is visible"):
        resolve_device("cuda")


def test_precision_and_cuda_graph_choices():
    from sparsebert.train import autocast, use_cuda_graphs  # noqa: PLC0415

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    a = torch.ones(2, 2)
    for precision, dtype in (("bf16", torch.bfloat16), ("auto", torch.float32),
                             ("fp32", torch.float32)):
        with autocast(cpu, precision):
            assert (a @ a).dtype == dtype, precision
    assert [use_cuda_graphs(TrainConfig(cuda_graphs=mode), device)
            for mode, device in (("auto", cpu), ("auto", cuda), ("off", cuda), ("on", cuda))] \
        == [False, True, False, True]


def test_a_rerun_may_change_the_runtime_settings_only(tiny_model_dir, synthetic_glue, tmp_path):
    """Settings that do not change what is computed may differ when a run is resumed; the
    others are refused as another run."""
    from sparsebert.train.loop import check_config  # noqa: PLC0415

    config = _config(tiny_model_dir, synthetic_glue, epochs=1, max_train_examples=32,
                     stop_after_steps=1)
    out = tmp_path / "run"
    assert finetune(config, out, progress=False).status == "stopped"
    for change in ({"threads": 2}, {"log_every": 5}, {"checkpoint_every": 3},
                   {"eval_batch_size": 7}, {"stop_after_steps": 2}, {"device": "cpu"},
                   {"cuda_graphs": "off"}, {"glue_dir": str(tmp_path / "elsewhere")}):
        assert check_config(out, dataclasses.replace(config, **change).resolved()) is None
    for change in ({"warmup_steps": 1}, {"max_length": 64}, {"weight_decay": 0.1},
                   {"seed": 8}, {"grad_clip": 0.5}, {"bucket": False}):
        with pytest.raises(TrainError, match="different config"):
            check_config(out, dataclasses.replace(config, **change).resolved())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_of_the_caller_is_refused(tiny_model_dir, synthetic_glue,
                                                         tmp_path, dtype):
    """finetune(model=...) trained a bf16/fp16 model's weights in that dtype (most updates of
    a 2e-5 step lost) and recorded precision fp32; load_model gives fp32 master weights."""
    model, tokenizer = load_model(tiny_model_dir, 2)
    with pytest.raises(TrainError, match=rf"the model has {str(dtype)[6:]} parameters; pass "
                                         r"it in float32 \(model.float\(\)\)"):
        finetune(_config(tiny_model_dir, synthetic_glue, epochs=1), tmp_path / "run",
                 model=model.to(dtype), tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_callers_autocast_region_does_not_change_the_run(tiny_model_dir, synthetic_glue,
                                                           tmp_path):
    """An fp32 run started inside a caller's bf16 autocast region took its backward in bf16
    (weights off by as much as bf16 training moves them) and recorded fp32: the run's own
    precision holds for the whole run, so the weights are those of a run outside it."""
    config = _config(tiny_model_dir, synthetic_glue, epochs=1, precision="fp32")
    plain = finetune(config, tmp_path / "plain", progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = finetune(config, tmp_path / "inside", progress=False)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is back after the run
    assert _same_weights(_weights(tmp_path / "plain"), _weights(tmp_path / "inside"))
    assert inside.metrics == plain.metrics


@pytest.mark.parametrize("model_type", ["roberta-prelayernorm", "data2vec-text", "mpnet"])
def test_max_length_of_a_roberta_style_type_is_checked_before_training(model_type, tmp_path,
                                                                        tiny_model_dir,
                                                                        synthetic_glue,
                                                                        monkeypatch):
    """Types whose position ids start after the padding index hold pad_token_id + 1 fewer
    tokens than max_position_embeddings: a longer --max-length crashed mid-training (index
    out of range) on the first long batch. The limit is read from the config's type, and from
    the loaded model's position table for any type (here with the type list emptied)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: PLC0415

    from sparsebert.hf import loading  # noqa: PLC0415
    from sparsebert.hf.loading import check_max_length, load_tokenizer, position_limit  # noqa: PLC0415,E501

    tokenizer = load_tokenizer(tiny_model_dir)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=16,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8, max_position_embeddings=40,
                                  pad_token_id=1)
    model = AutoModelForSequenceClassification.from_config(config)
    assert position_limit(config) == position_limit(config, model) == 38
    with pytest.raises(ModelLoadError, match=r"--max-length 39: longer than the model's "
                                             r"position limit \(38 tokens\)"):
        check_max_length(config, 39)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(loading, "PADDING_OFFSET_TYPES", ())  # a type not in the list
    assert position_limit(config) == 40
    with pytest.raises(ModelLoadError, match=r"--max-length 39: .*\(38 tokens\)"):
        finetune(_config(str(folder), synthetic_glue, max_length=39), tmp_path / "run",
                 progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
