"""Runs the DAG on this machine with kfp.local's SubprocessRunner(use_venv=False).

The same pipeline definition as on a cluster; GPU and Kubernetes settings are ignored locally.
The export stage publishes model.onnx, model.json and metrics.json into the output directory.
Finished tasks are reused through kfp.local's cache under `<output>/.kfp_cache`, and the distill
stage resumes from `<output>/checkpoints`, so re-running with the same output directory continues
where a crashed run stopped.

kfp.local prints every task's executor input and streamed log; all of it goes to `<output>/run.log`,
and the console shows one line per task (its progress while it runs, its time when done), warnings,
and a failed task's error as one line (`verbose=True`: everything, as kfp.local prints it).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

from kfp import local

from funmatch.config import Config
from funmatch.errors import FunmatchError, QualityGateStop
from funmatch.stages.serving import INFERENCE_SERVICE, SERVING_DIR
from pipelines.funmatch_pipeline import build, compile_pipeline

LOG_FILE = "run.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK = r"'(?P<task>[\w-]+)'"
_STARTED = re.compile(rf"Executing task {_TASK}")
_FINISHED = re.compile(rf"Task {_TASK} finished with status (?P<status>\w+)")
_CACHED = re.compile(rf"Task {_TASK} cache hit")
_PROGRESS = re.compile(r"^\s*(?P<label>[\w -]+):\s+\d+%\|")
_ERROR = re.compile(r"^\s*(?:\w+\.)*(?P<kind>[A-Z]\w*): (?P<message>.+)$")  # a traceback's last line
_WARNING = re.compile(r"\bWARNING\b|\w+Warning: ")
_KFP_PREFIX = re.compile(r"^\[KFP Executor [^\]]*\]:\s*")  # kfp.local's "[KFP Executor <time> WARNING]: "


class Console:
    """A file-like sink for kfp.local's output: everything into the log, a summary onto `out`."""

    def __init__(self, log: TextIO, out: TextIO, verbose: bool = False) -> None:
        self.log, self.out, self.verbose = log, out, verbose
        self.live = out.isatty()
        self.task, self.started, self.pending = "", 0.0, ""
        self.errors: dict[str, str] = {}  # task -> its last one-line error
        self.width = shutil.get_terminal_size((100, 20)).columns - 1

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.out.write(text)
            return len(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.out.flush()

    def _line(self, line: str) -> None:
        if m := _STARTED.search(line):
            self.task, self.started = m["task"], time.perf_counter()
            self._show(f"  {self.task:<20} …", final=False)
        elif m := _CACHED.search(line):
            self._show(f"  {m['task']:<20} cached", final=True)
            self.task = ""
        elif m := _FINISHED.search(line):
            status = "done" if m["status"] == "SUCCESS" else "FAILED"
            self._show(f"  {m['task']:<20} {status} in {time.perf_counter() - self.started:.0f}s", final=True)
            self.task = ""
        elif self.task and (m := _ERROR.match(line)):
            self.errors[self.task] = m["message"].strip()
        elif self.task and _PROGRESS.match(line):
            self._show(f"  {self.task:<20} {line.strip()}", final=False)
        elif _WARNING.search(line):  # shown whole: a warning says what to change
            self._show(f"  warning: {_KFP_PREFIX.sub('', line.strip())}", final=True, whole=True)

    def _show(self, text: str, final: bool, whole: bool = False) -> None:
        if self.live:
            self.out.write("\r\x1b[K" + (text if whole else text[: self.width]) + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()


def run(cfg: Config, output: str | Path, verbose: bool = False, out: TextIO | None = None) -> dict:
    """Compiles and runs the pipeline into `output`; returns the metrics."""
    start = time.perf_counter()
    target = Path(output).resolve()
    target.mkdir(parents=True, exist_ok=True)
    compile_pipeline(cfg, str(target / "pipeline.yaml"), target="local")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(target / "pipeline_root"),
        enable_caching=True,
        cache_root=str(target / ".kfp_cache"),
        raise_on_error=True,
    )
    stale = [*target.glob("model*.onnx"), *(target / n for n in ("model.json", "metrics.json", "SHA256SUMS"))]
    for path in [*stale, target / INFERENCE_SERVICE]:
        path.unlink(missing_ok=True)  # what is there afterwards is this run's (INT8, extra students too)
    shutil.rmtree(target / SERVING_DIR, ignore_errors=True)
    with open(target / LOG_FILE, "w") as log:
        console = Console(log, out or sys.stdout, verbose)
        with warnings.catch_warnings(), contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            warnings.simplefilter("ignore")  # "base_image ignored", "accelerator settings ignored locally"
            try:
                build(cfg)(
                    checkpoint_root=cfg.runtime.checkpoint_dir or str(target / "checkpoints"), publish_uri=str(target)
                )
            except RuntimeError as e:
                raise FunmatchError(_failure(str(e), console.errors, target / LOG_FILE)) from None
    metrics = json.loads((target / "metrics.json").read_text())
    metrics["wall_s"] = round(time.perf_counter() - start, 1)  # end to end, as the user waited
    (target / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def _failure(kfp_message: str, errors: dict[str, str], log: Path) -> str:
    """One line: the failed task's own error (the quality gate's verdict when the gate stopped the run)."""
    failed = re.findall(r"'([\w-]+)'", _ANSI.sub("", kfp_message.split("Inner task failed:")[-1]))
    task = failed[0] if failed else ""
    error = errors.get(task, "")
    if error.startswith(QualityGateStop.PREFIX):
        return f"the quality gate stopped the run before export:{error[len(QualityGateStop.PREFIX) + 1 :]}"
    return f"task {task or '?'} failed: {error or 'see the log'} (full log: {log})"
