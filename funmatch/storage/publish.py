"""Publishing an exported model (model.onnx, model.json, metrics.json) and pulling it back, verified.

Two layouts, chosen by the URI:

* **Registry**: `gs://<bucket>/[<prefix>/]models/<name>`. Every publication is a new, immutable version

      <uri>/<version>/model.onnx, model.json, metrics.json, SHA256SUMS
      <uri>/latest.json          {"version": ..., "created": ..., "sha256sums": <sha256 of SHA256SUMS>, ...}

  with `version = <package version>-<config hash>-<UTC publication time YYYYmmddTHHMMSSZ>`, e.g.
  `0.1.0-fac859a8db4f9e5c-20261126T031500Z`: it sorts by time within a config, says which code and
  config made the model, and never names two different trainings alike (the same config trained
  twice gives two models). Files are written create-only (`if_generation_match=0`), so a version
  can never be overwritten; the same bytes written again (a retried request) are accepted. The
  version's SHA256SUMS is written last: a version without it is incomplete and `pull` refuses it
  (a failed publication leaves such a prefix behind rather than risk deleting a concurrent
  publisher's identical files; nothing ever points to it).
  Then `latest.json` is moved with a generation-match precondition: read it with its generation,
  write only if that generation is still current, on a 412 re-read and decide again. Two
  publishers racing therefore serialise: the pointer ends on the newest `created` (it never moves
  back to an older version), and at every moment it is whole JSON naming a complete version.
  Publishing is idempotent: when the version latest.json names holds the same files with the same
  sha256 sums (model.json compared as it would be published under that version), nothing is
  written, one log line names that version and its URI is returned.

* **Flat**: anything else (a local directory, another gs:// prefix; what `funmatch run` uses):
  the three files and then SHA256SUMS straight into it, overwriting, as before.

File names are relative POSIX paths (`model.onnx`, `serving/<name>/1/model.onnx`): components of
letters, digits, `.`, `_` and `-` that start with a letter or digit, so no `..`, no absolute path, no
backslash; SHA256SUMS lines carry that relative path.

`funmatch pull gs://<bucket>/models/<name>[@<version>|@latest] DIR` resolves `latest.json` (and checks
SHA256SUMS against the digest it records), downloads every file SHA256SUMS lists into a temp
directory next to DIR, verifies each sha256, and only then moves them into DIR, recreating the
tree: a mismatch, or a SHA256SUMS entry that is no such relative path or would land outside DIR
(through a symlink already in DIR), leaves DIR untouched and is refused with one line (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

from funmatch import __version__, storage
from funmatch.errors import FunmatchError

log = logging.getLogger(__name__)

BUNDLE_FILES = ("model.onnx", "model.json", "metrics.json")  # always there; export may add model.int8.onnx
SUMS = "SHA256SUMS"
LATEST = "latest.json"
LATEST_FORMAT = "funmatch-latest/1"
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
REGISTRY = re.compile(rf"^(gs://[a-z0-9][a-z0-9._-]{{1,221}}/(?:[^@]+/)?models/{NAME})/?$")
PULL_SPEC = re.compile(rf"^(gs://[a-z0-9][a-z0-9._-]{{1,221}}/(?:[^@]+/)?models/{NAME})/?(?:@({NAME}))?$")
VERSION = re.compile(rf"^{NAME}$")
PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # one path component: never '.', '..' or empty
REL_PATH = re.compile(rf"^{PART}(?:/{PART})*$")  # relative POSIX paths: nothing can escape DIR on pull
SUMS_LINE = re.compile(rf"^([0-9a-f]{{64}})  ({PART}(?:/{PART})*)$")
POINTER_ATTEMPTS = 20


class PublishError(FunmatchError):
    """A bundle, a publish target or a publication that cannot be used."""


@dataclasses.dataclass
class Publication:
    uri: str  # where the files are: the version's prefix, or the flat target
    version: str | None = None  # registry only
    latest_moved: bool = False  # registry only: whether latest.json now names this version
    reused: bool = False  # registry only: the same files were already the latest version; nothing written


def provenance(dataset_dir: str | Path) -> dict:
    """What the model card records about where a model came from (added by the export stage)."""
    manifest = Path(dataset_dir) / "manifest.json"
    return {
        "dataset": {"manifest_sha256": storage.sha256_file(manifest) if manifest.is_file() else None},
        "git_commit": os.environ.get("FUNMATCH_GIT_COMMIT") or None,
        "created": _iso(dt.datetime.now(dt.UTC)),
    }


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def registry_base(uri: str) -> str | None:
    """`gs://bucket/[prefix/]models/name` without a trailing slash, or None for a flat target."""
    m = REGISTRY.match(uri)
    return m.group(1) if m else None


def version_name(card: dict, created: dt.datetime) -> str:
    package = re.sub(r"[^A-Za-z0-9._-]", "_", str(card.get("package", {}).get("version") or __version__))
    return f"{package}-{card['config_hash']}-{created.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}"


def _read_bundle(bundle_dir: str | Path, files: tuple[str, ...]) -> dict:
    bundle = Path(bundle_dir)
    for name in files:
        if not REL_PATH.match(name) or name in (SUMS, LATEST):
            raise PublishError(
                f"cannot publish a file named {name!r}; expected relative POSIX paths (no '..', no leading '/', "
                f"no '\\') other than {SUMS} and {LATEST}"
            )
        if not (bundle / name).is_file():
            raise PublishError(
                f"{bundle / name} is missing; expected the export stage's output ({', '.join(files)}) in {bundle}"
            )
    try:
        card = json.loads((bundle / "model.json").read_text())
    except ValueError as e:
        raise PublishError(f"{bundle / 'model.json'} is not JSON ({e}); expected the export stage's model card") from e
    if not isinstance(card, dict) or not card.get("config_hash"):
        raise PublishError(f"{bundle / 'model.json'} has no config_hash; expected the export stage's model card")
    return card


def publish(
    bundle_dir: str | Path,
    uri: str,
    *,
    files: tuple[str, ...] | list[str] = BUNDLE_FILES,
    created: dt.datetime | None = None,
) -> Publication:
    """Publishes `files` of the bundle (model.onnx, model.json and metrics.json at least; relative paths,
    subdirectories allowed; SHA256SUMS lists them in this order) to `uri`, registry or flat layout (see
    the module docstring)."""
    files = tuple(files)
    missing = [n for n in BUNDLE_FILES if n not in files]
    if missing:
        raise PublishError(f"files {list(files)} lack {missing}; expected at least {list(BUNDLE_FILES)}")
    card = _read_bundle(bundle_dir, files)
    base = registry_base(uri)
    if base is None:
        return _publish_flat(Path(bundle_dir), uri, files)
    return _publish_version(Path(bundle_dir), base, card, files, created or dt.datetime.now(dt.UTC))


def _sums_text(digests: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in digests.items()).encode()


def _publish_flat(bundle: Path, uri: str, files: tuple[str, ...]) -> Publication:
    digests = {}
    for name in files:  # no crc32c here: local targets must work without google-cloud-storage
        storage.upload_file(bundle / name, storage.join(uri, name))
        digests[name] = storage.sha256_file(bundle / name)
    storage.write_bytes(storage.join(uri, SUMS), _sums_text(digests))  # last: marks a complete publication
    log.info("published %s to %s", ", ".join(files), uri)
    return Publication(uri=uri)


def _published_card(card: dict, base: str, version: str, time: str) -> bytes:
    """model.json as the version `version` of `base` holds it: the card plus where and when it was published."""
    published = {"version": version, "published": {"uri": storage.join(base, version) + "/", "time": time}}
    return json.dumps(card | published, indent=1).encode()


def _latest_if_same(base: str, digests: dict[str, str]) -> dict | None:
    """latest.json's entry when the version it names holds the same model bytes: the same `.onnx` files
    (their relative paths and sha256 sums; `digests` maps every file to publish to its sum). Cards and
    metrics carry times and wall clocks, so they do not make a new model."""
    entry, _ = read_latest(base)
    if entry is None:
        return None
    sums_uri = storage.join(base, entry["version"], SUMS)
    try:
        sums = storage.read_bytes(sums_uri)
    except storage.ObjectNotFound:
        return None
    if hashlib.sha256(sums).hexdigest() != entry.get("sha256sums"):
        return None  # not the SHA256SUMS latest.json vouches for: publish anew rather than trust it
    try:
        published = {name: digest for digest, name in parse_sums(sums, sums_uri)}
    except PublishError:
        return None
    models = _onnx(digests)
    return entry if models and _onnx(published) == models else None


def _onnx(digests: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in digests.items() if name.endswith(".onnx")}


def _publish_version(bundle: Path, base: str, card: dict, files: tuple[str, ...], created: dt.datetime) -> Publication:
    hashes = {name: storage.file_hashes(bundle / name) for name in files if name != "model.json"}
    same = _latest_if_same(base, {name: h["sha256"] for name, h in hashes.items()})
    if same is not None:
        uri = storage.join(base, same["version"]) + "/"
        log.info(
            "not publishing: the latest version %s (%s) already holds this model (the same .onnx sha256 sums)",
            same["version"],
            uri,
        )
        return Publication(uri=uri, version=same["version"], latest_moved=True, reused=True)
    version = version_name(card, created)
    prefix = storage.join(base, version)
    card_bytes = _published_card(card, base, version, _iso(created))
    digests = {}
    try:
        for name in files:  # create-only: a version is immutable
            if name == "model.json":
                storage.write_bytes(storage.join(prefix, name), card_bytes, if_generation_match=0)
                digests[name] = hashlib.sha256(card_bytes).hexdigest()
            else:
                storage.upload_file(
                    bundle / name, storage.join(prefix, name), if_generation_match=0, hashes=hashes[name]
                )
                digests[name] = hashes[name]["sha256"]
        sums = _sums_text(digests)
        storage.write_bytes(storage.join(prefix, SUMS), sums, if_generation_match=0)  # the version is complete
    except storage.PreconditionFailed as e:
        raise PublishError(
            f"version {version} already exists under {base} with other content; versions are "
            "immutable, publish again for a new one"
        ) from e
    entry = {
        "format": LATEST_FORMAT,
        "model": base.rsplit("/", 1)[1],
        "version": version,
        "uri": prefix + "/",
        "created": _iso(created),
        "sha256sums": hashlib.sha256(sums).hexdigest(),
        "config_hash": card["config_hash"],
        "package_version": card.get("package", {}).get("version"),
        "git_commit": card.get("git_commit"),
    }
    moved = move_latest(base, entry)
    log.info(
        "published %s (%s); latest.json %s",
        prefix,
        ", ".join(files),
        "now points to it" if moved else "stays on a newer version",
    )
    return Publication(uri=prefix + "/", version=version, latest_moved=moved)


def _order(entry: dict) -> tuple[str, str]:
    return str(entry.get("created", "")), str(entry.get("version", ""))


def read_latest(base: str) -> tuple[dict | None, int]:
    """The current latest.json and its generation (None, 0 when there is none)."""
    uri = storage.join(base, LATEST)
    try:
        data, generation = storage.read_with_generation(uri)
    except storage.ObjectNotFound:
        return None, 0
    try:
        entry = json.loads(data)
        if not isinstance(entry, dict) or not VERSION.match(str(entry.get("version", ""))):
            raise ValueError("no valid 'version'")
    except ValueError as e:
        raise PublishError(f"{uri} is not a funmatch latest pointer ({e}); expected JSON with a 'version'") from e
    return entry, generation


def move_latest(base: str, entry: dict) -> bool:
    """Points latest.json at `entry` unless it already names a newer version; compare-and-swap on the
    object generation, re-reading after every lost race. True when latest.json names `entry` afterwards."""
    uri = storage.join(base, LATEST)
    body = json.dumps(entry, indent=1).encode()
    for attempt in range(POINTER_ATTEMPTS):
        current, generation = read_latest(base)
        if current is not None:
            if current["version"] == entry["version"]:
                return True  # ours already (e.g. our write landed but its response was lost)
            if _order(current) > _order(entry):
                return False  # never move the pointer back to an older version
        try:
            storage.write_bytes(uri, body, if_generation_match=generation)
            return True
        except storage.PreconditionFailed:
            log.info("%s changed under us (attempt %d); re-reading it", uri, attempt + 1)
            time.sleep(random.uniform(0, 0.02 * 2 ** min(attempt, 6)))
    raise PublishError(
        f"{uri} kept changing for {POINTER_ATTEMPTS} attempts; expected it to settle "
        f"(is something rewriting it in a loop?)"
    )


# ---------------------------------------------------------------- pull


def parse_spec(spec: str) -> tuple[str, str]:
    """'gs://b/models/m@v' → ('gs://b/models/m', 'v'); no '@' or '@latest' → 'latest'."""
    m = PULL_SPEC.match(spec)
    if not m:
        raise PublishError(
            f"{spec!r} is not a published model; expected gs://BUCKET/models/NAME, optionally "
            "followed by @VERSION or @latest"
        )
    return m.group(1), m.group(2) or "latest"


def _versions_hint(base: str) -> str:
    versions = storage.list_dirs(base)
    if not versions:
        return f"; nothing is published under {base}"
    shown = ", ".join(versions[-5:])
    return f"; expected one of: {shown}" + (f" (and {len(versions) - 5} older)" if len(versions) > 5 else "")


def parse_sums(data: bytes, uri: str) -> list[tuple[str, str]]:
    """[(sha256, relative path)] of a SHA256SUMS; anything else (`..`, an absolute path, a backslash, a
    file that is also another's directory) is refused."""
    entries = []
    for line in data.decode(errors="replace").splitlines():
        m = SUMS_LINE.match(line)
        if not m:
            raise PublishError(
                f"{uri}: line {line[:80]!r} is not '<sha256>  <relative path>' (no '..', no leading '/', no '\\')"
            )
        entries.append((m.group(1), m.group(2)))
    names = [n for _, n in entries]
    if len(set(names)) != len(names) or not {"model.onnx", "model.json"} <= set(names) or SUMS in names:
        raise PublishError(
            f"{uri} lists {names}; expected each file once, model.onnx and model.json among them, not {SUMS}"
        )
    dirs = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    if clash := sorted(dirs.intersection(names)):
        raise PublishError(f"{uri} lists {clash[0]!r} both as a file and as a directory")
    return entries


def _inside(dest: Path, name: str) -> Path:
    """dest/name, refused unless it resolves inside dest (a symlink already in dest could point out) and
    can be written there (no file where a directory goes, no directory where the file goes)."""
    target = dest / name
    if not target.resolve().is_relative_to(dest.resolve()):
        raise PublishError(f"{name!r} would be written to {target.resolve()}, outside {dest}; refusing the download")
    blocked = [d for d in target.parents if d.is_relative_to(dest) and d.exists() and not d.is_dir()]
    if blocked or target.is_dir():
        raise PublishError(f"cannot write {target}: {(blocked or [target])[0]} is in the way; refusing the download")
    return target


def pull(spec: str, dest: str | Path) -> dict:
    """Downloads a published version into `dest`, every file verified against SHA256SUMS."""
    base, version = parse_spec(spec)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise PublishError(f"{dest} exists and is not a directory; expected a directory to pull into")
    expected_sums = None
    if version == "latest":
        entry, _ = read_latest(base)
        if entry is None:
            raise PublishError(f"{base} has no {LATEST}{_versions_hint(base)}")
        version, expected_sums = entry["version"], entry.get("sha256sums")
    prefix = storage.join(base, version)
    sums_uri = storage.join(prefix, SUMS)
    try:
        sums = storage.read_bytes(sums_uri)
    except storage.ObjectNotFound:
        if storage.exists(prefix):
            raise PublishError(
                f"{prefix} is not a complete publication (no {SUMS}): its upload was interrupted or is still running"
            ) from None
        raise PublishError(f"no version {version!r} under {base}{_versions_hint(base)}") from None
    got = hashlib.sha256(sums).hexdigest()
    if expected_sums and got != expected_sums:
        raise storage.IntegrityError(
            f"{sums_uri}: sha256 {got} does not match {LATEST}'s sha256sums {expected_sums}; refusing the download"
        )
    entries = parse_sums(sums, sums_uri)
    targets = {name: _inside(dest, name) for name in [n for _, n in entries] + [SUMS]}  # SHA256SUMS last
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.pull-"))
    try:
        for want, name in entries:
            local = storage.download_file(storage.join(prefix, name), tmp / name)
            if (have := storage.sha256_file(local)) != want:
                raise storage.IntegrityError(
                    f"{storage.join(prefix, name)}: sha256 {have} does not match {SUMS} ({want}); refusing the download"
                )
        (tmp / SUMS).write_bytes(sums)
        try:
            card = json.loads((tmp / "model.json").read_text())
        except ValueError as e:
            raise PublishError(f"{storage.join(prefix, 'model.json')} is not JSON ({e}); expected a model card") from e
        for name, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"uri": prefix + "/", "version": version, "files": [n for _, n in entries], "card": card, "dest": str(dest)}


def summary_lines(pulled: dict) -> list[str]:
    card = pulled["card"]
    student, inp = card.get("student", {}), card.get("input", {})
    lines = [
        f"funmatch: pulled {pulled['uri']} into {pulled['dest']} ({len(pulled['files'])} files, sha256 verified)",
        f"  version {pulled['version']} | {student.get('arch', '?')} student, {len(card.get('classes', []))} "
        f"classes, input {inp.get('name', '?')} {inp.get('shape', '?')} {inp.get('dtype', '')}",
    ]
    metrics = card.get("metrics", {})
    if metrics:
        lines.append(
            "  " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
    dataset = (card.get("dataset") or {}).get("manifest_sha256")
    lines.append(
        f"  preset {card.get('preset', '?')} | config {card.get('config_hash', '?')} | funmatch "
        f"{card.get('package', {}).get('version', '?')} | git {card.get('git_commit') or 'unknown'} | "
        f"dataset {dataset[:12] if dataset else 'unknown'} | created {card.get('created', '?')}"
    )
    return lines


def cmd_pull(args: argparse.Namespace) -> int:
    """`funmatch pull SOURCE DIR`."""
    print("\n".join(summary_lines(pull(args.source, args.dest))))
    return 0
