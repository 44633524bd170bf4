"""Stage 3, distillation by function matching (Beyer et al. 2022), one readable loop.

Every step: take the next batch of the seeded data stream, make the setup's views on the training
device (`funmatch`: one inception crop + flip, resized for each model, plus mixup of the batch with
itself rolled by one), run the frozen teacher online (eval mode, WS folded, no grad), and fit the
student to it with t²·KL(teacher ‖ student) — no label term — using Adam with global-norm clipping,
decoupled weight decay on kernels and warmup + cosine. The loss is read back only every
`log_every` steps, so the step never waits on the host. Checkpoints go to `checkpoint_dir` by step
and by time; a SIGTERM (preemption) saves one and exits non-zero so the task retry resumes. A NaN or
infinite loss (or gradient norm) stops the run with a `TrainingError` naming the step (big_vision stops
too), and the state it left is never checkpointed.

`run` reads like big_vision's distill trainer (`big_vision/trainers/proj/distill/distill.py`): set
up (data, teacher, students), loop, finish. The loop's side concerns are the small classes below it:
`_Throughput` (steady-state img/s), `_Progress` (progress bar and TensorBoard), `_Checkpoints`
(cadence, the non-finite guard before each save, and SIGTERM). `Hooks` lets a caller observe the loop
(`funmatch fault-test`) or change the teacher's targets (tests); by default it does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from funmatch import config, runtime, storage
from funmatch.config import FIXED_SETUPS, Config, DistillConfig, split_uris
from funmatch.data import loader, prepared
from funmatch.errors import PREEMPTED_EXIT, CheckpointError, ConfigError, DataError, TrainingError
from funmatch.recipe import augment, models, optim
from funmatch.recipe.losses import ensemble_logits, kd_loss
from funmatch.recipe.metrics import distances, prec1
from funmatch.stages.evaluate import predict, resolutions
from funmatch.storage.checkpoint import CheckpointManager

log = logging.getLogger(__name__)

ValSet = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # val images, frames, labels, teacher logits


def _nothing(*args: Any) -> None:
    return None


def _same_targets(step: int, targets: torch.Tensor) -> torch.Tensor:
    return targets


@dataclass(frozen=True)
class Hooks:
    """Callbacks from the loop, each doing nothing by default. A step number counts the steps done
    (step 0 begins the run; checkpoint `step` holds the state after `step` steps).

    on_start(step, ckpt): the students are ready at `step` (0: from scratch, else resumed from that
        checkpoint), before the first step; `ckpt` is the first student's CheckpointManager or None.
    on_step(step): a step begins (before its views are drawn).
    on_targets(step, targets) -> targets: the teacher's logits of that step; what it returns is what
        the students fit (a test makes them non-finite here).
    on_checkpoint(step, ckpt): every student's checkpoint at `step` is committed; `ckpt` is the first
        student's CheckpointManager (written last, its checkpoint commits them all).
    """

    on_start: Callable[[int, CheckpointManager | None], None] = _nothing
    on_step: Callable[[int], None] = _nothing
    on_targets: Callable[[int, torch.Tensor], torch.Tensor] = _same_targets
    on_checkpoint: Callable[[int, CheckpointManager], None] = _nothing


def run(
    cfg: Config,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    checkpoint_dir: str = "",
    allow_config_change: bool = False,
    hooks: Hooks = Hooks(),
) -> dict:
    """Distils the teacher artifact into a student artifact in `out_dir`; returns its info.

    Raises TrainingError when a student's loss or gradient norm (under DDP the norm covers every rank)
    turns NaN or infinite. The guard adds no host sync per step: each step's loss and norm stay on the
    device and are read in one transfer where the loop syncs anyway, at the log cadence (`log_every` and
    the last step) and before every checkpoint. So the run may go on up to `log_every` steps past the bad
    one, but the error names the first bad step, no checkpoint is written from a state it produced, and
    no student is written.
    """
    clock = runtime.Stopwatch()
    k, s, seed = cfg.distill, cfg.student, cfg.runtime.seed
    rank, world, device = _distributed(runtime.setup(cfg.runtime, cfg.resources))  # torchrun: one process per GPU
    if k.batch_size % world:
        raise ConfigError(
            f"distill.batch_size={k.batch_size} is not allowed: it must divide evenly over "
            f"{world} processes (the global batch is preserved)"
        )

    # Data: the train split resident on the device as uint8 (views are made there, per batch), or, when
    # larger than runtime.resident_max_gb, streamed from the shards by parallel decode workers.
    manifest = prepared.read_manifest(dataset_dir)
    batches = loader.Batches(
        dataset_dir,
        device,
        cfg.runtime.resident_max_gb,
        k.batch_size,
        seed,
        augment.shard_rows(k.batch_size, k.setup, (rank, world)),
        cfg.runtime.loader_workers,
        cfg.runtime.jpeg_decode,
    )
    budget = _budget(k, batches.n)
    steps = budget.steps

    # Teacher (frozen) and students (from scratch with a zero head, the paper's default), each student
    # with its own optimizer and checkpoints; one teacher forward per step feeds all of them. Further
    # students resume at the first one's step.
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # NHWC convs on GPUs
    # data.labels=none: no dataset classes, the students learn the teacher's label space
    teacher = _Teacher(teacher_dir, manifest["classes"] if manifest.get("labels") != "none" else None, device, fmt)
    classes = teacher.info["classes"]
    specs = [(s.arch, s.resolution)] + config.extra_students(k)
    learners = _students(
        cfg,
        specs,
        len(classes),
        device,
        fmt,
        world,
        out_dir,
        checkpoint_dir,
        allow_config_change or cfg.runtime.allow_config_change,
    )
    start = learners[0].start
    amp = runtime.autocast(device, cfg.runtime.precision)

    # The teacher forward is 80-90 % of a step's compute: compiled too when runtime.compile is set. The
    # compiled artifacts persist next to the checkpoints: a retry on a fresh node does not recompile.
    compile_cache = _compile_cache_uri(cfg, checkpoint_dir, device)
    save_cache_at = start + 1 if compile_cache and not _load_compile_cache(compile_cache) and rank == 0 else None
    teacher.compile(cfg.runtime)
    cudagraphs = (
        cfg.runtime.compile
        and device.type == "cuda"
        and cfg.runtime.compile_mode in ("reduce-overhead", "max-autotune")
    )
    # fix/* (and the alias `fixed`): the teacher's targets once per image, reused every step.
    fixed = teacher.fixed_targets(dataset_dir, cfg, device, amp) if k.setup in FIXED_SETUPS else None
    val_set = _val_set(dataset_dir, teacher, cfg, device) if k.eval_every else None
    local = slice(rank * k.batch_size // world, (rank + 1) * k.batch_size // world)

    def update(step: int, images: torch.Tensor, frames: torch.Tensor) -> None:
        """One step (big_vision's update_fn): the views, the teacher's targets, every student's update."""
        if cudagraphs:  # several compiled graphs run per step: tell CUDA graph trees where a step begins
            torch.compiler.cudagraph_mark_step_begin()
        t_in, s_in = augment.distill_views(
            images,
            k.setup,
            teacher.views_of,
            [r for _, r in specs],
            (k.crop_min_area, k.crop_max_area),
            augment.step_generator(seed, step),
            shard=(rank, world),
            batch_size=k.batch_size,
            crop_pct=cfg.eval.crop_pct,
            frames=frames,
        )
        if fmt is torch.channels_last:
            s_in = [x.contiguous(memory_format=fmt) for x in s_in]
            t_in = t_in and [t.contiguous(memory_format=fmt) for t in t_in]
        if fixed is None:
            assert t_in is not None  # the online setups make teacher views
            target = teacher(t_in, amp)
        else:
            target = fixed[
                runtime.to_device(prepared.batch_indices(step, k.batch_size, batches.n, seed)[local], device)
            ]
        target = hooks.on_targets(step, target)
        lr = k.lr * optim.warmup_cosine(step, budget.warmup, steps)
        for learner, x in zip(learners, s_in, strict=True):
            learner.step(x, target, lr, amp, k, step + 1)

    if start:
        log.info("resumed from %s at step %d of %d", checkpoint_dir, start, steps)
    log.info(
        "distill %s→%s, setup %s: %d steps × batch %d (%.4g epochs of %d), t=%g, lr %g, wd %g, %s→%spx on %s",
        teacher.info["arch"],
        ", ".join(a for a, _ in specs),
        k.setup,
        steps,
        k.batch_size,
        budget.epochs,
        batches.n,
        k.temperature,
        k.lr,
        k.weight_decay,
        teacher.resolutions,
        [r for _, r in specs],
        device,
    )
    hooks.on_start(start, learners[0].ckpt)
    throughput = _Throughput(device, start, steps, k.batch_size, cfg.runtime.sync_debug)

    with (
        _Checkpoints(learners, rank, steps, hooks) as checkpoints,
        _Progress(Path(out_dir), rank, start, steps, k.batch_size) as progress,
    ):
        for step, (images, frames) in zip(range(start, steps), batches.iterate(start, steps), strict=True):
            hooks.on_step(step)
            if step == save_cache_at:  # the first step compiled every graph
                _save_compile_cache(compile_cache)
            throughput.step(step)
            update(step, images, frames)
            done = step + 1
            progress.update()
            if done % k.log_every == 0 or done == steps:
                _check_finite(learners)
                with_val = rank == 0 and k.eval_every and (done % k.eval_every == 0 or done == steps)
                for learner in learners:
                    learner.log(done, world, val_set if with_val else None, cfg, device)
                progress.logged(done, learners)
            checkpoints.after(done)
    measured = throughput.result()

    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank > 0:
            return {"rank": rank, "steps": steps}
    info = _write_students(cfg, learners, classes, teacher, budget, clock(), Path(out_dir)) | measured
    (Path(out_dir) / "model.json").write_text(json.dumps(info | {"members": ["member-0.safetensors"]}, indent=1))
    log.info("distilled %d steps in %.1fs", steps - start, info["wall_s"])
    return info


def _budget(k: DistillConfig, n: int) -> config.Budget:
    """The run's steps and warmup for `n` train images (`config.distill_budget`: `distill.epochs`, or derived
    from `n` when it is 0, capped by `distill.max_images`), logged in one line; the warmup must be shorter."""
    budget = config.distill_budget(k, n)
    if budget.warmup >= budget.steps:
        raise ConfigError(
            f"distill.warmup_steps={k.warmup_steps} is not allowed: this run has only {budget.steps} "
            f"steps ({budget.how}; {n} images / batch {k.batch_size}); expected fewer"
        )
    log.info(
        "distill budget: %d steps × batch %d = %d images seen (%.4g epochs of %d), warmup %d: %s",
        budget.steps,
        k.batch_size,
        budget.steps * k.batch_size,
        budget.epochs,
        n,
        budget.warmup,
        budget.how,
    )
    return budget


class _Teacher:
    """The teacher (or ensemble): frozen, eval mode, outside the optimizer and the checkpoints."""

    def __init__(
        self, teacher_dir: str | Path, classes: list[str] | None, device: torch.device, fmt: torch.memory_format
    ) -> None:
        """`classes`: the dataset's, which the teacher's must equal (None: no labels, nothing to check)."""
        members, self.info = models.load_bundle(teacher_dir, device)
        if classes is not None and self.info["classes"] != classes:
            raise DataError(f"teacher classes {self.info['classes'][:5]}... differ from the dataset's {classes[:5]}...")
        self.members = [models.freeze(t) for t in members]
        self.resolutions = resolutions(self.info)  # one per ensemble member
        self.views_of = sorted(set(self.resolutions))  # the teacher views each step makes
        for t in self.members:
            t.to(memory_format=fmt)
        self.forward: list[Callable[[torch.Tensor], torch.Tensor]] = list(self.members)

    def compile(self, rt: config.RuntimeConfig) -> None:
        if rt.compile:
            self.forward = [torch.compile(t, mode=rt.compile_mode) for t in self.members]

    def __call__(self, views: list[torch.Tensor], amp: Any) -> torch.Tensor:
        """The (ensembled) logits of one step's views, one view per resolution in `views_of`."""
        by_res = dict(zip(self.views_of, views, strict=True))
        with torch.no_grad(), amp:
            return ensemble_logits([t(by_res[r]).float() for t, r in zip(self.forward, self.resolutions, strict=True)])

    def fixed_targets(self, dataset_dir: str | Path, cfg: Config, device: torch.device, amp: Any) -> torch.Tensor:
        """The fixed teacher's target logits of every train image, shard by shard (the split need not fit
        in memory), by variant: fix/cc (alias `fixed`) the central crop (the eval view, big_vision's
        `resize_small(H)|central_crop(L)`); fix/rs the whole image resized (`augment.resized_view`);
        fix/ic_ens the average of the teacher's predictions over `distill.ensemble_crops` inception crops
        + flips (`ensemble_targets`). Each view is taken from the image's own frame."""
        train = prepared.ShardedImages(dataset_dir, "train")
        variant = config.canonical_setup(cfg.distill.setup)
        out = []
        for a, c in zip(train.starts[:-1], train.counts, strict=True):
            images = torch.from_numpy(train.gather(np.arange(a, a + c)))
            frames = torch.from_numpy(train.frames(np.arange(a, a + c)))
            if variant == "fix/cc":
                out.append(predict(self.members, images, self.resolutions, cfg.eval, device, frames))
            elif variant == "fix/rs":

                def resized(b: torch.Tensor, r: int, rows: slice, frames: torch.Tensor = frames) -> torch.Tensor:
                    return augment.resized_view(b, r, frames[rows])

                out.append(self.batched(images, resized, cfg.eval.batch_size, device, amp))
            else:
                gen = augment.step_generator(cfg.runtime.seed, int(a), stream=ENSEMBLE_STREAM)
                out.append(ensemble_targets(self, images, cfg, gen, device, amp, frames))
        return torch.cat(out).to(device)

    def batched(
        self,
        images_u8: torch.Tensor,
        view: Callable[[torch.Tensor, int, slice], torch.Tensor],
        batch_size: int,
        device: torch.device,
        amp: Any,
    ) -> torch.Tensor:
        """The (ensembled) logits (float32, CPU) of `view(batch, res, rows)` per teacher resolution, batch by
        batch (`rows`: the batch's rows in `images_u8`)."""
        out = []
        for start in range(0, len(images_u8), batch_size):
            rows = slice(start, start + batch_size)
            batch = runtime.to_device(images_u8[rows], device)
            out.append(self([view(batch, r, rows) for r in self.views_of], amp).cpu())
        return torch.cat(out) if out else torch.zeros(0)


ENSEMBLE_STREAM = 2  # the step_generator stream of fix/ic_ens's crops (0: the training views)


def ensemble_targets(
    teacher: _Teacher,
    images_u8: torch.Tensor,
    cfg: Config,
    generator: torch.Generator,
    device: torch.device,
    amp: Any,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """fix/ic_ens targets of `images_u8`: the teacher's prediction averaged over K = distill.ensemble_crops
    inception crops + flips per image (paper §3.1.1: "the average of 1k inception crops"), averaged as
    probabilities at the distillation temperature t and returned as logits t·log(mean_k softmax(z_k / t)),
    so that the loss's softmax(target / t) is exactly that average. Crop k of every image is drawn from
    `generator` before crop k+1, so the result does not depend on the eval batch size. The crops lie in
    each image's frame (`frames` N×2 (h, w); None: the whole canvas)."""
    k, t = cfg.distill, cfg.distill.temperature
    n = len(images_u8)
    height, width = augment.frame_sides(images_u8, frames)
    images_u8 = augment.fill_letterbox(images_u8, frames)  # crops sample the frames alone
    total: torch.Tensor | None = None
    for _ in range(k.ensemble_crops):
        boxes = augment.inception_boxes(n, height, width, (k.crop_min_area, k.crop_max_area), generator)
        flips = torch.rand(n, generator=generator) < 0.5

        def view(
            batch: torch.Tensor, res: int, rows: slice, boxes: torch.Tensor = boxes, flips: torch.Tensor = flips
        ) -> torch.Tensor:
            crops = augment.crop_resize(augment.to_float_nchw(batch), boxes[rows], res)
            return augment.value_range(augment.flip(crops, flips[rows]))

        log_p = torch.log_softmax(teacher.batched(images_u8, view, cfg.eval.batch_size, device, amp) / t, -1)
        total = log_p if total is None else torch.logaddexp(total, log_p)
    assert total is not None  # ensemble_crops >= 1 (validated)
    return t * (total - math.log(k.ensemble_crops))


def _val_set(dataset_dir: str | Path, teacher: _Teacher, cfg: Config, device: torch.device) -> ValSet:
    """The val split for curves during training, with the teacher's logits computed once."""
    vx, vy = (torch.from_numpy(a) for a in prepared.load_split(dataset_dir, "val"))
    vf = torch.from_numpy(prepared.load_frames(dataset_dir, "val"))
    return vx, vf, vy, predict(teacher.members, vx, teacher.resolutions, cfg.eval, device, vf)


class _Throughput:
    """Steady-state img/s, timed from a few steps in (after warm-up and compilation) to the end, and
    peak GPU memory. With runtime.sync_debug, CUDA warns from then on of any step that waits on the GPU."""

    def __init__(self, device: torch.device, start: int, steps: int, batch_size: int, sync_debug: bool) -> None:
        self.device, self.steps, self.batch_size, self.sync_debug = device, steps, batch_size, sync_debug
        self.first = start + min(10, (steps - start) // 4)
        self.began = 0.0

    def step(self, step: int) -> None:
        if step == self.first:
            runtime.synchronize(self.device)
            self.began = time.perf_counter()
            if self.sync_debug and self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")

    def result(self) -> dict:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        runtime.synchronize(self.device)
        seconds = time.perf_counter() - self.began
        return {
            "img_per_s": round((self.steps - self.first) * self.batch_size / seconds, 1)
            if self.steps > self.first
            else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if cuda else None,
        }


class _Progress:
    """The progress bar (rank 0) and TensorBoard scalars under the student artifact (rank 0)."""

    def __init__(self, out_dir: Path, rank: int, start: int, steps: int, batch_size: int) -> None:
        self.batch_size = batch_size
        self.board = _tensorboard(out_dir / "tensorboard") if rank == 0 else None
        self.bar = tqdm(
            total=steps * batch_size,
            initial=start * batch_size,
            desc="distill",
            unit="img",
            unit_scale=True,
            mininterval=2,
            file=sys.stderr,
            disable=rank > 0,
        )

    def __enter__(self) -> _Progress:
        return self

    def update(self) -> None:
        self.bar.update(self.batch_size)

    def logged(self, done: int, learners: list[Learner]) -> None:
        """Shows the newest history entries: the first student's loss on the bar, every scalar on the board."""
        self.bar.set_postfix(loss=learners[0].history[-1]["loss"])
        if self.board:
            for i, learner in enumerate(learners):
                for key, value in learner.history[-1].items():
                    if key != "step":
                        self.board.add_scalar(f"{learner.arch}@{learner.res}/{key}" if i else key, value, done)

    def __exit__(self, *exc: object) -> None:
        if self.board:
            self.board.close()
        self.bar.close()


def _tensorboard(path: Path) -> Any:
    """A TensorBoard event writer under the student artifact (the Kubeflow UI can serve it); None
    where the tensorboard package is missing (e.g. a bare GPU box running from source)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no event files (history.json still has the curves)")
        return None
    return SummaryWriter(str(path))


class _Checkpoints:
    """Checkpoint cadence (rank 0: by step, by time, at the end) and preemption: a SIGTERM becomes a flag
    read between steps, which checkpoints the step done and exits PREEMPTED_EXIT for the retry to resume.
    Before any save, the students' losses since the last check must be finite."""

    def __init__(self, learners: list[Learner], rank: int, steps: int, hooks: Hooks) -> None:
        self.learners, self.steps, self.hooks = learners, steps, hooks
        self.ckpt = learners[0].ckpt if rank == 0 else None  # the first student's step commits them all
        self.preempted = False
        self._previous: Any = None

    def __enter__(self) -> _Checkpoints:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: no handler, no preemption checkpoint
            self._previous = None
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.preempted = True

    def after(self, done: int) -> None:
        """After step `done`: checkpoints when due or preempted; exits when preempted."""
        stop = self.preempted  # read once: a SIGTERM between the two checks still checkpoints
        if self.ckpt and (stop or done == self.steps or self.ckpt.due(done)):
            _check_finite(self.learners)
            for learner in reversed(self.learners):  # the first student last: its step commits them all
                learner.save(done)
            self.hooks.on_checkpoint(done, self.ckpt)
        if stop:
            log.warning("SIGTERM: checkpoint written at step %d; exiting for the retry to resume", done)
            sys.exit(PREEMPTED_EXIT)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Learner:
    """One student: model, optimizer, DDP/compiled forward, checkpoints, running loss and history."""

    def __init__(
        self,
        arch: str,
        res: int,
        stem_pool: str,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        forward: Callable[[torch.Tensor], torch.Tensor],
        ckpt: CheckpointManager | None,
        resume_step: int | None = None,
    ) -> None:
        self.arch, self.res, self.stem_pool = arch, res, stem_pool
        self.model, self.opt, self.forward, self.ckpt = model, opt, forward, ckpt
        self.start, self.history = 0, []
        self.running, self.window = torch.zeros((), device=next(model.parameters()).device), 0
        self.unchecked: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, grad norm) on the device
        loaded = ckpt.load_latest(only_step=resume_step or None) if ckpt else None
        if ckpt and resume_step and not loaded:
            raise CheckpointError(
                f"{ckpt.directory} has no valid checkpoint at step {resume_step}, where the "
                "first student resumes; delete both checkpoint directories to start over"
            )
        if loaded:
            CheckpointManager.restore(loaded, model, opt)
            self.start, self.history = loaded.step, loaded.meta["extra"].get("history", [])
            running, self.window = loaded.meta["extra"].get("loss_window", (0.0, 0))  # steps since the last log
            self.running.fill_(float(running))
        model.train()

    def step(self, x: torch.Tensor, target: torch.Tensor, lr: float, amp: Any, k: DistillConfig, done: int) -> None:
        """One update towards `target`; `done`: the steps done after it (where a non-finite loss is reported)."""
        optim.set_lr(self.opt, lr)
        with amp:
            loss = kd_loss(self.forward(x), target, k.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), k.grad_clip_norm)
        self.opt.step()
        self.running += loss.detach()
        self.window += 1
        self.unchecked.append((done, loss.detach(), norm))

    def first_non_finite(self) -> tuple[int, str] | None:
        """(step, what) of the first step since the last call whose loss or gradient norm (all ranks'
        gradients, under DDP) was NaN or infinite; None when all were finite. Reads the device once."""
        unchecked, self.unchecked = self.unchecked, []
        if not unchecked:
            return None
        values = torch.stack([v.float() for _, loss, norm in unchecked for v in (loss, norm)]).view(-1, 2).cpu()
        bad = (~torch.isfinite(values)).any(1).nonzero()
        if not len(bad):
            return None
        i = int(bad[0])
        loss, norm = values[i].tolist()
        return unchecked[i][0], f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({norm}; loss {loss})"

    def log(self, done: int, world: int, val_set: ValSet | None, cfg: Config, device: torch.device) -> None:
        """Appends the mean loss since the last log (over all ranks), the lr and, given `val_set`, val metrics."""
        if world > 1:
            torch.distributed.all_reduce(self.running)
            self.running /= world
        entry = {
            "step": done,
            "loss": round(self.running.item() / self.window, 5),
            "lr": self.opt.param_groups[0]["lr"],
        }
        self.running.zero_()
        self.window = 0
        if val_set:
            entry |= _val_metrics(self.model, val_set, self.res, cfg, device)
            self.model.train()
        self.history.append(entry)

    def save(self, done: int) -> None:
        assert self.ckpt is not None  # only learners with a checkpoint directory are saved
        self.ckpt.save(
            done, self.model, self.opt, {"history": self.history, "loss_window": [self.running.item(), self.window]}
        )


def _check_finite(learners: list[Learner]) -> None:
    """Raises TrainingError at the first non-finite loss of any student since the last check, naming the
    step and the last good checkpoint (the first student's, which every student resumes at)."""
    for i, learner in enumerate(learners):
        found = learner.first_non_finite()
        if found is None:
            continue
        step, what = found
        student = f" of student {learner.arch}@{learner.res}" if i else ""
        ckpt = learners[0].ckpt
        last = ckpt.latest_step() if ckpt else None
        where = (
            "no checkpoint directory was given"
            if ckpt is None
            else f"no checkpoint was written in {ckpt.directory}"
            if last is None
            else f"the last good checkpoint is step {last} in {ckpt.directory}"
        )
        raise TrainingError(f"distill: non-finite {what} at step {step}{student}; {where}")


def _students(
    cfg: Config,
    specs: list[tuple[str, int]],
    num_classes: int,
    device: torch.device,
    fmt: torch.memory_format,
    world: int,
    out_dir: str | Path,
    checkpoint_dir: str,
    allow_config_change: bool,
) -> list[Learner]:
    """One learner per (arch, resolution), the first student's checkpoints in `checkpoint_dir`, the i-th
    further one's in `checkpoint_dir`-extra<i>; further students resume at the first one's step."""
    learners: list[Learner] = []
    for i, (arch, res) in enumerate(specs):
        learners.append(
            _learner(
                cfg,
                arch,
                res,
                num_classes,
                device,
                fmt,
                world,
                out_dir,
                f"{checkpoint_dir}{'' if i == 0 else f'-extra{i}'}" if checkpoint_dir else "",
                allow_config_change,
                resume_step=learners[0].start if learners else None,
            )
        )
    return learners


def _learner(
    cfg: Config,
    arch: str,
    res: int,
    num_classes: int,
    device: torch.device,
    fmt: torch.memory_format,
    world: int,
    out_dir: str | Path,
    checkpoint_dir: str,
    allow_config_change: bool,
    resume_step: int | None = None,
) -> Learner:
    s, k = cfg.student, cfg.distill
    # Initialised from (seed, arch, resolution): a student starts the same alone or beside others.
    torch.manual_seed(zlib.crc32(f"{cfg.runtime.seed}:{arch}:{res}".encode()))
    init = storage.fetch(s.init, Path(out_dir).parent / ".cache") if split_uris(s.init) and arch == s.arch else ""
    stem_pool = models.init_stem_pool(init, s.stem_pool, "student.stem_pool") if init else s.stem_pool
    model = models.create_model(arch, num_classes, stem_pool=stem_pool, zero_head=s.zero_head, device=device)
    if init:
        models.load_init(model, arch, init, load_head=False)
        model.to(device)
    model.to(memory_format=fmt)
    opt = optim.distill_optimizer(model, k.lr, k.weight_decay, k.optimizer)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if world > 1:  # only students are wrapped: the frozen teacher stays outside DDP
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    forward = torch.compile(forward, mode=cfg.runtime.compile_mode) if cfg.runtime.compile else forward
    ckpt = (
        CheckpointManager(
            checkpoint_dir,
            cfg.hash(),
            keep=k.keep_checkpoints,
            every_steps=k.checkpoint_every_steps,
            every_minutes=k.checkpoint_every_minutes,
            allow_config_change=allow_config_change,
        )
        if checkpoint_dir
        else None
    )
    return Learner(arch, res, stem_pool, model, opt, forward, ckpt, resume_step)


def _write_students(
    cfg: Config,
    learners: list[Learner],
    classes: list[str],
    teacher: _Teacher,
    budget: config.Budget,
    wall_s: float,
    out_dir: Path,
) -> dict:
    """Each student as a model bundle with its history.json (the first in `out_dir`, others in extra-<i>);
    returns the first's info."""
    k, s = cfg.distill, cfg.student
    common = {
        "role": "student",
        "classes": classes,
        "crop_pct": cfg.eval.crop_pct,
        "teacher": teacher.info["arch"],
        "teacher_resolution": teacher.resolutions[0],
        "teacher_stem_pool": teacher.info.get("stem_pool", "zero_pad"),
        "setup": k.setup,
        "steps": budget.steps,
        "epochs": budget.epochs,  # what ran: derived or capped budgets differ from distill.epochs
        "images_seen": budget.steps * k.batch_size,
        "budget": budget.how,
        "config_hash": cfg.hash(),
        "wall_s": wall_s,
    }
    for i, learner in enumerate(learners):
        target_dir = out_dir if i == 0 else out_dir / f"extra-{i}"
        learner.model.eval()
        models.save_bundle(
            target_dir,
            [learner.model.cpu()],
            common | {"arch": learner.arch, "resolution": learner.res, "stem_pool": learner.stem_pool},
        )
        (target_dir / "history.json").write_text(json.dumps(learner.history))
    return common | {
        "arch": s.arch,
        "resolution": s.resolution,
        "stem_pool": learners[0].stem_pool,
        "extra_students": [f"extra-{i}" for i in range(1, len(learners))],
    }


def _compile_cache_uri(cfg: Config, checkpoint_dir: str, device: torch.device) -> str:
    """The compile cache file for this torch and device ('' without runtime.compile or a place to keep it)."""
    root = cfg.runtime.compile_cache or (storage.join(checkpoint_dir, "compile-cache") if checkpoint_dir else "")
    if not (cfg.runtime.compile and root):
        return ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    file = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{torch.__version__}-{name}.bin")
    return storage.join(root, file)


def _load_compile_cache(uri: str) -> bool:
    if not storage.exists(uri):
        return False
    try:
        info = torch.compiler.load_cache_artifacts(storage.read_bytes(uri))
    except Exception as e:  # noqa: BLE001 (a speed-up only: a bad cache file costs a recompile, not the run)
        log.warning("compile cache %s not loaded (%s: %s); compiling afresh", uri, type(e).__name__, e)
        return False
    log.info(
        "compile cache: %d inductor, %d autograd artifacts loaded from %s",
        len(info.inductor_artifacts) if info else 0,
        len(info.aot_autograd_artifacts) if info else 0,
        uri,
    )
    return True


def _save_compile_cache(uri: str) -> None:
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return
    try:
        storage.write_bytes(uri, saved[0])
    except (OSError, storage.StorageError) as e:
        log.warning("compile cache not saved to %s (%s: %s)", uri, type(e).__name__, e)
        return
    log.info("compile cache: %d bytes saved to %s", len(saved[0]), uri)


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def _val_metrics(student: torch.nn.Module, val_set: ValSet, res: int, cfg: Config, device: torch.device) -> dict:
    vx, vf, vy, t_logits = val_set
    student.eval()
    s_logits = predict([student], vx, res, cfg.eval, device, vf)
    d = distances(s_logits, t_logits)
    labelled = bool((vy != prepared.NO_LABEL).all())  # data.labels=none: agreement with the teacher only
    return ({"val_prec@1": round(prec1(s_logits, vy), 4)} if labelled else {}) | {
        "val_agree@1": round(d["agree@1"], 4),
        "val_kl": round(d["kl"], 4),
    }
