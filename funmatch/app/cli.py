"""The `funmatch` command line.

    funmatch run [--preset NAME] [--set KEY=VALUE ...] [--output DIR]   compile the DAG and run it locally
    funmatch compile [--preset NAME] [--set ...] --output pipeline.yaml [--no-cache]  KFP IR for the Kubeflow UI
    funmatch presets [--json]                                            presets, expectations, configs
    funmatch pull gs://BUCKET/models/NAME[@VERSION|@latest] DIR          a published model, sha256-verified
    funmatch submit --host URL [--namespace NS] [--cache] [--preset ...] [--set ...] [--publish-uri URI]
                                                    upload the pipeline version, start a run (caching off)
    funmatch schedule --host URL --cron CRON6 [--name NAME] [--namespace NS] [--cache] [--preset ...] [--set ...]
                                                    create or update a recurring run (caching off)
    funmatch fault-test [--preset demo-tiny] [--kills 5] [--signal KILL|TERM|both] [--json PATH]
                                                    kill distill at random steps, resume, compare weights
    funmatch stage distill --config-json JSON --dataset URI --teacher URI --output URI
                                                    one stage in this process (each process of a TrainJob)

Bad input (unknown preset, unknown or mistyped key, wrong value, missing data source, a teacher
checkpoint that does not fit) is answered with one line before any compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from funmatch import __version__, config
from funmatch.errors import FunmatchError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=None,
        help="preset name (default: folder when --set data.source=DIR names your own images, else demo; "
        "see `funmatch presets`)",
    )
    p.set_defaults(choose_preset=True)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set distill.epochs=100 (repeatable)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="funmatch",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys: `funmatch presets --json` prints every preset fully resolved.",
    )
    p.add_argument("--version", action="version", version=f"funmatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="compile the pipeline and run all five stages locally (kfp.local)",
        description="Compiles the DAG and runs it with kfp.local's SubprocessRunner. On success "
        "DIR holds model.onnx, model.json and metrics.json; re-running with the same "
        "DIR reuses finished stages and resumes an interrupted distillation.",
    )
    _config_args(run)
    run.add_argument("--output", default="funmatch-run", metavar="DIR", help="output directory (default: funmatch-run)")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show kfp.local's whole output (by default it goes to DIR/run.log; one line per stage here)",
    )

    comp = sub.add_parser("compile", help="write the KFP IR YAML to upload in the Kubeflow UI")
    _config_args(comp)
    comp.add_argument("--output", required=True, metavar="PIPELINE_YAML")
    comp.add_argument(
        "--no-cache",
        action="store_true",
        help="turn KFP caching off on every task (the IR `funmatch submit` and `schedule` upload)",
    )

    exp = sub.add_parser("experiment", help="small-scale reproductions of the paper's claims")
    exp.add_argument(
        "name",
        choices=["teaching-setups"],
        help="teaching-setups: the paper's teaching variants (Fig. 3 / App. C) at three budgets, 3 seeds per cell",
    )
    exp.add_argument(
        "--size",
        choices=["cpu", "gpu", "smoke"],
        default="cpu",
        help="cpu: ~15 min on 2 quiet cores; gpu: one H100/H200 (not yet timed); smoke: a minute (tests)",
    )
    exp.add_argument("--output", default="runs/teaching-setups", metavar="DIR")

    pre = sub.add_parser("presets", help="list presets with description, expected metric and runtime")
    pre.add_argument("--json", action="store_true", help="print every preset's fully resolved config as JSON")

    ft = sub.add_parser(
        "fault-test",
        help="kill the distill stage at seeded random steps, resume it, compare weights",
        description="Runs the distill stage on the CPU in a worker process: once uninterrupted, "
        "then killed at --kills seeded random steps and restarted from its checkpoints "
        "after each kill. Passes when the final weights are bit-identical, every kill "
        "was survived and no committed checkpoint was lost (see docs/reliability.md). "
        "Preset: demo-tiny unless --preset says otherwise.",
    )
    _config_args(ft)
    ft.set_defaults(preset="demo-tiny")
    ft.add_argument("--kills", type=int, default=5, help="kills per signal (default: 5)")
    ft.add_argument(
        "--signal",
        choices=["KILL", "TERM", "both"],
        default="KILL",
        help="KILL: SIGKILL anywhere; TERM: preemption notice, checkpoint and exit 143 (default: KILL)",
    )
    ft.add_argument("--seed", type=int, default=0, help="picks the kill steps (default: 0)")
    ft.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ft.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep runs, checkpoints and worker logs here (default: a temporary directory, removed afterwards)",
    )

    bench = sub.add_parser(
        "bench",
        help="measure on this machine: distill (the loop vs baselines), loader (streaming img/s), onnx (CPU latency)",
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    onnx = bench_sub.add_parser(
        "onnx",
        help="batch-1 / batch-32 CPU latency: torch eager, onnxruntime fp32 and INT8 (static QDQ)",
        description="Exports a randomly initialised model to ONNX, quantizes it to INT8 (static QDQ, as export.int8 "
        "does) and times torch eager, onnxruntime fp32 and onnxruntime INT8 on this CPU: median and p90 "
        "over warmed repeats, plus the ratios. Random weights: latency only, no accuracy.",
    )
    onnx.add_argument("--preset", default=None, help="take arch and resolution from this preset's student")
    onnx.add_argument("--arch", default=None, help="architecture (default: the preset's student, else resnet50)")
    onnx.add_argument("--resolution", type=int, default=None, help="input side in px (default: preset's, else 224)")
    onnx.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime (default: 2)")
    onnx.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    onnx.add_argument("--repeats", type=int, default=20, help="timed calls per engine and batch size (default: 20)")
    onnx.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    onnx.add_argument("--classes", type=int, default=1000, help="head size (default: 1000)")
    onnx.add_argument(
        "--calibration",
        default="demo",
        choices=["demo", "random"],
        help="INT8 calibration images: bundled demo images (eval view) or uniform noise (default: demo)",
    )
    onnx.add_argument("--calibration-images", type=int, default=32, help="number of calibration images (default: 32)")
    onnx.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    bd = bench_sub.add_parser(
        "distill",
        help="the real distill loop vs plain-PyTorch baselines (naive fp32, bf16+channels_last+compile)",
        description="Runs funmatch's distill loop (dataset artifact → augmentation → teacher → student → optimizer) "
        "on synthetic data with the preset's models, resolutions and batch, then the baselines of "
        "shared/tools/gpu_anchor128.py in the same process; prints img/s, MFU, peak memory and ratios.",
    )
    _config_args(bd)
    bd.add_argument("--steps", type=int, default=20, help="timed steps of each case (default: 20)")
    bd.add_argument("--no-compile-baseline", action="store_true", help="skip the torch.compile baseline")
    bd.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    bl = bench_sub.add_parser(
        "loader",
        help="the streaming input pipeline's own img/s (JPEG/raw shards → worker decode → device)",
        description="Streams the train split of a prepared dataset artifact (or of a synthetic JPEG one with "
        "photograph-like 1/f images at the preset's stored resolution) through the distill loader, "
        "without training, for each worker count; prints img/s, img/s per worker and one process's "
        "decode rate.",
    )
    _config_args(bl)
    bl.add_argument("--dataset", default="", metavar="DIR", help="a prepared dataset artifact (default: synthetic)")
    bl.add_argument("--images", type=int, default=2048, help="synthetic dataset size (default: 2048)")
    bl.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    bl.add_argument("--steps", type=int, default=24, help="timed batches per worker count (default: 24)")
    bl.add_argument("--workers", default="1", help="worker counts, comma-separated, e.g. 1,2,8,15 (default: 1)")
    bl.add_argument(
        "--decode",
        default="cpu",
        choices=["cpu", "device"],
        help="cpu: workers decode; device: workers read bytes, the training device decodes (default: cpu)",
    )
    bl.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    stage = sub.add_parser("stage", help="run one stage in this process (what a multi-node TrainJob's pods run)")
    stage_sub = stage.add_subparsers(dest="stage", required=True)
    sd = stage_sub.add_parser(
        "distill",
        help="distillation: funmatch.stages.distill.run on local or gs:// artifacts",
        description="Runs the distill stage on the given artifacts (directories or gs:// prefixes; gs:// inputs are "
        "fetched once per node into --cache-dir). Under torchrun each process runs this; rank 0 writes "
        "the student to --output and marks it complete. See funmatch/launch/trainjob.py.",
    )
    sd.add_argument("--config-json", required=True, metavar="JSON", help="the resolved config (as the pipeline's)")
    sd.add_argument("--dataset", required=True, metavar="URI", help="prepared dataset artifact")
    sd.add_argument("--teacher", required=True, metavar="URI", help="teacher model artifact")
    sd.add_argument("--output", required=True, metavar="URI", help="where rank 0 writes the student artifact")
    sd.add_argument("--checkpoint-dir", default="", metavar="URI", help="step checkpoints (resume; default: none)")
    sd.add_argument(
        "--cache-dir",
        default="",
        metavar="DIR",
        help="local copies of gs:// inputs (default: $FUNMATCH_CACHE_DIR, else a temp dir)",
    )
    pull = sub.add_parser(
        "pull",
        help="download a published model version, verify it against SHA256SUMS, print its card",
        description="Resolves gs://BUCKET/models/NAME (its latest.json) or NAME@VERSION, downloads "
        "every file SHA256SUMS lists, checks each sha256 and only then moves them into "
        "DIR. A mismatch is refused (exit 2) and DIR is left as it was.",
    )
    pull.add_argument("source", metavar="gs://BUCKET/models/NAME[@VERSION|@latest]")
    pull.add_argument("dest", metavar="DIR")
    for verb, text in (
        ("submit", "upload the compiled pipeline to Kubeflow Pipelines as a version and start a run"),
        ("schedule", "create or update a recurring run of the compiled pipeline on Kubeflow Pipelines"),
    ):
        kp = sub.add_parser(
            verb,
            help=text,
            description=f"{text}. The pipeline version is named <package version>-<config hash>-nocache "
            "and reused when it exists; its IR has KFP caching off on every task, so each run retrains "
            "every stage (--cache: caching on, version <package version>-<config hash>). Auth: "
            "KF_PIPELINES_TOKEN, else the service account token file (KF_PIPELINES_SA_TOKEN_PATH), else "
            "Google default credentials.",
        )
        _config_args(kp)
        kp.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint, e.g. https://HOST/pipeline")
        kp.add_argument("--experiment", default="funmatch", metavar="NAME", help="experiment (default: funmatch)")
        kp.add_argument(
            "--namespace",
            default=None,
            metavar="NS",
            help="Kubeflow profile namespace (multi-user KFP): the pipeline, its versions, the experiment and "
            "the runs are created there (default: none, single-user KFP)",
        )
        kp.add_argument(
            "--cache",
            action="store_true",
            help="let KFP reuse cached stages of earlier runs with the same inputs (default: off, every stage reruns)",
        )
        kp.add_argument(
            "--publish-uri",
            default="",
            metavar="URI",
            help="where export publishes, e.g. gs://BUCKET/models/NAME (default: nowhere)",
        )
        if verb == "schedule":
            kp.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * 0' = Sundays 03:00")
            kp.add_argument("--name", default=None, help="recurring run name (default: funmatch-<preset>)")
    return p


def preflight(cfg: config.Config) -> None:
    """Input checks that need the file system (the config itself is already validated)."""
    from funmatch import storage
    from funmatch.data import sources
    from funmatch.errors import CheckpointError
    from funmatch.recipe import models

    sources.check_data(cfg.data.source, cfg.data.root, cfg.data.download)
    if cfg.distill.images:
        sources.check_data(cfg.distill.images, cfg.data.root, cfg.data.download, key="distill.images")
    if cfg.teacher.classes and not storage.is_gcs(cfg.teacher.classes) and not os.path.isfile(cfg.teacher.classes):
        raise config.ConfigError(f"teacher.classes={cfg.teacher.classes!r} does not exist or is not a file")
    for role, m in (("teacher", cfg.teacher), ("student", cfg.student)):
        for uri in config.split_uris(m.init):
            if storage.is_gcs(uri):
                continue  # checked by the stage that fetches it, before it trains
            if not os.path.isfile(uri):
                raise CheckpointError(f"{role}.init={uri!r} does not exist or is not a file")
            if m.arch == config.archs.ONNX:
                models.load_onnx(uri)  # input and output kinds; the class count is checked by the stage
                continue
            model = models.create_model(m.arch, 2, stem_pool=m.stem_pool)
            models.load_init(model, m.arch, uri, load_head=False)  # body shapes; the head is checked later


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config.load(args.preset, args.overrides)
    preflight(cfg)
    from pipelines import local  # kfp: loaded by the commands that use it

    out = Path(args.output).resolve()
    print(f"funmatch: preset {cfg.preset} (config {cfg.hash()}) into {out}; full log: {out / local.LOG_FILE}")
    if cfg.data.source not in config.NAMED_SOURCES and (note := config.scratch_teacher_note(cfg)):
        print(f"funmatch: note: {note}")  # the teacher stage logs it again with the train size
    try:
        metrics = local.run(cfg, out, verbose=args.verbose)
    except FunmatchError as e:
        if str(e).startswith(GATE_STOPPED):
            raise FunmatchError(f"{e}; {gate_advice(cfg)}") from None
        raise
    print(f"funmatch: model in {out}/model.onnx (card: model.json, metrics: metrics.json)")
    accuracy = (
        f"teacher test prec@1 {metrics['teacher/test/prec@1']:.4f} | student test prec@1 "
        f"{metrics['student/test/prec@1']:.4f} | agree@1 {metrics['student/test/agree@1']:.4f}"
        if "student/test/prec@1" in metrics
        else f"no labels: student test agree@1 {metrics['student/test/agree@1']:.4f} | "
        f"agree@5 {metrics['student/test/agree@5']:.4f}"
    )
    print(
        f"  {accuracy} | kl {metrics['student/test/kl']:.4f} | "
        f"onnx diff {metrics['export/onnx_max_abs_diff']:.1e} | wall {metrics['wall_s']:.0f}s"
    )
    return 0


GATE_STOPPED = "the quality gate stopped the run"  # how pipelines/local.py reports a QualityGateStop


def gate_advice(cfg: config.Config) -> str:
    """What to change when the student misses the quality gate, most effective first (the run's own values)."""
    t, s, k = cfg.teacher, cfg.student, cfg.distill
    if k.max_images:
        budget = f"distill.max_images={2 * k.max_images}"
    elif k.epochs:
        budget = f"distill.epochs={2 * k.epochs:g}"
    else:  # derived, uncapped: PATIENT_IMAGES at most
        budget = f"distill.max_images={2 * config.PATIENT_IMAGES}"
    steps = [
        f"a longer distillation (--set {budget}: twice the images, about twice the time)",
        f"larger views (--set teacher.resolution={t.resolution + 32} student.resolution={s.resolution + 32})",
    ]
    if not config.split_uris(t.init):
        steps.insert(
            0,
            "a pretrained teacher, which the recipe assumes (--set teacher.init=<file> teacher.finetune=false, "
            "or a BiT .npz with teacher.finetune=true)",
        )
    return "to get there, try " + "; or ".join(steps)


def cmd_compile(args: argparse.Namespace) -> int:
    cfg = config.load(args.preset, args.overrides)
    from pipelines.funmatch_pipeline import compile_pipeline

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    compile_pipeline(cfg, args.output, caching=not args.no_cache)
    print(
        f"funmatch: wrote {args.output} (preset {cfg.preset}, config {cfg.hash()}, "
        f"KFP caching {'off' if args.no_cache else 'on'})"
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from funmatch.app import experiment

    result = experiment.teaching_setups(args.size, args.output)
    print(experiment.table(result))
    print(f"funmatch: wrote {args.output}/results.json, runs.jsonl, table.md and setups.png in {result['wall_s']:.0f}s")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    described = config.describe_presets()
    if args.json:
        print(json.dumps({"presets": described}, indent=1))
        return 0
    for name, d in described.items():
        e = d["expected"]
        cost = f"; {d['images_processed']:.3g} images ≈ {d['gpu_hours']} GPU-hours" if d["gpu_hours"] else ""
        print(
            f"{name}\n  {d['description']}\n  expected: {e['metric']} ≈ {e['value']}"
            f"{' (teacher ' + str(e['teacher_value']) + ')' if e['teacher_value'] else ''}"
            f"{' [' + e['paper'] + ']' if e['paper'] else ''}\n  runtime: {e['runtime']}{cost}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from funmatch.app import bench  # imports torch and onnxruntime: only here

    return bench.command(args)


def cmd_stage(args: argparse.Namespace) -> int:
    from funmatch.launch import trainjob  # the worker side of a multi-node TrainJob; imports torch via distill

    info = trainjob.run_worker(
        args.config_json, args.dataset, args.teacher, args.output, args.checkpoint_dir, args.cache_dir
    )
    print(json.dumps({k: info.get(k) for k in ("arch", "setup", "steps", "wall_s")}))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from funmatch.storage import publish  # google-cloud-storage is imported only when a gs:// URI is read

    return publish.cmd_pull(args)


def cmd_submit(args: argparse.Namespace) -> int:
    from funmatch.app import kfp_client  # kfp is imported inside it

    return kfp_client.cmd_submit(args)


def cmd_schedule(args: argparse.Namespace) -> int:
    from funmatch.app import kfp_client

    return kfp_client.cmd_schedule(args)


def cmd_fault_test(args: argparse.Namespace) -> int:
    from funmatch.app import faults

    return faults.command(args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "choose_preset", False) and args.preset is None:
        args.preset, why = config.default_preset(args.overrides)
        if why:
            print(f"funmatch: {why}")
    handler = {
        "run": cmd_run,
        "compile": cmd_compile,
        "presets": cmd_presets,
        "experiment": cmd_experiment,
        "bench": cmd_bench,
        "stage": cmd_stage,
        "fault-test": cmd_fault_test,
        "pull": cmd_pull,
        "submit": cmd_submit,
        "schedule": cmd_schedule,
    }[args.command]
    try:
        return handler(args)
    except FunmatchError as e:
        print(f"funmatch: error: {e}", file=sys.stderr)
        return 2
