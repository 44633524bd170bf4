"""INT8 static quantization of an exported ONNX classifier with onnxruntime, and its accuracy check.

The recipe measured in docs/environment.md §1: `quant_pre_process` (symbolic shape inference and
ORT's graph optimisations, e.g. BatchNorm folded into Conv), then `quantize_static` in QDQ format
with per-channel symmetric int8 weights and per-tensor asymmetric uint8 activations, MinMax-calibrated
on training images fed through the exact eval preprocessing (`augment.eval_view` at the model's
resolution and crop_pct). onnxruntime's CPU provider fuses the QDQ pairs into integer kernels
(QLinearConv, ...), which is where the speed comes from.

GroupNorm models (BiT) export GroupNorm as Reshape → InstanceNormalization → Reshape → Mul/Add.
ORT cannot quantize InstanceNormalization's shared scale/bias ("Quantization parameter shared mode is
not supported for weight yet") and has no integer kernel for it anyway, so for those models only
Conv/Gemm/MatMul are quantized and the normalisation runs in float between Dequantize/Quantize.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from funmatch.data import prepared
from funmatch.errors import DataError, FunmatchError
from funmatch.recipe import augment
from funmatch.recipe.metrics import prec1

log = logging.getLogger(__name__)
INT8_FILE = "model.int8.onnx"
NORM_OPS = frozenset({"InstanceNormalization", "GroupNormalization", "LayerNormalization"})
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_BATCH = 16
CALIBRATION_SEED = 0


class QuantizationError(FunmatchError):
    """onnxruntime could not quantize the model."""


# ---------------------------------------------------------------- calibration data


def calibration_images(
    dataset_dir: str | Path, n: int, split: str = "train", seed: int = CALIBRATION_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(`n` images (N×S×S×3 uint8), their frames (N×2)) drawn without replacement, seeded, from a split of
    the prepared dataset.

    Reads only the chosen images from memory-mapped shards, so it stays cheap on an ImageNet-sized
    artifact (whose train split need not be shuffled: folder sources are stored class by class).
    """
    source = prepared.ShardedImages(dataset_dir, split)  # raw or JPEG shards
    if len(source) == 0:
        raise DataError(f"{dataset_dir}: split {split!r} is empty, nothing to calibrate the INT8 model on")
    picks = np.sort(np.random.default_rng(seed).choice(len(source), size=min(n, len(source)), replace=False))
    return source.gather(picks), source.frames(picks)


def eval_batches(images_u8: np.ndarray, res: int, crop_pct: float, batch_size: int, frames: np.ndarray | None = None):
    """Float32 NCHW batches of `images_u8` through the eval preprocessing (augment.eval_view), each image
    from its frame (`frames` N×2 (h, w); None: the whole canvas)."""
    for start in range(0, len(images_u8), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images_u8[start : start + batch_size]))
        f = None if frames is None else torch.from_numpy(frames[start : start + batch_size])
        yield augment.eval_view(batch, res, crop_pct, f).numpy()


def calibration_batches(dataset_dir: str | Path, n: int, res: int, crop_pct: float) -> list[np.ndarray]:
    """`n` training images of the dataset artifact as eval views, in batches of CALIBRATION_BATCH."""
    images, frames = calibration_images(dataset_dir, n)
    return list(eval_batches(images, res, crop_pct, CALIBRATION_BATCH, frames))


def _reader(input_name: str, batches: list[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(batches):
                return None
            self.i += 1
            return {input_name: batches[self.i - 1]}

        def rewind(self) -> None:
            self.i = 0

    return Reader()


# ---------------------------------------------------------------- quantization


def op_types_to_quantize(model) -> list[str] | None:
    """None (every op ORT has a QDQ rule for) unless the graph holds normalisation ops: then weights only."""
    ops = {n.op_type for n in model.graph.node}
    return list(WEIGHT_OPS) if ops & NORM_OPS else None


def quantize(
    fp32_path: str | Path, int8_path: str | Path, calibration: list[np.ndarray], input_name: str = "image"
) -> dict:
    """Writes the INT8 QDQ model of `fp32_path` to `int8_path`, calibrated on `calibration` (float32
    NCHW batches, already preprocessed); returns what was done (op types, seconds, bytes)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise QuantizationError("INT8 quantization needs at least one calibration image")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="funmatch-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        ops = op_types_to_quantize(onnx.load(str(pre), load_external_data=False))
        try:
            quantize_static(
                str(pre),
                str(int8_path),
                _reader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=ops,
            )
        except (ValueError, RuntimeError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise QuantizationError(f"onnxruntime could not quantize {Path(fp32_path).name}: {first}") from e
    info = {
        "format": "QDQ",
        "weights": "int8, symmetric, per channel",
        "activations": "uint8, asymmetric, per tensor",
        "calibration_method": "minmax",
        "calibration_images": int(sum(len(b) for b in calibration)),
        "op_types": ops or "all (onnxruntime default)",
        "seconds": round(time.perf_counter() - start, 3),
        "bytes": Path(int8_path).stat().st_size,
    }
    log.info(
        "quantized %s → %s (%d bytes, %.1fs, %d calibration images)",
        fp32_path,
        int8_path,
        info["bytes"],
        info["seconds"],
        info["calibration_images"],
    )
    return info


# ---------------------------------------------------------------- running


def session(path: str | Path, threads: int = 0):
    """A CPU onnxruntime session; `threads` > 0 fixes intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(
    sess, images_u8: np.ndarray, res: int, crop_pct: float, batch_size: int, frames: np.ndarray | None = None
) -> np.ndarray:
    """Logits of an ONNX session on uint8 NHWC images (with their `frames`) through the eval preprocessing."""
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x})[0] for x in eval_batches(images_u8, res, crop_pct, batch_size, frames)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def int8_refusal(fp32_prec1: float, int8_prec1: float, max_drop: float) -> str:
    """'' when the INT8 model may be published, else the reason it may not."""
    drop = fp32_prec1 - int8_prec1
    if drop > max_drop + 1e-9:  # exactly max_drop is allowed (0.80 - 0.79 is 0.010000000000000009)
        return (
            f"INT8 test prec@1 {int8_prec1:.4f} is {drop * 100:.2f} points below fp32 {fp32_prec1:.4f} "
            f"(onnxruntime), more than export.max_int8_drop={max_drop}"
        )
    return ""


# ---------------------------------------------------------------- the export option


def export_int8(
    cfg,
    dataset_dir: str | Path,
    out_dir: str | Path,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    res: int,
    crop_pct: float,
    input_name: str = "image",
    test_frames: np.ndarray | None = None,
) -> tuple[dict, dict | None]:
    """Quantizes `out_dir`/model.onnx, measures fp32 and INT8 test prec@1 with onnxruntime (on the test
    images' frames `test_frames`; None: whole canvases) and writes model.int8.onnx into `out_dir` only when
    it loses at most `export.max_int8_drop`.

    Returns (flat metrics, the model card's `int8` entry or None when refused). A refusal is recorded
    in the metrics (`export/int8_refused`), never raised: the fp32 export stands on its own.
    """
    ex, out = cfg.export, Path(out_dir)
    batches = calibration_batches(dataset_dir, ex.calibration_images, res, crop_pct)
    with tempfile.TemporaryDirectory(prefix="funmatch-int8-") as tmp:
        candidate = Path(tmp) / INT8_FILE
        try:
            info = quantize(out / "model.onnx", candidate, batches, input_name)
        except QuantizationError as e:  # the fp32 export stands; say why there is no INT8 model
            log.warning("INT8 model not published: %s", e)
            return {"export/int8_refused": str(e)}, None
        threads = cfg.runtime.num_threads
        batch = cfg.eval.batch_size
        fp32 = ort_logits(session(out / "model.onnx", threads), test_images, res, crop_pct, batch, test_frames)
        int8 = ort_logits(session(candidate, threads), test_images, res, crop_pct, batch, test_frames)
        metrics: dict = {
            "export/int8_bytes": info["bytes"],
            "export/int8/quantize_s": info["seconds"],
            "export/int8/calibration_images": info["calibration_images"],
        }
        if len(test_labels) == 0:
            metrics["export/int8_refused"] = "the dataset has no test images to check the INT8 model on"
            log.warning("INT8 model not published: %s", metrics["export/int8_refused"])
            return metrics, None
        p_fp32 = prec1(fp32, test_labels)
        p_int8 = prec1(int8, test_labels)
        metrics.update(
            {
                "export/fp32/test/prec@1": p_fp32,
                "export/int8/test/prec@1": p_int8,
                "export/int8/test/agree@1": prec1(fp32, int8.argmax(1)),
            }
        )
        reason = int8_refusal(p_fp32, p_int8, ex.max_int8_drop)
        if reason:
            metrics["export/int8_refused"] = reason
            log.warning("INT8 model not published: %s", reason)
            return metrics, None
        (out / INT8_FILE).write_bytes(candidate.read_bytes())
    log.info("INT8 model %s: test prec@1 %.4f (fp32 %.4f), %d bytes", out / INT8_FILE, p_int8, p_fp32, info["bytes"])
    card = {
        "file": INT8_FILE,
        "format": "ONNX QDQ (QuantizeLinear/DequantizeLinear around integer-ready ops)",
        "input_output": "as model.onnx (float32 image in, float32 logits out)",
        "weights": info["weights"],
        "activations": info["activations"],
        "op_types": info["op_types"],
        "calibration": {
            "split": "train",
            "images": info["calibration_images"],
            "method": info["calibration_method"],
            "preprocessing": "as `preprocessing` (eval view)",
        },
        "test_prec@1": p_int8,
        "fp32_test_prec@1": p_fp32,
        "max_int8_drop": ex.max_int8_drop,
        "bytes": info["bytes"],
    }
    return metrics, card
