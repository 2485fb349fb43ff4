"""Which fine-tuned full model a search's results were built on.

    out/full_model.json   {"weights_sha256": {weight file name: sha256}} of out/full/model/

A search records the digest of its full model's weight files once the full model is
fine-tuned. Every later run of the full stage compares the model in out/full/model/ with the
record. The two differ when the full model was fine-tuned again (its model/ folder deleted by
hand: the finished run is trained again, and on a GPU fine-tuning is not bitwise reproducible)
or replaced by hand. Everything built on the old model is then set aside
(sparsebert.lottery.redo.set_aside) into <root>/.superseded/full-model-<time>/ and computed
again from the new model: both methods' searches, masks, pruned scores and retrainings, the
summary and report, the speed timings; for one seed of several (a multi-seed search's or a
sweep's seed_<s>/, whose parent is <root>; else <root> is out) also that seed's super-survivor
pruned scores (super/pruned/<name>/seed_<s>.json: the controls on its fine-tuned model) and the
seeds' timings (<root>/speed/). The super-survivor masks are drawn again when the seed's good
mask changed (sparsebert.lottery.super_survivors); their re-fine-tunes start from the
pre-trained model and are kept. A model fine-tuned again to the same weights (on the CPU) keeps
everything. A sweep asks `full_model_replaced` before it skips a done full unit: the unit runs
again when the model was replaced, and this check sets the old results aside.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sparsebert.atomic import atomic_write_json, read_json
from sparsebert.errors import RunDirError
from sparsebert.hf.loading import weight_files
from sparsebert.lottery.config import METHODS
from sparsebert.lottery.redo import move_aside, set_aside, unused
from sparsebert.train.data_identity import file_sha256
from sparsebert.train.rundir import is_multi_seed_root

FULL_MODEL_FILE = "full_model.json"


def weights_digest(model_dir: Path) -> dict[str, str]:
    """{weight file name: sha256} of the saved model in `model_dir`."""
    return {path.name: file_sha256(path) for path in weight_files(model_dir)}


def _recorded(search_dir: Path) -> dict[str, str] | None:
    """The recorded digest; None when there is none (a search from before the record, or a
    damaged record: the current model is recorded then)."""
    try:
        record = read_json(search_dir / FULL_MODEL_FILE, "")
    except (OSError, RunDirError):
        return None
    digest = record.get("weights_sha256") if isinstance(record, dict) else None
    return digest if isinstance(digest, dict) and digest else None


def full_model_replaced(search_dir: Path) -> bool:
    """Whether `search_dir`/full/model's weights differ from the ones recorded in
    `search_dir`/full_model.json (False without a record: nothing was built on a model yet, or
    the search is from before the record)."""
    recorded = _recorded(search_dir)
    return recorded is not None and recorded != weights_digest(search_dir / "full" / "model")


def _seeds_root(search_dir: Path) -> Path | None:
    """The folder of the seeds when `search_dir` is one seed's search of several (seed_<s>/ of
    a multi-seed search or of a sweep's task folder), else None."""
    parent = search_dir.parent
    return parent if search_dir.name.startswith("seed_") and is_multi_seed_root(parent) else None


def _set_aside_seed_results(root: Path, seed_folder: str, aside: Path) -> list[Path]:
    """Move what the seeds' folder `root` holds that was built on seed `seed_folder`'s full
    model (its super-survivor pruned scores, the seeds' timings) to `aside`; returns it."""
    built_on = [*(root / "super" / "pruned").glob(f"*/{seed_folder}.json"), root / "speed"]
    moved = [path for path in built_on if path.exists()]
    for path in moved:
        move_aside(path, aside / path.relative_to(root))
    return moved


def check_full_model(search_dir: Path) -> list[Path]:
    """Compare the search's fine-tuned full model (`search_dir`/full/model, which must exist)
    with the one its results were built on, set those results aside when they differ, and
    record the current model. Returns what was set aside ([] when nothing): the search (when
    any of its results were), its timings, the seeds' files built on it."""
    current = weights_digest(search_dir / "full" / "model")
    recorded = _recorded(search_dir)
    moved: list[Path] = []
    if recorded is not None and recorded != current:
        seeds_root = _seeds_root(search_dir)
        root = search_dir if seeds_root is None else seeds_root
        stamp = time.strftime("%Y-%m-%dT%H%M%S%z")
        label = "" if seeds_root is None else f"{search_dir.name}-"
        aside = unused(root / ".superseded" / f"full-model-{label}{stamp}")
        searches, folders = set_aside(root, [], [search_dir], METHODS, aside)
        moved = [*searches, *folders]
        if seeds_root is not None:
            moved += _set_aside_seed_results(seeds_root, search_dir.name, aside)
        if moved:
            print(f"[search] {search_dir / 'full' / 'model'}: the fine-tuned full model is not "
                  f"the one this search's results were built on (it was fine-tuned again, or "
                  f"replaced); those results are set aside in {aside} and computed again",
                  file=sys.stderr)
    if recorded != current:  # (after the set-aside: an interrupted one is done again)
        atomic_write_json(search_dir / FULL_MODEL_FILE, {"weights_sha256": current})
    return moved
