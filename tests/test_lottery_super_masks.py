"""The super-survivor masks (super/masks.json) belong to one seed list: a rerun with other
seeds draws them again and sets the old ones aside, with what was built on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsebert.lottery.config import SearchConfig, SearchError
from sparsebert.lottery.super_survivors import SuperStage, search_seeds
from sparsebert.train.config import TrainConfig

HEADS = {1: [[1, 1, 1], [1, 0, 0]], 2: [[1, 1, 0], [1, 0, 0]], 3: [[1, 0, 0], [0, 0, 0]]}
MLPS = {1: [1, 1], 2: [1, 0], 3: [0, 1]}


@pytest.fixture
def seeds_dir(tmp_path):
    """Three seeds' finished structured searches (their good masks), (L, H) = (2, 3)."""
    for seed in HEADS:
        found = tmp_path / f"seed_{seed}" / "structured"
        found.mkdir(parents=True)
        (found / "search.json").write_text(json.dumps({"head_mask": HEADS[seed],
                                                       "mlp_mask": MLPS[seed]}))
    return tmp_path


def _stage(out, seeds):
    return SuperStage("MRPC", out, seeds, SearchConfig(), TrainConfig(), progress=False)


def _kept_in_every(seeds):
    return np.all([HEADS[s] for s in seeds], axis=0).astype(float).tolist()


def test_masks_of_another_seed_list_are_drawn_again(seeds_dir, capsys):
    first = _stage(seeds_dir, [1, 2]).masks_stage()
    assert first["seeds"] == [1, 2] and first["masks"]["good"]["head_mask"] == _kept_in_every([1, 2])
    built_on = seeds_dir / "super" / "pruned" / "good" / "seed_1.json"
    built_on.parent.mkdir(parents=True)
    built_on.write_text("{}")
    assert _stage(seeds_dir, [1, 2]).masks_stage() == first and built_on.is_file()  # reused

    later = _stage(seeds_dir, [1, 2, 3]).masks_stage()
    assert later["seeds"] == [1, 2, 3]
    assert later["masks"]["good"]["head_mask"] == _kept_in_every([1, 2, 3])
    assert later["stability"]["heads"]["n_seeds"] == 3
    assert not built_on.exists()  # scores of the old masks are not mixed with the new ones
    aside = list((seeds_dir / ".superseded").glob("super-seeds-1-2-*"))
    assert len(aside) == 1 and (aside[0] / "pruned" / "good" / "seed_1.json").is_file()
    assert json.loads((aside[0] / "masks.json").read_text())["seeds"] == [1, 2]
    assert "set aside" in capsys.readouterr().err
    assert _stage(seeds_dir, [1, 2, 3]).masks_stage() == later  # and then reused
    assert len(list((seeds_dir / ".superseded").iterdir())) == 1


def test_masks_written_before_they_named_their_seeds(seeds_dir):
    """An older masks.json (no "seeds"): kept when it holds this seed list's masks, else
    drawn again."""
    current = _stage(seeds_dir, [1, 2]).masks_stage()
    masks_file = seeds_dir / "super" / "masks.json"
    masks_file.write_text(json.dumps({k: v for k, v in current.items() if k != "seeds"}))
    assert _stage(seeds_dir, [1, 2]).masks_stage() == current
    assert not (seeds_dir / ".superseded").exists()
    masks_file.write_text(json.dumps({k: v for k, v in current.items() if k != "seeds"}))
    later = _stage(seeds_dir, [1, 3]).masks_stage()
    assert later["masks"]["good"]["head_mask"] == _kept_in_every([1, 3])
    assert list((seeds_dir / ".superseded").glob("super-seeds-unknown-*"))


def _search_again(seeds_dir, seed, heads, mlps):
    """Seed `seed`'s structured search redone alone: new good masks in its search.json."""
    found = seeds_dir / f"seed_{seed}" / "structured" / "search.json"
    found.write_text(json.dumps({"head_mask": heads, "mlp_mask": mlps}))


def test_masks_drawn_before_a_seed_was_searched_again_are_drawn_again(seeds_dir, capsys):
    """The same seed list, but seed 2's search redone since (`search --redo structured` of
    that seed alone): the masks, and what was built on them, are set aside and drawn from the
    seeds' current masks; a search that found the same masks again (written as floats) keeps
    them."""
    first = _stage(seeds_dir, [1, 2]).masks_stage()
    assert set(first["sources"]) == {"1", "2"}
    built_on = seeds_dir / "super" / "retrained" / "good" / "seed_2" / "results.json"
    built_on.parent.mkdir(parents=True)
    built_on.write_text("{}")
    _search_again(seeds_dir, 2, [[float(v) for v in row] for row in HEADS[2]],
                  [float(v) for v in MLPS[2]])
    assert _stage(seeds_dir, [1, 2]).masks_stage() == first and built_on.is_file()

    HEADS[2], MLPS[2], saved = [[1, 0, 0], [0, 0, 0]], [0, 0], (HEADS[2], MLPS[2])
    try:
        _search_again(seeds_dir, 2, HEADS[2], MLPS[2])
        capsys.readouterr()
        later = _stage(seeds_dir, [1, 2]).masks_stage()
        assert later["masks"]["good"]["head_mask"] == _kept_in_every([1, 2])
        assert later["masks"]["good"]["mlp_mask"] == [0.0, 0.0]
        assert later["sources"]["1"] == first["sources"]["1"] != first["sources"]["2"]
        assert not built_on.exists()
        aside = list((seeds_dir / ".superseded").glob("super-seeds-1-2-*"))
        assert len(aside) == 1 and (aside[0] / "retrained" / "good" / "seed_2").is_dir()
        assert "good masks of seed(s) 2 that were searched again since" in \
            capsys.readouterr().err
        assert _stage(seeds_dir, [1, 2]).masks_stage() == later  # and then reused
    finally:
        HEADS[2], MLPS[2] = saved


def test_masks_written_before_they_recorded_their_sources(seeds_dir):
    """An older masks.json (seeds, no "sources"): kept while its good masks are those kept in
    every seed's current masks, drawn again once a seed's search found others."""
    current = _stage(seeds_dir, [1, 2]).masks_stage()
    masks_file = seeds_dir / "super" / "masks.json"
    older = {k: v for k, v in current.items() if k != "sources"}
    masks_file.write_text(json.dumps(older))
    assert _stage(seeds_dir, [1, 2]).masks_stage() == older
    assert not (seeds_dir / ".superseded").exists()
    _search_again(seeds_dir, 1, [[1, 0, 0], [1, 0, 0]], MLPS[1])
    later = _stage(seeds_dir, [1, 2]).masks_stage()
    assert later["masks"]["good"]["head_mask"] == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert "sources" in later and list((seeds_dir / ".superseded").glob("super-seeds-1-2-*"))


def test_seed_list_errors(tmp_path):
    with pytest.raises(SearchError, match="--seeds: expected at least one seed"):
        search_seeds("MRPC", tmp_path, [])
    with pytest.raises(SearchError, match=r"--seeds \[1, 1\]: expected distinct seeds"):
        search_seeds("MRPC", tmp_path, [1, 1])


def test_a_missing_or_damaged_seed_search_is_named(seeds_dir):
    """The masks need every seed's s-pruning search: a missing or damaged search.json is one
    error naming it and the --redo that remakes it (a sweep skips a deleted unit's output)."""
    from sparsebert.errors import RunDirError  # noqa: PLC0415

    found = seeds_dir / "seed_2" / "structured" / "search.json"
    found.write_text('{"head_mask": [[1, 1')
    with pytest.raises(RunDirError, match=r"seed_2/structured/search.json: damaged .*--redo "
                                          r"structured"):
        _stage(seeds_dir, [1, 2]).masks_stage()
    found.unlink()
    with pytest.raises(RunDirError, match=r"seed_2/structured/search.json: missing: .*--redo "
                                          r"structured"):
        _stage(seeds_dir, [1, 2]).masks_stage()


def test_super_mlps_are_the_mlps_kept_in_every_seed(tmp_path):
    """Each MLP is kept in two of three seeds: none is a super-survivor, none is pruned in
    every seed (so the bad mask has none), by hand."""
    mlps = {1: [1, 1, 0], 2: [1, 0, 1], 3: [0, 1, 1]}
    for seed, mlp_mask in mlps.items():
        found = tmp_path / f"seed_{seed}" / "structured"
        found.mkdir(parents=True)
        (found / "search.json").write_text(json.dumps({"head_mask": [[1, 1, 1]] * 3,
                                                       "mlp_mask": mlp_mask}))
    masks = SuperStage("MRPC", tmp_path, [1, 2, 3], SearchConfig(), TrainConfig(),
                       progress=False).masks_stage()
    assert masks["masks"]["good"]["mlp_mask"] == [0.0, 0.0, 0.0]
    assert masks["stability"]["mlps"]["super_survivors"] == 0
    assert np.sum(masks["masks"]["bad"]["mlp_mask"]) == 0


@pytest.mark.parametrize("content, problem", [
    ({"x": 1}, r"no 'masks' in it"),
    ([1, 2, 3], r"expected a JSON object, found a list"),
    ({"masks": {"good": {"head_mask": [[1, 0, 0]] * 2, "mlp_mask": [1, 1]}}},
     r"masks 'random': expected an object, found null"),
    ({"masks": {name: {"head_mask": [[1, 0, 0]] * 2, "mlp_mask": [1]} for name in
                ("good", "random", "bad")}}, r"masks 'good': mlp_mask is a list of 1"),
])
def test_a_super_masks_file_of_the_wrong_shape_is_named(seeds_dir, content, problem):
    """super/masks.json that is valid JSON but not the masks of every subnetwork is one error
    naming it and what to do (was a KeyError or AttributeError)."""
    from sparsebert.errors import RunDirError  # noqa: PLC0415

    (seeds_dir / "super").mkdir()
    (seeds_dir / "super" / "masks.json").write_text(json.dumps(content))
    with pytest.raises(RunDirError, match=rf"super/masks.json: damaged \({problem}.*\); delete "
                                          rf"it to draw the masks again"):
        _stage(seeds_dir, [1, 2]).masks_stage()


def test_super_masks_are_floats_of_the_seeds_shape(seeds_dir):
    """A control's masks come as float tensors (0/1 integers in masks.json too); masks of
    another (L, H) than the seeds' good masks are named with the file."""
    from sparsebert.errors import RunDirError  # noqa: PLC0415

    stage = _stage(seeds_dir, [1, 2])
    stage.masks_stage()
    path = seeds_dir / "super" / "masks.json"
    found = json.loads(path.read_text())
    found["masks"]["good"] = {"head_mask": [[1, 1, 0], [0, 0, 1]], "mlp_mask": [1, 0]}
    path.write_text(json.dumps(found))
    masks = stage._masks("good")
    assert masks["head_mask"].dtype == masks["mlp_mask"].dtype == torch.float32
    assert masks["head_mask"].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    found["masks"]["good"] = {"head_mask": [[1, 1], [0, 0]], "mlp_mask": [1, 0]}
    path.write_text(json.dumps(found))
    with pytest.raises(RunDirError, match=r"masks.json: damaged \(head_mask is \(2, 2\), the "
                                          r"search's model has \(L, H\) = \(2, 3\)\)"):
        stage._masks("good")


@pytest.mark.parametrize("content, problem", [
    ({"x": 1}, r"no 'metrics' in it"),
    ({"metrics": [1]}, r"'metrics' is a list, expected an object"),
    ({"metrics": {"acc": "high"}}, r"metrics 'acc' is a string, expected a number"),
])
def test_a_super_pruned_score_of_the_wrong_shape_is_named(seeds_dir, content, problem):
    """super/pruned/<subnet>/seed_<s>.json without its metrics is one error naming it and what
    to do when the summary is written (was a KeyError)."""
    from sparsebert.errors import RunDirError  # noqa: PLC0415
    from sparsebert.glue.tasks import get_task  # noqa: PLC0415

    search = seeds_dir / "seed_1" / "structured" / "search.json"
    sizes = {"layers": 2, "heads": 3, "hidden": 6, "head_dim": 2, "intermediate": 8}
    search.write_text(json.dumps({**json.loads(search.read_text()), "sizes": sizes}))
    stage = _stage(seeds_dir, [1, 2])
    found = stage.masks_stage()
    pruned = seeds_dir / "super" / "pruned" / "good" / "seed_2.json"
    pruned.parent.mkdir(parents=True)
    pruned.write_text(json.dumps(content))
    with pytest.raises(RunDirError, match=rf"good/seed_2.json: damaged \({problem}\); delete it "
                                          rf"to score that subnetwork again"):
        stage.summarize(found, get_task("MRPC"))
