"""Which fine-tuned full model a search's results were built on.

    out/full_model.json   {"weights_sha256": {weight file name: sha256}} of out/full/model/

A search records the digest of its full model's weight files once the full model is
fine-tuned. Every later run of the full stage compares the model in out/full/model/ with the
record. The two differ when the full model was fine-tuned again (its model/ folder deleted by
hand: the finished run is trained again, and on a GPU fine-tuning is not bitwise reproducible)
or replaced by hand. Everything built on the old model (both methods' searches, masks, pruned
scores and retrainings, the summary and report, the speed timings) is then set aside
(sparsebert.lottery.redo.set_aside) into out/.superseded/full-model-<time>/ and computed again
from the new model. A model fine-tuned again to the same weights (on the CPU) keeps everything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sparsebert.atomic import atomic_write_json, read_json
from sparsebert.errors import RunDirError
from sparsebert.hf.loading import weight_files
from sparsebert.lottery.config import METHODS
from sparsebert.lottery.redo import set_aside, unused
from sparsebert.train.data_identity import file_sha256

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


def check_full_model(search_dir: Path) -> list[Path]:
    """Compare the search's fine-tuned full model (`search_dir`/full/model, which must exist)
    with the one its results were built on, set those results aside when they differ, and
    record the current model. Returns the folders and files set aside ([] when none)."""
    current = weights_digest(search_dir / "full" / "model")
    recorded = _recorded(search_dir)
    moved: list[Path] = []
    if recorded is not None and recorded != current:
        stamp = time.strftime("%Y-%m-%dT%H%M%S%z")
        aside = unused(search_dir / ".superseded" / f"full-model-{stamp}")
        searches, folders = set_aside(search_dir, [], [search_dir], METHODS, aside)
        moved = [*(search_dir / m for m in METHODS if (aside / m).exists()), *folders]
        if searches or folders:
            print(f"[search] {search_dir / 'full' / 'model'}: the fine-tuned full model is not "
                  f"the one this search's results were built on (it was fine-tuned again, or "
                  f"replaced); those results are set aside in {aside} and computed again",
                  file=sys.stderr)
    if recorded != current:  # (after the set-aside: an interrupted one is done again)
        atomic_write_json(search_dir / FULL_MODEL_FILE, {"weights_sha256": current})
    return moved
