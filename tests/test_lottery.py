"""The lottery-ticket search: s-pruning schedule and reverts, m-pruning amounts and
eligibility, random/bad subnetworks, rewinding, and the search directory (resume, errors)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from sparsebert.lottery import magnitude as mag
from sparsebert.lottery import magnitude_stages as stages
from sparsebert.lottery.config import SearchConfig, SearchError
from sparsebert.lottery.structured import (
    component_fractions,
    head_step_size,
    kept_fraction,
    lowest_unmasked,
    structured_search,
)
from sparsebert.lottery.subnetworks import (
    structured_bad,
    structured_random,
    structured_subnetworks,
)

# --- s-pruning schedule ---------------------------------------------------------------------

class FakeModel:
    """Score = 1 - cost of the masked components; importance = fixed per-component values, masked
    components included (as the search's importance scores them: score_masked_heads)."""

    def __init__(self, head_cost, mlp_cost, head_imp, mlp_imp, trace):
        self.head_cost, self.mlp_cost = head_cost, mlp_cost
        self.head_imp, self.mlp_imp = head_imp, mlp_imp
        self.trace = trace

    def evaluate(self, head_mask, mlp_mask):
        score = 1.0 - float(((1 - head_mask) * self.head_cost).sum()
                            + ((1 - mlp_mask) * self.mlp_cost).sum())
        return score, score

    def importance(self, head_mask, mlp_mask):
        self.trace.append((head_mask.clone(), mlp_mask.clone()))
        return self.head_imp.clone(), self.mlp_imp.clone()


def test_step_sizes_follow_the_model():
    assert head_step_size(144, 0.1) == 14  # BERT-base: 14 heads (PAPER.md §1.3)
    assert head_step_size(72, 0.1) == 7  # the default model
    assert head_step_size(4, 0.1) == 1
    assert head_step_size(48, 0.1) == 4  # int() truncates, as the authors' num_to_mask
    assert head_step_size(144, 0.15) == 21


def test_lowest_unmasked_skips_masked_and_breaks_ties_by_index():
    scores = torch.tensor([[0.5, 0.1], [0.1, 0.9]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert lowest_unmasked(scores, mask, 2).tolist() == [2, 0]
    assert lowest_unmasked(scores, torch.zeros(2, 2), 2).tolist() == []


def test_schedule_phases_counts_and_reverts():
    """6 layers x 12 heads: phase 1 masks 7 heads + 1 MLP per step, phase 2 3 heads, phase 3
    one MLP; each phase reverts its failing step."""
    layers, heads = 6, 12
    head_imp = torch.arange(layers * heads, dtype=torch.float32).view(layers, heads) + 1
    mlp_imp = torch.arange(layers, dtype=torch.float32) + 1
    # Each head costs 0.005, each MLP 0.02; threshold 0.9 -> at most 0.1 of cost.
    trace = []
    fake = FakeModel(torch.full((layers, heads), 0.005), torch.full((layers,), 0.02),
                     head_imp, mlp_imp, trace)
    result = structured_search(layers, heads, 0.9, 1.0, fake.evaluate, fake.importance,
                               progress=False)
    phases = [(r["phase"], r["heads_kept"], r["mlps_kept"], r["passed"]) for r in result.curve]
    # Phase 1: 7 heads (0.035) + 1 MLP (0.02) per step: 0.055 passes, 0.11 fails.
    assert phases[:3] == [(0, 72, 6, True), (1, 65, 5, True), (1, 58, 4, False)]
    # Phase 2 from (65, 5): 3 heads (0.015) per step: 0.07, 0.085, 0.1 pass; 0.115 fails.
    assert phases[3:7] == [(2, 62, 5, True), (2, 59, 5, True), (2, 56, 5, True),
                           (2, 53, 5, False)]
    # Phase 3 from (56, 5): one MLP (0.02) -> 0.12 fails at once.
    assert phases[7:] == [(3, 56, 4, False)]
    assert int(result.head_mask.sum()) == 56 and int(result.mlp_mask.sum()) == 5
    # The lowest-importance heads go first: the first 16 heads of layer 0, then layer 1.
    assert result.head_mask.flatten()[:16].sum() == 0 and result.head_mask.flatten()[16:].all()
    assert result.mlp_mask.tolist() == [0, 1, 1, 1, 1, 1]
    # Quirk: phase 2's first ranking comes from the importance under phase 1's failed mask.
    failed_phase1 = trace[2]
    assert int(failed_phase1[0].sum()) == 58 and int(failed_phase1[1].sum()) == 4


def test_schedule_progress_bar_shows_the_kept_fraction(capsys):
    """The s-pruning bar shows the step's phase, heads, MLPs, kept fraction and score."""
    fake = FakeModel(torch.full((2, 4), 0.04), torch.full((2,), 0.5), torch.rand(2, 4),
                     torch.tensor([1.0, 2.0]), [])
    sizes = {"layers": 2, "heads": 4, "hidden": 16, "head_dim": 4, "intermediate": 32}
    structured_search(2, 4, 0.9, 1.0, fake.evaluate, fake.importance, progress=True,
                      kept_fraction=lambda h, m: kept_fraction(h, m, sizes))
    err = capsys.readouterr().err
    assert "s-pruning" in err and "heads=7" in err and "score=" in err
    assert f"kept={kept_fraction(7, 2, sizes):.3f}" in err


def test_schedule_recompute_after_revert_option():
    trace = []
    fake = FakeModel(torch.full((2, 4), 0.04), torch.full((2,), 0.5),
                     torch.rand(2, 4, generator=torch.Generator().manual_seed(0)),
                     torch.tensor([1.0, 2.0]), trace)
    structured_search(2, 4, 0.9, 1.0, fake.evaluate, fake.importance,
                      recompute_after_revert=True, progress=False)
    # Phase 2 starts with an importance call under the reverted (passing) masks.
    assert any(int(h.sum()) == 8 and int(m.sum()) == 2 for h, m in trace[1:])


@pytest.mark.parametrize("recompute,expected_heads", [
    (False, [[0, 1, 1, 1], [1, 1, 1, 0]]),  # the authors' code: the failed step's ranking
    (True, [[0, 0, 1, 1], [1, 1, 1, 1]]),  # the documented deviation: the reverted mask's
])
def test_phase_two_ranks_heads_by_the_failed_steps_scores_unless_recomputed(recompute,
                                                                           expected_heads):
    """2 x 4 heads, head_step 1. Importance 1..8 by flat index, except that with every MLP
    masked head (1, 3) scores 0.1. Phase 1: step 1 masks head (0, 0) + MLP 0 (0.96, passes);
    step 2 masks head (0, 1) + MLP 1 (0.42, fails) and is reverted, its scores are not. By
    default phase 2 masks the lowest of those, head (1, 3) (0.92 passes), then head (0, 1)
    (0.88 fails); recomputed under the reverted mask, it masks head (0, 1) then fails on head
    (0, 2). Phase 3 fails on MLP 1 either way."""
    layers, heads = 2, 4

    def importance(head_mask, mlp_mask):
        head = torch.arange(layers * heads, dtype=torch.float32).view(layers, heads) + 1
        if mlp_mask.sum() == 0:
            head[1, 3] = 0.1
        return head, torch.tensor([1.0, 2.0])

    def evaluate(head_mask, mlp_mask):
        score = 1.0 - 0.04 * float((1 - head_mask).sum()) - 0.5 * float(1 - mlp_mask[1])
        return score, score

    result = structured_search(layers, heads, 0.9, 1.0, evaluate, importance,
                               recompute_after_revert=recompute, progress=False)
    assert result.head_mask.tolist() == expected_heads
    assert result.mlp_mask.tolist() == [0, 1]
    assert [(r["phase"], r["heads_kept"], r["passed"]) for r in result.curve if r["phase"] == 2
            ] == [(2, 6, True), (2, 5, False)]


def test_schedule_can_mask_everything():
    """A task where masking never hurts (WNLI-like) ends with nothing left to mask."""
    fake = FakeModel(torch.zeros(2, 4), torch.zeros(2), torch.rand(2, 4), torch.rand(2), [])
    result = structured_search(2, 4, 0.9, 1.0, fake.evaluate, fake.importance, progress=False)
    assert result.head_mask.sum() == 0 and result.mlp_mask.sum() == 0
    assert any("no MLPs left to mask" in note for note in result.notes)


def test_a_partial_last_step_masks_the_remaining_heads():
    """BERT-base's 12 x 12 heads with the paper's 10% step (14 heads, which does not divide
    144) on a task where masking never hurts: phase 1 masks 14 heads + 1 MLP per step for 10
    steps (4 heads, 2 MLPs left), then a partial step masks the last 4 heads with an MLP; only
    a step that finds no head at all ends the phase. Nothing is kept in the end."""
    layers = heads = 12
    fake = FakeModel(torch.zeros(layers, heads), torch.zeros(layers),
                     torch.arange(layers * heads, dtype=torch.float32).view(layers, heads),
                     torch.arange(layers, dtype=torch.float32), [])
    result = structured_search(layers, heads, 0.9, 1.0, fake.evaluate, fake.importance,
                               progress=False)
    steps = [(r["phase"], r["heads_kept"], r["mlps_kept"]) for r in result.curve]
    assert [s for s in steps if s[0] == 1] == (
        [(1, 144 - 14 * k, 12 - k) for k in range(1, 11)] + [(1, 0, 1)])
    assert [s for s in steps if s[0] == 2] == []
    assert [s for s in steps if s[0] == 3] == [(3, 0, 0)]
    assert result.head_mask.sum() == 0 and result.mlp_mask.sum() == 0
    assert result.notes == ["phase 1: no heads left to mask", "phase 2: no heads left to mask",
                            "phase 3: no MLPs left to mask"]


def test_phase_one_ends_when_the_mlps_run_out():
    """The authors' phase 1 breaks as soon as no MLP is left (`if mlp_importance[mlp_to_mask] ==
    inf: break`), keeping the last passing masks; phase 2 then goes on at head_step // 2. Here a
    6 x 12 model passes while at least 20 heads are kept and MLPs cost nothing."""
    layers, heads = 6, 12

    def evaluate(head_mask, mlp_mask):
        score = 1.0 if head_mask.sum() >= 20 else 0.0
        return score, score

    def importance(head_mask, mlp_mask):
        return (torch.arange(layers * heads, dtype=torch.float32).view(layers, heads) + 1,
                torch.arange(layers, dtype=torch.float32) + 1)

    result = structured_search(layers, heads, 0.9, 1.0, evaluate, importance, progress=False)
    steps = [(r["phase"], r["heads_kept"], r["mlps_kept"], r["passed"]) for r in result.curve]
    # Phase 1: 7 heads + 1 MLP per step until the 6 MLPs are gone (no 7th step).
    assert [s for s in steps if s[0] == 1] == [(1, 72 - 7 * k, 6 - k, True) for k in range(1, 7)]
    # Phase 2 from 30 heads: 3 per step.
    assert [s for s in steps if s[0] == 2] == [(2, 27, 0, True), (2, 24, 0, True),
                                               (2, 21, 0, True), (2, 18, 0, False)]
    assert int(result.head_mask.sum()) == 21 and int(result.mlp_mask.sum()) == 0
    assert "phase 1: no MLPs left to mask" in result.notes


# --- subnetworks ------------------------------------------------------------------------------

def test_structured_random_matches_size_in_expectation():
    good = torch.zeros(100, 50)
    good.view(-1)[:3000] = 1  # 60% kept
    rng = np.random.default_rng(0)
    draws = torch.stack([structured_random(good, rng) for _ in range(20)])
    assert abs(float(draws.mean()) - 0.6) < 0.01
    assert set(draws.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("kept", [3, 5, 8])
def test_structured_bad_takes_pruned_first(kept):
    good = torch.zeros(10)
    good[:kept] = 1
    bad = structured_bad(good, np.random.default_rng(1))
    assert int(bad.sum()) == kept  # same number of components as good
    pruned = good == 0
    if kept >= int(pruned.sum()):  # all pruned ones, topped up from good ones
        assert bad[pruned].all()
    else:  # a subset of the pruned ones only
        assert bad[~pruned].sum() == 0


# --- m-pruning ----------------------------------------------------------------------------------

def _tiny_bert(seed=0):
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def test_eligible_parameters_follow_the_paper():
    params = mag.eligible_parameters(_tiny_bert())
    names = set(params)
    assert len(names) == 2 * 11  # per layer: Q, K, V, attn-out (w+b), FFN in (w+b), FFN out w
    assert "bert.encoder.layer.0.attention.self.query.bias" in names
    assert "bert.encoder.layer.1.output.dense.weight" in names
    for excluded in ("bert.encoder.layer.0.output.dense.bias", "bert.pooler.dense.weight",
                     "classifier.weight", "bert.embeddings.word_embeddings.weight",
                     "bert.encoder.layer.0.output.LayerNorm.weight"):
        assert excluded not in names


def test_eligible_parameters_of_a_physically_pruned_model():
    """Removed heads and MLPs have no weights left to prune: the rest is listed as usual."""
    from sparsebert.hf import patch, prune, set_masks  # noqa: PLC0415

    model = patch(_tiny_bert())
    layers = model.config.num_hidden_layers
    head_mask = torch.ones(layers, model.config.num_attention_heads)
    head_mask[0] = 0  # every head of layer 0
    mlp_mask = torch.ones(layers)
    mlp_mask[1] = 0
    set_masks(model, head_mask=head_mask, mlp_mask=mlp_mask)
    prune(model)
    names = set(mag.eligible_parameters(model))
    assert len(names) == 2 * 11 - 8 - 3  # layer 0: Q, K, V, out (w+b); layer 1: FFN in (w+b), out
    assert not any(name.startswith("bert.encoder.layer.0.attention") for name in names)
    assert "bert.encoder.layer.0.intermediate.dense.weight" in names
    assert "bert.encoder.layer.1.attention.self.query.weight" in names
    assert not any(".layer.1.intermediate" in n or ".layer.1.output.dense" in n for n in names)


@pytest.mark.parametrize("steps", [0, 1, 3, 9])
def test_magnitude_amounts_and_ordering(steps):
    model = _tiny_bert()
    params = mag.eligible_parameters(model)
    total = sum(p.numel() for p in params.values())
    kept = mag.kept_count(total, steps)
    assert abs(kept / total - 0.9 ** steps) < 1e-3  # 1 - 0.9^k of the eligible weights pruned
    good = mag.magnitude_mask(params, kept)
    bad = mag.magnitude_mask(params, kept, largest=False)
    random = mag.random_mask(params, kept, torch.Generator().manual_seed(0))
    values = torch.cat([p.detach().abs().flatten() for p in params.values()])
    flat = {name: torch.cat([m[n].flatten() for n in params]) for name, m in
            (("good", good), ("bad", bad), ("random", random))}
    assert all(int(m.sum()) == kept for m in flat.values())
    if 0 < kept < total:
        assert values[flat["good"]].min() >= values[~flat["good"]].max()  # largest kept
        assert values[flat["bad"]].max() <= values[~flat["bad"]].min()  # largest removed


def test_random_mask_depends_on_its_generator_only():
    """The random subnetwork is reproducible from its seed: two generators seeded alike give
    the same mask whatever the global RNG's state (torch.manual_seed between the draws), and
    another seed gives another mask of the same size."""
    params = mag.eligible_parameters(_tiny_bert())
    total = sum(p.numel() for p in params.values())
    kept = total // 3
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = mag.random_mask(params, kept, torch.Generator().manual_seed(5))
        torch.manual_seed(1)
        again = mag.random_mask(params, kept, torch.Generator().manual_seed(5))
        other = mag.random_mask(params, kept, torch.Generator().manual_seed(6))
    assert set(first) == set(params)
    assert all(torch.equal(first[n], again[n]) for n in params)
    assert not all(torch.equal(first[n], other[n]) for n in params)
    assert sum(int(m.sum()) for m in other.values()) == kept


def test_layer_kept_fractions_of_a_hand_built_mask(tiny_bert):
    """Layer 0 fully kept, layer 1 fully pruned, layer 2 with the first half of each eligible
    tensor kept (every size even here): 1.0, 0.0 and 0.5, in layer order."""
    model = tiny_bert(intermediate_size=36)
    params = mag.eligible_parameters(model)
    masks = {}
    for name, param in params.items():
        mask = torch.zeros(param.shape, dtype=torch.bool)
        if ".layer.0." in name:
            mask[:] = True
        elif ".layer.2." in name:
            assert param.numel() % 2 == 0
            mask.view(-1)[: param.numel() // 2] = True
        masks[name] = mask
    assert mag.layer_kept_fractions(model, masks) == [1.0, 0.0, 0.5]


def test_rewinding_is_exact_and_masks_hold_during_training(tmp_path):
    """The good mask on the pre-trained weights: masked weights zero, all others equal to the
    pre-trained ones when retraining starts, and masked weights still zero after it."""
    from sparsebert.pruning.weight_masks import WeightMasks  # noqa: PLC0415
    from sparsebert.train.config import TrainConfig  # noqa: PLC0415
    from sparsebert.train.optim import make_optimizer  # noqa: PLC0415

    fine_tuned, pretrained = _tiny_bert(seed=1), _tiny_bert(seed=2)
    masks = mag.magnitude_mask(mag.eligible_parameters(fine_tuned),
                               mag.kept_count(sum(p.numel() for p in mag.eligible_parameters(
                                   fine_tuned).values()), 3))
    before = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    weight_masks = WeightMasks.from_named(pretrained, masks)
    optimizer, _ = make_optimizer(pretrained, TrainConfig(lr=1e-2, weight_decay=0.1).resolved(),
                                  10)
    weight_masks.attach(optimizer)
    for name, p in pretrained.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0).all()
            assert torch.equal(p[masks[name]], before[name][masks[name]])
        else:
            assert torch.equal(p, before[name])
    inputs = torch.randint(0, 50, (4, 8))
    for _ in range(3):
        loss = pretrained(input_ids=inputs, labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in pretrained.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0).all()


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("method", "lottery", "--method"), ("subnets", "good,great", "--subnets"),
    ("threshold", 0.0, "--threshold"), ("threshold", 1.5, "--threshold"),
    ("search_data", "test", "--search-data"), ("importance_mode", "taylor", "--importance-mode"),
    ("importance_precision", "fp16", "--importance-precision"),
])
def test_bad_search_options(field, value, match):
    with pytest.raises(SearchError, match=match):
        SearchConfig(**{field: value}).validate()


def test_michel_importance_needs_recompute_after_revert_for_s_pruning():
    """michel scores masked heads 0, so phase 2's first step (ranked under the failed step's
    mask) would take that step's heads by index: s-pruning with it must recompute after a
    revert; m-pruning does not use importance."""
    for method in ("structured", "both"):
        with pytest.raises(SearchError, match="--recompute-after-revert"):
            SearchConfig(method=method, importance_mode="michel").validate()
        SearchConfig(method=method, importance_mode="michel",
                     recompute_after_revert=True).validate()
    SearchConfig(method="magnitude", importance_mode="michel").validate()


def test_search_config_round_trips():
    config = SearchConfig(method="magnitude", subnets="good,bad", threshold=0.8)
    assert SearchConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert "method" not in config.identity() and "threshold" in config.identity()


# --- search data and baselines --------------------------------------------------------------

def test_search_data_train_subset_and_majority(synthetic_glue, tiny_model_dir):
    from sparsebert.glue.loading import load_split  # noqa: PLC0415
    from sparsebert.glue.tasks import get_task  # noqa: PLC0415
    from sparsebert.hf.loading import load_tokenizer  # noqa: PLC0415
    from sparsebert.lottery.scoring import load_search_data, majority_baseline  # noqa: PLC0415
    from sparsebert.train.config import TrainConfig  # noqa: PLC0415

    task = get_task("SST-2")
    train = TrainConfig(task="SST-2", glue_dir=synthetic_glue, seed=3)
    tokenizer = load_tokenizer(tiny_model_dir)
    on_dev = load_search_data(task, train, tokenizer, "dev", 10)
    assert on_dev.same_sets and len(on_dev.importance_batches) == 4  # 32 dev rows, batches of 10
    assert [len(b["labels"]) for b in on_dev.importance_batches] == [10, 10, 10, 2]
    on_train = load_search_data(task, train, tokenizer, "train", 64)
    assert not on_train.same_sets and len(on_train.search) == len(on_train.dev) == 32
    again = load_search_data(task, train, tokenizer, "train", 64)
    assert np.array_equal(again.search.labels, on_train.search.labels)  # seeded subset
    # Majority class of train labels, scored on dev by hand.
    assert len(load_split(task, "train", synthetic_glue)) == 96
    majority = majority_baseline(task, np.asarray([1, 1, 0]), on_dev.dev)
    assert majority["acc"] == float(np.mean(np.asarray(on_dev.dev.labels) == 1))
    # The stopping rule's constant-predictor check uses the set the threshold is computed on.
    assert on_dev.search_majority == on_dev.majority
    train_labels = np.asarray(load_split(task, "train", synthetic_glue).labels)
    common = np.bincount(train_labels).argmax()
    assert on_train.search_majority["acc"] == pytest.approx(
        float(np.mean(np.asarray(on_train.search.labels) == common)))
    assert on_train.majority["acc"] == pytest.approx(
        float(np.mean(np.asarray(on_train.dev.labels) == common)))


@pytest.mark.parametrize("full,threshold,on_search,expected", [
    (0.80, 0.72, None, None),  # a meaningful search
    (0.70, 0.63, None, "majority class passes"),  # MRPC on a small train subset
    (0.338, 0.30, None, "meaningless"),  # WNLI: the full model is below the majority class
    # --search-data train: the threshold is on the train subset, so is the comparison
    (0.80, 0.72, 0.75, "majority class passes"),  # passes on a skewed train subset
    (0.70, 0.63, 0.55, None),  # the dev majority (0.684) is not what the threshold is on
])
def test_threshold_notes(full, threshold, on_search, expected):
    from types import SimpleNamespace  # noqa: PLC0415

    from sparsebert.glue.tasks import get_task  # noqa: PLC0415
    from sparsebert.lottery.search import Search  # noqa: PLC0415

    majority = {"acc": 0.684, "f1": 0.812}
    data = SimpleNamespace(majority=majority, search_majority=majority, same_sets=True)
    if on_search is not None:
        data = SimpleNamespace(majority=majority, search_majority={"acc": on_search, "f1": 0.5},
                               same_sets=False)
    fake = SimpleNamespace(task=get_task("MRPC"), data=data)
    notes = Search._notes_on_threshold(fake, {"acc": full, "f1": 0.8}, threshold)
    if expected is None:
        assert notes == []
    elif expected == "meaningless":
        assert len(notes) == 1 and "meaningless" in notes[0]
    else:
        assert len(notes) == 1 and "always predicts the majority class passes" in notes[0]
        assert ("on the search set" in notes[0]) == (on_search is not None)


# A score equal to the threshold passes (PAPER.md §1.3, §2: "continue while score >=
# threshold"); the m-pruning loop; its amounts against torch's own pruning.

def test_structured_search_a_score_equal_to_the_threshold_passes():
    """MLPs cost exactly 0.25 each, heads nothing; threshold 0.5: masking the second MLP gives
    0.5 exactly (binary fractions, no rounding), which passes, so both MLPs end masked."""
    def evaluate(head_mask, mlp_mask):
        score = 1.0 - 0.25 * float((1 - mlp_mask).sum())
        return score, score

    def scores(head_mask, mlp_mask):
        return torch.arange(8.0).view(2, 4), torch.tensor([1.0, 2.0])

    result = structured_search(2, 4, 0.5, 1.0, evaluate, scores, progress=False)
    assert [r["search_score"] for r in result.curve if r["phase"] == 1] == [0.75, 0.5]
    assert all(r["passed"] for r in result.curve if r["phase"] == 1)
    assert result.mlp_mask.tolist() == [0.0, 0.0]


class _StubSearch:
    """What MagnitudeStages._magnitude_search reads from its Search."""

    def __init__(self, score, max_steps=9):
        self.config = types.SimpleNamespace(threshold=0.5, magnitude_max_steps=max_steps,
                                      magnitude_amount=0.1)
        self.progress, self.data, self.train, self.task = False, None, None, None
        self.score = score  # (search score, dev metrics) of the model as it stands

    def _full_scores(self, model):
        return 1.0, {"acc": 1.0}

    def _notes_on_threshold(self, full_dev, threshold):
        return []


def _tiny_magnitude_model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
    return BertForSequenceClassification(config).eval()


def test_magnitude_search_a_score_equal_to_the_threshold_passes_and_weights_are_restored(
        monkeypatch):
    """Scores 0.75, 0.5, 0.25 at steps 1, 2, 3 with threshold 0.5 x 1.0: step 2 (== threshold)
    passes, so the good mask is step 2's; every weight the search pruned is restored after it."""
    model = _tiny_magnitude_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = mag.eligible_parameters(model)
    total = sum(p.numel() for p in params.values())
    calls = []

    def score(model):
        calls.append(sum(int((p == 0).sum()) for p in params.values()))
        value = [0.75, 0.5, 0.25][len(calls) - 1]
        return value, {"acc": value}

    monkeypatch.setattr(stages, "report_metric", lambda task: "acc")
    found = stages.MagnitudeStages._magnitude_search(_StubSearch(score), model, params)
    assert found["good_step"] == 2 and found["kept"] == mag.kept_count(total, 2)
    assert [r["passed"] for r in found["curve"]] == [True, True, True, False]
    # each step is evaluated from the original weights, which are all back afterwards
    assert calls == [total - mag.kept_count(total, k) for k in (1, 2, 3)]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_magnitude_search_that_reaches_the_step_cap_keeps_the_last_saved_mask(monkeypatch):
    """Every step passes: the authors' loop saves the mask before each prune, so with
    magnitude_max_steps=3 the good mask is step 2's (PAPER.md §2: at most 1 - 0.9^(cap - 1))."""
    model = _tiny_magnitude_model()
    params = mag.eligible_parameters(model)
    monkeypatch.setattr(stages, "report_metric", lambda task: "acc")
    found = stages.MagnitudeStages._magnitude_search(
        _StubSearch(lambda m: (1.0, {"acc": 1.0}), max_steps=3), model, params)
    assert len(found["curve"]) == 4 and found["good_step"] == 2


def test_a_full_model_below_its_own_threshold_prunes_nothing(monkeypatch):
    """A negative full score (a Matthews correlation below 0) lies below 0.9 x itself: the
    authors' loops test the full model first and never prune (PAPER.md §1.3, §2), so both
    searches keep the full masks, evaluate no step, and say why."""
    calls = []

    def evaluate(head_mask, mlp_mask):  # every step would pass the threshold
        calls.append(1)
        return -0.05, -0.05

    def scores(head_mask, mlp_mask):
        return torch.arange(8.0).view(2, 4), torch.tensor([1.0, 2.0])

    result = structured_search(2, 4, 0.9 * -0.1, -0.1, evaluate, scores, progress=False)
    assert not calls and result.head_mask.all() and result.mlp_mask.all()
    assert [r["passed"] for r in result.curve] == [False]
    assert len(result.notes) == 1 and "below the threshold (-0.0900)" in result.notes[0]
    assert "negative score lies below any fraction of itself" in result.notes[0]
    # A threshold above a positive full score (structured_search's absolute threshold, or a
    # ratio above 1) says no more than that: the note named 0.9 x and a negative score.
    positive = structured_search(2, 4, 0.95, 0.9, evaluate, scores, progress=False).notes[0]
    assert "below the threshold (0.9500): nothing was pruned" in positive
    assert "0.9 x" not in positive and "negative" not in positive

    model = _tiny_magnitude_model()
    params = mag.eligible_parameters(model)
    monkeypatch.setattr(stages, "report_metric", lambda task: "acc")
    search = _StubSearch(lambda m: calls.append(1) or (1.0, {"acc": 1.0}))
    search._full_scores = lambda model: (-0.1, {"acc": -0.1})
    found = stages.MagnitudeStages._magnitude_search(search, model, params)
    assert not calls and found["good_step"] == 0 and found["fraction_kept"] == 1.0
    assert [r["passed"] for r in found["curve"]] == [False]
    assert "nothing was pruned" in found["notes"][-1]


def test_kept_counts_and_masks_match_torch_global_l1_unstructured():
    """The authors' m-pruning step, torch.nn.utils.prune.global_unstructured(L1Unstructured,
    amount=0.1) applied repeatedly (a PruningContainer prunes round(0.1 x remaining)), is the
    reference: same kept count and same mask at every step."""
    torch.manual_seed(0)
    a, b = nn.Linear(7, 3), nn.Linear(3, 2)
    params = {"a.weight": nn.Parameter(a.weight.detach().clone()),
              "a.bias": nn.Parameter(a.bias.detach().clone()),
              "b.weight": nn.Parameter(b.weight.detach().clone())}
    total = sum(p.numel() for p in params.values())  # 30
    targets = [(a, "weight"), (a, "bias"), (b, "weight")]
    for step in range(1, 10):
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.1)
        torch_masks = {f"{'a' if m is a else 'b'}.{n}": getattr(m, f"{n}_mask").bool()
                       for m, n in targets}
        kept = sum(int(m.sum()) for m in torch_masks.values())
        assert mag.kept_count(total, step) == kept, step
        ours = mag.magnitude_mask(params, kept)
        for name, mask in torch_masks.items():
            assert torch.equal(ours[name], mask), (step, name)


@pytest.mark.parametrize("call,needle", [
    (lambda p: mag.random_mask(p, -1, torch.Generator()), r"kept must be in \[0, 30\], got -1"),
    (lambda p: mag.random_mask(p, 35, torch.Generator()), r"kept must be in \[0, 30\], got 35"),
    (lambda p: mag.magnitude_mask(p, 31), r"kept must be in \[0, 30\], got 31"),
    (lambda p: mag.kept_count(30, 2, amount=-0.1), r"amount must be a fraction in \[0, 1\]"),
    (lambda p: mag.kept_count(30, 2, amount=1.5), r"amount must be a fraction in \[0, 1\]"),
    (lambda p: mag.kept_count(30, -1), "total and steps must be >= 0"),
])
def test_impossible_mask_sizes_are_errors(call, needle):
    """random_mask kept N - 1 weights for kept=-1 (a slice from the end) and all for kept > N;
    kept_count gave more than the total for a negative amount."""
    params = {"w": nn.Parameter(torch.randn(5, 6))}
    with pytest.raises(ValueError, match=needle):
        call(params)


def test_bad_top_up_is_a_random_draw_from_the_good_components():
    """Paper §3: bad = all pruned ones plus a *random* top-up from the good ones."""
    good = torch.ones(10)
    good[8:] = 0  # 8 kept, 2 pruned: top-up of 6 drawn from the 8 kept
    counts = np.zeros(10)
    for seed in range(200):
        counts += structured_bad(good, np.random.default_rng(seed)).numpy()
    assert (counts[8:] == 200).all()
    freq = counts[:8] / 200  # each kept component: 6/8 = 0.75 in expectation
    assert (np.abs(freq - 0.75) < 0.12).all(), freq


def test_structured_subnetworks_match_heads_and_mlps_separately():
    """random: Bernoulli(p) with p = the good mask's kept fraction, per component kind; bad: as
    many as good of that kind, pruned ones first."""
    head = torch.zeros(12, 12)
    head.view(-1)[:72] = 1  # 50% of heads kept
    mlp = torch.zeros(12)
    mlp[:3] = 1  # 25% of MLPs kept
    head_means, mlp_means = [], []
    for seed in range(200):
        out = structured_subnetworks(head, mlp, seed)
        head_means.append(float(out["random"]["head_mask"].mean()))
        mlp_means.append(float(out["random"]["mlp_mask"].mean()))
        assert int(out["bad"]["mlp_mask"].sum()) == 3
        assert out["bad"]["mlp_mask"][:3].sum() == 0  # 9 pruned >= 3: pruned ones only
        assert int(out["bad"]["head_mask"].sum()) == 72
    assert abs(np.mean(head_means) - 0.5) < 0.02
    assert abs(np.mean(mlp_means) - 0.25) < 0.03


def test_s_prunable_parameter_count_by_brute_force():
    """A head's parameters = its slices of the attention projections; an MLP's = its two
    dense layers. BERT-base: 144 heads + 12 MLPs = 85,008,384 parameters (PAPER.md §2)."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=32,
                        max_position_embeddings=32)
    model = BertForSequenceClassification(config)
    attn = model.bert.encoder.layer[0].attention
    # A head: its rows of Q, K, V (weights and biases) and its columns of the output dense (the
    # output bias is shared by all heads and stays).
    per_head = (sum(p.numel() for m in (attn.self.query, attn.self.key, attn.self.value)
                    for p in m.parameters()) + attn.output.dense.weight.numel()) // 4
    layer = model.bert.encoder.layer[1]
    per_mlp = sum(p.numel() for m in (layer.intermediate.dense, layer.output.dense)
                  for p in m.parameters())
    total = 8 * per_head + 2 * per_mlp
    assert component_fractions(7, 2, 8, 2, 16, 4, 32) == (total - per_head) / total
    assert component_fractions(8, 1, 8, 2, 16, 4, 32) == (total - per_mlp) / total
    assert component_fractions(1, 0, 144, 12, 768, 64, 3072) == 196800 / 85008384


def test_report_metric_and_majority_baseline_by_hand():
    """Paper §4 table: CoLA MCC, STS-B Pearson, accuracy elsewhere; the majority baseline
    predicts the train set's most frequent class."""
    from sparsebert.glue.tasks import get_task  # noqa: PLC0415
    from sparsebert.lottery.scoring import majority_baseline, report_metric  # noqa: PLC0415

    assert [report_metric(get_task(t)) for t in ("CoLA", "STS-B", "MRPC", "MNLI")] == [
        "mcc", "pearson", "acc", "acc"]

    class Dev:
        labels = np.array([1, 0, 1, 1, 0])

        def __len__(self):
            return 5

    out = majority_baseline(get_task("MRPC"), np.array([1, 1, 1, 0]), Dev())
    assert out["acc"] == 3 / 5  # always 1: 3 of 5 right
    assert out["f1"] == 2 * 3 / (2 * 3 + 2)  # TP 3, FP 2, FN 0


def test_a_weight_mask_file_with_damaged_bytes_is_refused(tmp_path):
    """safetensors has no checksum: a byte flipped in a bool mask's data read as True (a kept
    weight the search never chose). Every byte must be 0 or 1, and the dtype bool."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from sparsebert.pruning.weight_masks import (  # noqa: PLC0415
        WeightMaskError,
        load_weight_masks,
        save_weight_masks,
    )

    masks = {"a.weight": torch.rand(6, 5) > 0.5, "b.weight": torch.zeros(7, dtype=torch.bool)}
    path = tmp_path / "good.safetensors"
    save_weight_masks(path, masks)
    loaded = load_weight_masks(path)
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[name], masks[name]) for name in masks)
    data = bytearray(path.read_bytes())
    data[-1] = 0xFF  # the last byte of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(WeightMaskError, match=r"good.safetensors: damaged \('.*' holds bytes "
                                              r"other than 0 and 1\)"):
        load_weight_masks(path)
    save_file({"a.weight": torch.ones(3)}, str(path))
    with pytest.raises(WeightMaskError, match=r"'a.weight' holds torch.float32"):
        load_weight_masks(path)
