"""Optimizers and schedules of the recipe.

Distillation (big_vision): Adam (0.9, 0.999, 1e-8) on gradients clipped to global norm 1.0, plus
decoupled weight decay on conv and dense kernels only; the update is
θ ← θ − s(t)·(lr·adam_dir + wd·θ), with s(t) linear warmup from 0 then cosine to 0. wd is scaled by
the schedule but *not* by lr. PyTorch's AdamW applies θ ← θ − lr_t·λ·θ with lr_t = lr·s(t), so the
exact mapping is λ = wd / lr (ImageNet: 3e-4 / 0.03 = 0.01).

Teacher fine-tuning (BiT-HyperRule): SGD momentum 0.9, no weight decay, linear warmup then ×0.1
steps at fixed boundaries chosen by the train-set size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def total_steps(epochs: float, train_size: int, batch_size: int) -> int:
    """ceil(epochs × train size / batch)."""
    return max(1, math.ceil(epochs * train_size / batch_size))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Schedule multiplier at 0-based `step`: linear from 0 over `warmup`, then cosine to 0 at `total`."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """True for conv and linear kernels (big_vision: names ending in /kernel), False for norms and biases."""
    kernels = {
        f"{name}.weight".lstrip(".")
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight is not None
    }
    return {name: name in kernels for name, _ in model.named_parameters()}


def distill_optimizer(model: nn.Module, lr: float, weight_decay: float, name: str = "adam") -> torch.optim.Optimizer:
    mask = decay_mask(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if mask[n]], "weight_decay": weight_decay / lr},
        {"params": [p for n, p in params.items() if not mask[n]], "weight_decay": 0.0},
    ]
    if name == "shampoo":
        from pytorch_optimizer import ScalableShampoo  # optional dependency: pip install pytorch-optimizer

        return ScalableShampoo(groups, lr=lr, decoupled_weight_decay=True)  # θ -= lr_t·λ·θ, as AdamW
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------- BiT-HyperRule


def hyperrule(train_size: int) -> tuple[int, tuple[int, ...], int]:
    """(warmup steps, step-decay boundaries, total steps) by train-set size (big_transfer)."""
    if train_size < 20_000:
        return 100, (200, 300, 400), 500
    if train_size < 500_000:
        return 500, (3000, 6000, 9000), 10_000
    return 500, (6000, 12_000, 18_000), 20_000


def hyperrule_mixup_alpha(train_size: int) -> float:
    return 0.1 if train_size >= 20_000 else 0.0


def scaled_hyperrule(train_size: int, steps: int) -> tuple[int, tuple[int, ...], int]:
    """The HyperRule schedule for `train_size`, stretched to `steps` total (0 keeps its own length)."""
    warmup, bounds, total = hyperrule(train_size)
    if steps <= 0 or steps == total:
        return warmup, bounds, total
    scale = steps / total
    return max(1, round(warmup * scale)), tuple(round(b * scale) for b in bounds), steps


def step_decay(step: int, warmup: int, boundaries: tuple[int, ...]) -> float:
    """Linear warmup, then ×0.1 at each boundary passed."""
    if step < warmup:
        return step / warmup
    return 0.1 ** sum(step >= b for b in boundaries)
