"""Bad input to the public Python API: each is an error naming the argument and what was
expected, raised before any work (not a traceback from inside torch, numpy or a loop, nor a
silently wrong result)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparsebert
from sparsebert.errors import ConfigError, SparsebertError
from sparsebert.glue import GlueError, batching, metrics
from sparsebert.lottery import SearchConfig
from sparsebert.sweep import SweepConfig
from sparsebert.train import TrainConfig


def test_a_stop_after_typo_is_refused_before_the_search_starts(tiny_model_dir, synthetic_glue,
                                                               tmp_path):
    """stop_after takes a stage name: a typo ran the whole search (it never matched)."""
    from sparsebert.lottery import search  # noqa: PLC0415
    from sparsebert.lottery.search import STAGES  # noqa: PLC0415

    out = tmp_path / "search"
    with pytest.raises(ConfigError, match=r"stop_after 'ful': expected a stage name, one of "
                                          r"full, structured.search"):
        search("SST-2", out, model=tiny_model_dir, glue_dir=synthetic_glue, stop_after="ful")
    assert not out.exists()
    assert {"full", "summary", "magnitude.retrained.bad", "structured.pruned.random"} <= set(
        STAGES)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("importance_batch_size", 2.5, "--importance-batch-size 2.5: expected an integer >= 1"),
    ("importance_batch_size", math.nan, "--importance-batch-size nan: expected an integer"),
    ("magnitude_max_steps", math.inf, "--magnitude-max-steps inf: expected an integer >= 1"),
    ("magnitude_max_steps", True, "--magnitude-max-steps True: expected an integer >= 1"),
    ("threshold", "0.9", "--threshold '0.9': expected a number"),
    ("subnets", None, "--subnets None: expected a string"),
    ("retrain", "no", "--retrain 'no': expected True or False"),
])
def test_search_config_names_a_bad_field(field, value, needle):
    """(a float batch size passed the check and failed after the full model's fine-tune)"""
    with pytest.raises(ConfigError, match=needle):
        SearchConfig(**{field: value}).validate()


@pytest.mark.parametrize(("field", "value"), [
    ("workers", 2.5), ("workers", math.nan), ("per_gpu", 1.5), ("retries", 1.5),
    ("retries", math.nan), ("unit_memory_gb", "4")])
def test_sweep_config_names_a_bad_count(field, value):
    """(a float worker count failed in the slots with a bare TypeError; retries nan was kept)"""
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag} {value!r}: expected"):
        SweepConfig(**{field: value}).validate()


def test_evaluate_model_refuses_a_head_of_another_task(tiny_bert):
    """A 2-label head on STS-B (a regression) or a 3-label head on RTE scored a metric of the
    wrong head (logit 0 read as a score; argmax over other classes)."""
    from sparsebert.train.evaluate import evaluate_model  # noqa: PLC0415

    for labels, task, needed in ((2, "STS-B", 1), (3, "RTE", 2), (2, "MNLI", 3)):
        with pytest.raises(SparsebertError, match=rf"the model has {labels} output\(s\) "
                                                  rf"\(config.num_labels\), {task} needs "
                                                  rf"{needed}"):
            evaluate_model(tiny_bert(num_labels=labels), task, None)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"bucket_batches": -1}, "'bucket_batches' must be an integer >= 1, got -1"),
    ({"bucket_batches": 0}, "'bucket_batches' must be an integer >= 1, got 0"),
    ({"seed": None}, "'seed' must be an integer >= 0, got None"),
    ({"batch_size": 2.5}, "'batch_size' must be an integer >= 1, got 2.5"),
    ({"epoch": -1}, "'epoch' must be an integer >= 0, got -1"),
])
def test_train_batches_names_a_bad_argument(kwargs, needle):
    """(bucket_batches=-1 gave an epoch of no batches, 0 range()'s error)"""
    args = {"batch_size": 2, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=needle):
        batching.train_batches(np.arange(1, 9), **args)


def test_batching_helpers_name_a_bad_argument():
    encoded = batching.Encoded([[1, 2, 3], [1, 2]], None, np.array([0, 1]), np.array([3, 2]),
                               0, 16)
    with pytest.raises(ValueError, match="'batch_size' must be an integer >= 1, got '2'"):
        batching.eval_batches(np.array([3, 2]), "2")
    with pytest.raises(ValueError, match="'pad_to_multiple_of' must be an integer >= 1"):
        batching.collate(encoded, np.array([0, 1]), pad_to_multiple_of=-3)
    with pytest.raises(ValueError, match="'indices' is empty"):
        batching.collate(encoded, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="'tokenizer' must be a Hugging Face tokenizer"):
        batching.encode(None, None)
    from sparsebert.glue import load_split  # noqa: PLC0415

    with pytest.raises(GlueError, match="split None: expected a split name of task RTE"):
        load_split("RTE", None)


def test_metrics_name_what_they_need():
    with pytest.raises(ValueError, match=r"'metrics' has no 'acc'.*got keys \['accuracy'\]"):
        metrics.threshold_score("RTE", {"accuracy": 0.7})
    with pytest.raises(ValueError, match=r"predictions must be \(N,\) values, got shape "
                                         r"\(3, 2\)"):
        metrics.accuracy(np.zeros((3, 2)), np.zeros(3))
    assert metrics.accuracy(np.zeros((3, 1)), np.zeros(3)) == 1.0  # a column is (N,)


def test_saving_and_loading_name_a_bad_path_or_device(tiny_bert, tmp_path):
    model = tiny_bert()
    sparsebert.patch(model)
    with pytest.raises(TypeError, match="save_pruned: 'path' must be a str or os.PathLike"):
        sparsebert.save_pruned(model, None)
    with pytest.raises(TypeError, match="load_pruned: 'path' must be a str or os.PathLike"):
        sparsebert.load_pruned(None)
    saved = sparsebert.save_pruned(model, tmp_path / "pruned")
    with pytest.raises(ValueError, match="load_pruned: 'device' 'gpu': expected a torch device"):
        sparsebert.load_pruned(saved, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'device' 'cuda': no CUDA device is visible"):
            sparsebert.load_pruned(saved, device="cuda")
    assert sparsebert.load_pruned(saved, device="cpu").device.type == "cpu"


def test_importance_names_bad_batches_and_token_ids(tiny_bert, tiny_batches, tiny_dims):
    model = tiny_bert()
    sparsebert.patch(model)
    with pytest.raises(TypeError, match="'batches' must be an iterable of batches"):
        sparsebert.importance(model, None, progress=False)
    batches = tiny_batches(1)
    batches[0]["input_ids"][0, 0] = tiny_dims.vocab  # one past the vocabulary
    with pytest.raises(ValueError, match=rf"'input_ids' must be token ids in \[0, vocab_size "
                                         rf"= {tiny_dims.vocab}\)"):
        sparsebert.importance(model, batches, progress=False)


def test_training_helpers_take_what_they_document(tiny_bert):
    from sparsebert.precision import autocast  # noqa: PLC0415
    from sparsebert.train import make_optimizer  # noqa: PLC0415
    from sparsebert.train.config import resolve_device  # noqa: PLC0415
    from sparsebert.train.step import LinearSchedule  # noqa: PLC0415

    model = tiny_bert()
    optimizer, schedule = make_optimizer(model, TrainConfig(), 10)  # lr from the preset
    assert schedule.peak_lr == TrainConfig().resolved().lr
    with pytest.raises(ValueError, match="'total_steps' must be an integer >= 1, got 2.5"):
        LinearSchedule(optimizer, 1e-3, 2.5)
    with autocast("cpu", "fp32"):  # a device name, as torch's own autocast takes
        pass
    with pytest.raises(ConfigError, match="--device None: expected auto, cpu, cuda"):
        resolve_device(None)


def test_entry_points_name_a_config_of_the_wrong_type(tmp_path):
    from sparsebert.lottery import search  # noqa: PLC0415
    from sparsebert.sweep import sweep  # noqa: PLC0415
    from sparsebert.train import finetune  # noqa: PLC0415

    with pytest.raises(ConfigError, match="finetune: 'config' must be a TrainConfig"):
        finetune({"task": "RTE"}, tmp_path / "run")
    with pytest.raises(ConfigError, match="search: 'search_config' must be a SearchConfig"):
        search("RTE", tmp_path / "search", search_config={"method": "structured"})
    with pytest.raises(ConfigError, match="sweep: 'config' must be a SweepConfig"):
        sweep(tmp_path / "sweep", {"tasks": "RTE"})
    with pytest.raises(SparsebertError, match="report: 'paths' must be a path or a list"):
        sparsebert.lottery.report(None)
    assert not any(tmp_path.iterdir())


def test_models_and_modules_are_checked(tiny_bert):
    from sparsebert.hf.head_gates import attention_modules  # noqa: PLC0415

    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module"):
        attention_modules(None)
    model = tiny_bert()
    sparsebert.patch(model)
    with pytest.raises(ValueError, match="'bucket' must be an int >= 1"):
        sparsebert.accelerate(model, bucket=-5)


def test_numpy_numbers_pass_the_checks(tiny_bert, tmp_path):
    """The checks take numpy integers and floats (numbers.Integral / numbers.Real), as the
    values were taken before them; a glob's generator is a list of paths to report."""
    from sparsebert.nn import SparseAttention, SparseMLP  # noqa: PLC0415
    from sparsebert.report import ReportError, report  # noqa: PLC0415

    attention = SparseAttention(np.int64(32), np.int64(4), layer_norm_eps=np.float32(1e-5),
                                attention_dropout=np.float32(0.1))
    assert attention(torch.randn(2, 3, 32))[0].shape == (2, 3, 32)
    assert SparseMLP(np.int64(32), np.int64(64))(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    assert len(batching.train_batches(np.arange(1, 9), np.int64(2), np.int64(1))) == 4
    SearchConfig(importance_batch_size=np.int64(16), threshold=np.float64(0.9)).validate()
    SweepConfig(workers=np.int64(2)).validate()
    model = tiny_bert()
    sparsebert.patch(model)
    sparsebert.accelerate(model, bucket=np.int64(128))
    missing = tmp_path / "missing"
    with pytest.raises(ReportError, match="missing") as error:
        report(path for path in [missing])
    assert "must be a path or a list" not in str(error.value)


def test_blocks_name_hidden_states_of_another_width():
    """A block fed hidden states of another width names the argument and the width it takes
    (not torch's matmul shape error from inside)."""
    from sparsebert.nn import SparseAttention, SparseMLP  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"SparseAttention: hidden_states .*hidden=32, got "
                                         r"shape \(2, 5, 16\)"):
        SparseAttention(32, 4)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"SparseMLP: hidden_states .*hidden=32, got shape "
                                         r"\(2, 5, 16\)"):
        SparseMLP(32, 64)(torch.randn(2, 5, 16))


def test_argument_checks_take_numpy_numbers_and_refuse_bools():
    from sparsebert.checks import is_finite_number, is_integer, is_number
    assert is_integer(3) and is_integer(np.int64(3)) and is_integer(-1)
    assert not any(is_integer(v) for v in (True, 3.0, "3", None, np.float32(3)))
    assert is_number(2.5) and is_number(np.float32(2.5)) and is_number(7) and is_number(math.nan)
    assert not any(is_number(v) for v in (False, "2.5", None, 1j))
    assert is_finite_number(np.float64(1e300)) and is_finite_number(0)
    assert not any(is_finite_number(v) for v in (math.nan, math.inf, -math.inf, True))
    # one check through each kind of caller: a config, a batching helper, an nn block
    with pytest.raises(ConfigError, match="--batch-size True"):
        TrainConfig(task="rte", batch_size=True).resolved()
    assert len(batching.eval_batches(np.array([3, 2, 1]), np.int64(2))) == 2
    block = sparsebert.nn.SparseMLP(np.int64(8), np.int64(16), layer_norm_eps=np.float32(1e-5))
    assert block.intermediate_size == 16


def test_config_checks_read_the_values_config_json_holds():
    """XLNet's max_position_embeddings is a derived -1 ("no limit"), not a bad size: its config
    passes and has no position limit (load_model refused every XLNet model, and --max-length
    was "longer than the model's position limit (-1 tokens)"); a field under another name
    (GPT-2's n_embd for hidden_size) is named as config.json holds it."""
    from transformers import GPT2Config, XLNetConfig  # noqa: PLC0415

    from sparsebert.hf.loading import (  # noqa: PLC0415
        check_max_length,
        config_value_problem,
        position_limit,
    )

    assert config_value_problem(XLNetConfig()) is None and position_limit(XLNetConfig()) is None
    check_max_length(XLNetConfig(), 100_000)
    assert config_value_problem(GPT2Config()) is None
    assert config_value_problem(GPT2Config(n_embd=0)) == \
        "config.json n_embd 0: expected a positive integer"
