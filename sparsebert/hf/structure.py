"""Where things live in each supported Hugging Face architecture: one row per model_type.

All architecture knowledge of sparsebert.hf is here. Code never builds attribute names: it reads
them from a row. To support a new BERT-like model type, add a row (and a tiny-config test).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from sparsebert.errors import SparsebertError
from sparsebert.nn import AttentionLayout, MLPLayout


@dataclass(frozen=True)
class ConfigFields:
    """Names of the config attributes that give the (unpruned) sizes."""

    num_layers: str = "num_hidden_layers"
    num_heads: str = "num_attention_heads"
    hidden_size: str = "hidden_size"
    intermediate_size: str = "intermediate_size"
    attention_dropout: str = "attention_probs_dropout_prob"


@dataclass(frozen=True)
class ModelStructure:
    """One architecture.

    layers: dotted path from the base model (`model.base_model`) to the nn.ModuleList of layers;
    attention: a layer's attribute holding the attention block (replaced by SparseAttention);
    attention_layout: child names inside that block (q/k/v, output dense/LayerNorm/dropout);
    ffn_entry: the layer method that runs intermediate + output on the attention output (routed to
    SparseMLP); mlp_layout: the layer's FFN child names; config: size fields; unsupported_flags:
    config flags that must be false (decoder / cross-attention layers are not handled);
    first_token_classifier: the class name of transformers' sequence-classification model of this
    type, whose head reads the last layer's first position only (the pooler or classifier takes
    hidden[:, 0]), or None.
    """

    model_type: str
    layers: str = "encoder.layer"
    attention: str = "attention"
    attention_layout: AttentionLayout = field(default_factory=AttentionLayout)
    ffn_entry: str = "feed_forward_chunk"
    mlp_layout: MLPLayout = field(default_factory=MLPLayout)
    config: ConfigFields = field(default_factory=ConfigFields)
    unsupported_flags: tuple[str, ...] = ("is_decoder", "add_cross_attention")
    first_token_classifier: str | None = None


# BERT and its direct descendants share the HF BertLayer layout.
STRUCTURES: dict[str, ModelStructure] = {
    row.model_type: row
    for row in (
        ModelStructure("bert", first_token_classifier="BertForSequenceClassification"),
        ModelStructure("roberta", first_token_classifier="RobertaForSequenceClassification"),
        ModelStructure("xlm-roberta",
                       first_token_classifier="XLMRobertaForSequenceClassification"),
        ModelStructure("camembert", first_token_classifier="CamembertForSequenceClassification"),
        ModelStructure("electra", first_token_classifier="ElectraForSequenceClassification"),
    )
}


def supported_model_types() -> list[str]:
    return sorted(STRUCTURES)


class UnsupportedModelError(SparsebertError):
    """A model type with no row in STRUCTURES (cannot be patched with gated blocks)."""


def check_patchable(model_type: str | None) -> None:
    """UnsupportedModelError unless `model_type` (config.model_type) can be patched."""
    if model_type not in STRUCTURES:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r} for patching (SparseAttention / SparseMLP "
            f"blocks): supported model types: {', '.join(supported_model_types())}. Head gates "
            "on other models whose attention goes through transformers' AttentionInterface: "
            "sparsebert.use_sparse_attention(model), or load it with "
            "attn_implementation='sparsebert'"
        )


def structure_for(model: nn.Module) -> ModelStructure:
    """The row for a Hugging Face model (uses `model.config.model_type`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type is None:
        raise TypeError(
            "expected a Hugging Face PreTrainedModel (with .config.model_type), got "
            f"{type(model).__name__}"
        )
    check_patchable(model_type)
    return STRUCTURES[model_type]


def resolve(root: nn.Module, dotted: str) -> nn.Module:
    """Follow a dotted attribute path from the table (e.g. 'encoder.layer')."""
    node = root
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def encoder_layers(model: nn.Module, row: ModelStructure) -> nn.ModuleList:
    """The list of encoder layers of a HF model (task head models included, via base_model)."""
    base = getattr(model, "base_model", model)
    return resolve(base, row.layers)


def config_size(model: nn.Module, row: ModelStructure, name: str) -> int:
    """An unpruned size from the config, e.g. config_size(model, row, 'num_heads')."""
    return int(getattr(model.config, getattr(row.config, name)))
