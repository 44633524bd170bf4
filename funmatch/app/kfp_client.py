"""Submitting and scheduling the pipeline on a Kubeflow Pipelines cluster (KFP v2beta1 REST API, kfp.Client).

`funmatch submit` compiles the DAG for a config, uploads it as a version of the pipeline `funmatch`
named `<package version>-<config hash>-nocache` (a sha256 of the whole resolved config, resources
included, since every key lands in the IR; the model card's config_hash covers only result-relevant
keys), and starts a run in an experiment. The IR is compiled with KFP's caching off on every task:
KFP's cache key is a task's parameters and input artifacts, so with caching on a scheduled run of an
unchanged config would hit the cache for every stage but export and republish the same model. The
v2beta1 API has no per-run caching field for a run of a pipeline version (kfp.Client's
`enable_caching` only rewrites an inline pipeline spec), so the setting lives in the version's IR;
`--cache` compiles with caching on, as the version without the `-nocache` suffix (the IRs differ).
An existing version of that name is reused, so submitting the same config twice uploads once; its
description records the IR's sha256, and a same-named version whose IR differs (code or
FUNMATCH_IMAGE_* changed without a version bump) is refused rather than run stale.
`funmatch schedule` does the same upload and then creates the recurring run `--name` (6-field cron,
seconds first), or replaces one of that name whose version, cron or parameters differ: the new one
is created before the old one is deleted, so a failure never leaves no schedule.

`--namespace NS` (multi-user Kubeflow): the pipeline, its versions, the experiment, runs and
recurring runs are all created in the profile namespace NS (pipelines listed and uploaded with
`namespace`, the experiment and the recurring run carry it, runs follow their experiment).

Auth, never from the command line: the token in `KF_PIPELINES_TOKEN`; else the projected service
account token file (`KF_PIPELINES_SA_TOKEN_PATH`, default /var/run/secrets/kubeflow/pipelines/token);
else Google default credentials (an ID token for the audience `KF_PIPELINES_IAP_OAUTH2_CLIENT_ID`
when that is set, as IAP wants, otherwise an OAuth access token); else no token (a port-forward).

kfp is imported inside the functions: `funmatch/` has no top-level KFP import.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from funmatch import __version__, config
from funmatch.errors import FunmatchError
from pipelines.funmatch_pipeline import compile_pipeline

log = logging.getLogger(__name__)

PIPELINE_NAME = "funmatch"  # pipelines.funmatch_pipeline.PIPELINE_NAME, without importing kfp here
DEFAULT_EXPERIMENT = "funmatch"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
IR_DIGEST = re.compile(r"IR sha256 ([0-9a-f]{64})")
CRON_FIELDS = (  # robfig/cron with seconds: name, low, high, names allowed
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC"),
    ("day-of-week", 0, 6, "SUN MON TUE WED THU FRI SAT"),
)


class KfpError(FunmatchError):
    """A KFP endpoint, credential, schedule or answer that cannot be used."""


# ---------------------------------------------------------------- auth


def resolve_token() -> tuple[str | None, str]:
    """(bearer token or None, where it came from), in the order the module docstring gives."""
    token = os.environ.get("KF_PIPELINES_TOKEN", "").strip()
    if token:
        return token, "KF_PIPELINES_TOKEN"
    path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH") or SA_TOKEN_PATH
    if os.path.isfile(path):
        token = Path(path).read_text().strip()
        if not token:
            raise KfpError(f"service account token file {path} is empty; expected a projected token")
        return token, f"service account token {path}"
    return _google_token()


def _google_token() -> tuple[str | None, str]:
    try:
        import google.auth
        import google.auth.transport.requests
        from google.auth import exceptions as gexc
    except ImportError:
        return None, "no credentials (google-auth not installed)"
    try:
        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except gexc.DefaultCredentialsError:
        return None, "no credentials"
    request = google.auth.transport.requests.Request()
    audience = os.environ.get("KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "").strip()
    try:
        if audience:
            from google.oauth2 import id_token

            try:
                return id_token.fetch_id_token(request, audience), f"Google ID token for audience {audience}"
            except gexc.DefaultCredentialsError:  # user credentials: their refresh carries an ID token
                creds.refresh(request)
                if user_id_token := getattr(creds, "id_token", None):
                    return user_id_token, "Google ID token (user credentials)"
                raise KfpError(
                    f"KF_PIPELINES_IAP_OAUTH2_CLIENT_ID={audience!r} asks for an ID token, but the "
                    "default credentials cannot mint one; use a service account or set KF_PIPELINES_TOKEN"
                ) from None
        creds.refresh(request)
        return creds.token, "Google access token"
    except gexc.GoogleAuthError as e:
        raise KfpError(
            f"Google default credentials could not produce a token ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); set KF_PIPELINES_TOKEN instead"
        ) from e


# ---------------------------------------------------------------- connection


def _check_host(host: str) -> str:
    if not re.match(r"^https?://[^\s/]+(/\S*)?$", host or ""):
        raise KfpError(f"--host {host!r} is not a URL; expected http(s)://HOST[:PORT][/PATH] of the KFP API")
    return host.rstrip("/")


def _preflight(host: str, token: str | None, source: str) -> None:
    """One GET of /apis/v2beta1/healthz, so a wrong host or token is one clear line (kfp.Client itself
    would retry a refused healthz five times, 5 s apart)."""
    request = urllib.request.Request(f"{host}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise KfpError(
                f"KFP at {host} refused the credentials ({e.code} {e.reason}); the token came from {source}"
            ) from None
        if e.code == 404:
            raise KfpError(
                f"{host} has no /apis/v2beta1/healthz (404); expected the KFP API endpoint, e.g. "
                "https://HOST/pipeline or a port-forward of ml-pipeline"
            ) from None
        raise KfpError(f"KFP at {host} answered {e.code} {e.reason} to GET /apis/v2beta1/healthz") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise KfpError(f"cannot reach KFP at {host} ({reason}); expected a reachable KFP API endpoint") from None


def connect(host: str, namespace: str | None = None):  # -> kfp.Client
    host = _check_host(host)
    token, source = resolve_token()
    log.info("KFP %s: authenticating with %s", host, source)
    _preflight(host, token, source)
    import kfp

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


@contextlib.contextmanager
def _api_errors(host: str, action: str):
    """kfp/kfp_server_api failures as one KfpError line; the client's own link printing is silenced."""
    import kfp_server_api
    import urllib3

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except kfp_server_api.ApiException as e:
        detail = ""
        with contextlib.suppress(Exception):
            detail = json.loads(e.body).get("message", "") or json.loads(e.body).get("error", "")
        detail = " ".join(str(detail or e.body or "").split())[:200]
        raise KfpError(
            f"KFP at {host} answered {e.status} {e.reason} while trying to {action}{': ' + detail if detail else ''}"
        ) from None
    except urllib3.exceptions.HTTPError as e:
        raise KfpError(f"cannot reach KFP at {host} while trying to {action} ({type(e).__name__})") from None
    except ValueError as e:  # kfp.Client's own checks, e.g. two pipelines of one name
        raise KfpError(f"KFP at {host}: cannot {action} ({e})") from None


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _pages(list_call, field: str):
    """Every item of a paginated v2beta1 list call (list_call(page_token) -> response)."""
    token = ""
    while True:
        response = list_call(token)
        yield from getattr(response, field) or []
        token = response.next_page_token or ""
        if not token:
            return


# ---------------------------------------------------------------- pipeline versions, runs, schedules


def pipeline_version_name(cfg: config.Config, caching: bool = False) -> str:
    """`<package version>-<config hash>`, plus `-nocache` for an IR compiled with caching off."""
    name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', __version__)}-{cfg.hash(everything=True)}"
    return name if caching else f"{name}-nocache"


def compile_ir(cfg: config.Config, directory: str, caching: bool = False) -> tuple[str, str]:
    """(path of the IR YAML compiled for the cluster, KFP caching on or off on every task; its sha256)."""

    path = os.path.join(directory, "pipeline.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        compile_pipeline(cfg, path, target="cluster", caching=caching)
    return path, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pipeline_id(client, host: str, namespace: str | None) -> str | None:
    """The id of the pipeline `funmatch` (in `namespace`, when given), or None."""
    with _api_errors(host, f"look up pipeline {PIPELINE_NAME!r}"):
        found = [
            p
            for p in _pages(
                lambda token: client.list_pipelines(
                    page_token=token, page_size=100, filter=_name_filter(PIPELINE_NAME), namespace=namespace
                ),
                "pipelines",
            )
            if p.display_name == PIPELINE_NAME
        ]
    if len(found) > 1:
        raise KfpError(
            f"KFP at {host} has {len(found)} pipelines named {PIPELINE_NAME!r}"
            f"{' in namespace ' + namespace if namespace else ''}; expected one, delete the others"
        )
    return found[0].pipeline_id if found else None


def ensure_version(
    client,
    host: str,
    cfg: config.Config,
    package: str,
    ir_sha: str,
    namespace: str | None = None,
    caching: bool = False,
) -> dict:
    """The pipeline (in `namespace`, when given) and its version for `cfg`, uploaded only when missing."""
    name = pipeline_version_name(cfg, caching)
    pipeline_id = _pipeline_id(client, host, namespace)
    if pipeline_id is None:
        with _api_errors(host, f"create pipeline {PIPELINE_NAME!r}"):
            pipeline_id = client.upload_pipeline(
                package,
                pipeline_name=PIPELINE_NAME,
                description="funmatch: patient and consistent distillation",
                namespace=namespace,
            ).pipeline_id
    existing = _find_version(client, host, pipeline_id, name)
    if existing is None:
        description = (
            f"funmatch {__version__}, preset {cfg.preset}, config {cfg.hash(everything=True)}, "
            f"KFP caching {'on' if caching else 'off'}; IR sha256 {ir_sha}"
        )
        try:
            with _api_errors(host, f"upload pipeline version {name!r}"):
                version = client.upload_pipeline_version(
                    package, name, pipeline_id=pipeline_id, description=description
                )
            return {
                "pipeline_id": pipeline_id,
                "version_id": version.pipeline_version_id,
                "version": name,
                "uploaded": True,
            }
        except KfpError:
            existing = _find_version(client, host, pipeline_id, name)  # a concurrent submit uploaded it first
            if existing is None:
                raise
    found = IR_DIGEST.search(existing.description or "")
    if found and found.group(1) != ir_sha:
        raise KfpError(
            f"pipeline version {name!r} already exists with other IR (sha256 {found.group(1)[:12]}…, "
            f"this one {ir_sha[:12]}…): code or FUNMATCH_IMAGE_* changed without a package version "
            "bump; bump the version or delete that pipeline version"
        )
    if not found:
        log.warning("pipeline version %s records no IR digest; reusing it as is", name)
    return {"pipeline_id": pipeline_id, "version_id": existing.pipeline_version_id, "version": name, "uploaded": False}


def _find_version(client, host: str, pipeline_id: str, name: str):
    with _api_errors(host, f"list versions of pipeline {PIPELINE_NAME!r}"):
        versions = _pages(
            lambda token: client.list_pipeline_versions(
                pipeline_id, page_token=token, page_size=100, filter=_name_filter(name)
            ),
            "pipeline_versions",
        )
        return next((v for v in versions if v.display_name == name), None)  # checked here too


def _experiment(client, host: str, name: str, namespace: str | None):
    with _api_errors(host, f"get or create experiment {name!r}"):
        return client.create_experiment(name, namespace=namespace)


def _params(publish_uri: str) -> dict:
    return {"publish_uri": publish_uri} if publish_uri else {}


def _version_and_experiment(
    host: str, cfg: config.Config, experiment: str, namespace: str | None, caching: bool
):  # -> (kfp.Client, host, pipeline version, experiment)
    """What submit and schedule both start from; the IR is compiled (and the config checked for the
    cluster) before any request."""
    host = _check_host(host)
    with tempfile.TemporaryDirectory() as tmp:
        package, ir_sha = compile_ir(cfg, tmp, caching)
        client = connect(host, namespace)
        version = ensure_version(client, host, cfg, package, ir_sha, namespace, caching)
    return client, host, version, _experiment(client, host, experiment, namespace)


def submit(
    host: str,
    cfg: config.Config,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    publish_uri: str = "",
    caching: bool = False,
) -> dict:
    """Uploads (or reuses) the pipeline version for `cfg` and starts a run; returns ids and the run's URL.
    The run's namespace is its experiment's."""
    client, host, version, exp = _version_and_experiment(host, cfg, experiment, namespace, caching)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_name = f"funmatch-{cfg.preset}-{cfg.hash(everything=True)[:8]}-{stamp}"
    with _api_errors(host, f"start run {run_name!r}"):
        run = client.run_pipeline(
            exp.experiment_id,
            run_name,
            pipeline_id=version["pipeline_id"],
            version_id=version["version_id"],
            params=_params(publish_uri),
        )
    return version | {
        "experiment_id": exp.experiment_id,
        "run_id": run.run_id,
        "run_name": run_name,
        "url": f"{host}/#/runs/details/{run.run_id}",
    }


def check_cron(cron: str) -> str:
    """A 6-field robfig/cron expression (seconds first), checked field by field."""
    fields = cron.split()
    example = "e.g. '0 0 3 * * 0' = 03:00 every Sunday"
    if len(fields) != 6:
        raise KfpError(
            f"--cron {cron!r} has {len(fields)} fields; expected 6, seconds first "
            f"(second minute hour day-of-month month day-of-week), {example}"
        )
    for text, (what, low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise KfpError(f"--cron {cron!r}: {what} step {step!r} is not a positive number; {example}")
            if base in ("*", "?") and (base == "*" or what in ("day-of-month", "day-of-week")):
                continue
            for value in base.split("-", 1):
                upper = value.upper()
                number = (
                    names.split().index(upper) + low
                    if names and upper in names.split()
                    else (int(value) if value.isdigit() else None)
                )
                if number is None or not low <= number <= high:
                    raise KfpError(
                        f"--cron {cron!r}: {what} {value!r} is not in {low}-{high}"
                        f"{' or ' + names.split()[0] + '-' + names.split()[-1] if names else ''}; {example}"
                    )
    return " ".join(fields)


def schedule(
    host: str,
    cfg: config.Config,
    cron: str,
    name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    publish_uri: str = "",
    caching: bool = False,
) -> dict:
    """Creates the recurring run `name`, or replaces the one of that name that differs; see the module docstring."""
    cron = check_cron(cron)
    name = name or f"funmatch-{cfg.preset}"
    client, host, version, exp = _version_and_experiment(host, cfg, experiment, namespace, caching)
    params = _params(publish_uri)
    with _api_errors(host, f"list recurring runs named {name!r}"):
        existing = [
            r
            for r in _pages(
                lambda token: client.list_recurring_runs(
                    page_token=token, page_size=100, experiment_id=exp.experiment_id, filter=_name_filter(name)
                ),
                "recurring_runs",
            )
            if r.display_name == name
        ]

    def same(r) -> bool:
        ref, trigger, runtime = r.pipeline_version_reference, r.trigger, r.runtime_config
        return (
            ref is not None
            and ref.pipeline_version_id == version["version_id"]
            and trigger is not None
            and trigger.cron_schedule is not None
            and trigger.cron_schedule.cron == cron
            and str(r.mode).upper().endswith("ENABLE")
            and dict((runtime.parameters if runtime else None) or {}) == params
        )

    if len(existing) == 1 and same(existing[0]):
        return version | {
            "experiment_id": exp.experiment_id,
            "recurring_run_id": existing[0].recurring_run_id,
            "name": name,
            "cron": cron,
            "action": "unchanged",
        }
    with _api_errors(host, f"create recurring run {name!r}"):
        created = _create_recurring_run(client, exp.experiment_id, name, cfg.preset, cron, version, params, namespace)
    for old in existing:  # after the new one exists: a failure here leaves two, never none
        with _api_errors(host, f"delete the replaced recurring run {old.recurring_run_id}"):
            client.delete_recurring_run(old.recurring_run_id)
    return version | {
        "experiment_id": exp.experiment_id,
        "recurring_run_id": created.recurring_run_id,
        "name": name,
        "cron": cron,
        "action": "updated" if existing else "created",
        "replaced": [r.recurring_run_id for r in existing],
    }


def _create_recurring_run(
    client, experiment_id: str, name: str, preset: str, cron: str, version: dict, params: dict, namespace: str | None
):  # -> kfp_server_api.V2beta1RecurringRun
    """What kfp.Client.create_recurring_run sends, plus `namespace`, which multi-user KFP checks access
    against (the client has no argument for it)."""
    import kfp_server_api

    body = kfp_server_api.V2beta1RecurringRun(
        experiment_id=experiment_id,
        display_name=name,
        description=f"funmatch {preset}: {cron}",
        mode=kfp_server_api.RecurringRunMode.ENABLE,
        trigger=kfp_server_api.V2beta1Trigger(cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=cron)),
        max_concurrency=1,
        no_catchup=True,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=version["pipeline_id"], pipeline_version_id=version["version_id"]
        ),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=params),
        namespace=namespace,
    )
    return client.recurring_runs.recurring_run_service_create_recurring_run(recurring_run=body)


# ---------------------------------------------------------------- command line


def _in(namespace: str | None) -> str:
    return f" (namespace {namespace})" if namespace else ""


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = config.load(args.preset, args.overrides)
    r = submit(args.host, cfg, args.experiment, args.namespace, args.publish_uri, args.cache)
    print(
        f"funmatch: run {r['run_id']} ({r['run_name']}) of pipeline {PIPELINE_NAME} version {r['version']} "
        f"({'uploaded' if r['uploaded'] else 'reused'}) in experiment {args.experiment}{_in(args.namespace)}, "
        f"KFP caching {'on' if args.cache else 'off'}\n  {r['url']}"
    )
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    cfg = config.load(args.preset, args.overrides)
    r = schedule(args.host, cfg, args.cron, args.name, args.experiment, args.namespace, args.publish_uri, args.cache)
    print(
        f"funmatch: recurring run {r['name']} ({r['recurring_run_id']}) {r['action']}: cron '{r['cron']}', "
        f"pipeline {PIPELINE_NAME} version {r['version']} ({'uploaded' if r['uploaded'] else 'reused'}), "
        f"experiment {args.experiment}{_in(args.namespace)}, KFP caching {'on' if args.cache else 'off'}"
    )
    return 0
