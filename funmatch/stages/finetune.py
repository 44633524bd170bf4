"""Stage 2, teacher: fine-tune `teacher.init` on the dataset with BiT-HyperRule, or take given teachers.

Fine-tuning: start from a BiT `.npz` / safetensors checkpoint (or scratch), replace the head with a
zero-initialised one for the dataset's classes, train with cross-entropy: SGD momentum 0.9, no weight
decay, linear warmup + ×0.1 steps (schedule by train-set size, `finetune.steps` stretches it), batch
mixup α by train-set size. Views: square resize to res/crop_pct, random crop, flip.
`teacher.finetune=false` instead checks the given checkpoints against the classes and passes them on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from funmatch import config, runtime, storage
from funmatch.config import Config, split_uris
from funmatch.data import loader, prepared
from funmatch.errors import CheckpointError
from funmatch.recipe import augment, models, optim
from funmatch.recipe.metrics import prec1
from funmatch.stages.evaluate import predict

log = logging.getLogger(__name__)


def _info(cfg: Config, manifest: dict, **extra) -> dict:
    t = cfg.teacher
    return {
        "role": "teacher",
        "arch": t.arch,
        "resolution": t.resolution,
        "stem_pool": t.stem_pool,
        "classes": manifest["classes"],
        "init": t.init,
        "crop_pct": cfg.eval.crop_pct,
    } | extra


def given_teacher(cfg: Config, dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """teacher.finetune=false: load each checkpoint with its head (shapes checked) into the artifact."""
    clock = runtime.Stopwatch()
    manifest = prepared.read_manifest(dataset_dir)
    t = cfg.teacher
    files = [storage.fetch(uri, Path(out_dir).parent / ".cache") for uri in split_uris(t.init)]
    pools = [models.init_stem_pool(f, t.stem_pool, "teacher.stem_pool") for f in files]
    if len(set(pools)) > 1:
        raise CheckpointError(
            f"teacher.init mixes big_vision- and big_transfer-layout files ({t.init}); "
            "set teacher.stem_pool=neg_inf_pad to run every member with big_vision's max-pool padding"
        )
    members = []
    for f, stem_pool in zip(files, pools, strict=True):
        model = models.create_model(t.arch, manifest["num_classes"], stem_pool=stem_pool)
        models.load_init(model, t.arch, f, load_head=True)
        members.append(model)
    info = _info(
        cfg,
        manifest,
        finetuned=False,
        member_resolutions=config.member_resolutions(t),
        stem_pool=pools[0] if pools else t.stem_pool,
        wall_s=clock(),
    )
    models.save_bundle(out_dir, members, info)
    return info


def run(cfg: Config, dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """Fine-tunes the teacher and writes its artifact into `out_dir`; returns the artifact info."""
    clock = runtime.Stopwatch()
    device = runtime.setup(cfg.runtime, cfg.resources)
    t, f = cfg.teacher, cfg.finetune
    manifest = prepared.read_manifest(dataset_dir)
    # The train split resident on the device, or streamed by decode workers (as in distill).
    batches = loader.Batches(
        dataset_dir,
        device,
        cfg.runtime.resident_max_gb,
        f.batch_size,
        cfg.runtime.seed,
        torch.arange(f.batch_size),
        cfg.runtime.loader_workers,
        cfg.runtime.jpeg_decode,
    )
    labels = torch.from_numpy(prepared.load_labels(dataset_dir, "train")).to(device)
    n = batches.n

    # Model: pretrained body (if any) + a fresh zero head for these classes.
    inits = [storage.fetch(uri, Path(out_dir).parent / ".cache") for uri in split_uris(t.init)[:1]]
    stem_pool = models.init_stem_pool(inits[0], t.stem_pool, "teacher.stem_pool") if inits else t.stem_pool
    model = models.create_model(t.arch, manifest["num_classes"], stem_pool=stem_pool, zero_head=True, device=device)
    if inits:
        models.load_init(model, t.arch, inits[0], load_head=False)
        model.to(device)

    # BiT-HyperRule.
    warmup, boundaries, steps = optim.scaled_hyperrule(n, f.steps)
    alpha = optim.hyperrule_mixup_alpha(n) if f.mixup_alpha < 0 else f.mixup_alpha
    opt = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=0.0)
    log.info(
        "teacher %s from %s: %d steps (warmup %d, decays at %s), batch %d, mixup α %.2g, %dpx",
        t.arch,
        t.init,
        steps,
        warmup,
        boundaries,
        f.batch_size,
        alpha,
        t.resolution,
    )

    model.train()
    running = torch.zeros((), device=device)
    bar = tqdm(range(steps), desc="teacher", unit="step", mininterval=2)
    for step, images in zip(bar, batches.iterate(0, steps), strict=True):
        g = augment.step_generator(cfg.runtime.seed, step, stream=1)
        idx = runtime.to_device(prepared.batch_indices(step, f.batch_size, n, cfg.runtime.seed), device)
        x = augment.finetune_view(images, t.resolution, cfg.eval.crop_pct, g)
        target = F.one_hot(labels[idx], manifest["num_classes"]).float()
        lam = augment.batch_mixup_lambda(alpha, g)
        if lam < 1.0:
            x, target = augment.mixup(x, lam), augment.mixup(target, lam)
        optim.set_lr(opt, f.lr * optim.step_decay(step, warmup, boundaries))
        with runtime.autocast(device, cfg.runtime.precision):
            loss = F.cross_entropy(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()
        if (step + 1) % cfg.distill.log_every == 0:
            bar.set_postfix(loss=f"{running.item() / cfg.distill.log_every:.3f}")
            running.zero_()

    model.eval()
    val_x, val_y = prepared.load_split(dataset_dir, "val")
    logits = predict([model], torch.from_numpy(val_x), t.resolution, cfg.eval, device)
    val_acc = prec1(logits, torch.from_numpy(val_y))
    info = _info(
        cfg, manifest, finetuned=True, steps=steps, val_prec1=round(val_acc, 4), stem_pool=stem_pool, wall_s=clock()
    )
    models.save_bundle(out_dir, [model.cpu()], info)
    log.info("teacher val prec@1 %.4f (%.1fs)", val_acc, info["wall_s"])
    return info
