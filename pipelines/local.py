"""Runs the DAG on this machine with kfp.local's SubprocessRunner(use_venv=False).

The same pipeline definition as on a cluster; GPU and Kubernetes settings are ignored locally.
The export stage publishes model.onnx, model.json and metrics.json into the output directory.
Finished tasks are reused through kfp.local's cache under `<output>/.kfp_cache`, and the distill
stage resumes from `<output>/checkpoints`, so re-running with the same output directory continues
where a crashed run stopped.
"""
import json
import time
import warnings
from pathlib import Path

from kfp import local

from funmatch.config import Config
from funmatch.errors import FunmatchError
from pipelines.funmatch_pipeline import build, compile_pipeline


def run(cfg: Config, output: str | Path) -> dict:
    """Compiles and runs the pipeline into `output`; returns the metrics."""
    start = time.perf_counter()
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    compile_pipeline(cfg, str(out / "pipeline.yaml"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "pipeline_root"),
               enable_caching=True, cache_root=str(out / ".kfp_cache"), raise_on_error=True)
    for stale in [*out.glob("model*.onnx"), out / "model.json", out / "metrics.json", out / "SHA256SUMS"]:
        stale.unlink(missing_ok=True)  # what is there afterwards is this run's (INT8, extra students too)
    started = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "base_image ignored", "accelerator settings ignored locally"
        try:
            build(cfg)(checkpoint_root=cfg.runtime.checkpoint_dir or str(out / "checkpoints"), publish_uri=str(out))
        except RuntimeError:
            verdicts = [p for p in (out / "pipeline_root").glob("*/**/report/gate.json") if p.stat().st_mtime >= started]
            verdict = json.loads(verdicts[0].read_text()) if verdicts else {"passed": True}
            if not verdict["passed"]:
                raise FunmatchError(f"the quality gate stopped the run before export: {verdict['reason']}") from None
            raise
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = round(time.perf_counter() - start, 1)  # end to end, as the user waited
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics
