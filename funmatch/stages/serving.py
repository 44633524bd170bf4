"""The serving handoff of an export: a Triton model repository and a KServe InferenceService beside it.

    serving/<name>/config.pbtxt       Triton's model configuration, read off the ONNX graph
    serving/<name>/labels.txt         the class names, one a line (Triton's classification extension)
    serving/<name>/1/model.onnx       the model itself, version 1
    inferenceservice.yaml             KServe v1beta1 InferenceService whose storageUri is `serving/`

`<name>` is `funmatch` for model.onnx, `funmatch-int8` for model.int8.onnx and `funmatch-<arch>-<res>`
for a further student's model-<arch>-<res>.onnx; Triton loads every model of the repository.

Runtime and protocol: the predictor names KServe's `kserve-tritonserver` ClusterServingRuntime with
`protocolVersion: v2`. Triton (installed with KServe, model format `onnx` version 1) runs ONNX through
onnxruntime on CPU or GPU, batches concurrent requests (`dynamic_batching`) and serves the QDQ INT8
model with the same backend, all from the repository as a plain directory (`tritonserver
--model-repository=serving` serves the same files without Kubernetes). The runtime is named rather than
auto-selected: where the optional `kserve-openvino` runtime is installed it would win the `onnx` format
(priority 2 over Triton's 1) and ignore config.pbtxt. Triton serves the Open Inference Protocol (v2)
only (KServe's v1 is TF-Serving's JSON); `v2` rather than `grpc-v2` keeps the endpoint plain HTTP through
the Knative ingress (`POST /v2/models/funmatch/infer`), and Triton listens on gRPC too. The
InferenceService is named like the main Triton model, so KServe's route and Triton's model name agree.
Pods reading a gs:// storageUri need a service account allowed to read the bucket (Workload Identity):
set `spec.predictor.serviceAccountName`.

Bytes: each model file in the repository is a hard link to the export's own file (no extra disk),
falling back to a copy where the file system has no hard links (gcsfuse). A publication uploads both
paths, so a published version stores each ONNX file twice (a ResNet-50: ~0.1 GB more); the top-level
files stay for consumers of model.json, the repository is what servers load as is.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import yaml

from funmatch import storage
from funmatch.errors import FunmatchError

SERVING_DIR = "serving"
INFERENCE_SERVICE = "inferenceservice.yaml"
MODEL_NAME = "funmatch"
RUNTIME = "kserve-tritonserver"
LABELS = "labels.txt"
# Rows Triton accepts per request and the most its dynamic batcher merges (the ONNX graph allows any batch):
# bounds one request's input (64 images of 224 px: 38 MB of float32) and the wait a full batch adds.
MAX_BATCH_SIZE = 64
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # model and tensor names: quoted in config.pbtxt as they are
FUSE_PREFIXES = (("/gcs/", "gs://"), ("/s3/", "s3://"))  # KFP's local paths of gs:// and s3:// artifacts


class ServingError(FunmatchError):
    """An ONNX model that the serving repository cannot describe."""


@dataclass(frozen=True)
class Tensor:
    """A graph input or output: name, ONNX element type (e.g. FLOAT) and shape (str: a symbolic dim,
    None: an unknown one)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Graph:
    """What a server needs to know of an ONNX file."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    opset: int
    producer: str
    producer_version: str


def _tensor(value: onnx.ValueInfoProto) -> Tensor:
    t = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return Tensor(value.name, onnx.TensorProto.DataType.Name(t.elem_type), dims)


def read_graph(onnx_path: str | Path) -> Graph:
    """The inputs (initializers excluded), outputs, default-domain opset and producer of an ONNX file."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Graph(
        tuple(_tensor(v) for v in model.graph.input if v.name not in initializers),
        tuple(_tensor(v) for v in model.graph.output),
        opset,
        model.producer_name,
        model.producer_version,
    )


def _batched(graph: Graph) -> bool:
    """Every input and output has a symbolic (or unknown) leading axis: Triton may batch."""
    return all(len(t.shape) > 0 and not isinstance(t.shape[0], int) for t in graph.inputs + graph.outputs)


def _tensor_config(t: Tensor, batched: bool, labels: bool) -> str:
    if t.dtype not in TRITON_TYPES:
        raise ServingError(f"tensor {t.name!r} has ONNX type {t.dtype}; Triton serves {', '.join(TRITON_TYPES)}")
    if not NAME.match(t.name):
        raise ServingError(f"tensor name {t.name!r} is not of the form {NAME.pattern}")
    dims = [d if isinstance(d, int) else -1 for d in (t.shape[1:] if batched else t.shape)]
    lines = [
        "  {",
        f'    name: "{t.name}"',
        f"    data_type: {TRITON_TYPES[t.dtype]}",
        f"    dims: [ {', '.join(map(str, dims))} ]",
    ]
    if labels:
        lines.append(f'    label_filename: "{LABELS}"')
    return "\n".join([*lines, "  }"])


def triton_config(name: str, graph: Graph, labels: bool) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for an ONNX graph: platform
    onnxruntime_onnx, the graph's tensors and types, a dynamic batch axis as max_batch_size, dynamic
    batching on; `labels`: the single output names labels.txt (classification extension)."""
    if not NAME.match(name):
        raise ServingError(f"model name {name!r} is not of the form {NAME.pattern}")
    batched = _batched(graph)
    labels = labels and len(graph.outputs) == 1 and len(graph.outputs[0].shape) == (2 if batched else 1)
    inputs = ",\n".join(_tensor_config(t, batched, False) for t in graph.inputs)
    outputs = ",\n".join(_tensor_config(t, batched, labels) for t in graph.outputs)
    text = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {MAX_BATCH_SIZE if batched else 0}",
        f"input [\n{inputs}\n]",
        f"output [\n{outputs}\n]",
    ]
    if batched:
        text.append("dynamic_batching { }")
    return "\n".join(text) + "\n"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another device, gcsfuse): the bytes again
        shutil.copyfile(src, dst)


def model_name(onnx_file: str) -> str:
    """The Triton model name of an export's ONNX file: model.onnx → funmatch, model.int8.onnx →
    funmatch-int8, model-<arch>-<res>.onnx → funmatch-<arch>-<res>."""
    stem = onnx_file.removesuffix(".onnx").removeprefix("model")
    return MODEL_NAME + stem.replace(".", "-")


def write_repository(out_dir: str | Path, onnx_files: list[str], classes: list[str]) -> list[str]:
    """Replaces `out_dir`/serving with a Triton repository holding each of `onnx_files` (names in
    `out_dir`) as version 1 of its own model. Returns the model names."""
    out = Path(out_dir)
    root = out / SERVING_DIR
    shutil.rmtree(root, ignore_errors=True)
    names = []
    for file in onnx_files:
        name = model_name(file)
        (root / name / "1").mkdir(parents=True)
        _link_or_copy(out / file, root / name / "1" / "model.onnx")
        graph = read_graph(out / file)
        (root / name / "config.pbtxt").write_text(triton_config(name, graph, labels=bool(classes)))
        if classes:
            (root / name / LABELS).write_text("".join(f"{c}\n" for c in classes))
        names.append(name)
    return names


def repository_files(out_dir: str | Path) -> tuple[str, ...]:
    """The repository's files as POSIX paths relative to `out_dir`, sorted; () when there is none."""
    root = Path(out_dir) / SERVING_DIR
    if not root.is_dir():
        return ()
    return tuple(sorted(p.relative_to(out_dir).as_posix() for p in root.rglob("*") if p.is_file()))


def storage_uri(location: str | Path) -> str:
    """Where KServe finds the repository of a bundle at `location` (a gs:// prefix or a directory; KFP's
    /gcs/ and /s3/ artifact paths become the gs:// / s3:// URIs they stand for)."""
    if "://" in str(location):
        return storage.join(str(location), SERVING_DIR)
    path = (Path(location).resolve() / SERVING_DIR).as_posix()
    for local, scheme in FUSE_PREFIXES:
        if path.startswith(local):
            return scheme + path.removeprefix(local)
    return path


def inference_service(uri: str) -> dict:
    """The KServe v1beta1 InferenceService serving the repository at `uri` with Triton (module docstring)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": MODEL_NAME, "labels": {"app.kubernetes.io/name": MODEL_NAME}},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "onnx", "version": "1"},
                    "runtime": RUNTIME,
                    "protocolVersion": "v2",
                    "storageUri": uri,
                }
            }
        },
    }


def write_inference_service(out_dir: str | Path, uri: str) -> Path:
    """Writes inferenceservice.yaml into `out_dir`, its storageUri `uri` (see `storage_uri`)."""
    path = Path(out_dir) / INFERENCE_SERVICE
    path.write_text(yaml.safe_dump(inference_service(uri), sort_keys=False))
    return path
