"""Classification metrics as big_vision names them: prec@1, and the student–teacher distances of
`proj.distill.distance` (agree@1, agree@5, KL(teacher ‖ student) at t=1, logits' L2 distance)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def prec1(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy: the fraction of rows whose argmax is the label."""
    if isinstance(logits, torch.Tensor):
        return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())
    return float((np.argmax(logits, 1) == np.asarray(labels)).mean())


def distances(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """agree@1 (same argmax), agree@5 (the teacher's top-1 in the student's top-5), KL and L2."""
    top1_t = teacher.argmax(1)
    top5_s = student.topk(min(5, student.shape[1]), dim=1).indices
    kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none").sum(1)
    return {
        "agree@1": prec1(student, top1_t),
        "agree@5": float((top5_s == top1_t[:, None]).any(1).float().mean()),
        "kl": float(kl.mean()),
        "l2": float((student - teacher).norm(dim=1).mean()),
    }
