"""No silent CPU fallback: a task given GPUs that sees no CUDA device stops at once, saying why in one line
(`funmatch.runtime.setup`); `runtime.device=cpu` and CPU configs keep running on the CPU."""

import os
import subprocess
import sys
import time

import pytest
import torch

from funmatch import config, runtime
from funmatch.errors import FunmatchError

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_task_given_a_gpu_without_cuda_stops_in_one_line_within_30s():
    cfg = config.load("pets-fast")
    code = (
        "import sys; from funmatch import config, runtime; from funmatch.errors import FunmatchError\n"
        f"cfg = config.from_json({cfg.to_json()!r})\n"
        "try:\n    runtime.setup(cfg.runtime, cfg.resources)\n"
        "except FunmatchError as e:\n    sys.exit(f'funmatch: error: {e}')"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=NO_GPU, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 1 and elapsed < 30, (elapsed, out.stderr)
    (line,) = out.stderr.splitlines()
    assert line.startswith(
        "funmatch: error: runtime: this task was given 1 nvidia.com/gpu (resources.accelerator_count=1) "
        "but CUDA sees no device (CUDA_VISIBLE_DEVICES='', torch "
    ), line
    assert "resources.accelerator_count=0 or runtime.device=cpu" in line


@pytest.mark.slow
def test_the_distill_stage_given_a_gpu_without_cuda_stops_in_one_line_within_30s(tmp_path):
    cfg = config.load("pets-fast")
    for artifact in ("dataset", "teacher"):
        (tmp_path / artifact).mkdir()  # stopped before either is read
    argv = ["stage", "distill", "--config-json", cfg.to_json(), "--dataset", str(tmp_path / "dataset")]
    argv += ["--teacher", str(tmp_path / "teacher"), "--output", str(tmp_path / "student")]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "funmatch", *argv], env=NO_GPU, capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - start
    errors = [line for line in out.stderr.splitlines() if line.startswith("funmatch: error:")]
    assert out.returncode == 2 and elapsed < 30, (elapsed, out.stderr[-2000:])
    assert len(errors) == 1 and "this task was given 1 nvidia.com/gpu" in errors[0], out.stderr[-2000:]


@pytest.mark.usefixtures("no_cuda")
def test_explicit_cuda_without_cuda_stops_and_cpu_runs_on_the_cpu():
    gpu = config.load("pets-fast")
    with pytest.raises(FunmatchError, match=r"^runtime: runtime.device=cuda:1 but CUDA sees no device"):
        runtime.setup(config.load("demo-tiny", ["runtime.device=cuda:1"]).runtime)
    cpu = config.load("pets-fast", ["runtime.device=cpu"])  # what the benchmarks use: allowed with GPUs given
    assert runtime.setup(cpu.runtime, cpu.resources).type == "cpu"
    assert runtime.setup(gpu.runtime).type == "cpu"  # a CPU task of a GPU config (evaluate, export): given none
    # CPU configs (resources.accelerator_count=0): the demo presets and every smoke variant, even with device auto
    for cfg in (config.load("demo"), config.load("imagenet", ["smoke=true", "runtime.device=auto"])):
        assert runtime.setup(cfg.runtime, cfg.resources).type == "cpu"
