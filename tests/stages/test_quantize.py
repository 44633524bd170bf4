"""INT8 export (static QDQ, onnxruntime) and `funmatch bench onnx` on the tiny demo models."""

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from funmatch import config
from funmatch.app import cli
from funmatch.stages import distill, export, quantize

pytestmark = pytest.mark.slow  # an export (and an INT8 calibration) per module: over 5 s


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_cfg, dataset_dir, teacher_dir):
    """A bit-r14-mini student distilled for a few steps (enough for non-trivial test accuracy)."""
    out = tmp_path_factory.mktemp("student") / "student"
    distill.run(tiny_cfg, dataset_dir, teacher_dir, out)
    return out


@pytest.fixture(scope="module")
def int8_cfg(tiny_cfg):
    return config.load("demo-tiny", ["export.int8=true", "export.calibration_images=128"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, int8_cfg, dataset_dir, student_dir):
    out = tmp_path_factory.mktemp("export")
    metrics = export.run(int8_cfg, dataset_dir, student_dir, {"student/test/prec@1": 0.5}, out / "model").metrics
    return out / "model", metrics


def test_int8_model_is_qdq_per_channel_and_published(exported, tmp_path):
    out, metrics = exported
    path = out / quantize.INT8_FILE
    assert path.is_file() and "export/int8_refused" not in metrics
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    conv_count = ops.count("Conv")
    assert len(weight_dq) >= conv_count  # every conv weight is stored as int8
    scales = [numpy_helper.to_array(inits[n.input[1]]) for n in weight_dq]
    assert all(s.ndim == 1 and s.size > 1 for s in scales)  # one scale per output channel
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert acts and all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in acts)  # u8 activations
    assert metrics["export/int8_bytes"] == path.stat().st_size < 0.6 * metrics["export/onnx_bytes"]

    card = json.loads((out / "model.json").read_text())
    assert card["file"] == "model.onnx" and card["int8"]["file"] == quantize.INT8_FILE
    assert card["int8"]["test_prec@1"] == metrics["export/int8/test/prec@1"]
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("export/int8/test/prec@1", "export/fp32/test/prec@1", "export/int8_bytes"):
        assert saved[key] == metrics[key]

    export.publish_result(out, str(tmp_path / "pub"))
    sums = (tmp_path / "pub" / "SHA256SUMS").read_text().splitlines()
    published = [line.split()[1] for line in sums]
    assert published == list(export.result_files(out))
    assert published[:2] == ["model.onnx", quantize.INT8_FILE] and published[-2:] == ["model.json", "metrics.json"]
    assert "serving/funmatch-int8/1/model.onnx" in published  # the INT8 model is served as its own entry
    assert (tmp_path / "pub" / quantize.INT8_FILE).read_bytes() == path.read_bytes()


def test_int8_agrees_with_fp32_on_test_images(exported, dataset_dir, student_dir):
    out, metrics = exported
    fp32, int8 = metrics["export/fp32/test/prec@1"], metrics["export/int8/test/prec@1"]
    assert fp32 > 0.15  # above chance (0.1): the student learned something, so agreement means something
    assert fp32 - int8 <= 0.01 and metrics["export/int8/test/agree@1"] >= 0.95
    # independent check of the written files on the raw test split, through the exact eval preprocessing
    from funmatch.data import prepared

    images, _ = prepared.load_split(dataset_dir, "test")
    crop_pct = json.loads((student_dir / "model.json").read_text())["crop_pct"]
    a = quantize.ort_logits(quantize.session(out / "model.onnx", 2), images[:500], 32, crop_pct, 250)
    b = quantize.ort_logits(quantize.session(out / quantize.INT8_FILE, 2), images[:500], 32, crop_pct, 250)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert np.abs(a - b).max() < 0.25 * np.abs(a).max()
    assert not np.allclose(a, b)  # it really is another (quantized) model


def test_int8_refusal_keeps_fp32_export(tmp_path, int8_cfg, dataset_dir, student_dir, monkeypatch):
    """Negative control: calibrating on inputs 1000x outside the eval value range [-1, 1] makes the
    input quantization step so coarse that every real image looks the same to the INT8 model, so it
    loses accuracy and is refused; the fp32 export is still written and valid."""
    real = quantize.calibration_batches
    monkeypatch.setattr(quantize, "calibration_batches", lambda *a, **kw: [b * 1000 for b in real(*a, **kw)])
    cfg = copy.deepcopy(int8_cfg)
    cfg.export.calibration_images = 32
    out = tmp_path / "model"
    metrics = export.run(cfg, dataset_dir, student_dir, {"student/test/prec@1": 0.5}, out).metrics
    drop = metrics["export/fp32/test/prec@1"] - metrics["export/int8/test/prec@1"]
    assert drop > cfg.export.max_int8_drop
    refused = metrics["export/int8_refused"]  # the reason, a str among the float metrics
    assert isinstance(refused, str) and "more than export.max_int8_drop=0.01" in refused
    assert not (out / quantize.INT8_FILE).exists()
    assert (out / "model.onnx").is_file() and metrics["export/onnx_max_abs_diff"] <= 1e-3
    assert "int8" not in json.loads((out / "model.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["export/int8_refused"] == metrics["export/int8_refused"]
    export.publish_result(out, str(tmp_path / "pub"))
    assert not (tmp_path / "pub" / quantize.INT8_FILE).exists()


def test_refusal_threshold_is_absolute():
    assert quantize.int8_refusal(0.80, 0.795, 0.01) == ""
    assert quantize.int8_refusal(0.80, 0.80, 0.0) == ""
    assert quantize.int8_refusal(0.80, 0.79, 0.01) == ""  # exactly one point is still allowed
    assert quantize.int8_refusal(0.50, 0.60, 0.0) == ""  # INT8 better than fp32
    assert "1.50 points" in quantize.int8_refusal(0.80, 0.785, 0.01)


@pytest.mark.parametrize(
    "override, words",
    [
        ("export.max_int8_drop=1.5", ["export.max_int8_drop", "1.5"]),
        ("export.calibration_images=0", ["export.calibration_images", "0"]),
    ],
)
def test_int8_config_is_validated(override, words):
    with pytest.raises(config.ConfigError) as e:
        config.load("demo-tiny", [override])
    assert all(w in str(e.value) for w in words)


def test_bench_onnx_tiny(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "bench",
                "onnx",
                "--arch",
                "bit-r14-mini",
                "--resolution",
                "32",
                "--repeats",
                "3",
                "--warmup",
                "1",
                "--calibration-images",
                "16",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for word in ("torch", "ort_fp32", "ort_int8", "ORT fp32 / INT8", "torch / ORT fp32", "random init"):
        assert word in out
    r = json.loads(path.read_text())
    assert r["arch"] == "bit-r14-mini" and r["resolution"] == 32 and r["threads"] == 2
    for engine in ("torch", "ort_fp32", "ort_int8"):
        for b in ("1", "32"):
            t = r["latency_ms"][engine][b]
            assert 0 < t["median_ms"] <= t["p90_ms"] and t["repeats"] == 3
    for b in ("1", "32"):
        assert set(r["ratios"][b]) == {"ort_fp32/ort_int8", "torch/ort_fp32"}
    assert r["bytes"]["int8"] < r["bytes"]["fp32"] and r["machine"]["cpu"] and r["date"]
    assert r["command"].startswith("funmatch bench onnx --arch bit-r14-mini --resolution 32")


def test_bench_onnx_bad_arch_is_one_line(capsys):
    assert cli.main(["bench", "onnx", "--arch", "resnet5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("funmatch: error:") and err.count("\n") == 1 and "resnet5" in err
