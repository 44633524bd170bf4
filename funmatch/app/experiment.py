"""Small-scale reproduction of the paper's teaching-setup comparison (§3.1, Fig. 3) on real data.

    funmatch experiment teaching-setups [--size cpu|gpu] [--output DIR]

One teacher, then the four setups (fixed, independent, consistent, funmatch) at three budgets,
each a full distill run with the same recipe, evaluated on the test split. Writes results.json,
table.md and setups.png into DIR. The claims to check (paper): at the longest budget funmatch ≥
consistent > independent and > fixed; funmatch improves with the budget; the fixed teacher's
student stops improving or degrades at long budgets.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import date
from pathlib import Path

import torch

from funmatch import config, runtime
from funmatch.config import SETUPS
from funmatch.data import prepared
from funmatch.recipe import models
from funmatch.recipe.metrics import prec1
from funmatch.stages import distill, evaluate, finetune, prepare

log = logging.getLogger(__name__)

# cpu: ≤ 10 min on 2 cores; gpu: ≤ 8 min on one H100/H200. Both on the bundled Fashion-MNIST subset
# with a reduced train split, so that long budgets are long in epochs (where fixed teachers overfit).
SIZES: dict[str, dict] = {
    "cpu": {
        "budgets": (10, 30, 90),
        "overrides": {
            "data.max_train_per_class": 200,
            "distill.batch_size": 128,
            "distill.warmup_steps": 20,
            "distill.eval_every": 0,
        },
    },
    "smoke": {
        "budgets": (1, 2, 3),
        "overrides": {
            "data.max_train_per_class": 16,
            "distill.batch_size": 32,
            "distill.warmup_steps": 1,
            "distill.eval_every": 0,
            "finetune.steps": 10,
            "finetune.batch_size": 32,
        },
    },
    "gpu": {
        "budgets": (30, 300, 3000),
        "overrides": {
            "data.max_train_per_class": 200,
            "data.stored_resolution": 40,
            "teacher.arch": "bit-r50x1",
            "teacher.resolution": 64,
            "student.arch": "bit-r14-mini",
            "student.resolution": 64,
            "finetune.steps": 1500,
            "finetune.batch_size": 256,
            "distill.batch_size": 512,
            "distill.warmup_steps": 50,
            "distill.eval_every": 0,
            "runtime.device": "auto",
            "runtime.precision": "bf16",
        },
    },
}


def teaching_setups(size: str, out_dir: str | Path) -> dict:
    """Runs the grid; returns {"rows": [...], ...} and writes results.json, table.md, setups.png."""
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = config.load("demo", spec["overrides"])
    device = runtime.setup(base.runtime)
    prepare.run(base, out / "dataset")
    finetune.run(base, out / "dataset", out / "teacher")
    test_x, test_y = (torch.from_numpy(a) for a in prepared.load_split(out / "dataset", "test"))
    teachers, t_info = models.load_bundle(out / "teacher", device)
    t_logits = evaluate.predict(teachers, test_x, t_info["resolution"], base.eval, device)
    teacher_acc = prec1(t_logits, test_y)

    rows = []
    for epochs in spec["budgets"]:
        for setup in SETUPS:
            cfg = config.load("demo", spec["overrides"] | {"distill.setup": setup, "distill.epochs": epochs})
            t0 = time.perf_counter()
            info = distill.run(cfg, out / "dataset", out / "teacher", out / f"student-{setup}-{epochs}")
            (student,), _ = models.load_bundle(out / f"student-{setup}-{epochs}", device)
            s_logits = evaluate.predict([student], test_x, cfg.student.resolution, cfg.eval, device)
            history = json.loads((out / f"student-{setup}-{epochs}" / "history.json").read_text())
            rows.append(
                {
                    "setup": setup,
                    "epochs": epochs,
                    "steps": info["steps"],
                    "test_prec@1": round(prec1(s_logits, test_y), 4),
                    "test_agree@1": round(evaluate.distances(s_logits, t_logits)["agree@1"], 4),
                    "final_train_loss": history[-1]["loss"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            log.info("%s", rows[-1])
    result = {
        "size": size,
        "teacher_test_prec@1": round(teacher_acc, 4),
        "rows": rows,
        "train_images": prepared.read_manifest(out / "dataset")["splits"]["train"]["count"],
        "command": f"funmatch experiment teaching-setups --size {size}",
        "machine": "{arch}, {threads} threads, {accelerator}".format(**runtime.machine(device)),
        "date": date.today().isoformat(),
        "wall_s": round(time.perf_counter() - start, 1),
        "claims": claims(rows, spec["budgets"]),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table(result))
    plot(result, out / "setups.png")
    return result


def claims(rows: list[dict], budgets: tuple[int, ...]) -> dict[str, bool]:
    """The paper's claims, evaluated on this run's test accuracies."""
    acc = {(r["setup"], r["epochs"]): r["test_prec@1"] for r in rows}
    longest = budgets[-1]
    return {
        "longest budget: funmatch >= consistent": acc["funmatch", longest] >= acc["consistent", longest],
        "longest budget: consistent > independent": acc["consistent", longest] > acc["independent", longest],
        "longest budget: consistent > fixed": acc["consistent", longest] > acc["fixed", longest],
        "funmatch rises with budget": all(
            acc["funmatch", a] < acc["funmatch", b] for a, b in zip(budgets, budgets[1:], strict=False)
        ),
        "fixed stops improving at the longest budget": acc["fixed", longest] <= acc["fixed", budgets[-2]] + 0.005,
    }


def table(result: dict) -> str:
    budgets = sorted({r["epochs"] for r in result["rows"]})
    acc = {(r["setup"], r["epochs"]): r for r in result["rows"]}
    lines = ["| setup | " + " | ".join(f"{b} epochs" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for setup in SETUPS:
        cells = [
            f"{acc[setup, b]['test_prec@1']:.4f} (agree {acc[setup, b]['test_agree@1']:.3f}, "
            f"loss {acc[setup, b]['final_train_loss']:.3f})"
            for b in budgets
        ]
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nTeacher test prec@1: {result['teacher_test_prec@1']:.4f}; train images: {result['train_images']}; "
        f"cells: student test prec@1 (top-1 agreement with the teacher, final train KD loss).\n"
    )
    lines += [f"- {claim}: **{'holds' if ok else 'does not hold'}**" for claim, ok in result["claims"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for setup in SETUPS:
        pts = sorted((r["epochs"], r["test_prec@1"]) for r in result["rows"] if r["setup"] == setup)
        ax.plot(*zip(*pts, strict=True), marker="o", label=setup)
    ax.axhline(result["teacher_test_prec@1"], color="gray", ls="--", label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("distillation epochs")
    ax.set_ylabel("student test prec@1")
    ax.set_title(f"Teaching setups, Fashion-MNIST subset ({result['size']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
