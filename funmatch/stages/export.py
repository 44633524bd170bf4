"""Stage 5, export: the student as one self-contained ONNX file plus `model.json`, checked with onnxruntime.

Weight standardisation is folded into plain conv weights first, the batch axis is dynamic, and the
ONNX model must reproduce PyTorch's logits on real test images within `export.max_abs_diff`.
`model.json` tells a consumer with nothing else how to feed the model; `metrics.json` gathers the
evaluation, the export check and the stage timings. `serving/` (a Triton model repository of every
exported ONNX file) and `inferenceservice.yaml` (KServe) are the serving handoff (funmatch/stages/serving.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from funmatch import __version__, runtime, storage
from funmatch.config import Config
from funmatch.data import prepared
from funmatch.errors import FunmatchError
from funmatch.recipe import augment, models
from funmatch.stages import quantize, serving
from funmatch.storage import publish

log = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
RESULT_FILES = ("model.onnx", "model.json", "metrics.json")
# the model card's figures; without labels (no prec@1) agreement with the teacher: agree@1, agree@5, KL
CARD_METRICS = ("student/test/prec@1", "teacher/test/prec@1", "student/test/agree@1")
LABEL_FREE_METRICS = ("student/test/agree@1", "student/test/agree@5", "student/test/kl")
CHECK_IMAGES = 64


def to_onnx(model: torch.nn.Module, res: int, path: Path, opset: int) -> None:
    model = models.fold_weight_standardization(model.eval())
    example = torch.zeros(2, 3, res, res)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        )


def max_abs_diff(model: torch.nn.Module, onnx_path: Path, x: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    return float(np.abs(got - want).max())


def model_card(cfg: Config, info: dict, metrics: dict) -> dict:
    res, crop_pct = info["resolution"], info["crop_pct"]
    return {
        "format": "funmatch-model/1",
        "file": "model.onnx",
        "classes": info["classes"],
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, res, res], "dtype": "float32", "layout": "NCHW"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(info["classes"])],
            "dtype": "float32",
            "meaning": "logits in the order of `classes` (softmax for probabilities)",
        },
        "preprocessing": {
            "color": "RGB (grayscale, palette, RGBA over white and CMYK converted to RGB; EXIF orientation applied)",
            "resize": {"short_side": int(round(res / crop_pct)), "interpolation": "bilinear", "antialias": True},
            "center_crop": res,
            "value_range": [-1.0, 1.0],
            "formula": "x = pixel_uint8 / 127.5 - 1 (i.e. mean 0.5, std 0.5 on [0, 1]), channels first",
        },
        "student": {
            "arch": info["arch"],
            "resolution": res,
            "setup": info["setup"],
            "steps": info["steps"],
            "epochs": info["epochs"],
            "budget": info.get("budget", ""),  # how the steps came about (distill.epochs=0: derived from the data)
            "stem_pool": info.get("stem_pool", "zero_pad"),  # max-pool padding: zero_pad | neg_inf_pad (big_vision)
        },
        "teacher": {
            "arch": info["teacher"],
            "resolution": info["teacher_resolution"],
            "stem_pool": info.get("teacher_stem_pool", "zero_pad"),
        },
        "metrics": {
            k: metrics[k]
            for k in (CARD_METRICS if "student/test/prec@1" in metrics else LABEL_FREE_METRICS)
            if k in metrics
        },
        "preset": cfg.preset,
        "config_hash": info["config_hash"],
        "package": {"name": "funmatch", "version": __version__},
    }


def onnx_files(bundle_dir: str | Path) -> tuple[str, ...]:
    """model.onnx, model.int8.onnx when the export wrote (i.e. accepted) it, and the ONNX files of a run's
    further students (model-<arch>-<res>.onnx)."""
    int8 = (quantize.INT8_FILE,) if (Path(bundle_dir) / quantize.INT8_FILE).is_file() else ()
    extras = tuple(sorted(p.name for p in Path(bundle_dir).glob("model-*.onnx")))
    return RESULT_FILES[:1] + int8 + extras


def result_files(bundle_dir: str | Path) -> tuple[str, ...]:
    """What a publication copies, as POSIX paths relative to the bundle: the ONNX files, the serving
    repository (serving/...) and inferenceservice.yaml when there, then model.json and metrics.json."""
    isvc = (serving.INFERENCE_SERVICE,) if (Path(bundle_dir) / serving.INFERENCE_SERVICE).is_file() else ()
    return onnx_files(bundle_dir) + serving.repository_files(bundle_dir) + isvc + RESULT_FILES[1:]


def publish_result(bundle_dir: str | Path, uri: str) -> str:
    """Copies the result files to a directory or gs:// prefix, SHA256SUMS last (its presence marks a
    complete publication); `gs://<bucket>/models/<name>` gets a new immutable version and a moved
    latest.json (funmatch/storage/publish.py). inferenceservice.yaml is first rewritten (in the bundle
    too) to serve from where the files go: the version's prefix, or the flat target. A local flat target
    loses its old serving/ first: Triton loads every model there, and one the bundle lacks is stale
    (e.g. an INT8 model this run refused). Returns where the files are."""
    created = dt.datetime.now(dt.UTC)
    base = publish.registry_base(uri)
    if base is None:
        target = uri
        if not storage.is_gcs(uri) and Path(uri).resolve() != Path(bundle_dir).resolve():
            shutil.rmtree(Path(uri) / serving.SERVING_DIR, ignore_errors=True)
    else:  # the version publish() will name, from the same card and time
        card = json.loads((Path(bundle_dir) / "model.json").read_text())
        target = storage.join(base, publish.version_name(card, created))
    serving.write_inference_service(bundle_dir, serving.storage_uri(target))
    return publish.publish(bundle_dir, uri, files=result_files(bundle_dir), created=created).uri


@dataclass
class Export:
    """What export wrote into its directory: the files (model.onnx first), the model card and the
    metrics (evaluation + export check + stage timings), both also written as model.json / metrics.json."""

    files: tuple[str, ...]
    card: dict[str, Any]
    metrics: dict[str, float]

    def metadata(self) -> dict[str, Any]:
        """The Model artifact's metadata (KFP's UI and ML Metadata show it without opening a file)."""
        card, onnx = self.card, self.card["onnx"]
        if "student/test/prec@1" not in self.metrics:  # data.labels=none: agreement with the teacher
            figures: dict[str, float | None] = {
                f"student_test_{k.rsplit('/', 1)[1].replace('@', '')}": self.metrics[k] for k in LABEL_FREE_METRICS
            }
        else:
            figures = {
                "student_test_prec1": self.metrics.get("student/test/prec@1"),
                "teacher_test_prec1": self.metrics.get("teacher/test/prec@1"),
            }
        return {
            "framework": onnx["producer"],
            "framework_version": onnx["producer_version"],
            "format": "onnx",
            "opset": onnx["opset"],
            "input_name": card["input"]["name"],
            "input_shape": card["input"]["shape"],
            "output_name": card["output"]["name"],
            "output_shape": card["output"]["shape"],
            "num_classes": len(card["classes"]),
            "preprocessing": card["preprocessing"],
            **figures,
            "onnx_max_abs_diff": self.metrics["export/onnx_max_abs_diff"],
            "config_hash": card["config_hash"],
            "serving": card["serving"],
        }


def run(
    cfg: Config,
    dataset_dir: str | Path,
    student_dir: str | Path,
    evaluation: dict[str, float],
    out_dir: str | Path,
    stage_wall_s: dict[str, float] | None = None,
) -> Export:
    """Writes model.onnx, model.json and metrics.json (and model.int8.onnx with export.int8, unless it
    loses more than export.max_int8_drop) into `out_dir`; `evaluation`: the evaluate stage's metrics."""
    clock = runtime.Stopwatch()
    runtime.setup(cfg.runtime)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / quantize.INT8_FILE).unlink(missing_ok=True)  # only this run's INT8 model may be published
    for stale in out.glob("model-*.onnx"):
        stale.unlink()
    shutil.rmtree(out / serving.SERVING_DIR, ignore_errors=True)  # hard links to the files rewritten below
    (out / serving.INFERENCE_SERVICE).unlink(missing_ok=True)
    (student,), info = models.load_bundle(student_dir, "cpu")
    res = info["resolution"]
    to_onnx(student, res, out / "model.onnx", cfg.export.opset)

    images, labels = prepared.load_split(dataset_dir, "test")
    frames = prepared.load_frames(dataset_dir, "test")
    check, check_frames = torch.from_numpy(images[:CHECK_IMAGES]), torch.from_numpy(frames[:CHECK_IMAGES])
    x = augment.eval_view(check, res, info["crop_pct"], check_frames)
    (reference,), _ = models.load_bundle(student_dir, "cpu")  # unfolded: the model as trained
    diff = max_abs_diff(reference, out / "model.onnx", x)
    if diff > cfg.export.max_abs_diff:
        raise FunmatchError(
            f"ONNX logits differ from PyTorch by {diff:.2e} on {len(x)} test images, "
            f"more than export.max_abs_diff={cfg.export.max_abs_diff}"
        )

    extra_models = []
    for sub in info.get("extra_students", []):  # every student of the run gets its own ONNX file
        (extra,), e_info = models.load_bundle(Path(student_dir) / sub, "cpu")
        name = f"model-{e_info['arch']}-{e_info['resolution']}.onnx"
        to_onnx(extra, e_info["resolution"], out / name, cfg.export.opset)
        (reference,), _ = models.load_bundle(Path(student_dir) / sub, "cpu")
        x_e = augment.eval_view(check, e_info["resolution"], e_info["crop_pct"], check_frames)
        e_diff = max_abs_diff(reference, out / name, x_e)
        if e_diff > cfg.export.max_abs_diff:
            raise FunmatchError(
                f"{name}: ONNX logits differ from PyTorch by {e_diff:.2e}, more than "
                f"export.max_abs_diff={cfg.export.max_abs_diff}"
            )
        diff = max(diff, e_diff)
        extra_models.append({"file": name, "arch": e_info["arch"], "resolution": e_info["resolution"]})

    metrics = dict(evaluation)
    metrics["export/onnx_max_abs_diff"] = diff
    metrics["export/onnx_bytes"] = (out / "model.onnx").stat().st_size
    int8_card = None
    if cfg.export.int8:
        int8_metrics, int8_card = quantize.export_int8(
            cfg, dataset_dir, out, images, labels, res, info["crop_pct"], INPUT_NAME, frames
        )
        metrics.update(int8_metrics)
    metrics["export/wall_s"] = clock()
    walls = (stage_wall_s or {}) | {"evaluate": metrics.get("evaluate/wall_s", 0.0), "export": metrics["export/wall_s"]}
    metrics.update({f"{stage}/wall_s": w for stage, w in walls.items()})
    metrics["wall_s"] = round(sum(walls.values()), 3)  # stage compute; `funmatch run` replaces it with end-to-end
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    graph = serving.read_graph(out / "model.onnx")
    models_served = serving.write_repository(out, list(onnx_files(out)), info["classes"])
    serving.write_inference_service(out, serving.storage_uri(out))
    card = model_card(cfg, info, metrics) | publish.provenance(dataset_dir)
    card["onnx"] = {"opset": graph.opset, "producer": graph.producer, "producer_version": graph.producer_version}
    card["serving"] = {
        "triton_repository": serving.SERVING_DIR,
        "triton_models": dict(zip(models_served, onnx_files(out), strict=True)),
        "kserve_inference_service": serving.INFERENCE_SERVICE,
    }
    if int8_card:
        card["int8"] = int8_card
    if extra_models:
        card["extra_models"] = extra_models  # same classes, input name and preprocessing at their resolution
    (out / "model.json").write_text(json.dumps(card, indent=1))
    log.info(
        "exported %s (%d bytes), ONNX vs PyTorch max abs diff %.2e",
        out / "model.onnx",
        metrics["export/onnx_bytes"],
        diff,
    )
    return Export(result_files(out), card, metrics)
