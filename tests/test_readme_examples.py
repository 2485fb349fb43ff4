"""README's Python examples run as a user pastes them: the lottery search's building blocks and
the masks-and-importance walk-through on the default model (the search itself and the causal-LM
example need a long run or a model of the reader's own, and are left out)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    """The ```python blocks of README's "Python API" section, in order."""
    text = README.read_text()
    start = text.index("## Python API")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_building_blocks_example_runs(default_model_dir):
    building = python_blocks()[0].split("# the building blocks")[1].split("\n", 1)[1]
    names: dict = {}
    exec(compile(building, "README.md (building blocks)", "exec"), names)  # noqa: S102
    masks, model = names["masks"], names["model"]
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 1_000_000
    assert set(masks) <= {name for name, _ in model.named_parameters()}


def test_the_masks_and_importance_example_runs(default_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves to out/pruned
    names: dict = {}
    exec(compile(python_blocks()[1], "README.md (masks and importance)", "exec"),  # noqa: S102
         names)
    model, imp = names["model"], names["imp"]
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert imp.head.shape == (layers, heads) and imp.mlp.shape == (layers,)
    assert names["logits"].shape == (2, 2) and torch.isfinite(names["logits"]).all()
    assert names["out"].shape == (2, 16, 4, 32)
    assert (names["out"][:, :, 1] == 0).all()  # the pruned head adds exactly 0
    assert (tmp_path / "out" / "pruned").is_dir()
