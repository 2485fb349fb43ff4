"""model.json: what the pre-trained model folder a run (or search) started from contained, so
that a resume after the folder's files changed (weights overwritten, another checkpoint saved
in its place) is refused instead of silently mixing two models: a search reloads the
pre-trained weights for every retraining and m-pruning rewind, long after its full fine-tune.
The folder replaced by a copy of the same files resumes as before; a --model that names
another folder is another setting (config.json refuses it, even with the same files).

    {"source": "local", "files": {"config.json": "<sha256>", "model.safetensors": "<sha256>"}}
    {"source": "hub", "files": {}}          (a hub id: the hub's revision is not tracked)

Fingerprinted: the folder's top-level files but documentation (*.md) and hidden files.
"""

from __future__ import annotations

import os
from pathlib import Path

from sparsebert.atomic import atomic_write_json
from sparsebert.errors import RunDirError
from sparsebert.train.data_identity import file_sha256, read_record

MODEL_FILE = "model.json"


def model_fingerprint(model: str | os.PathLike | None) -> dict[str, str]:
    """{file name: sha256} of the model folder's top-level files (documentation and hidden
    files aside); {} for a hub id. `model`: --model as given (None / "default" included)."""
    from sparsebert.hf.loading import check_model_source, resolve_model  # noqa: PLC0415

    source = resolve_model(model)
    if not check_model_source(source):
        return {}
    folder = Path(source).expanduser()
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".md":
            out[path.name] = file_sha256(path)
    return out


def check_model(out_dir: Path, model: str | os.PathLike | None) -> None:
    """Refuse to go on in `out_dir` from a model folder whose files differ from those it
    started with; record them for a new (or older, unrecorded) directory. `out_dir` must
    exist."""
    files = model_fingerprint(model)
    source = "local" if files else "hub"
    path = out_dir / MODEL_FILE
    saved = read_record(path, "the model files")
    if saved is not None:
        theirs = saved["files"]
        if saved.get("source") == source == "local":
            changed = sorted(k for k in set(theirs) | set(files) if theirs.get(k) != files.get(k))
            if changed:
                raise RunDirError(
                    f"{out_dir} was started from other model files: {', '.join(changed)} "
                    f"in --model {model} differ from what it began with ({path}). Resume "
                    f"with the model it used, or use another --out")
        if saved.get("source") == source:
            return
    atomic_write_json(path, {"source": source, "files": files})
