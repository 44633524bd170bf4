"""The serving handoff of an export: the Triton model repository checked with Triton's own ModelConfig
schema against the ONNX files, and the KServe InferenceService against KServe's vendored CRD."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from funmatch import config, storage
from funmatch.launch import tasks
from funmatch.stages import distill, export, serving
from gcs_server import fake_gcs
from infra.k8s import CRDValidator

pytestmark = pytest.mark.slow  # an export (and an INT8 calibration) per module: over 5 s

KSERVE_DIR = Path(__file__).resolve().parents[2] / "manifests" / "schemas" / "kserve-v0.20.0"
CRD_FILE = KSERVE_DIR / "serving.kserve.io_inferenceservices.yaml"
EVALUATION = {"student/test/prec@1": 0.5, "teacher/test/prec@1": 0.6}
TRITON_TYPE: dict[int, int] = {  # ONNX element type → Triton's DataType, as Triton's onnxruntime backend maps them
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
}


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    short = ["distill.epochs=0.05", "distill.warmup_steps=1", "distill.eval_every=0"]
    extra = ["distill.extra_students=bit-r14-mini@64"]
    int8 = ["export.int8=true", "export.calibration_images=32", "export.max_int8_drop=1"]  # kept whatever it scores
    return config.load("demo-tiny", short + extra + int8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cfg, dataset_dir, teacher_dir) -> tuple[Path, export.Export]:
    """A tiny run's export: model.onnx, model.int8.onnx and a further student's model-bit-r14-mini-64.onnx."""
    student = tmp_path_factory.mktemp("student") / "student"
    distill.run(cfg, dataset_dir, teacher_dir, student)
    out = tmp_path_factory.mktemp("export") / "model"
    return out, export.run(cfg, dataset_dir, student, EVALUATION, out)


def config_errors(model_config: mc.ModelConfig, onnx_path: Path) -> list[str]:
    """Where a parsed config.pbtxt disagrees with the ONNX graph Triton's onnxruntime backend will load."""
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name for i in graph.initializer}
    errs = []
    if model_config.platform != "onnxruntime_onnx":
        errs.append(f"platform {model_config.platform!r}")
    for kind, declared, actual in (
        ("input", model_config.input, [v for v in graph.input if v.name not in inits]),
        ("output", model_config.output, list(graph.output)),
    ):
        if [t.name for t in declared] != [v.name for v in actual]:
            errs.append(f"{kind} names {[t.name for t in declared]} != {[v.name for v in actual]}")
            continue
        for t, v in zip(declared, actual, strict=True):
            tensor = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            if model_config.max_batch_size > 0:
                if dims[0] != -1:
                    errs.append(f"{kind} {t.name}: batching declared but the ONNX batch axis is fixed")
                dims = dims[1:]
            if list(t.dims) != dims:
                errs.append(f"{kind} {t.name}: dims {list(t.dims)} != ONNX {dims}")
            if t.data_type != TRITON_TYPE.get(tensor.elem_type):
                errs.append(f"{kind} {t.name}: {mc.DataType.Name(t.data_type)} for ONNX type {tensor.elem_type}")
    return errs


def parse_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


MODELS = ["funmatch", "funmatch-int8", "funmatch-bit-r14-mini-64"]


def test_the_repository_holds_every_exported_model(exported):
    out, result = exported
    assert result.card["serving"]["triton_models"] == {
        "funmatch": "model.onnx",
        "funmatch-int8": "model.int8.onnx",
        "funmatch-bit-r14-mini-64": "model-bit-r14-mini-64.onnx",
    }
    tree = sorted(f"serving/{m}/{f}" for m in MODELS for f in ("1/model.onnx", "config.pbtxt", "labels.txt"))
    assert serving.repository_files(out) == tuple(tree)
    assert result.files == (
        "model.onnx",
        "model.int8.onnx",
        "model-bit-r14-mini-64.onnx",
        *tree,
        "inferenceservice.yaml",
        "model.json",
        "metrics.json",
    )
    assert export.result_files(out) == result.files
    for name, file in result.card["serving"]["triton_models"].items():  # the same bytes, hard-linked here
        assert (out / "serving" / name / "1" / "model.onnx").samefile(out / file)
    assert (out / "serving" / "funmatch" / "labels.txt").read_text().splitlines() == result.card["classes"]


@pytest.mark.parametrize("name", MODELS)
def test_config_pbtxt_parses_with_tritons_schema_and_matches_the_onnx_file(exported, name):
    out, _ = exported
    model_config = parse_config(out / "serving" / name / "config.pbtxt")
    assert model_config.name == name and model_config.max_batch_size == serving.MAX_BATCH_SIZE
    assert model_config.HasField("dynamic_batching")
    assert config_errors(model_config, out / "serving" / name / "1" / "model.onnx") == []
    assert [list(t.dims) for t in model_config.input] == [[3, 64, 64] if "r14" in name else [3, 32, 32]]
    (logits,) = model_config.output
    assert list(logits.dims) == [10] and logits.label_filename == "labels.txt"
    assert len((out / "serving" / name / logits.label_filename).read_text().splitlines()) == 10


def test_broken_configs_are_rejected(exported):
    out, _ = exported
    text = (out / "serving" / "funmatch" / "config.pbtxt").read_text()
    for broken in (
        text.replace("dims:", "dimz:", 1),  # a field ModelConfig does not have
        text.replace("TYPE_FP32", "TYPE_FLOAT32", 1),  # not a DataType
        text.replace("max_batch_size: 64", 'max_batch_size: "64"'),  # a string for an int
        text.replace("output [", "output [ {", 1),  # unbalanced braces
    ):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(broken, mc.ModelConfig())
    onnx_file = out / "serving" / "funmatch" / "1" / "model.onnx"
    for old, new, why in (
        ("dims: [ 3, 32, 32 ]", "dims: [ 3, 32, 33 ]", "dims"),
        ('name: "image"', 'name: "input"', "input names"),
        ("TYPE_FP32", "TYPE_FP16", "TYPE_FP16"),
        ('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"', "platform"),
    ):
        wrong = text_format.Parse(text.replace(old, new, 1), mc.ModelConfig())
        errs = config_errors(wrong, onnx_file)
        assert errs and why in errs[0], (old, errs)
    unbatched = text_format.Parse(text.replace("max_batch_size: 64", "max_batch_size: 0"), mc.ModelConfig())
    assert "dims [3, 32, 32] != ONNX [-1, 3, 32, 32]" in config_errors(unbatched, onnx_file)[0]


def test_the_served_copy_gives_the_same_logits(exported):
    out, _ = exported
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    got = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
        for p in (out / "model.onnx", out / "serving" / "funmatch" / "1" / "model.onnx")
    ]
    assert got[0].shape == (3, 10) and np.array_equal(got[0], got[1])


def test_a_fixed_batch_graph_is_served_unbatched(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, "n"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, "n"])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, tmp_path / "model.onnx")
    assert serving.write_repository(tmp_path, ["model.onnx"], []) == ["funmatch"]
    model_config = parse_config(tmp_path / "serving" / "funmatch" / "config.pbtxt")
    assert model_config.max_batch_size == 0 and not model_config.HasField("dynamic_batching")
    assert [list(t.dims) for t in (*model_config.input, *model_config.output)] == [[4, -1], [4, -1]]
    assert config_errors(model_config, tmp_path / "serving" / "funmatch" / "1" / "model.onnx") == []


@pytest.fixture(scope="module")
def kserve() -> CRDValidator:
    return CRDValidator(CRD_FILE)


def test_the_vendored_crd_is_the_published_one():
    readme = (KSERVE_DIR / "README.md").read_text()
    listed = dict(re.findall(r"^\| (\S+) \| ([0-9a-f]{64}) \|$", readme, re.M))
    assert listed.keys() == {CRD_FILE.name, "LICENSE"}
    for name, digest in listed.items():
        assert hashlib.sha256((KSERVE_DIR / name).read_bytes()).hexdigest() == digest, name


def test_the_inference_service_is_valid_for_kserve(exported, kserve):
    out, _ = exported
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert kserve.errors(isvc) == []
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == str(out.resolve() / "serving") and model["modelFormat"]["name"] == "onnx"
    assert (model["runtime"], model["protocolVersion"]) == ("kserve-tritonserver", "v2")
    assert isvc["metadata"]["name"] == "funmatch"  # Triton's name of model.onnx: one route for both


@pytest.mark.parametrize(
    "where, field, value, why",
    [
        (("spec", "predictor", "model"), "storageURI", "gs://b/m", "'storageURI' was unexpected"),  # misspelt
        (("spec", "predictor", "model", "modelFormat"), "name", None, "'name' is a required property"),
        (("spec", "predictor", "model"), "protocolVersion", 2, "2 is not of type 'string'"),
        (("spec", "predictor"), "minReplicas", "one", "'one' is not of type 'integer'"),
        (("spec",), "predictor", None, "'predictor' is a required property"),
        (("metadata",), "name", "Funmatch_Model", "not a DNS-1123 subdomain"),
    ],
)
def test_a_wrong_inference_service_is_rejected(kserve, where, field, value, why):
    isvc = copy.deepcopy(serving.inference_service("gs://bucket/models/m/v/serving"))
    assert kserve.errors(isvc) == []
    node = isvc
    for key in where:
        node = node[key]
    if value is None:
        del node[field]
    else:
        node[field] = value
    (err,) = kserve.errors(isvc)
    assert why in err


def test_storage_uris():
    assert serving.storage_uri("gs://b/models/m/v1/") == "gs://b/models/m/v1/serving"
    assert serving.storage_uri("/gcs/b/pipeline/run/export/model") == "gs://b/pipeline/run/export/model/serving"
    assert serving.storage_uri("/s3/b/x") == "s3://b/x/serving"
    assert serving.storage_uri("relative/dir") == str(Path("relative/dir").resolve() / "serving")


def copy_bundle(out: Path, bundle: Path) -> Path:
    """A copy of an export, so that publishing it leaves the export fixture's inferenceservice.yaml local."""
    for name in export.result_files(out):
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes((out / name).read_bytes())
    return bundle


def test_a_flat_publication_serves_from_its_own_directory(exported, tmp_path, kserve):
    out, result = exported
    target = tmp_path / "published"
    assert export.publish_result(copy_bundle(out, tmp_path / "bundle"), str(target)) == str(target)
    isvc = yaml.safe_load((target / "inferenceservice.yaml").read_text())
    assert kserve.errors(isvc) == [] and isvc["spec"]["predictor"]["model"]["storageUri"] == str(target / "serving")
    sums = [line.split()[1] for line in (target / "SHA256SUMS").read_text().splitlines()]
    assert sums == list(result.files)
    assert parse_config(target / "serving" / "funmatch-int8" / "config.pbtxt").name == "funmatch-int8"


def test_a_republished_directory_serves_no_stale_model(exported, tmp_path):
    bundle = copy_bundle(exported[0], tmp_path / "bundle")
    export.publish_result(bundle, str(tmp_path / "run"))
    assert (tmp_path / "run" / "serving" / "funmatch-int8" / "config.pbtxt").is_file()
    (bundle / "model.int8.onnx").unlink()  # the next run's INT8 model is refused
    serving.write_repository(bundle, list(export.onnx_files(bundle)), [])
    export.publish_result(bundle, str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / "serving").iterdir()) == ["funmatch", "funmatch-bit-r14-mini-64"]
    assert (bundle / "serving" / "funmatch" / "config.pbtxt").is_file()  # the bundle keeps its own


def test_a_registry_version_serves_from_its_gcs_prefix(exported, tmp_path, monkeypatch):
    bundle = copy_bundle(exported[0], tmp_path / "bundle")
    with fake_gcs() as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        bucket = f"fm-{uuid4().hex[:12]}"
        storage.gcs_client().create_bucket(bucket)
        published = export.publish_result(bundle, f"gs://{bucket}/models/fashion")
        version = json.loads(storage.read_bytes(f"gs://{bucket}/models/fashion/latest.json"))["version"]
        assert published == f"gs://{bucket}/models/fashion/{version}/"
        isvc = yaml.safe_load(storage.read_bytes(published + "inferenceservice.yaml"))
        assert isvc["spec"]["predictor"]["model"]["storageUri"] == published + "serving"
        assert storage.exists(published + "serving/funmatch/1/model.onnx")
    assert yaml.safe_load((bundle / "inferenceservice.yaml").read_text()) == isvc


def test_the_model_artifact_carries_the_cards_facts(exported, tmp_path, cfg, monkeypatch):
    out, result = exported
    meta = result.metadata()
    assert meta["framework"] == "pytorch" and meta["format"] == "onnx" and meta["opset"] == cfg.export.opset
    assert (meta["input_name"], meta["input_shape"]) == ("image", ["batch", 3, 32, 32])
    assert (meta["output_name"], meta["output_shape"], meta["num_classes"]) == ("logits", ["batch", 10], 10)
    assert (meta["student_test_prec1"], meta["teacher_test_prec1"]) == (0.5, 0.6)
    assert meta["config_hash"] == cfg.hash() and meta["preprocessing"]["center_crop"] == 32
    assert json.loads(json.dumps(meta)) == meta  # what KFP stores: plain JSON

    monkeypatch.setattr(export, "run", lambda *args: result)  # the task's own part: copying the metadata
    (tmp_path / "metrics.json").write_text(json.dumps(EVALUATION))
    artifact = SimpleNamespace(path=str(tmp_path), metadata={})
    model = SimpleNamespace(path=str(out), metadata={})
    tasks.export(cfg.to_json(), artifact, artifact, artifact, artifact, "", model)
    assert model.metadata == meta
