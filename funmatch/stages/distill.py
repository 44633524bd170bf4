"""Stage 3, distillation by function matching (Beyer et al. 2022), one readable loop.

Every step: take the next batch of the seeded data stream, make the setup's views on the training
device (`funmatch`: one inception crop + flip, resized for each model, plus mixup of the batch with
itself rolled by one), run the frozen teacher online (eval mode, WS folded, no grad), and fit the
student to it with t²·KL(teacher ‖ student) — no label term — using Adam with global-norm clipping,
decoupled weight decay on kernels and warmup + cosine. The loss is read back only every
`log_every` steps, so the step never waits on the host. Checkpoints go to `checkpoint_dir` by step
and by time; a SIGTERM (preemption) saves one and exits non-zero so the task retry resumes.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from funmatch import runtime, storage
from funmatch.data import prepared, loader
from funmatch.recipe import augment, models, optim
from funmatch.storage.checkpoint import CheckpointManager
from funmatch import config
from funmatch.config import Config, split_uris
from funmatch.errors import CheckpointError, ConfigError, DataError
from funmatch.stages.evaluate import distances, predict, resolutions
from funmatch.recipe.losses import ensemble_logits, kd_loss

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 143  # 128 + SIGTERM


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Preemption":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption checkpoint
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path,
        checkpoint_dir: str = "", allow_config_change: bool = False) -> dict:
    """Distils the teacher artifact into a student artifact in `out_dir`; returns its info."""
    clock = runtime.Stopwatch()
    device = runtime.setup(cfg.runtime)
    k, s, seed = cfg.distill, cfg.student, cfg.runtime.seed
    rank, world, device = _distributed(device)  # torchrun: one process per GPU, the global batch split
    if k.batch_size % world:
        raise ConfigError(f"distill.batch_size={k.batch_size} is not allowed: it must divide evenly over "
                          f"{world} processes (the global batch is preserved)")

    # Data: the train split resident on the device as uint8 (views are made there, per batch), or, when
    # larger than runtime.resident_max_gb, streamed from the shards by parallel decode workers.
    manifest = prepared.read_manifest(dataset_dir)
    batches = loader.Batches(dataset_dir, device, cfg.runtime.resident_max_gb, k.batch_size, seed,
                             augment.shard_rows(k.batch_size, k.setup, (rank, world)),
                             cfg.runtime.loader_workers, cfg.runtime.jpeg_decode)
    n = batches.n
    steps = optim.total_steps(k.epochs, n, k.batch_size)
    if k.warmup_steps >= steps:
        raise ConfigError(f"distill.warmup_steps={k.warmup_steps} is not allowed: this run has only {steps} "
                          f"steps ({k.epochs} epochs × {n} images / batch {k.batch_size}); expected fewer")

    # Teacher(s): frozen, eval mode, outside the optimizer and the checkpoints.
    teachers, t_info = models.load_bundle(teacher_dir, device)
    if t_info["classes"] != manifest["classes"]:
        raise DataError(f"teacher classes {t_info['classes'][:5]}... differ from the dataset's "
                        f"{manifest['classes'][:5]}...")
    teachers = [models.freeze(t) for t in teachers]
    t_res = resolutions(t_info)  # one per ensemble member

    # Students: from scratch with a zero head (the paper's default), each with its own optimizer and
    # checkpoints; one teacher forward per step feeds all of them.
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # NHWC convs on GPUs
    for t in teachers:
        t.to(memory_format=fmt)
    specs = [(s.arch, s.resolution)] + config.extra_students(k)
    learners: list[Learner] = []
    for i, (arch, res) in enumerate(specs):  # further students resume at the first one's step
        learners.append(_learner(cfg, arch, res, manifest["num_classes"], device, fmt, world, out_dir,
                                 f"{checkpoint_dir}{'' if i == 0 else f'-extra{i}'}" if checkpoint_dir else "",
                                 allow_config_change or cfg.runtime.allow_config_change,
                                 resume_step=learners[0].start if learners else None))
    amp = runtime.autocast(device, cfg.runtime.precision)
    views_of = sorted(set(t_res))
    student_res = [r for _, r in specs]

    # The teacher forward is 80-90 % of a step's compute: compiled too when runtime.compile is set. The
    # compiled artifacts persist next to the checkpoints: a retry on a fresh node does not recompile.
    compile_cache = _compile_cache_uri(cfg, checkpoint_dir, device)
    cudagraphs = cfg.runtime.compile and device.type == "cuda" and cfg.runtime.compile_mode in ("reduce-overhead",
                                                                                                 "max-autotune")
    cache_loaded = bool(compile_cache) and _load_compile_cache(compile_cache)
    teacher_fwd = [torch.compile(t, mode=cfg.runtime.compile_mode) for t in teachers] if cfg.runtime.compile else teachers

    def teach(views: list[torch.Tensor]) -> torch.Tensor:
        by_res = dict(zip(views_of, views))
        with torch.no_grad(), amp:
            return ensemble_logits([t(by_res[r]).float() for t, r in zip(teacher_fwd, t_res)])

    # `fixed`: the teacher's targets once per image, on the central crop, reused every step.
    fixed_logits = None
    if k.setup == "fixed":  # shard by shard: the split need not fit in memory
        train = prepared.ShardedImages(dataset_dir, "train")
        fixed_logits = torch.cat([predict(teachers, torch.from_numpy(train.gather(np.arange(a, a + c))), t_res, cfg.eval,
                                          device) for a, c in zip(train.starts[:-1], train.counts)]).to(device)

    # Validation set for curves during training (teacher logits computed once).
    val_eval = None
    if k.eval_every:
        vx, vy = prepared.load_split(dataset_dir, "val")
        vx, vy = torch.from_numpy(vx), torch.from_numpy(vy)
        val_eval = vx, vy, predict(teachers, vx, t_res, cfg.eval, device)

    # Resume every student from its newest valid checkpoint (they are saved at the same steps).
    start = learners[0].start
    if start:
        log.info("resumed from %s at step %d of %d", checkpoint_dir, start, steps)
    log.info("distill %s→%s, setup %s: %d steps × batch %d (%.4g epochs of %d), t=%g, lr %g, wd %g, %s→%spx on %s",
             t_info["arch"], ", ".join(a for a, _ in specs), k.setup, steps, k.batch_size, k.epochs, n,
             k.temperature, k.lr, k.weight_decay, t_res, student_res, device)
    board = _tensorboard(Path(out_dir) / "tensorboard") if rank == 0 else None
    bar = tqdm(total=steps * k.batch_size, initial=start * k.batch_size, desc="distill", unit="img",
               unit_scale=True, mininterval=2, file=sys.stderr, disable=rank > 0)
    local = slice(rank * k.batch_size // world, (rank + 1) * k.batch_size // world)
    timed_from = start + min(10, (steps - start) // 4)  # steady-state throughput: after warm-up / compile
    timer = 0.0
    with _Preemption() as preemption:
        for step, images in zip(range(start, steps), batches.iterate(start, steps)):
            if cudagraphs:  # several compiled graphs run per step: tell CUDA graph trees where a step begins
                torch.compiler.cudagraph_mark_step_begin()
            g = augment.step_generator(seed, step)
            t_in, s_in = augment.distill_views(images, k.setup, views_of, student_res,
                                               (k.crop_min_area, k.crop_max_area), g, shard=(rank, world),
                                               batch_size=k.batch_size)
            if step == start + 1 and compile_cache and not cache_loaded and rank == 0:
                _save_compile_cache(compile_cache)  # the first step compiled every graph
            if step == timed_from:
                _sync(device)
                timer = time.perf_counter()
                if cfg.runtime.sync_debug and device.type == "cuda":  # the step should never wait on the GPU
                    torch.cuda.set_sync_debug_mode("warn")
            if fmt is torch.channels_last:
                s_in = [x.contiguous(memory_format=fmt) for x in s_in]
                t_in = t_in and [t.contiguous(memory_format=fmt) for t in t_in]
            if fixed_logits is not None:
                target = fixed_logits[runtime.to_device(prepared.batch_indices(step, k.batch_size, n, seed)[local], device)]
            else:
                target = teach(t_in)
            lr_now = k.lr * optim.warmup_cosine(step, k.warmup_steps, steps)
            for learner, x in zip(learners, s_in):
                learner.step(x, target, lr_now, amp, k)
            bar.update(k.batch_size)
            done = step + 1
            if done % k.log_every == 0 or done == steps:
                for learner in learners:
                    learner.log(done, world, val_eval if rank == 0 and k.eval_every and
                                (done % k.eval_every == 0 or done == steps) else None, cfg, device)
                bar.set_postfix(loss=learners[0].history[-1]["loss"])
                if board:
                    for i, learner in enumerate(learners):
                        for key, value in learner.history[-1].items():
                            if key != "step":
                                board.add_scalar(f"{learner.arch}@{learner.res}/{key}" if i else key, value, done)
            stop = preemption.requested  # read once: a SIGTERM between the two checks still checkpoints
            if rank == 0 and learners[0].ckpt and (stop or done == steps or learners[0].ckpt.due(done)):
                for learner in reversed(learners):  # the first student last: its step commits them all
                    learner.save(done)
            if stop:
                bar.close()
                log.warning("SIGTERM: checkpoint written at step %d; exiting for the retry to resume", done)
                sys.exit(PREEMPTED_EXIT)
    if board:
        board.close()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    measured = {"img_per_s": round((steps - timed_from) * k.batch_size / (time.perf_counter() - timer), 1)
                if steps > timed_from else None,
                "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}
    bar.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank > 0:
            return {"rank": rank, "steps": steps}

    common = {"role": "student", "classes": manifest["classes"], "crop_pct": cfg.eval.crop_pct,
              "teacher": t_info["arch"], "teacher_resolution": t_res[0], "setup": k.setup, "steps": steps,
              "epochs": k.epochs, "images_seen": steps * k.batch_size, "config_hash": cfg.hash(), "wall_s": clock()}
    for i, learner in enumerate(learners):
        target_dir = Path(out_dir) if i == 0 else Path(out_dir) / f"extra-{i}"
        learner.model.eval()
        models.save_bundle(target_dir, [learner.model.cpu()],
                           common | {"arch": learner.arch, "resolution": learner.res, "stem_pool": s.stem_pool})
        (target_dir / "history.json").write_text(json.dumps(learner.history))
    info = common | {"arch": s.arch, "resolution": s.resolution, "stem_pool": s.stem_pool,
                     "extra_students": [f"extra-{i}" for i in range(1, len(learners))]} | measured
    (Path(out_dir) / "model.json").write_text(json.dumps(info | {"members": ["member-0.safetensors"]}, indent=1))
    log.info("distilled %d steps in %.1fs", steps - start, info["wall_s"])
    return info


def _tensorboard(path: Path):
    """A TensorBoard event writer under the student artifact (the Kubeflow UI can serve it); None
    where the tensorboard package is missing (e.g. a bare GPU box running from source)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no event files (history.json still has the curves)")
        return None
    return SummaryWriter(str(path))


class Learner:
    """One student: model, optimizer, DDP/compiled forward, checkpoints, running loss and history."""

    def __init__(self, arch: str, res: int, model, opt, forward, ckpt: CheckpointManager | None,
                 resume_step: int | None = None) -> None:
        self.arch, self.res, self.model, self.opt, self.forward, self.ckpt = arch, res, model, opt, forward, ckpt
        self.start, self.history = 0, []
        self.running, self.window = torch.zeros((), device=next(model.parameters()).device), 0
        loaded = ckpt.load_latest(only_step=resume_step or None) if ckpt else None
        if ckpt and resume_step and not loaded:
            raise CheckpointError(f"{ckpt.directory} has no valid checkpoint at step {resume_step}, where the "
                                  "first student resumes; delete both checkpoint directories to start over")
        if loaded:
            CheckpointManager.restore(loaded, model, opt)
            self.start, self.history = loaded.step, loaded.meta["extra"].get("history", [])
            running, self.window = loaded.meta["extra"].get("loss_window", (0.0, 0))  # steps since the last log
            self.running.fill_(float(running))
        model.train()

    def step(self, x: torch.Tensor, target: torch.Tensor, lr: float, amp, k) -> None:
        optim.set_lr(self.opt, lr)
        with amp:
            loss = kd_loss(self.forward(x), target, k.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), k.grad_clip_norm)
        self.opt.step()
        self.running += loss.detach()
        self.window += 1

    def log(self, done: int, world: int, val_eval, cfg: Config, device) -> None:
        if world > 1:
            torch.distributed.all_reduce(self.running)
            self.running /= world
        entry = {"step": done, "loss": round(self.running.item() / self.window, 5),
                 "lr": self.opt.param_groups[0]["lr"]}
        self.running.zero_()
        self.window = 0
        if val_eval:
            entry |= _val_metrics(self.model, val_eval, self.res, cfg, device)
            self.model.train()
        self.history.append(entry)

    def save(self, done: int) -> None:
        self.ckpt.save(done, self.model, self.opt,
                       {"history": self.history, "loss_window": [self.running.item(), self.window]})


def _learner(cfg: Config, arch: str, res: int, num_classes: int, device, fmt, world: int, out_dir,
             checkpoint_dir: str, allow_config_change: bool, resume_step: int | None = None) -> Learner:
    s, k = cfg.student, cfg.distill
    # Initialised from (seed, arch, resolution): a student starts the same alone or beside others.
    torch.manual_seed(zlib.crc32(f"{cfg.runtime.seed}:{arch}:{res}".encode()))
    model = models.create_model(arch, num_classes, stem_pool=s.stem_pool, zero_head=s.zero_head, device=device)
    if split_uris(s.init) and arch == s.arch:
        models.load_init(model, arch, storage.fetch(s.init, Path(out_dir).parent / ".cache"), load_head=False)
        model.to(device)
    model.to(memory_format=fmt)
    opt = optim.distill_optimizer(model, k.lr, k.weight_decay, k.optimizer)
    forward = model
    if world > 1:  # only students are wrapped: the frozen teacher stays outside DDP
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    forward = torch.compile(forward, mode=cfg.runtime.compile_mode) if cfg.runtime.compile else forward
    ckpt = CheckpointManager(checkpoint_dir, cfg.hash(), keep=k.keep_checkpoints, every_steps=k.checkpoint_every_steps,
                             every_minutes=k.checkpoint_every_minutes,
                             allow_config_change=allow_config_change) if checkpoint_dir else None
    return Learner(arch, res, model, opt, forward, ckpt, resume_step)


def _compile_cache_uri(cfg: Config, checkpoint_dir: str, device: torch.device) -> str:
    """The compile cache file for this torch and device ('' without runtime.compile or a place to keep it)."""
    root = cfg.runtime.compile_cache or (storage.join(checkpoint_dir, "compile-cache") if checkpoint_dir else "")
    if not (cfg.runtime.compile and root):
        return ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return storage.join(root, "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{torch.__version__}-{name}.bin"))


def _load_compile_cache(uri: str) -> bool:
    if not storage.exists(uri):
        return False
    try:
        info = torch.compiler.load_cache_artifacts(storage.read_bytes(uri))
    except Exception as e:  # a speed-up only: a bad cache file costs a recompile, not the run
        log.warning("compile cache %s not loaded (%s: %s); compiling afresh", uri, type(e).__name__, e)
        return False
    log.info("compile cache: %d inductor, %d autograd artifacts loaded from %s", len(info.inductor_artifacts) if info else 0,
             len(info.aot_autograd_artifacts) if info else 0, uri)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _val_metrics(student, val_eval, res: int, cfg: Config, device) -> dict:
    vx, vy, t_logits = val_eval
    student.eval()
    s_logits = predict([student], vx, res, cfg.eval, device)
    d = distances(s_logits, t_logits)
    return {"val_prec@1": round(float((s_logits.argmax(1) == vy).float().mean()), 4),
            "val_agree@1": round(d["agree@1"], 4), "val_kl": round(d["kl"], 4)}
