"""`funmatch bench ...`: measurements on the local machine, one function per benchmark.

    bench_onnx   batch-1 and batch-32 latency of torch eager, onnxruntime fp32 and onnxruntime INT8
                 (static QDQ, funmatch/quantize.py) for one architecture, with the ratios

Each benchmark returns a JSON-able dict (machine, date, command, figures) and has a `print_*`
companion; `command(args)` dispatches the CLI's `bench` sub-subcommands through COMMANDS.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from funmatch import runtime
from funmatch.config import archs
from funmatch.errors import ConfigError

ENGINES = ("torch", "ort_fp32", "ort_int8")
DEMO_CALIBRATION = "demo"
CALIBRATION_SOURCES = (DEMO_CALIBRATION, "random")


# ---------------------------------------------------------------- shared helpers


def timings(fn: Callable[[], object], warmup: int, repeats: int) -> dict:
    """Median and p90 wall time (ms) of `fn` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": round(float(np.median(times)), 3),
        "p90_ms": round(float(np.percentile(times, 90)), 3),
        "repeats": repeats,
    }


def _calibration_batches(source: str, n: int, res: int, crop_pct: float, batch: int) -> list[np.ndarray]:
    from funmatch.data import sources
    from funmatch.stages import quantize

    if source == DEMO_CALIBRATION:
        images = sources.demo_source().arrays["train"][0]
        if images.ndim == 3:  # grayscale N×H×W: replicate to RGB as prepare does
            images = np.repeat(images[..., None], 3, axis=-1)
        images = images[np.sort(np.random.default_rng(0).choice(len(images), min(n, len(images)), replace=False))]
        return list(quantize.eval_batches(images, res, crop_pct, batch))
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (min(batch, n - i), 3, res, res)).astype(np.float32) for i in range(0, n, batch)]


# ---------------------------------------------------------------- bench onnx


def bench_onnx(
    arch: str = "resnet50",
    resolution: int = 224,
    threads: int = 2,
    batches: tuple[int, ...] = (1, 32),
    warmup: int = 3,
    repeats: int = 20,
    num_classes: int = 1000,
    calibration: str = DEMO_CALIBRATION,
    calibration_images: int = 32,
    crop_pct: float = 0.875,
    opset: int = 18,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Latency of one arch at one resolution on this CPU: torch eager, ORT fp32, ORT INT8, per batch size.

    Weights are random (latency does not depend on their values); the INT8 model is calibrated on
    `calibration_images` bundled demo images through the eval preprocessing, or on uniform noise.
    """
    import onnxruntime
    import torch

    from funmatch.recipe import models
    from funmatch.stages import export, quantize

    archs.check_arch("--arch", arch)
    archs.check_resolution("--resolution", arch, resolution)
    if threads < 1:
        raise ConfigError(f"--threads={threads} is not allowed: expected a positive integer")
    if calibration not in CALIBRATION_SOURCES:
        raise ConfigError(
            f"--calibration={calibration!r} is not allowed: expected one of {', '.join(CALIBRATION_SOURCES)}"
        )
    if warmup < 0 or repeats < 1 or calibration_images < 1 or min(batches) < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats, --calibration-images and batch sizes >= 1")

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.fold_weight_standardization(models.create_model(arch, num_classes, zero_head=False).eval())
    result: dict = {
        "bench": "onnx",
        "arch": arch,
        "resolution": resolution,
        "threads": threads,
        "classes": num_classes,
        "weights": "random init (latency only; INT8 accuracy is measured by the export option export.int8)",
        "calibration": {"source": calibration, "images": calibration_images},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": runtime.machine() | {"onnxruntime": onnxruntime.__version__},
        "warmup": warmup,
    }
    with tempfile.TemporaryDirectory(prefix="funmatch-bench-") as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / quantize.INT8_FILE
        log(f"exporting {arch} @ {resolution} px to ONNX (opset {opset}, random init weights)")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter's progress lines
            export.to_onnx(model, resolution, fp32_path, opset)
        result["export_s"] = round(time.perf_counter() - start, 3)
        log(f"quantizing (static QDQ INT8, {calibration_images} {calibration} calibration images)")
        info = quantize.quantize(
            fp32_path,
            int8_path,
            _calibration_batches(calibration, calibration_images, resolution, crop_pct, 16),
            export.INPUT_NAME,
        )
        result["quantize_s"] = info["seconds"]
        result["quantized_op_types"] = info["op_types"]
        result["bytes"] = {"fp32": fp32_path.stat().st_size, "int8": info["bytes"]}
        sessions = {"ort_fp32": quantize.session(fp32_path, threads), "ort_int8": quantize.session(int8_path, threads)}

        latency: dict = {engine: {} for engine in ENGINES}
        agree: dict = {}
        for b in batches:
            x = torch.from_numpy(
                np.random.default_rng(1).uniform(-1, 1, (b, 3, resolution, resolution)).astype(np.float32)
            )
            feed = {export.INPUT_NAME: x.numpy()}
            with torch.inference_mode():
                log(f"batch {b}: torch eager")
                latency["torch"][str(b)] = timings(functools.partial(model, x), warmup, repeats)
                want = model(x).numpy()
            for engine, sess in sessions.items():
                log(f"batch {b}: {engine}")
                latency[engine][str(b)] = timings(functools.partial(sess.run, None, feed), warmup, repeats)
            got = sessions["ort_int8"].run(None, feed)[0]
            fp32 = sessions["ort_fp32"].run(None, feed)[0]
            agree[str(b)] = {
                "fp32_max_abs_diff_vs_torch": float(np.abs(fp32 - want).max()),
                "int8_max_abs_diff_vs_torch": float(np.abs(got - want).max()),
                "logit_scale": float(np.abs(want).max()),
            }
    result["latency_ms"] = latency
    result["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []
    median = {engine: {b: t["median_ms"] for b, t in per_batch.items()} for engine, per_batch in latency.items()}
    result["ratios"] = {
        b: {
            "ort_fp32/ort_int8": round(median["ort_fp32"][b] / median["ort_int8"][b], 3),
            "torch/ort_fp32": round(median["torch"][b] / median["ort_fp32"][b], 3),
        }
        for b in map(str, batches)
    }
    result["outputs"] = agree
    return result


def print_onnx(r: dict) -> None:
    m = r["machine"]
    print(
        f"funmatch bench onnx: {r['arch']} @ {r['resolution']} px, {r['threads']} threads, {r['classes']} classes; "
        f"weights: {r['weights']}"
    )
    print(
        f"  machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, load avg 1/5/15 min {m['load_avg_1_5_15']} "
        f"before, {m.get('load_avg_after')} after), "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; {r['date']}"
    )
    print(
        f"  INT8: static QDQ, {r['calibration']['images']} {r['calibration']['source']} calibration images, "
        f"quantized ops {r['quantized_op_types']}; {r['bytes']['fp32'] / 1e6:.1f} MB fp32 -> "
        f"{r['bytes']['int8'] / 1e6:.1f} MB int8 (quantize {r['quantize_s']:.1f} s)"
    )
    header = f"  {'batch':>5} | {'engine':<9} | {'median ms':>10} | {'p90 ms':>9} | {'ms/image':>9}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for b in r["ratios"]:
        for engine in ENGINES:
            t = r["latency_ms"][engine][b]
            print(
                f"  {b:>5} | {engine:<9} | {t['median_ms']:>10.2f} | {t['p90_ms']:>9.2f} | "
                f"{t['median_ms'] / int(b):>9.2f}"
            )
    for b, ratio in r["ratios"].items():
        print(
            f"  batch {b}: ORT fp32 / INT8 = {ratio['ort_fp32/ort_int8']:.2f}x, "
            f"torch / ORT fp32 = {ratio['torch/ort_fp32']:.2f}x"
        )


def cmd_onnx(args) -> int:
    from funmatch import config

    cfg = config.load(args.preset) if args.preset else None
    arch = args.arch or (cfg.student.arch if cfg else "resnet50")
    resolution = args.resolution or (cfg.student.resolution if cfg else 224)
    crop_pct = cfg.eval.crop_pct if cfg else 0.875
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bench_onnx(
            arch,
            resolution,
            args.threads,
            tuple(args.batch),
            args.warmup,
            args.repeats,
            args.classes,
            args.calibration,
            args.calibration_images,
            crop_pct,
            log=lambda s: print(f"  ... {s}", file=sys.stderr, flush=True),
        )
    result["command"] = (
        f"funmatch bench onnx --arch {arch} --resolution {resolution} --threads {args.threads} "
        f"--batch {' '.join(map(str, args.batch))} --repeats {args.repeats} --warmup {args.warmup} "
        f"--calibration {args.calibration} --calibration-images {args.calibration_images}"
    )
    print_onnx(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"  wrote {path}")
    return 0


def cmd_distill(args) -> int:
    from funmatch.app import bench_distill  # the GPU loop benchmark lives with its baselines

    return bench_distill.command(args)


def cmd_loader(args) -> int:
    from funmatch.app import bench_loader

    return bench_loader.command(args)


COMMANDS: dict[str, Callable] = {"onnx": cmd_onnx, "distill": cmd_distill, "loader": cmd_loader}


def command(args) -> int:
    """Runs `funmatch bench <what>`; args.bench names the benchmark."""
    return COMMANDS[args.bench](args)
