import math

import pytest
import torch
from torch import nn

from funmatch.recipe import losses, optim


def test_kd_loss_is_t2_kl_teacher_to_student():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    temp = 3.0
    ps, pt = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
    want = temp**2 * (pt * (pt.log() - ps.log())).sum(1).mean()
    assert losses.kd_loss(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
    reverse = temp**2 * (ps * (ps.log() - pt.log())).sum(1).mean()
    assert abs(losses.kd_loss(s, t, temp).item() - reverse.item()) > 1e-4  # direction matters
    assert losses.kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_ensemble_averages_logits():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(losses.ensemble_logits([a, b]), (a + b) / 2)


def test_total_steps_and_warmup_cosine():
    assert optim.total_steps(10_000, 1020, 512) == math.ceil(10_000 * 1020 / 512)
    assert optim.warmup_cosine(0, 1500, 20_000) == 0.0
    assert optim.warmup_cosine(750, 1500, 20_000) == pytest.approx(0.5)
    assert optim.warmup_cosine(1500, 1500, 20_000) == pytest.approx(1.0)
    assert optim.warmup_cosine(1500 + 18_500 // 2, 1500, 20_000) == pytest.approx(0.5, abs=1e-3)
    assert optim.warmup_cosine(20_000, 1500, 20_000) == pytest.approx(0.0)


def test_weight_decay_only_on_conv_and_linear_kernels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))
    mask = optim.decay_mask(model)
    assert mask == {
        "0.weight": True,
        "0.bias": False,
        "1.weight": False,
        "1.bias": False,
        "3.weight": True,
        "3.bias": False,
    }


def test_decoupled_weight_decay_follows_big_vision_not_lr_scaled():
    """One step: θ ← θ − s·(lr·adam_dir + wd·θ); AdamW with λ = wd/lr gives exactly that."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    lr, wd, sched = 0.01, 3e-4, 0.5
    w0 = lin.weight.detach().clone()
    opt = optim.distill_optimizer(lin, lr, wd)
    optim.set_lr(opt, lr * sched)
    lin(torch.randn(5, 3)).sum().backward()
    assert lin.weight.grad is not None
    g = lin.weight.grad.clone()
    opt.step()
    adam_dir = g / (g.abs() + 1e-8)  # first Adam step: m̂/√v̂ = g/|g|
    want = w0 - sched * (lr * adam_dir + wd * w0)
    assert torch.allclose(lin.weight, want, atol=1e-7)


def test_hyperrule_schedule_by_dataset_size():
    assert optim.hyperrule(1020) == (100, (200, 300, 400), 500)
    assert optim.hyperrule(68_000) == (500, (3000, 6000, 9000), 10_000)
    assert optim.hyperrule(1_281_167) == (500, (6000, 12_000, 18_000), 20_000)
    assert optim.hyperrule_mixup_alpha(19_999) == 0.0 and optim.hyperrule_mixup_alpha(20_000) == 0.1
    assert optim.step_decay(50, 100, (200, 300, 400)) == 0.5
    assert optim.step_decay(250, 100, (200, 300, 400)) == pytest.approx(0.1)
    assert optim.step_decay(450, 100, (200, 300, 400)) == pytest.approx(0.001)
    assert optim.scaled_hyperrule(1020, 1000) == (200, (400, 600, 800), 1000)
