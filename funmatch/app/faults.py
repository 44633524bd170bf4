"""Fault injection for the distill stage: kill it at seeded random steps, restart it, compare weights.

`funmatch fault-test` runs `funmatch.stages.distill.run` in a worker process (`python -m funmatch.app.faults
worker ...`, on the CPU) on one dataset and teacher: once uninterrupted (the reference), then once
per signal, signalled at `kills` seeded random steps and started again after every kill on the same
checkpoint directory until it finishes. The final student weights must be bit-identical to the
reference's. SIGKILL stops the worker wherever it is (mid-step, mid-checkpoint write; a seeded
fraction of a steady step's time is waited after the step starts); SIGTERM is a preemption notice: the
loop finishes its step, checkpoints and exits 143.

The worker announces on stdout the step it resumed from, each step it begins and each checkpoint
it has committed, through the loop's public callbacks (`funmatch.stages.distill.Hooks`: on_start,
on_step, on_checkpoint). From those lines the parent accounts for each kill:

- steps redone: steps the killed worker had completed, less the step its successor resumed from
  (a step counts as completed once the next one began or its checkpoint was committed);
- bytes lost: size of the committed checkpoints that should still be there (the newest
  `distill.keep_checkpoints`) but are missing or fail their checksum after the kill; 0 means no
  kill ever cost a completed checkpoint;
- stray bytes: temporary files of interrupted checkpoint writes left in the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from funmatch import runtime, storage
from funmatch.errors import PREEMPTED_EXIT, FunmatchError

if TYPE_CHECKING:
    from funmatch.storage.checkpoint import CheckpointManager

TAG = "@funmatch-fault"
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
# Worker settings the comparison needs; the user's --set values come after them and win.
DEFAULT_OVERRIDES = ["runtime.device=cpu", "distill.checkpoint_every_steps=3"]


class FaultTestError(FunmatchError):
    """The fault test could not run to its end (a worker crashed, hung or never reached a step)."""


# ---------------------------------------------------------------- the worker (a child process)


def _say(*words: Any) -> None:
    print(TAG, *words, flush=True)


def _bytes(ckpt: CheckpointManager | None, step: int) -> int:
    """The size of checkpoint `step` on disk (0 for step 0, the start from scratch)."""
    return sum(os.path.getsize(path) for path in ckpt.files(step)) if ckpt and step else 0


def worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m funmatch.app.faults worker")
    p.add_argument("--preset", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--dataset", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    a = p.parse_args(argv)

    import torch

    from funmatch import config
    from funmatch.stages import distill

    if a.deterministic:
        torch.use_deterministic_algorithms(True)
    cfg = config.load(a.preset, a.overrides)
    announce = distill.Hooks(
        on_start=lambda step, ckpt: _say("resumed", step, _bytes(ckpt, step)),
        on_step=lambda step: _say("step", step),
        on_checkpoint=lambda step, ckpt: _say("saved", step, _bytes(ckpt, step)),
    )
    distill.run(cfg, a.dataset, a.teacher, a.out, checkpoint_dir=a.checkpoint_dir, hooks=announce)  # SIGTERM: 143
    _say("finished")
    return 0


# ---------------------------------------------------------------- the parent


class _Attempt:
    """One worker process, watched line by line; signals it once when `kill_at` is reached."""

    def __init__(self, cmd: list[str], log_path: Path, timeout_s: float):
        self.cmd, self.log_path, self.timeout_s = cmd, log_path, timeout_s
        self.resumed: int | None = None
        self.resumed_bytes = 0
        self.completed = 0
        self.saves: list[tuple[int, int]] = []
        self.finished = False
        self.signalled_at: int | None = None
        self.timed_out = False
        self.exit_code: int | None = None
        self.wall_s = 0.0

    def run(self, kill_at: int | None, sig: signal.Signals | None, jitter: float) -> _Attempt:
        if kill_at is not None and sig is None:
            raise ValueError(f"kill_at={kill_at} needs a signal to send")
        start = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as log:
            proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

            def expire():
                self.timed_out = True
                proc.kill()

            watchdog = threading.Timer(self.timeout_s, expire)
            watchdog.start()
            step_starts: list[float] = []
            try:
                if proc.stdout is None:  # stdout=PIPE above always opens one
                    raise RuntimeError(f"no stdout pipe from {self.cmd}")
                for line in proc.stdout:
                    words = line.split()
                    if not words or words[0] != TAG:
                        continue
                    event, values = words[1], [int(v) for v in words[2:]]
                    if event == "resumed":
                        self.resumed = self.completed = values[0]
                        self.resumed_bytes = values[1]
                    elif event == "saved":
                        self.saves.append((values[0], values[1]))
                        self.completed = max(self.completed, values[0])
                    elif event == "finished":
                        self.finished = True
                    elif event == "step":
                        step = values[0]
                        self.completed = max(self.completed, step)
                        step_starts.append(time.perf_counter())
                        if kill_at is not None and sig is not None and self.signalled_at is None and step >= kill_at:
                            # land inside the step: a fraction of a steady step (the first one after a
                            # start includes warm-up and is not counted); none known yet: at its start
                            steady = [b - a for a, b in zip(step_starts[1:], step_starts[2:], strict=False)]
                            if jitter and steady:
                                time.sleep(jitter * min(steady))
                            if proc.poll() is None:
                                proc.send_signal(sig)
                                self.signalled_at = step
                self.exit_code = proc.wait()
            finally:
                watchdog.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        self.wall_s = time.perf_counter() - start
        return self

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _checkpoint_damage(ckpt_dir: Path, committed: dict[int, int], keep: int) -> tuple[int, list[int]]:
    """Bytes of the newest `keep` committed checkpoints that are missing or fail their checksum."""
    lost, damaged = 0, []
    for step in sorted(committed)[-keep:]:
        meta_path, blob_path = ckpt_dir / f"ckpt-{step:09d}.json", ckpt_dir / f"ckpt-{step:09d}.safetensors"
        try:
            meta = json.loads(meta_path.read_text())
            ok = storage.sha256_file(blob_path) == meta["sha256"]
        except (OSError, ValueError, KeyError):
            ok = False
        if not ok:
            lost += committed[step]
            damaged.append(step)
    return lost, damaged


def _stray_bytes(ckpt_dir: Path) -> int:
    """Temporary files of interrupted atomic writes (`.ckpt-*.tmp`)."""
    return sum(p.stat().st_size for p in ckpt_dir.glob(".*.tmp")) if ckpt_dir.exists() else 0


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def fault_test(
    preset: str = "demo-tiny",
    overrides: list[str] | None = None,
    kills: int = 5,
    signals: tuple[str, ...] = ("KILL",),
    seed: int = 0,
    workdir: str | Path | None = None,
    dataset_dir: str | Path | None = None,
    teacher_dir: str | Path | None = None,
    deterministic: bool = False,
    worker_timeout_s: float = 600.0,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict:
    """Runs the reference and one faulted distillation per signal; returns the report (see module doc)."""
    import numpy as np
    import torch

    from funmatch import config
    from funmatch.data import prepared

    clock = time.perf_counter()
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown or not signals:
        raise FaultTestError(f"signals {unknown or list(signals)} are not allowed: expected KILL and/or TERM")
    sets = DEFAULT_OVERRIDES + list(overrides or [])
    cfg = config.load(preset, sets)
    k = cfg.distill
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="funmatch-fault-"))
    work.mkdir(parents=True, exist_ok=True)

    # Dataset and teacher, shared by every run (prepared here unless given).
    if dataset_dir is None:
        from funmatch.stages import prepare

        dataset_dir = work / "dataset"
        if not (dataset_dir / "manifest.json").exists():
            log(f"fault-test: preparing the {preset} dataset in {dataset_dir}")
            prepare.run(cfg, dataset_dir)
    if teacher_dir is None:
        from funmatch.stages import finetune

        teacher_dir = work / "teacher"
        if not (teacher_dir / "model.json").exists():
            log(f"fault-test: making the teacher in {teacher_dir}")
            (finetune.run if cfg.teacher.finetune else finetune.given_teacher)(cfg, dataset_dir, teacher_dir)
    n = prepared.read_manifest(dataset_dir)["splits"]["train"]["count"]
    steps = config.distill_budget(k, n).steps  # what distill runs (distill.epochs=0: derived)
    if not 1 <= kills <= steps - 1:
        raise FaultTestError(
            f"--kills {kills} is not allowed: this run has {steps} steps, so 1 to {steps - 1} "
            "kills (one per step, never after the last)"
        )

    def command(name: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "funmatch.app.faults",
            "worker",
            "--preset",
            preset,
            "--dataset",
            str(dataset_dir),
            "--teacher",
            str(teacher_dir),
            "--out",
            str(work / name / "student"),
            "--checkpoint-dir",
            str(work / name / "checkpoints"),
        ]
        for s in sets:
            cmd += ["--set", s]
        return cmd + (["--deterministic"] if deterministic else [])

    def fresh(name: str) -> None:
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)

    # 1. The reference: uninterrupted.
    fresh("reference")
    log(f"fault-test: reference run, {steps} steps, checkpoint every {k.checkpoint_every_steps}")
    ref = _Attempt(command("reference"), work / "reference" / "worker-0.log", worker_timeout_s).run(None, None, 0)
    if not (ref.finished and ref.exit_code == 0):
        raise FaultTestError(f"the reference run failed (exit {ref.exit_code}); its log ends:\n{ref.log_tail()}")
    ref_weights = work / "reference" / "student" / "member-0.safetensors"
    machine = runtime.machine()
    report: dict[str, Any] = {
        "command": "funmatch fault-test "
        + " ".join(
            [
                f"--preset {preset}",
                f"--kills {kills}",
                f"--seed {seed}",
                "--signal " + ("both" if len(signals) > 1 else signals[0]),
            ]
            + [f"--set {s}" for s in overrides or []]
        ),
        "preset": preset,
        "overrides": sets,
        "config_hash": cfg.hash(),
        "steps": steps,
        "checkpoint_every_steps": k.checkpoint_every_steps,
        "keep_checkpoints": k.keep_checkpoints,
        "seed": seed,
        "deterministic_algorithms": deterministic,
        "machine": f"{machine['cpu']}, {machine['logical_cpus']} cores, {machine['os']}",
        "python": machine["python"],
        "torch": machine["torch"],
        "threads": cfg.runtime.num_threads or torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "workdir": str(work),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "reference": {"wall_s": round(ref.wall_s, 2), "sha256": storage.sha256_file(ref_weights)},
        "runs": [],
    }

    # 2. One faulted run per signal.
    for index, name in enumerate(signals):
        sig = SIGNALS[name]
        rng = np.random.default_rng([seed, index])
        targets = sorted(int(t) for t in rng.choice(np.arange(1, steps), size=kills, replace=False))
        jitters = [float(j) for j in rng.random(kills)] if name == "KILL" else [0.0] * kills
        fresh(name)
        ckpt_dir = work / name / "checkpoints"
        log(f"fault-test: SIG{name} at steps {targets}")
        committed: dict[int, int] = {}  # step -> bytes, checkpoints some worker announced as committed
        records: list[dict[str, Any]] = []
        attempts: list[_Attempt] = []
        pending = list(zip(targets, jitters, strict=True))
        while True:
            if len(attempts) > kills + 2:
                raise FaultTestError(f"SIG{name}: the worker did not finish after {len(attempts)} starts")
            kill_at, jitter = pending[0] if pending else (None, 0.0)
            a = _Attempt(command(name), work / name / f"worker-{len(attempts)}.log", worker_timeout_s)
            a.run(kill_at, sig, jitter)
            attempts.append(a)
            if records and records[-1]["resumed_from"] is None:  # the previous kill's successor
                prev = records[-1]
                prev["resumed_from"] = a.resumed
                if a.resumed is not None:
                    # negative when it died after committing a checkpoint but before announcing it
                    prev["steps_redone"] = max(0, prev["completed_at_death"] - a.resumed)
                    prev["survived"] = prev["bytes_lost"] == 0 and a.resumed >= prev["newest_committed"]
            if a.resumed:  # found valid in the directory: committed, whoever announced it
                committed.setdefault(a.resumed, a.resumed_bytes)
            committed.update(dict(a.saves))
            if a.timed_out:
                raise FaultTestError(
                    f"SIG{name}: a worker ran past {worker_timeout_s:.0f}s; its log ends:\n{a.log_tail()}"
                )
            if a.finished and a.exit_code == 0:
                if a.signalled_at is not None:  # the signal came after its last step: not a kill
                    log(f"fault-test: SIG{name} at step {a.signalled_at} landed after the run had finished")
                break
            expected = {-signal.SIGKILL} if name == "KILL" else {PREEMPTED_EXIT, -signal.SIGTERM}
            if a.signalled_at is None or a.exit_code not in expected:
                raise FaultTestError(
                    f"SIG{name}: worker {len(attempts) - 1} ended with exit {a.exit_code} "
                    f"(signalled at step {a.signalled_at}); its log ends:\n{a.log_tail()}"
                )
            pending.pop(0)
            lost, damaged = _checkpoint_damage(ckpt_dir, committed, k.keep_checkpoints)
            records.append(
                {
                    "target_step": kill_at,
                    "signalled_at_step": a.signalled_at,
                    "jitter": round(jitter, 3),
                    "exit_code": a.exit_code,
                    "completed_at_death": a.completed,
                    "newest_committed": max(committed, default=0),
                    "checkpointed_on_signal": a.exit_code == PREEMPTED_EXIT
                    and max(committed, default=0) == a.completed,
                    "bytes_lost": lost,
                    "damaged_checkpoints": damaged,
                    "resumed_from": None,
                    "steps_redone": None,
                    "survived": False,
                }
            )
        weights = work / name / "student" / "member-0.safetensors"
        history_same = (work / name / "student" / "history.json").read_text() == (
            work / "reference" / "student" / "history.json"
        ).read_text()
        sha = storage.sha256_file(weights)
        run = {
            "signal": f"SIG{name}",
            "kill_steps": targets,
            "kills_requested": kills,
            "kills_survived": sum(r["survived"] for r in records),
            "kills": records,
            "steps_redone": sum(r["steps_redone"] or 0 for r in records),
            "bytes_lost": sum(r["bytes_lost"] for r in records),
            "stray_bytes": _stray_bytes(ckpt_dir),
            "starts": len(attempts),
            "wall_s": round(sum(a.wall_s for a in attempts), 2),
            "sha256": sha,
            "bit_identical": sha == report["reference"]["sha256"] and _same_tensors(weights, ref_weights),
            "history_identical": history_same,
        }
        run["ok"] = run["bit_identical"] and run["kills_survived"] == kills and run["bytes_lost"] == 0
        report["runs"].append(run)
        log(
            f"fault-test: SIG{name}: {run['kills_survived']}/{kills} kills survived, {run['steps_redone']} steps "
            f"redone, {run['bytes_lost']} bytes lost, bit-identical {run['bit_identical']}, {run['wall_s']}s"
        )
    report["ok"] = all(r["ok"] for r in report["runs"])
    report["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["wall_s"] = round(time.perf_counter() - clock, 2)
    return report


def summary(report: dict) -> str:
    lines = [
        f"fault test: {report['preset']}, {report['steps']} distill steps, checkpoint every "
        f"{report['checkpoint_every_steps']} (keep {report['keep_checkpoints']}), seed {report['seed']}",
        f"  machine: {report['machine']} (load {report['load_average_1m_at_start']} → "
        f"{report['load_average_1m_at_end']}); torch {report['torch']}, {report['threads']} threads; "
        f"{report['date']}",
        f"  reference (uninterrupted): {report['reference']['wall_s']:.1f}s, "
        f"weights sha256 {report['reference']['sha256'][:16]}",
    ]
    for r in report["runs"]:
        lines.append(
            f"  {r['signal']} at steps {r['kill_steps']}: {r['kills_survived']}/{r['kills_requested']} kills "
            f"survived, {r['steps_redone']} steps redone, {r['bytes_lost']} bytes lost "
            f"({r['stray_bytes']} stray temp bytes), {r['starts']} starts, {r['wall_s']:.1f}s; weights "
            f"{'bit-identical' if r['bit_identical'] else 'DIFFER'}, history "
            f"{'identical' if r['history_identical'] else 'differs'}"
        )
    lines.append(f"  {'PASS' if report['ok'] else 'FAIL'} in {report['wall_s']:.0f}s")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """`funmatch fault-test`: prints the summary, writes the JSON report; 0 when every run passed."""
    signals = ("KILL", "TERM") if args.signal == "both" else (args.signal,)
    work = args.workdir or tempfile.mkdtemp(prefix="funmatch-fault-")
    try:
        report = fault_test(args.preset, args.overrides, args.kills, signals, args.seed, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.workdir is None:
        report["workdir"] = None  # removed
    print(summary(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m funmatch.app.faults worker ... (the parent is `funmatch fault-test`)")
    sys.exit(worker(sys.argv[2:]))
