"""AdamW with a separate projector learning rate, and a cosine schedule with warmup and a floor."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tc_llava.model.tc_llava import TCLlava


def param_groups(model: TCLlava, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """Projector / LLM groups; biases and norms get no weight decay (as HF's Trainer does)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_projector = "multi_modal_projector" in name or "image_newline" in name
        decays = param.ndim >= 2
        groups.setdefault((is_projector, decays), []).append(param)
    return [
        {"params": params, "lr": (projector_lr or lr) if is_projector else lr,
         "weight_decay": weight_decay if decays else 0.0,
         "name": ("projector" if is_projector else "llm") + ("" if decays else "_no_decay")}
        for (is_projector, decays), params in sorted(groups.items())
    ]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                       min_lr_ratio: float) -> LambdaLR:
    """Linear warmup to each group's lr, then cosine down to ``min_lr_ratio`` of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
