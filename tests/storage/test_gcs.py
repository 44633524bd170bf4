"""GCS storage, publishing and pulling against fake-gcs-server on loopback, with injected faults."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest

from funmatch import storage
from funmatch.app import cli
from funmatch.storage import publish
from gcs_server import FaultProxy, after, fake_gcs, first

T0 = dt.datetime(2026, 11, 26, 3, 0, 0, tzinfo=dt.UTC)
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def emulator():
    with fake_gcs() as url:
        yield url


@pytest.fixture
def gcs(emulator, monkeypatch):
    """A fresh bucket; fast retries (50 ms first backoff, 5 s per-request timeout, 15 s deadline)."""
    for key, value in {
        "STORAGE_EMULATOR_HOST": emulator,
        "FUNMATCH_GCS_DEADLINE_S": "15",
        "FUNMATCH_GCS_TIMEOUT_S": "5",
        "FUNMATCH_GCS_BACKOFF_S": "0.05",
        "FUNMATCH_GCS_MAX_BACKOFF_S": "0.2",
        "FUNMATCH_GCS_CHUNK_MIB": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FUNMATCH_GIT_COMMIT", raising=False)
    name = f"fm-{uuid4().hex[:12]}"
    storage.gcs_client().create_bucket(name)
    return SimpleNamespace(url=emulator, bucket=name, root=f"gs://{name}")


@pytest.fixture
def through(gcs, monkeypatch):
    """Routes this test's GCS calls through a FaultProxy with the given plan."""
    proxies = []

    def start(plan=None, **kw) -> FaultProxy:
        proxy = FaultProxy(gcs.url, plan, **kw).start()
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def direct(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)


def make_bundle(directory: Path, onnx_bytes: bytes = b"", config_hash: str = "fac859a8db4f9e5c") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(onnx_bytes or os.urandom(200_000))
    card = {
        "format": "funmatch-model/1",
        "file": "model.onnx",
        "classes": ["cat", "dog", "fox"],
        "input": {"name": "image", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW"},
        "student": {"arch": "resnet50", "resolution": 32},
        "metrics": {"student/test/prec@1": 0.8455},
        "preset": "demo-tiny",
        "config_hash": config_hash,
        "package": {"name": "funmatch", "version": "0.1.0"},
        "dataset": {"manifest_sha256": "ab" * 32},
        "git_commit": "0123abc",
        "created": "2026-11-26T02:00:00Z",
    }
    (directory / "model.json").write_text(json.dumps(card))
    (directory / "metrics.json").write_text(json.dumps({"student/test/prec@1": 0.8455}))
    return directory


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("funmatch: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- storage


def test_generation_preconditions(gcs):
    uri = f"{gcs.root}/p/latest.json"
    g1 = storage.write_bytes(uri, b'{"v": 1}', if_generation_match=0)
    assert storage.read_with_generation(uri) == (b'{"v": 1}', g1)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes(uri, b'{"v": 2}', if_generation_match=0)  # create-only, other bytes
    assert storage.write_bytes(uri, b'{"v": 1}', if_generation_match=0) == g1  # same bytes: a retry that landed
    g2 = storage.write_bytes(uri, b'{"v": 2}', if_generation_match=g1)  # compare-and-swap
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes(uri, b'{"v": 3}', if_generation_match=g1)  # stale generation loses
    assert storage.read_with_generation(uri) == (b'{"v": 2}', g2) and g2 != g1
    with pytest.raises(storage.ObjectNotFound) as e:
        storage.read_bytes(f"{gcs.root}/p/missing")
    assert isinstance(e.value, FileNotFoundError)  # what checkpoint.load_latest catches


def test_large_file_goes_up_resumable_in_verified_chunks(gcs, through, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 * MIB + 123))
    proxy = through()
    uri = f"{gcs.root}/big/model.onnx"
    storage.upload_file(src, uri)
    methods = [m for m, _, _ in proxy.object_requests()]
    assert methods.count("POST") == 1 and methods.count("PUT") == 10  # 1 MiB chunks, one session
    blob = storage.gcs_client().bucket(gcs.bucket).get_blob("big/model.onnx")
    assert blob.crc32c == storage.file_hashes(src)["crc32c"] and blob.size == src.stat().st_size
    assert sha(storage.download_file(uri, tmp_path / "back.bin")) == sha(src)


@pytest.mark.parametrize("fault", ["503", "429", "hang", "reset"])
def test_transient_failures_are_retried_with_backoff(gcs, through, caplog, monkeypatch, fault):
    monkeypatch.setenv("FUNMATCH_GCS_TIMEOUT_S", "0.75")  # what a "hang" costs
    proxy = through(first(3, fault))
    uri = f"{gcs.root}/retry/x.json"
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="funmatch.storage"):
        storage.write_bytes(uri, b"[1, 2, 3]")  # 3 failed attempts, then the write
        assert storage.read_bytes(uri) == b"[1, 2, 3]"
    assert [f for _, _, f in proxy.faults()] == [fault] * 3
    assert [m for m, _, f in proxy.object_requests()] == ["POST"] * 4 + ["GET"]
    assert sum("retrying with backoff" in r.getMessage() for r in caplog.records) == 3
    if fault == "hang":
        assert time.monotonic() - start >= 3 * 0.75  # three read timeouts


def test_failed_chunks_and_downloads_are_retried(gcs, through, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 * MIB + 5))
    plan_put, plan_get = first(2, "503", method="PUT"), first(1, "reset", method="GET")
    proxy = through(lambda m, p, b: plan_put(m, p, b) or plan_get(m, p, b))
    uri = f"{gcs.root}/chunks/model.onnx"
    storage.upload_file(src, uri)
    assert sha(storage.download_file(uri, tmp_path / "back.bin")) == sha(src)
    assert [(m, f) for m, _, f in proxy.faults()] == [("PUT", "503"), ("PUT", "503"), ("GET", "reset")]


def test_persistent_failure_ends_at_the_deadline_as_one_line(gcs, through, monkeypatch):
    monkeypatch.setenv("FUNMATCH_GCS_DEADLINE_S", "1")
    through(first(10**6, "503"))
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as e:
        storage.write_bytes(f"{gcs.root}/down/x.json", b"{}")
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "\n" not in message and "FUNMATCH_GCS_DEADLINE_S=1" in message and "503" in message


def test_interrupted_resumable_upload_leaves_no_object(gcs, through, monkeypatch, tmp_path):
    monkeypatch.setenv("FUNMATCH_GCS_DEADLINE_S", "1.5")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 * MIB))
    proxy = through(after(4, "reset", method="PUT"))  # 4 of 9 chunks arrive, then the connection dies
    with pytest.raises(storage.StorageError):
        storage.upload_file(src, f"{gcs.root}/cut/model.onnx")
    assert [m for m, _, f in proxy.log if f == "forwarded"].count("PUT") == 4
    direct(gcs, monkeypatch)
    assert not storage.exists(f"{gcs.root}/cut/model.onnx")
    assert list(storage.list_files(f"{gcs.root}/cut")) == []


# ---------------------------------------------------------------- publish and pull


def test_publish_and_pull_round_trip(gcs, bundle, tmp_path, capsys):
    base = f"{gcs.root}/models/fashion"
    pub = publish.publish(bundle, base, created=T0)
    assert pub.version == "0.1.0-fac859a8db4f9e5c-20261126T030000Z" and pub.latest_moved
    assert pub.uri == f"{base}/{pub.version}/"
    assert sorted(storage.list_files(base)) == sorted(
        [f"{base}/latest.json"]
        + [f"{base}/{pub.version}/{n}" for n in ("model.onnx", "model.json", "metrics.json", "SHA256SUMS")]
    )
    latest = json.loads(storage.read_bytes(f"{base}/latest.json"))
    sums = storage.read_bytes(f"{base}/{pub.version}/SHA256SUMS")
    assert latest["version"] == pub.version and latest["sha256sums"] == hashlib.sha256(sums).hexdigest()
    assert [line.split()[1] for line in sums.decode().splitlines()] == ["model.onnx", "model.json", "metrics.json"]

    dest = tmp_path / "pulled"
    assert cli.main(["pull", base, str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"pulled {base}/{pub.version}/ into {dest} (3 files, sha256 verified)" in out
    assert "resnet50 student, 3 classes" in out and "student/test/prec@1 0.8455" in out and "git 0123abc" in out
    assert sha(dest / "model.onnx") == sha(bundle / "model.onnx")
    assert (dest / "metrics.json").read_bytes() == (bundle / "metrics.json").read_bytes()
    card = json.loads((dest / "model.json").read_text())
    assert card["version"] == pub.version and card["published"]["uri"] == pub.uri and card["classes"][2] == "fox"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "pulled"]  # no temp directory left

    assert cli.main(["pull", f"{base}@{pub.version}", str(tmp_path / "pinned")]) == 0
    assert sha(tmp_path / "pinned" / "model.onnx") == sha(bundle / "model.onnx")


def test_other_uris_get_the_flat_layout(gcs, bundle, tmp_path):
    (bundle / "model.int8.onnx").write_bytes(b"int8")
    files = ("model.onnx", "model.int8.onnx", "model.json", "metrics.json")
    for target in (f"{gcs.root}/exports/run-1", str(tmp_path / "local")):
        assert publish.publish(bundle, target, files=files).uri == target
        sums = storage.read_bytes(f"{target}/SHA256SUMS").decode().splitlines()
        assert [line.split()[1] for line in sums] == list(files)
        assert storage.read_bytes(f"{target}/model.int8.onnx") == b"int8"
        assert not storage.exists(f"{target}/latest.json")


@pytest.mark.parametrize("tamper", ["file", "sums"])
def test_pull_refuses_a_checksum_mismatch(gcs, bundle, tmp_path, capsys, tamper):
    base = f"{gcs.root}/models/fashion"
    pub = publish.publish(bundle, base, created=T0)
    evil = os.urandom(1000)
    storage.write_bytes(f"{base}/{pub.version}/model.onnx", evil)
    if tamper == "sums":  # a consistent SHA256SUMS for the new bytes: latest.json's digest still catches it
        sums = storage.read_bytes(f"{base}/{pub.version}/SHA256SUMS").decode().splitlines()
        sums[0] = f"{hashlib.sha256(evil).hexdigest()}  model.onnx"
        storage.write_bytes(f"{base}/{pub.version}/SHA256SUMS", ("\n".join(sums) + "\n").encode())
    dest = tmp_path / "pulled"
    assert cli.main(["pull", base, str(dest)]) == 2
    err = one_line_error(capsys)
    if tamper == "file":
        assert (
            f"{base}/{pub.version}/model.onnx: sha256 {hashlib.sha256(evil).hexdigest()} does not match "
            f"SHA256SUMS ({sha(bundle / 'model.onnx')})" in err
        )
    else:
        assert "SHA256SUMS: sha256" in err and "does not match latest.json's sha256sums" in err
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_pull_errors_are_one_line(gcs, bundle, tmp_path, capsys):
    base = f"{gcs.root}/models/fashion"
    assert cli.main(["pull", base, str(tmp_path / "d")]) == 2
    assert f"{base} has no latest.json; nothing is published under {base}" in one_line_error(capsys)
    pub = publish.publish(bundle, base, created=T0)
    assert cli.main(["pull", f"{base}@0.1.0-nope", str(tmp_path / "d")]) == 2
    assert f"no version '0.1.0-nope' under {base}; expected one of: {pub.version}" in one_line_error(capsys)
    assert cli.main(["pull", f"{gcs.root}/fashion", str(tmp_path / "d")]) == 2
    assert "expected gs://BUCKET/models/NAME" in one_line_error(capsys)


def test_interrupted_publish_is_never_visible(gcs, through, bundle, tmp_path, monkeypatch, capsys):
    base = f"{gcs.root}/models/fashion"
    v1 = publish.publish(bundle, base, created=T0)
    monkeypatch.setenv("FUNMATCH_GCS_DEADLINE_S", "1")
    new = make_bundle(tmp_path / "new")
    through(first(1000, "503", body_contains=b"metrics.json"))  # GCS fails from the third file on
    with pytest.raises(storage.StorageError):
        publish.publish(new, base, created=T0 + dt.timedelta(hours=1))
    direct(gcs, monkeypatch)
    v2 = publish.version_name(json.loads((new / "model.json").read_text()), T0 + dt.timedelta(hours=1))
    assert storage.exists(f"{base}/{v2}/model.onnx") and not storage.exists(f"{base}/{v2}/SHA256SUMS")
    assert json.loads(storage.read_bytes(f"{base}/latest.json"))["version"] == v1.version
    assert cli.main(["pull", f"{base}@{v2}", str(tmp_path / "d")]) == 2
    assert f"{base}/{v2} is not a complete publication (no SHA256SUMS)" in one_line_error(capsys)
    assert cli.main(["pull", base, str(tmp_path / "d")]) == 0
    assert sha(tmp_path / "d" / "model.onnx") == sha(bundle / "model.onnx")


def test_racing_publishers_newest_wins_through_the_precondition(gcs, tmp_path, monkeypatch):
    """Both read latest.json (absent) at once to move it; the newer writes first; the older's write must then
    fail its generation precondition, re-read, and leave the pointer on the newer version."""
    base = f"{gcs.root}/models/race"
    read_both, newer_wrote = threading.Barrier(2, timeout=20), threading.Event()
    lost = []
    real_read, real_write = publish.read_latest, storage.write_bytes
    reads: dict[str, int] = {}

    def read_latest(b):
        result = real_read(b)
        me = threading.current_thread().name
        reads[me] = reads.get(me, 0) + 1
        if reads[me] == 2:  # the first read is publish's "same as latest?" check, the second move_latest's
            read_both.wait()
        return result

    def write_bytes(uri, data, **kw):
        me = threading.current_thread().name
        if uri.endswith("latest.json") and me == "older":
            assert newer_wrote.wait(20)
        try:
            return real_write(uri, data, **kw)
        except storage.PreconditionFailed:
            lost.append(me)
            raise
        finally:
            if uri.endswith("latest.json") and me == "newer":
                newer_wrote.set()

    monkeypatch.setattr(publish, "read_latest", read_latest)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    results = {}

    def run(name, created):
        results[name] = publish.publish(make_bundle(tmp_path / name), base, created=created)

    threads = [
        threading.Thread(target=run, name=n, args=(n, T0 + dt.timedelta(minutes=m)))
        for n, m in (("older", 0), ("newer", 1))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert lost == ["older"]  # exactly one lost race, detected by the precondition
    assert results["newer"].latest_moved and not results["older"].latest_moved
    assert json.loads(storage.read_bytes(f"{base}/latest.json"))["version"] == results["newer"].version
    for name in ("older", "newer"):  # both versions complete and intact
        pulled = publish.pull(f"{base}@{results[name].version}", tmp_path / f"pulled-{name}")
        assert sha(Path(pulled["dest"]) / "model.onnx") == sha(tmp_path / name / "model.onnx")


def test_many_racing_publishers_keep_latest_whole(gcs, tmp_path):
    base = f"{gcs.root}/models/crowd"
    created = [T0 + dt.timedelta(seconds=s) for s in (3, 0, 2, 1)]
    bundles = [make_bundle(tmp_path / f"b{i}") for i in range(4)]
    stop, seen, bad = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                entry = json.loads(storage.read_bytes(f"{base}/latest.json"))
            except storage.ObjectNotFound:
                continue
            except (ValueError, KeyError, TypeError, storage.StorageError) as e:  # a torn or unparsable pointer
                bad.append(repr(e))
                continue
            seen.add(entry["version"])
            if not storage.exists(f"{base}/{entry['version']}/SHA256SUMS"):
                bad.append(f"latest.json names incomplete {entry['version']}")

    watcher = threading.Thread(target=reader)
    watcher.start()
    publishers = [
        threading.Thread(target=publish.publish, args=(b, base), kwargs={"created": c})
        for b, c in zip(bundles, created, strict=True)
    ]
    for t in publishers:
        t.start()
    for t in publishers:
        t.join(30)
    stop.set()
    watcher.join(10)
    assert not bad and seen
    newest = publish.version_name({"config_hash": "fac859a8db4f9e5c", "package": {"version": "0.1.0"}}, max(created))
    assert json.loads(storage.read_bytes(f"{base}/latest.json"))["version"] == newest
    assert storage.list_dirs(base) == sorted(
        publish.version_name({"config_hash": "fac859a8db4f9e5c", "package": {"version": "0.1.0"}}, c) for c in created
    )
    for c, b in zip(created, bundles, strict=True):
        v = publish.version_name({"config_hash": "fac859a8db4f9e5c", "package": {"version": "0.1.0"}}, c)
        assert sha(Path(publish.pull(f"{base}@{v}", tmp_path / f"p-{v}")["dest"]) / "model.onnx") == sha(
            b / "model.onnx"
        )


def test_a_version_is_never_overwritten(gcs, tmp_path):
    base = f"{gcs.root}/models/fixed"
    a, b = make_bundle(tmp_path / "a"), make_bundle(tmp_path / "b")
    pub = publish.publish(a, base, created=T0)
    assert publish.publish(a, base, created=T0).version == pub.version  # the same bytes again: idempotent
    with pytest.raises(publish.PublishError, match="already exists .* with other content"):
        publish.publish(b, base, created=T0)  # same name, other model
    pulled = publish.pull(base, tmp_path / "d")
    assert sha(Path(pulled["dest"]) / "model.onnx") == sha(a / "model.onnx")


def test_publishing_the_same_model_bytes_again_is_one_version(gcs, bundle, tmp_path, caplog):
    base = f"{gcs.root}/models/same"
    first = publish.publish(bundle, base, created=T0)
    again = shutil.copytree(bundle, tmp_path / "again")  # the same model, another run an hour later:
    (again / "metrics.json").write_text(json.dumps({"wall_s": 123.0}))  # its metrics carry other wall clocks
    with caplog.at_level("INFO", logger="funmatch.storage.publish"):
        second = publish.publish(again, base, created=T0 + dt.timedelta(hours=1))
    assert second == publish.Publication(uri=first.uri, version=first.version, latest_moved=True, reused=True)
    assert storage.list_dirs(base) == [first.version]
    (line,) = [r.getMessage() for r in caplog.records if "not publishing" in r.getMessage()]
    assert f"the latest version {first.version} ({first.uri})" in line and "same .onnx sha256 sums" in line
    assert json.loads(storage.read_bytes(f"{base}/latest.json"))["version"] == first.version

    (again / "model.onnx").write_bytes(os.urandom(2000))  # other model bytes: a new version
    third = publish.publish(again, base, created=T0 + dt.timedelta(hours=2))
    assert not third.reused and third.latest_moved and storage.list_dirs(base) == [first.version, third.version]
    assert json.loads(storage.read_bytes(f"{base}/latest.json"))["version"] == third.version


SERVING = ("serving/fashion/config.pbtxt", "serving/fashion/1/model.onnx", "serving/inferenceservice.yaml")


def test_nested_paths_publish_and_pull_as_a_tree(gcs, bundle, tmp_path):
    for name in SERVING:
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(os.urandom(500))
    files = (*publish.BUNDLE_FILES, *SERVING)
    base = f"{gcs.root}/models/served"
    pub = publish.publish(bundle, base, files=files, created=T0)
    sums = storage.read_bytes(f"{base}/{pub.version}/SHA256SUMS").decode().splitlines()
    assert [line.split("  ")[1] for line in sums] == list(files)
    assert f"{sha(bundle / SERVING[1])}  {SERVING[1]}" in sums
    pulled = publish.pull(base, tmp_path / "pulled")
    assert pulled["files"] == list(files)
    assert sorted(str(p.relative_to(tmp_path / "pulled")) for p in (tmp_path / "pulled").rglob("*") if p.is_file()) == (
        sorted([*files, "SHA256SUMS"])
    )
    for name in SERVING:
        assert sha(tmp_path / "pulled" / name) == sha(bundle / name)
    assert publish.publish(bundle, base, files=files, created=T0 + dt.timedelta(hours=1)).reused

    flat = tmp_path / "flat"  # the flat layout keeps the tree too
    publish.publish(bundle, str(flat), files=files)
    assert all(sha(flat / name) == sha(bundle / name) for name in SERVING)


@pytest.mark.parametrize("name", ["../x", "/etc/x", "serving/../../x", "./model.onnx", "a\\b", "a//b", "SHA256SUMS"])
def test_publish_refuses_a_path_that_is_not_plain_relative(bundle, tmp_path, name):
    with pytest.raises(publish.PublishError, match="expected relative POSIX paths"):
        publish.publish(bundle, str(tmp_path / "out"), files=(*publish.BUNDLE_FILES, name))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("evil", ["../x", "/etc/x", "serving/../../x", "a\\b"])
def test_pull_refuses_a_sums_entry_that_escapes(gcs, bundle, tmp_path, capsys, evil):
    base = f"{gcs.root}/models/evil"
    pub = publish.publish(bundle, base, created=T0)
    sums_uri = f"{base}/{pub.version}/SHA256SUMS"
    storage.write_bytes(sums_uri, storage.read_bytes(sums_uri) + f"{'0' * 64}  {evil}\n".encode())
    dest = tmp_path / "d" / "pulled"
    assert cli.main(["pull", f"{base}@{pub.version}", str(dest)]) == 2
    line = f"{'0' * 64}  {evil}"
    assert f"line {line[:80]!r} is not '<sha256>  <relative path>'" in one_line_error(capsys)  # shown up to 80 chars
    assert not (tmp_path / "d").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_pull_refuses_a_symlink_in_dest_that_leads_out(gcs, bundle, tmp_path, capsys):
    (bundle / SERVING[2]).parent.mkdir()
    (bundle / SERVING[2]).write_text("kind: InferenceService\n")
    base = f"{gcs.root}/models/linked"
    publish.publish(bundle, base, files=(*publish.BUNDLE_FILES, SERVING[2]), created=T0)
    (tmp_path / "outside").mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "serving").symlink_to(tmp_path / "outside")
    assert cli.main(["pull", base, str(tmp_path / "dest")]) == 2
    assert f"outside {tmp_path / 'dest'}; refusing the download" in one_line_error(capsys)
    assert list((tmp_path / "outside").iterdir()) == [] and sorted(p.name for p in (tmp_path / "dest").iterdir()) == [
        "serving"
    ]


def test_model_card_provenance(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text('{"num_classes": 10}')
    monkeypatch.setenv("FUNMATCH_GIT_COMMIT", "deadbeef")
    p = publish.provenance(tmp_path)
    assert p["dataset"]["manifest_sha256"] == sha(tmp_path / "manifest.json") and p["git_commit"] == "deadbeef"
    assert abs(
        dt.datetime.strptime(p["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC) - dt.datetime.now(dt.UTC)
    ) < dt.timedelta(minutes=1)
    monkeypatch.delenv("FUNMATCH_GIT_COMMIT")
    assert publish.provenance(tmp_path / "nowhere") | {"created": None} == {
        "dataset": {"manifest_sha256": None},
        "git_commit": None,
        "created": None,
    }


def test_local_create_only_write(tmp_path):
    target = tmp_path / "x" / "latest.json"
    storage.write_bytes(str(target), b"1", if_generation_match=0)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes(str(target), b"2", if_generation_match=0)
    with pytest.raises(storage.StorageError, match="only 0"):
        storage.write_bytes(str(target), b"2", if_generation_match=5)
    assert target.read_bytes() == b"1" and sorted(p.name for p in target.parent.iterdir()) == ["latest.json"]


def test_the_fault_proxy_stops_itself_after_its_request_budget(gcs, through, monkeypatch):
    monkeypatch.setenv("FUNMATCH_GCS_DEADLINE_S", "1")
    proxy = through(max_requests=3)
    written = 0
    with pytest.raises(storage.StorageError):  # the proxy is gone after 3 requests: nothing can hang on it
        for written in range(5):
            storage.write_bytes(f"{gcs.root}/bounded/{written}", b"1")
    assert written <= 3 and len(proxy.log) == 3 and proxy._stopped


def test_checkpoints_on_gcs_move_latest_by_generation_and_survive_a_corrupt_newest(gcs):
    import torch
    from torch import nn

    from funmatch.storage.checkpoint import CheckpointManager

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = CheckpointManager(f"{gcs.root}/run/distill", "cfg", keep=2)
    for step in (5, 10, 15):
        ckpt.save(step, model, opt)
    assert ckpt.latest_step() == 15 and ckpt.steps() == [15, 10]
    _, generation = storage.read_with_generation(f"{gcs.root}/run/distill/latest")
    ckpt._move_latest(3)  # a stale writer cannot move the pointer back
    assert ckpt.latest_step() == 15
    assert storage.read_with_generation(f"{gcs.root}/run/distill/latest")[1] == generation
    storage.write_bytes(f"{gcs.root}/run/distill/ckpt-000000015.safetensors", b"truncated")
    loaded = ckpt.load_latest()
    assert loaded is not None and loaded.step == 10  # the pointed-at checkpoint is corrupt: the previous one
