"""AdamW and the linear schedule of a fine-tuning run, built from its TrainConfig."""

from __future__ import annotations

import torch

from sparsebert.train.config import TrainConfig
from sparsebert.train.step import LinearSchedule, make_adamw


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int,
                   capturable: bool = False) -> tuple[torch.optim.AdamW, LinearSchedule]:
    """AdamW (fused where possible) over trainable parameters (no decay on biases/LayerNorm)
    and a linear schedule with `warmup_steps` of linear warmup. capturable=True (CUDA) makes
    the step capturable in a CUDA graph (sparsebert.train.step.CudaGraphStep).

    Buffers (pruning gates, masks) are never handed to the optimizer. `config` is checked and
    its lr filled in from its preset when unset (TrainConfig.resolved).
    """
    config = config.resolved()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_norm = param.ndim == 1 or "LayerNorm" in name or "layer_norm" in name
            (no_decay if is_norm else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = (decay + no_decay)[0].device if decay or no_decay else torch.device("cpu")
    optimizer = make_adamw(groups, config.lr, config.adam_eps, device, capturable)
    return optimizer, LinearSchedule(optimizer, config.lr, total_steps, config.warmup_steps)
