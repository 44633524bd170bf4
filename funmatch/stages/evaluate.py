"""Stage 4, evaluation as in big_vision: student and teacher on minitrain, val and test.

prec@1 for both models; student–teacher distances on logits at eval preprocessing (big_vision
`proj.distill.distance`): agree@1 (same argmax), agree@5 (teacher's top-1 in the student's top-5),
KL(teacher ‖ student) at t=1 and the logits' L2 distance. The teacher runs once per split. The test
split adds per-class accuracy and the confusion matrix. Splits without labels (all of them with
`data.labels=none`, minitrain with `distill.images`) get the distances only: no accuracy, no confusion
matrix, and the quality gate compares test agree@1 with `gate.min_agreement`.

The report artifact keeps every figure (`metrics.json`, `confusion.json`). The Kubeflow UI gets
`Evaluation.ui_view()`: the same for up to UI_MAX_CLASSES classes; above that (ImageNet: 1000) the
confusion matrix of the UI_TOP_K most confused classes, prec@1 of the UI_TOP_K worst classes, and the
mean, min and median per-class prec@1, so the UI does not render a 1000×1000 table and 1000 metrics.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from funmatch import runtime
from funmatch.config import Config, EvalConfig
from funmatch.data import prepared
from funmatch.recipe import augment, models
from funmatch.recipe.metrics import distances, prec1

log = logging.getLogger(__name__)

UI_MAX_CLASSES = 50  # up to this many classes the Kubeflow UI gets every class, as the report does
UI_TOP_K = 20  # above it: the confusion matrix of the K most confused classes, prec@1 of the K worst
CLASS_PREC = "student/test/class_prec@1/"  # + class name: the student's per-class test prec@1


@torch.no_grad()
def predict(
    members: list[nn.Module],
    images_u8: torch.Tensor,
    res: int | list[int],
    ev: EvalConfig,
    device: torch.device,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (float32, CPU) of an ensemble (logits averaged; each member at its own resolution) on
    eval views of uint8 NHWC images, each from its frame (`frames` N×2 (h, w); None: the whole canvas)."""
    resolutions = res if isinstance(res, list) else [res] * len(members)
    out = []
    for start in range(0, len(images_u8), ev.batch_size):
        batch = images_u8[start : start + ev.batch_size].to(device)
        f = None if frames is None else frames[start : start + ev.batch_size]
        views = {r: augment.eval_view(batch, r, ev.crop_pct, f) for r in set(resolutions)}
        out.append(torch.stack([m(views[r]).float() for m, r in zip(members, resolutions, strict=True)]).mean(0).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def resolutions(info: dict) -> list[int]:
    """Per-member resolutions of a model artifact."""
    return info.get("member_resolutions") or [info["resolution"]] * len(info["members"])


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """rows: true class, columns: predicted class."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_metrics(
    pred: torch.Tensor, target: torch.Tensor, classes: list[str]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The confusion matrix and per-class prec@1 (`student/test/class_prec@1/<class>`; 0 for a class
    without test images)."""
    confusion = confusion_matrix(pred, target, len(classes))
    return confusion, {f"{CLASS_PREC}{c}": float(a) for c, a in zip(classes, _per_class_prec(confusion), strict=True)}


def _per_class_prec(confusion: torch.Tensor) -> torch.Tensor:
    return confusion.diag() / confusion.sum(1).clamp(min=1)


def most_confused(confusion: torch.Tensor, k: int) -> list[int]:
    """Indices (ascending) of the k classes with the most off-diagonal mass: the class's test images
    predicted as another class (its row) plus other classes' images predicted as it (its column).
    Ties go to the lower index."""
    off = confusion.sum(0) + confusion.sum(1) - 2 * confusion.diag()
    ranked = sorted(range(len(off)), key=lambda i: (-int(off[i]), i))
    return sorted(ranked[:k])


@dataclass(frozen=True)
class UIView:
    """What the Kubeflow UI gets (KFP Metrics and ClassificationMetrics): flat metrics, and the classes
    and confusion matrix (rows: true class) to draw."""

    metrics: dict[str, float]
    classes: list[str]
    confusion: list[list[int]]


def gate(cfg: Config, metrics: dict) -> tuple[bool, str]:
    """(passed, one line saying why) for the quality gate before export: on test prec@1, or without
    labels (no prec@1 in `metrics`) on the student's top-1 agreement with the teacher."""
    g = cfg.gate
    if "student/test/prec@1" not in metrics:
        a = metrics["student/test/agree@1"]
        if a < g.min_agreement:
            return False, f"student test agree@1 {a:.4f} < gate.min_agreement={g.min_agreement} (no labels)"
        return True, f"student test agree@1 {a:.4f} with the teacher passes gate.min_agreement={g.min_agreement}"
    s, t = metrics["student/test/prec@1"], metrics["teacher/test/prec@1"]
    if s < g.min_student_acc:
        return False, f"student test prec@1 {s:.4f} < gate.min_student_acc={g.min_student_acc}"
    if s < g.min_teacher_ratio * t:
        return False, (
            f"student test prec@1 {s:.4f} < gate.min_teacher_ratio={g.min_teacher_ratio} × teacher "
            f"{t:.4f} = {g.min_teacher_ratio * t:.4f}"
        )
    return True, f"student test prec@1 {s:.4f} (teacher {t:.4f}) passes the gate"


def report_html(metrics: dict, student_dir: Path, s_info: dict, t_info: dict, gate_reason: str, note: str = "") -> str:
    """A self-contained HTML page for the Kubeflow UI: teacher/student table and training curves
    (and `note`, a paragraph under the gate's verdict); without labels agreement with the teacher only."""
    import base64
    import io

    if "student/test/prec@1" not in metrics:
        header = "<th>agree@1</th><th>agree@5</th><th>KL</th>"
        keys = ("agree@1", "agree@5", "kl")
        rows = "".join(
            f"<tr><td>{split}</td>"
            + "".join(f"<td>{metrics.get(f'student/{split}/{k}', float('nan')):.4f}</td>" for k in keys)
            + "</tr>"
            for split in ("minitrain", "val", "test")
        )
    else:
        header = "<th>teacher prec@1</th><th>student prec@1</th><th>agree@1</th><th>KL</th>"
        rows = "".join(
            f"<tr><td>{split}</td><td>{metrics.get(f'teacher/{split}/prec@1', float('nan')):.4f}</td>"
            f"<td>{metrics.get(f'student/{split}/prec@1', float('nan')):.4f}</td>"
            f"<td>{metrics.get(f'student/{split}/agree@1', float('nan')):.4f}</td>"
            f"<td>{metrics.get(f'student/{split}/kl', float('nan')):.4f}</td></tr>"
            for split in ("minitrain", "val", "test")
        )
    history_file = student_dir / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    img = ""
    if history:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        axes[0].plot([h["step"] for h in history], [h["loss"] for h in history])
        axes[0].set(xlabel="step", ylabel="KD loss", yscale="log", title="train loss")
        val = [h for h in history if "val_agree@1" in h]
        for key in (k for k in ("val_prec@1", "val_agree@1") if all(k in h for h in val)):  # no labels: agree
            axes[1].plot([h["step"] for h in val], [h[key] for h in val], marker="o", label=key)
        axes[1].set(xlabel="step", title="student on val")
        axes[1].legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        img = f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    note_html = f"<p>{note}</p>" if note else ""
    return (
        f"<html><body><h3>funmatch: {t_info['arch']}@{t_info['resolution']} → "
        f"{s_info['arch']}@{s_info['resolution']} ({s_info.get('setup', '')}, {s_info.get('steps', '?')} steps)</h3>"
        f"<p>Quality gate: {gate_reason}</p>{note_html}<table border=1 cellpadding=4><tr><th>split</th>"
        f"{header}</tr>{rows}</table>{img}</body></html>"
    )


@dataclass
class Evaluation:
    """What evaluate found: flat big_vision-style metrics, the student's test confusion matrix (rows:
    true class), the quality gate's verdict and the HTML report for the Kubeflow UI."""

    metrics: dict[str, float]
    classes: list[str]
    confusion: list[list[int]]
    gate_passed: bool
    gate_reason: str
    report_html: str

    def write(self, out_dir: str | Path) -> None:
        """`metrics.json` (what export reads), `confusion.json` (not without labels) and `report.html`
        into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=1))
        if self.classes:
            (out / "confusion.json").write_text(json.dumps({"classes": self.classes, "matrix": self.confusion}))
        (out / "report.html").write_text(self.report_html)

    def ui_view(self, max_classes: int = UI_MAX_CLASSES, k: int = UI_TOP_K) -> UIView:
        """Everything for up to `max_classes` classes. Above: the confusion matrix restricted to the `k`
        most confused classes (`most_confused`, in class order), per-class prec@1 only for the `k` worst
        classes with test images (worst first), and `student/test/class_prec@1_{mean,min,median}` over
        all classes with test images. The other metrics are kept as they are."""
        if len(self.classes) <= max_classes or not self.confusion:
            return UIView(dict(self.metrics), list(self.classes), self.confusion)
        matrix = torch.tensor(self.confusion, dtype=torch.int64)
        keep = most_confused(matrix, k)
        scored = [i for i, n in enumerate(matrix.sum(1).tolist()) if n > 0]
        prec = _per_class_prec(matrix).tolist()
        worst = sorted(scored, key=lambda i: (prec[i], i))[:k]
        metrics = {key: v for key, v in self.metrics.items() if not key.startswith(CLASS_PREC)}
        metrics.update({f"{CLASS_PREC}{self.classes[i]}": prec[i] for i in worst})
        values = [prec[i] for i in scored] or [0.0]
        metrics["student/test/class_prec@1_mean"] = statistics.fmean(values)
        metrics["student/test/class_prec@1_min"] = min(values)
        metrics["student/test/class_prec@1_median"] = statistics.median(values)
        return UIView(metrics, [self.classes[i] for i in keep], matrix[keep][:, keep].tolist())


def minitrain(cfg: Config, dataset_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`eval.minitrain_size` train images, a class-stratified sample seeded by `data.split_seed` (the same
    rows for every run on one dataset). big_vision's minitrain is train[:512] (train[:2%] for ImageNet) of
    TFDS's shuffled split; the first rows of a prepared split can be class-sorted (Food101: one class)."""
    return prepared.load_sample(dataset_dir, "train", cfg.eval.minitrain_size, cfg.data.split_seed)


def run(cfg: Config, dataset_dir: str | Path, teacher_dir: str | Path, student_dir: str | Path) -> Evaluation:
    """Teacher and student(s) on minitrain, val and test; the gate's verdict on the test split."""
    clock = runtime.Stopwatch()
    device = runtime.setup(cfg.runtime, cfg.resources if cfg.eval.on_gpu else None)
    teachers, t_info = models.load_bundle(teacher_dir, device)
    students, s_info = models.load_bundle(student_dir, device)
    extras = {}
    for sub in s_info.get("extra_students", []):
        members, e_info = models.load_bundle(Path(student_dir) / sub, device)
        extras[f"{e_info['arch']}@{e_info['resolution']}"] = members, e_info
    manifest = prepared.read_manifest(dataset_dir)
    labelled = prepared.labelled_splits(manifest)  # splits with labels: accuracy; all: agreement
    classes = manifest["classes"] if "test" in labelled else []  # no labels: no confusion matrix
    metrics: dict[str, float] = {}
    confusion = None
    for split in ("minitrain", "val", "test"):
        images_np, labels_np = (
            minitrain(cfg, dataset_dir) if split == "minitrain" else prepared.load_split(dataset_dir, split)
        )
        if len(labels_np) == 0:
            continue
        images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np)
        sample = (cfg.eval.minitrain_size, cfg.data.split_seed) if split == "minitrain" else None
        frames = torch.from_numpy(prepared.load_frames(dataset_dir, "train" if sample else split, sample))
        has_labels = ("train" if sample else split) in labelled
        t_logits = predict(teachers, images, resolutions(t_info), cfg.eval, device, frames)
        s_logits = predict(students, images, s_info["resolution"], cfg.eval, device, frames)
        for name, (extra, e_info) in extras.items():  # more students of the same run
            e_logits = predict(extra, images, e_info["resolution"], cfg.eval, device, frames)
            if has_labels:
                metrics[f"students/{name}/{split}/prec@1"] = prec1(e_logits, labels)
            metrics.update({f"students/{name}/{split}/{k}": v for k, v in distances(e_logits, t_logits).items()})
        if has_labels:
            metrics[f"teacher/{split}/prec@1"] = prec1(t_logits, labels)
            metrics[f"student/{split}/prec@1"] = prec1(s_logits, labels)
        metrics.update({f"student/{split}/{k}": v for k, v in distances(s_logits, t_logits).items()})
        if split == "test" and has_labels:
            confusion, per_class = class_metrics(s_logits.argmax(1), labels, classes)
            metrics.update(per_class)
    metrics["evaluate/wall_s"] = clock()
    passed, reason = gate(cfg, metrics)
    metrics["gate/passed"] = float(passed)
    if "test" in labelled:
        log.info(
            "teacher test prec@1 %.4f, student %.4f, agree@1 %.4f",
            metrics["teacher/test/prec@1"],
            metrics["student/test/prec@1"],
            metrics["student/test/agree@1"],
        )
    else:
        log.info(
            "no labels: student test agree@1 %.4f, agree@5 %.4f, KL(teacher ‖ student) %.4f",
            metrics["student/test/agree@1"],
            metrics["student/test/agree@5"],
            metrics["student/test/kl"],
        )
    return Evaluation(
        metrics,
        classes,
        confusion.tolist() if confusion is not None else [],
        passed,
        reason,
        report_html(metrics, Path(student_dir), s_info, t_info, reason, ui_note(len(classes))),
    )


def ui_note(num_classes: int) -> str:
    """What the report page says when the Kubeflow UI shows a capped view ('' when it shows all)."""
    if num_classes <= UI_MAX_CLASSES:
        return ""
    return (
        f"{num_classes} classes: the Kubeflow UI shows the confusion matrix of the {UI_TOP_K} most confused "
        f"classes and prec@1 of the {UI_TOP_K} worst (plus mean/min/median); every class and the full matrix "
        "are in the report artifact (metrics.json, confusion.json)."
    )
