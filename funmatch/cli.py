"""The `funmatch` command line.

    funmatch run [--preset NAME] [--set KEY=VALUE ...] [--output DIR]   compile the DAG and run it locally
    funmatch compile [--preset NAME] [--set ...] --output pipeline.yaml  KFP IR YAML for the Kubeflow UI
    funmatch presets [--json]                                            presets, expectations, configs

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
    p.add_argument("--preset", default="demo", help="preset name (default: demo; see `funmatch presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. --set distill.epochs=100 (repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="funmatch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config keys: `funmatch presets --json` prints every preset fully resolved.")
    p.add_argument("--version", action="version", version=f"funmatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compile the pipeline and run all five stages locally (kfp.local)",
                         description="Compiles the DAG and runs it with kfp.local's SubprocessRunner. On success "
                                     "DIR holds model.onnx, model.json and metrics.json; re-running with the same "
                                     "DIR reuses finished stages and resumes an interrupted distillation.")
    _config_args(run)
    run.add_argument("--output", default="funmatch-run", metavar="DIR", help="output directory (default: funmatch-run)")

    comp = sub.add_parser("compile", help="write the KFP IR YAML to upload in the Kubeflow UI")
    _config_args(comp)
    comp.add_argument("--output", required=True, metavar="PIPELINE_YAML")

    pre = sub.add_parser("presets", help="list presets with description, expected metric and runtime")
    pre.add_argument("--json", action="store_true", help="print every preset's fully resolved config as JSON")
    return p


def preflight(cfg: config.Config) -> None:
    """Input checks that need the file system (the config itself is already validated)."""
    from funmatch import data, models, storage
    from funmatch.errors import CheckpointError

    data.check_source(cfg.data.source)
    for role, m in (("teacher", cfg.teacher), ("student", cfg.student)):
        for uri in config.split_uris(m.init):
            if storage.is_gcs(uri):
                continue  # checked by the stage that fetches it, before it trains
            if not os.path.isfile(uri):
                raise CheckpointError(f"{role}.init={uri!r} does not exist or is not a file")
            model = models.create_model(m.arch, 2, stem_pool=m.stem_pool)
            models.load_init(model, m.arch, uri, load_head=False)  # body shapes; the head is checked later


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config.load(args.preset, args.overrides)
    preflight(cfg)
    from pipelines import local  # needs kfp; imported only here

    metrics = local.run(cfg, args.output)
    out = Path(args.output).resolve()
    print(f"\nfunmatch: model in {out}/model.onnx (card: model.json, metrics: metrics.json)")
    print(f"  teacher test prec@1 {metrics['teacher/test/prec@1']:.4f} | student test prec@1 "
          f"{metrics['student/test/prec@1']:.4f} | agree@1 {metrics['student/test/agree@1']:.4f} | "
          f"kl {metrics['student/test/kl']:.4f} | onnx diff {metrics['export/onnx_max_abs_diff']:.1e} | "
          f"wall {metrics['wall_s']:.0f}s")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    cfg = config.load(args.preset, args.overrides)
    from pipelines.funmatch_pipeline import compile_pipeline

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    compile_pipeline(cfg, args.output)
    print(f"funmatch: wrote {args.output} (preset {cfg.preset}, config {cfg.hash()})")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    described = config.describe_presets()
    if args.json:
        print(json.dumps({"presets": described}, indent=1))
        return 0
    for name, d in described.items():
        e = d["expected"]
        print(f"{name}\n  {d['description']}\n  expected: {e['metric']} ≈ {e['value']}"
              f"{' (paper: ' + e['paper'] + ')' if e['paper'] else ''}; runtime: {e['runtime']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = {"run": cmd_run, "compile": cmd_compile, "presets": cmd_presets}[args.command]
    try:
        return handler(args)
    except FunmatchError as e:
        print(f"funmatch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
