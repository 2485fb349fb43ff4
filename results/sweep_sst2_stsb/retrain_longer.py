"""Re-fine-tune one s-pruning subnetwork of a sweep with more epochs than the sweep gave it.

    python results/sweep_sst2_stsb/retrain_longer.py RUN_DIR EPOCHS OUT_DIR

RUN_DIR: a finished re-fine-tune of the sweep (e.g. runs/sweep-cpu-sst2-stsb/STS-B/seed_42/
structured/retrained/good: its config.json and masks.json are read); the same recipe, seed and
masks (the pre-trained model, physically pruned) are trained for EPOCHS epochs into OUT_DIR,
and the dev metrics after each epoch are printed. It tells slow convergence (the score keeps
rising with more steps) from a subnetwork that cannot learn the task.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sparsebert.glue.tasks import get_task
from sparsebert.hf.loading import load_model
from sparsebert.hf.masks import set_masks
from sparsebert.hf.patching import patch
from sparsebert.hf.surgery import prune
from sparsebert.train.config import TrainConfig
from sparsebert.train.loop import finetune


def main(run_dir: Path, epochs: int, out_dir: Path) -> None:
    config = TrainConfig(**{**json.loads((run_dir / "config.json").read_text()),
                            "epochs": epochs})
    masks = json.loads((run_dir / "masks.json").read_text())
    task = get_task(config.task)
    model, tokenizer = load_model(config.model, task.num_labels, labels=task.labels,
                                  seed=config.seed)
    patch(model)
    set_masks(model, head_mask=torch.tensor(masks["head_mask"]),
              mlp_mask=torch.tensor(masks["mlp_mask"]))
    prune(model)  # as the sweep's re-fine-tune does
    finetune(config, out_dir, model=model, tokenizer=tokenizer)
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "dev":
            print({k: v for k, v in record.items() if k != "split"})


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
