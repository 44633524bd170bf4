"""One small interface over local paths and `gs://bucket/prefix` URIs.

GCS goes through google-cloud-storage (imported lazily: the GPU image may lack it) with the
environment's credentials (workload identity on GKE; `STORAGE_EMULATOR_HOST` for tests) and the
library's retry policy with backoff. Local writes are atomic: temp file, fsync, rename.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

from funmatch.errors import DataError


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' → ('bucket', 'a/b')."""
    if not is_gcs(uri) or len(uri) <= 5 or uri[5] == "/":
        raise DataError(f"{uri!r} is not a gs://bucket/path URI")
    bucket, _, path = uri[5:].partition("/")
    return bucket, path


def gcs_client():  # -> google.cloud.storage.Client
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        client = gcs_client()
        if client.bucket(bucket).blob(path).exists():
            return True
        return any(True for _ in client.list_blobs(bucket, prefix=path.rstrip("/") + "/", max_results=1))
    return Path(uri).exists()


def list_files(uri: str) -> Iterator[str]:
    """Every file below a directory or gs:// prefix (recursively), as paths or URIs, sorted."""
    if is_gcs(uri):
        bucket, prefix = split_gcs(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names = sorted(b.name for b in gcs_client().list_blobs(bucket, prefix=prefix) if not b.name.endswith("/"))
        yield from (f"gs://{bucket}/{n}" for n in names)
        return
    for root, dirs, files in os.walk(uri, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            yield os.path.join(root, f)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        return gcs_client().bucket(bucket).blob(path).download_as_bytes()
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old content or the new, never a part."""
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        gcs_client().bucket(bucket).blob(path).upload_from_string(data)  # GCS objects appear whole
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(uri: str, cache_dir: str | Path) -> str:
    """A local path holding `uri`'s content: the path itself, or a download into `cache_dir`."""
    if not is_gcs(uri):
        if not Path(uri).is_file():
            raise DataError(f"{uri!r} does not exist or is not a file")
        return uri
    bucket, path = split_gcs(uri)
    local = Path(cache_dir) / bucket / path
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        gcs_client().bucket(bucket).blob(path).download_to_filename(str(tmp))
        os.replace(tmp, local)
    return str(local)


def delete(uri: str) -> None:
    """Removes a file or object; a missing one is not an error."""
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        bucket, path = split_gcs(uri)
        try:
            gcs_client().bucket(bucket).blob(path).delete()
        except NotFound:
            pass
        return
    Path(uri).unlink(missing_ok=True)
