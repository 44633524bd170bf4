"""Stage 2, teacher: fine-tune `teacher.init` on the dataset with BiT-HyperRule, or take given teachers.

Fine-tuning: start from a BiT `.npz` / safetensors checkpoint (or scratch), replace the head with a
zero-initialised one for the dataset's classes, train with cross-entropy: SGD momentum 0.9, no weight
decay, linear warmup + ×0.1 steps (schedule by train-set size, `finetune.steps` stretches it), batch
mixup α by train-set size. Views: each image's frame resized to a res/crop_pct square, random crop, flip.
`teacher.finetune=false` instead checks the given checkpoints against the classes and passes them on;
with `data.labels=none` the classes are the teacher's own (`teacher.classes`, or its metadata), whose
label space the student learns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from funmatch import config, runtime, storage
from funmatch.config import Config, archs, split_uris
from funmatch.data import loader, prepared
from funmatch.errors import CheckpointError, ConfigError
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


def _inputs(cfg: Config, members: list[torch.nn.Module]) -> dict:
    """What the artifact records of how its members take input: each one's normalization (load_bundle
    puts it in front of the member) and what runs them (torch, or onnxruntime for an ONNX teacher)."""
    t = cfg.teacher
    stats = config.channel_stats("teacher.mean", t.mean), config.channel_stats("teacher.std", t.std)
    norms = [models.normalization(t.arch, m, *stats) for m in members]
    runtime_name = "onnxruntime" if t.arch == archs.ONNX else "torch"
    for i, norm in enumerate(norms):
        log.info(
            "teacher member %d: input mean %s std %s (%s), run by %s",
            i,
            norm["mean"],
            norm["std"],
            norm["source"],
            runtime_name,
        )
    return {"normalization": norms, "runtime": runtime_name}


def given_teacher(cfg: Config, dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """teacher.finetune=false: load each checkpoint with its head (shapes checked) into the artifact."""
    clock = runtime.Stopwatch()
    manifest = prepared.read_manifest(dataset_dir)
    t = cfg.teacher
    files = [storage.fetch(uri, Path(out_dir).parent / ".cache") for uri in split_uris(t.init)]
    if manifest.get("labels") == "none":  # no dataset classes: the teacher's label space
        names = teacher_classes(cfg, files[0])
        manifest = manifest | {"classes": names, "num_classes": len(names)}
    pools = [models.init_stem_pool(f, t.stem_pool, "teacher.stem_pool") for f in files]
    if len(set(pools)) > 1:
        raise CheckpointError(
            f"teacher.init mixes big_vision- and big_transfer-layout files ({t.init}); "
            "set teacher.stem_pool=neg_inf_pad to run every member with big_vision's max-pool padding"
        )
    members: list[torch.nn.Module] = []
    res_key = "teacher.member_resolutions" if t.member_resolutions else "teacher.resolution"
    for f, stem_pool, res in zip(files, pools, config.member_resolutions(t), strict=True):
        if t.arch == archs.ONNX:  # run as given: checked on one image for its input and class count
            onnx_model = models.load_onnx(f)
            onnx_model.check(manifest["num_classes"], res, res_key)
            members.append(onnx_model)
            continue
        model = models.create_model(t.arch, manifest["num_classes"], stem_pool=stem_pool)
        try:
            models.load_init(model, t.arch, f, load_head=True)
        except CheckpointError as e:
            if manifest.get("labels") != "none":
                raise
            raise CheckpointError(f"the teacher's {manifest['num_classes']} class names do not fit {f}: {e}") from e
        members.append(model)
    info = _info(
        cfg,
        manifest,
        finetuned=False,
        member_resolutions=config.member_resolutions(t),
        stem_pool=pools[0] if pools else t.stem_pool,
        **_inputs(cfg, members),
        wall_s=clock(),
    )
    models.save_bundle(out_dir, members, info)
    return info


def teacher_classes(cfg: Config, init_file: str) -> list[str]:
    """The class names of a given teacher (data.labels=none): `teacher.classes` (a file, one name a line),
    else the "classes" (a JSON list) its checkpoint `init_file` records in its safetensors metadata or ONNX
    metadata_props, else those of the funmatch artifact it belongs to (model.json next to a bundle member or
    an exported model.onnx)."""
    t = cfg.teacher
    if t.classes:
        listed = [line.strip() for line in storage.read_bytes(t.classes).decode().splitlines() if line.strip()]
        if len(listed) < 2:
            raise ConfigError(f"teacher.classes={t.classes!r} holds {len(listed)} names: expected one class a line")
        return listed
    recorded = None
    if init_file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(init_file, "pt") as st:
            recorded = (st.metadata() or {}).get("classes")
    elif init_file.endswith(".onnx"):
        recorded = models.load_onnx(init_file).session.get_modelmeta().custom_metadata_map.get("classes")
    artifact = Path(init_file).parent / "model.json"
    try:
        names = json.loads(recorded) if recorded else json.loads(artifact.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        names = None
    if not isinstance(names, list) or len(names) < 2:
        raise ConfigError(
            f"teacher.init={t.init!r} records no class names and teacher.classes is empty: with data.labels=none "
            "set teacher.classes=<file of the teacher's class names, one a line>"
        )
    return [str(n) for n in names]


def run(cfg: Config, dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """Fine-tunes the teacher and writes its artifact into `out_dir`; returns the artifact info."""
    clock = runtime.Stopwatch()
    t, f = cfg.teacher, cfg.finetune
    manifest = prepared.read_manifest(dataset_dir)
    if prepared.labelled_splits(manifest) != prepared.SPLITS:  # also refused by config.validate
        raise ConfigError(
            f"teacher.finetune={t.finetune} is not allowed: the train images of {dataset_dir} have no labels "
            "(data.labels=none or distill.images); give the teacher (teacher.init, teacher.finetune=false)"
        )
    device = runtime.setup(cfg.runtime, cfg.resources)
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
    inputs = _inputs(cfg, [model])
    model = models.normalized(model, inputs["normalization"][0]).to(device)  # trained as distill will run it

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
    if note := config.scratch_teacher_note(cfg, n):
        log.warning(note)

    model.train()
    running = torch.zeros((), device=device)
    bar = tqdm(range(steps), desc="teacher", unit="step", mininterval=2)
    for step, (images, frames) in zip(bar, batches.iterate(0, steps), strict=True):
        g = augment.step_generator(cfg.runtime.seed, step, stream=1)
        idx = runtime.to_device(prepared.batch_indices(step, f.batch_size, n, cfg.runtime.seed), device)
        x = augment.finetune_view(images, t.resolution, cfg.eval.crop_pct, g, frames)
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
    val_frames = torch.from_numpy(prepared.load_frames(dataset_dir, "val"))
    logits = predict([model], torch.from_numpy(val_x), t.resolution, cfg.eval, device, val_frames)
    val_acc = prec1(logits, torch.from_numpy(val_y))
    info = _info(
        cfg,
        manifest,
        finetuned=True,
        steps=steps,
        val_prec1=round(val_acc, 4),
        stem_pool=stem_pool,
        **inputs,
        wall_s=clock(),
    )
    models.save_bundle(out_dir, [model.cpu()], info)
    log.info("teacher val prec@1 %.4f (%.1fs)", val_acc, info["wall_s"])
    if note := weak_teacher_note(cfg, val_acc, manifest["num_classes"]):
        log.warning(note)
    return info


def weak_teacher_note(cfg: Config, val_acc: float, num_classes: int) -> str:
    """One line when the teacher's val prec@1 is nearer chance than perfect: the student would copy guesses."""
    chance = 1 / max(1, num_classes)
    if val_acc >= (1 + chance) / 2:
        return ""
    t = cfg.teacher
    return (
        f"teacher val prec@1 {val_acc:.4f} is nearer chance ({chance:.2f}) than 1: the student can only copy it; "
        + (
            "give a pretrained teacher (--set teacher.init=<file> teacher.finetune=false, or a BiT .npz), "
            if not split_uris(t.init)
            else ""
        )
        + f"or larger views (teacher.resolution={t.resolution + 32} student.resolution={cfg.student.resolution + 32}), "
        f"or more teacher steps (finetune.steps={2 * max(cfg.finetune.steps, 500)})"
    )
