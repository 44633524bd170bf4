"""`funmatch run`'s console: kfp.local's whole output goes to the log, one line per task to the user."""

import io

from funmatch.errors import QualityGateStop
from pipelines import local

# What kfp.local 2.17 prints for a task (logging_utils / task_dispatcher), colours included.
STREAM = """\
10:31:15.361 - INFO - Executing task \x1b[96m'train-teacher'\x1b[0m
10:31:15.361 - INFO - Streamed logs:

    [KFP Executor 2026-11-30 10:31:15,429 INFO]: Got executor_input:
    {
        "inputs": {"parameterValues": {"config": "{...}"}}
    }
    teacher:  50%|#####     | 600/1200 [00:10<00:10, 60.0step/s, loss=0.5]
    teacher: 100%|##########| 1200/1200 [00:20<00:00, 60.0step/s, loss=0.4]
    [KFP Executor 2026-11-30 10:31:35,000 WARNING]: the teacher was trained from scratch
10:31:35.000 - INFO - Task \x1b[96m'train-teacher'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
10:31:35.001 - INFO - Task \x1b[96m'train-teacher'\x1b[0m outputs:
    teacher: Model( name='teacher', uri='/x', metadata={} )
--------------------------------------------------------------------------------
10:31:35.002 - INFO - Task \x1b[96m'evaluate'\x1b[0m cache hit (key=0123456789ab); reusing outputs
10:31:35.003 - INFO - Executing task \x1b[96m'quality-gate-stop'\x1b[0m
    Traceback (most recent call last):
      File "x.py", line 1, in <module>
    funmatch.errors.QualityGateStop: GATE
10:31:36.000 - ERROR - Task \x1b[96m'quality-gate-stop'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
""".replace("GATE", str(QualityGateStop("student test prec@1 0.2430 < gate.min_student_acc=0.99")))


def _feed(verbose: bool = False) -> tuple[local.Console, str, str]:
    log, out = io.StringIO(), io.StringIO()
    console = local.Console(log, out, verbose)
    for chunk in (STREAM[:50], STREAM[50:777], STREAM[777:]):  # arbitrary write boundaries
        console.write(chunk)
    return console, log.getvalue(), out.getvalue()


def test_everything_goes_to_the_log_and_one_line_per_task_to_the_user():
    console, log, out = _feed()
    assert log == STREAM
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["warning:", "train-teacher", "evaluate", "quality-gate-stop"]
    assert lines[1].split()[1:3] == ["done", "in"] and lines[2].endswith("cached")
    assert lines[0] == "  warning: the teacher was trained from scratch"  # whole, without kfp.local's prefix
    assert "FAILED" in lines[3]
    assert "executor_input" not in out and "%|" not in out  # no progress lines when not a terminal
    assert console.errors["quality-gate-stop"].startswith(QualityGateStop.PREFIX)


def test_verbose_shows_everything():
    _, log, out = _feed(verbose=True)
    assert out == log == STREAM


def test_a_failed_run_is_one_line_with_the_gate_reason_or_the_task_error(tmp_path):
    console, _, _ = _feed()
    kfp_error = (
        "Pipeline \x1b[95m'funmatch'\x1b[0m finished with status FAILURE. Inner task failed: "
        "\x1b[96m'quality-gate-stop'\x1b[0m inside \x1b[96m'condition-3'\x1b[0m."
    )
    line = local._failure(kfp_error, console.errors, tmp_path / "run.log")
    assert line == (
        "the quality gate stopped the run before export: student test prec@1 0.2430 < gate.min_student_acc=0.99"
    )
    line = local._failure(
        "... Inner task failed: 'distill' inside 'x'.", {"distill": "CUDA out of memory"}, tmp_path / "run.log"
    )
    assert line == f"task distill failed: CUDA out of memory (full log: {tmp_path / 'run.log'})"
