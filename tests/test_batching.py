"""Tokenize-once and length-bucketed dynamic-padding batches."""

import numpy as np
import pytest
import torch

from sparsebert.glue import batching
from sparsebert.glue.loading import GlueData
from sparsebert.glue.tasks import get_task
from sparsebert.hf.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the default model's tokenizer, offline


def _lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(5, 128, n)


def test_train_batches_cover_every_example_once():
    lengths = _lengths(1000)
    for bucket in (True, False):
        batches = batching.train_batches(lengths, 32, seed=1, epoch=0, bucket=bucket)
        assert len(batches) == batching.num_batches(1000, 32) == 32
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
        assert all(len(b) == 32 for b in batches[:-1]) and len(batches[-1]) == 1000 - 31 * 32


def test_train_batches_deterministic_per_seed_and_epoch():
    lengths = _lengths(500)
    a = batching.train_batches(lengths, 16, seed=3, epoch=1)
    b = batching.train_batches(lengths, 16, seed=3, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = batching.train_batches(lengths, 16, seed=3, epoch=2)
    d = batching.train_batches(lengths, 16, seed=4, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(np.array_equal(x, y) for x, y in zip(a, d))


def test_bucketing_pads_far_less():
    lengths = _lengths(3000)
    encoded = batching.Encoded([[1] * n for n in lengths], None, np.zeros(3000, np.int64),
                               lengths, 0, 128)
    bucketed = batching.train_batches(lengths, 32, seed=0, bucket=True)
    shuffled = batching.train_batches(lengths, 32, seed=0, bucket=False)
    eff_bucket = batching.padding_stats(encoded, bucketed)["efficiency"]
    eff_shuffle = batching.padding_stats(encoded, shuffled)["efficiency"]
    eff_fixed = batching.padding_stats(encoded, shuffled, "max_length")["efficiency"]
    assert eff_bucket > 0.9 > eff_shuffle > eff_fixed


def test_eval_batches_longest_first():
    lengths = np.array([3, 9, 1, 9, 5])
    batches = batching.eval_batches(lengths, 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]


def test_encode_and_collate(tokenizer):
    task = get_task("RTE")
    long_text = " ".join(["word"] * 300)
    data = GlueData(task, "dev", (["A short premise.", long_text], ["Hyp.", "Another."]),
                    np.array([0, 1]), "x")
    encoded = batching.encode(data, tokenizer, max_length=32)
    assert encoded.lengths.tolist()[1] == 32 and encoded.lengths[0] < 32
    assert encoded.token_type_ids is not None
    batch = batching.collate(encoded, np.array([0, 1]))
    assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].dtype == torch.long
    n0 = int(encoded.lengths[0])
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (32 - n0)
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    assert batch["token_type_ids"][0, :n0].max() == 1  # the pair's second segment
    assert batch["labels"].tolist() == [0, 1] and batch["index"].tolist() == [0, 1]
    only_short = batching.collate(encoded, np.array([0]))
    assert only_short["input_ids"].shape == (1, n0)
    fixed = batching.collate(encoded, np.array([0]), padding="max_length")
    assert fixed["input_ids"].shape == (1, 32)
    rounded = batching.collate(encoded, np.array([0]), pad_to_multiple_of=8)
    assert rounded["input_ids"].shape[1] % 8 == 0
    with pytest.raises(ValueError, match="padding"):
        batching.collate(encoded, np.array([0]), padding="longest")


def test_regression_labels_are_float(tokenizer):
    data = GlueData(get_task("STS-B"), "dev", (["a"], ["b"]), np.array([3.2], np.float32), "x")
    batch = batching.collate(batching.encode(data, tokenizer), np.array([0]))
    assert batch["labels"].dtype == torch.float32
