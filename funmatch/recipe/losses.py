"""The distillation loss: t²·KL(softmax(z_t/t) ‖ softmax(z_s/t)), batch mean, no label term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from the teacher's to the student's tempered distribution, times t² (paper Eq. 1)."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return temperature**2 * kl.mean()


def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Several teachers as one: their logits averaged (paper §3.6)."""
    return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)
