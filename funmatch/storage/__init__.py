"""One small interface over local paths and `gs://bucket/prefix` URIs.

GCS goes through google-cloud-storage, imported lazily (the GPU image may lack it), with the
environment's credentials (workload identity on GKE; `STORAGE_EMULATOR_HOST` + anonymous
credentials for tests). Every GCS call:

- is retried with exponential backoff (google.api_core Retry) on 408/429/5xx, connection errors
  and timeouts, until an overall deadline; a call that still fails is one `StorageError` line;
- has a per-request timeout, so a server that stops answering counts as a retryable failure;
- is retried even for unconditional writes: every write here puts the same bytes again, so a
  repeated attempt is harmless (google-cloud-storage itself only retries conditional writes).

Settings (environment, read at each call so a KFP task can set them):

    FUNMATCH_GCS_DEADLINE_S      overall retry deadline of one call (default 600)
    FUNMATCH_GCS_TIMEOUT_S       read timeout of one HTTP request (default 120; connect: min(10, this))
    FUNMATCH_GCS_BACKOFF_S       first backoff delay, doubled per retry (default 1)
    FUNMATCH_GCS_MAX_BACKOFF_S   longest backoff delay (default 32)
    FUNMATCH_GCS_CHUNK_MIB       chunk of a resumable upload, a multiple of 0.25 (default 32)

Atomicity. Local writes: temp file, fsync, rename. GCS: an object becomes visible only when its
single-request upload, or the last chunk of its resumable upload, is accepted; an interrupted
resumable session leaves no object at all. Files over 8 MiB go up as resumable uploads in
chunks (each chunk retried on its own) with the whole file's CRC32C sent up front, so GCS refuses
to finalize an object whose bytes differ from the local file; small uploads carry their CRC32C
in the request metadata, with the same effect. After every upload the CRC32C (and MD5 when the
server reports one) that GCS returns is compared with the local file's; on a mismatch that
generation is deleted and `IntegrityError` raised. So no object is ever left under its final name
with bytes other than the ones we meant to write, and no temp-name-then-copy is needed (it would
double the requests and leave orphaned temp objects after a crash without making multi-file
sets any safer). A *set* of files (a checkpoint, a published model version) is committed by a
marker written last (the checkpoint's JSON, SHA256SUMS, then `latest.json`), which readers
require; see funmatch/storage/publish.py.

`write_bytes(..., if_generation_match=G)` is GCS's compare-and-swap: G=0 creates only if absent,
G>0 replaces only that generation; a lost race raises `PreconditionFailed`. `read_with_generation`
returns the generation to pass. Locally only G=0 (create-only, via an atomic hard link) exists.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

from funmatch.errors import DataError

log = logging.getLogger(__name__)

RESUMABLE_THRESHOLD = 8 * 1024 * 1024  # google-cloud-storage's own switch to resumable uploads
_READ_BLOCK = 4 * 1024 * 1024


class StorageError(DataError):
    """A storage call that failed for good (after retries) or cannot be made."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """A file or object that does not exist (also a FileNotFoundError for callers that catch OSError)."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object's generation is not the one the caller expected."""


class IntegrityError(StorageError):
    """Bytes that do not match their checksum."""


class Hashes(TypedDict):
    """sha256 (hex), md5 and crc32c (base64, GCS's encoding) and size in bytes of a file or buffer."""

    sha256: str
    md5: str
    crc32c: str
    size: int


# ---------------------------------------------------------------- URIs


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' → ('bucket', 'a/b')."""
    if not is_gcs(uri) or len(uri) <= 5 or uri[5] == "/":
        raise DataError(f"{uri!r} is not a gs://bucket/path URI")
    bucket, _, path = uri[5:].partition("/")
    return bucket, path


def join(uri: str, *names: str) -> str:
    """`uri` + '/' + names, for directories and gs:// prefixes alike."""
    return "/".join([uri.rstrip("/"), *(n.strip("/") for n in names)])


# ---------------------------------------------------------------- settings, client, retry


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StorageError(f"{name}={raw!r} is not a number of seconds > 0")
    return value


def deadline_s() -> float:
    return _env_seconds("FUNMATCH_GCS_DEADLINE_S", 600.0)


def _timeout() -> tuple[float, float]:
    read = _env_seconds("FUNMATCH_GCS_TIMEOUT_S", 120.0)
    return min(10.0, read), read


def _chunk_size() -> int:
    mib = _env_seconds("FUNMATCH_GCS_CHUNK_MIB", 32.0)
    quantum = 256 * 1024
    if (mib * 1024 * 1024) % quantum:
        raise StorageError(f"FUNMATCH_GCS_CHUNK_MIB={mib:g} is not a multiple of 0.25 (GCS chunks are 256 KiB units)")
    return int(mib * 1024 * 1024)


def _log_retry(exc: Exception) -> None:
    log.warning("GCS request failed (%s); retrying with backoff", _short(exc))


def retry_policy():  # -> google.api_core.retry.Retry
    """Exponential backoff (x2, capped) on 408/429/5xx, connection errors and timeouts, up to the deadline."""
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import DEFAULT_RETRY

    return Retry(
        predicate=DEFAULT_RETRY._predicate,
        initial=_env_seconds("FUNMATCH_GCS_BACKOFF_S", 1.0),
        maximum=_env_seconds("FUNMATCH_GCS_MAX_BACKOFF_S", 32.0),
        multiplier=2.0,
        timeout=deadline_s(),
        on_error=_log_retry,
    )


_clients = threading.local()  # storage.Client is not documented as thread-safe: one per thread


def gcs_client():  # -> google.cloud.storage.Client
    """This thread's client (anonymous against `STORAGE_EMULATOR_HOST` when that is set)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    key = (os.getpid(), emulator, os.environ.get("GOOGLE_CLOUD_PROJECT", ""))
    cached = getattr(_clients, "by_key", {})
    if key not in cached:
        from google.cloud import storage

        if emulator:
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(
                project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials()
            )
        else:
            client = storage.Client()
        _clients.by_key = cached = {key: client}  # one live client per thread
    return cached[key]


def _blob(uri: str, chunk_size: int | None = None):
    bucket, path = split_gcs(uri)
    if not path or path.endswith("/"):
        raise StorageError(f"{uri!r} names a prefix, not an object")
    return gcs_client().bucket(bucket).blob(path, chunk_size=chunk_size)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _gcs_errors(uri: str, action: str):
    """Turns what google-cloud-storage raises after its retries into one-line StorageErrors."""
    import requests
    from google.api_core import exceptions as gexc
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    try:
        yield
    except StorageError:
        raise
    except gexc.NotFound as e:
        raise ObjectNotFound(f"{uri} does not exist ({action})") from e
    except gexc.PreconditionFailed as e:
        raise PreconditionFailed(f"{uri} changed while we were writing it (generation precondition failed, 412)") from e
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise StorageError(
            f"{uri}: permission denied to {action} ({_short(e)}); check the credentials' roles on the bucket"
        ) from e
    except DataCorruption as e:
        raise IntegrityError(f"{uri}: checksum mismatch while trying to {action} ({_short(e)})") from e
    except gexc.RetryError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise StorageError(
            f"{uri}: GCS kept failing for FUNMATCH_GCS_DEADLINE_S={deadline_s():g}s while trying "
            f"to {action} (last: {_short(cause)})"
        ) from e
    except (gexc.GoogleAPICallError, InvalidResponse) as e:
        raise StorageError(f"{uri}: could not {action} ({_short(e)})") from e
    except (requests.RequestException, ConnectionError, TimeoutError) as e:  # after the retries gave up
        raise StorageError(f"{uri}: could not {action} ({_short(e)}; retried for up to {deadline_s():g}s)") from e


# ---------------------------------------------------------------- checksums


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a local file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_hashes(path: str | Path) -> Hashes:
    """sha256 (hex), crc32c and md5 (base64, GCS's encoding) and size of a local file, in one pass."""
    import google_crc32c

    sha, md5, crc = hashlib.sha256(), hashlib.md5(), google_crc32c.Checksum()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            sha.update(block)
            md5.update(block)
            crc.update(block)
            size += len(block)
    return {
        "sha256": sha.hexdigest(),
        "md5": base64.b64encode(md5.digest()).decode(),
        "crc32c": base64.b64encode(crc.digest()).decode(),
        "size": size,
    }


def _bytes_hashes(data: bytes) -> Hashes:
    import google_crc32c

    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5": base64.b64encode(hashlib.md5(data).digest()).decode(),
        "crc32c": base64.b64encode(google_crc32c.Checksum(data).digest()).decode(),
        "size": len(data),
    }


def _server_matches(blob, local: Hashes) -> bool:
    """Whether GCS's reported checksums (crc32c, and md5 when given) and size equal the local ones."""
    if blob.crc32c is None and blob.md5_hash is None:
        blob.reload(retry=retry_policy(), timeout=_timeout())
    if blob.crc32c is None and blob.md5_hash is None:
        raise StorageError(f"gs://{blob.bucket.name}/{blob.name}: the server reported no checksum to verify against")
    return (
        (blob.crc32c is None or blob.crc32c == local["crc32c"])
        and (blob.md5_hash is None or blob.md5_hash == local["md5"])
        and (blob.size is None or int(blob.size) == local["size"])
    )


def _verify_upload(blob, uri: str, local: Hashes) -> None:
    if _server_matches(blob, local):
        return
    got = f"crc32c {blob.crc32c}, md5 {blob.md5_hash}, {blob.size} bytes"
    with contextlib.suppress(Exception):  # the object must not stay under its final name
        blob.delete(if_generation_match=blob.generation, retry=retry_policy(), timeout=_timeout())
    raise IntegrityError(
        f"{uri}: GCS stored {got}; expected crc32c {local['crc32c']}, md5 {local['md5']}, "
        f"{local['size']} bytes (upload deleted)"
    )


def _same_object_exists(uri: str, local: Hashes) -> int | None:
    """The generation of `uri` if it already holds exactly these bytes (a retried create that had landed)."""
    blob = _blob(uri)
    with _gcs_errors(uri, "read metadata"):
        found = blob.bucket.get_blob(blob.name, retry=retry_policy(), timeout=_timeout())
    if found is not None and _server_matches(found, local):
        return found.generation
    return None


def _content_type(uri: str) -> str:
    return (
        "application/json"
        if uri.endswith(".json")
        else "text/plain"
        if uri.endswith("SUMS")
        else "application/octet-stream"
    )


# ---------------------------------------------------------------- reading


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        client = gcs_client()
        with _gcs_errors(uri, "check existence"):
            if path and client.bucket(bucket).blob(path).exists(retry=retry_policy(), timeout=_timeout()):
                return True
            prefix = path.rstrip("/") + "/" if path else ""
            return any(
                True
                for _ in client.list_blobs(
                    bucket, prefix=prefix, max_results=1, retry=retry_policy(), timeout=_timeout()
                )
            )
    return Path(uri).exists()


def list_files(uri: str) -> Iterator[str]:
    """Every file below a directory or gs:// prefix (recursively), as paths or URIs, sorted."""
    if is_gcs(uri):
        bucket, prefix = split_gcs(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        with _gcs_errors(uri, "list objects"):
            names = sorted(
                b.name
                for b in gcs_client().list_blobs(bucket, prefix=prefix, retry=retry_policy(), timeout=_timeout())
                if not b.name.endswith("/")
            )
        yield from (f"gs://{bucket}/{n}" for n in names)
        return
    for root, dirs, files in os.walk(uri, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            yield os.path.join(root, f)


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-directories (gs:// sub-prefixes) of `uri`, sorted."""
    if is_gcs(uri):
        bucket, prefix = split_gcs(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        with _gcs_errors(uri, "list prefixes"):
            pages = gcs_client().list_blobs(
                bucket, prefix=prefix, delimiter="/", retry=retry_policy(), timeout=_timeout()
            )
            for _ in pages:  # prefixes are filled in while iterating
                pass
            return sorted(p[len(prefix) :].rstrip("/") for p in pages.prefixes)
    p = Path(uri)
    return sorted(d.name for d in p.iterdir() if d.is_dir()) if p.is_dir() else []


def read_bytes(uri: str) -> bytes:
    return read_with_generation(uri)[0]


def read_with_generation(uri: str) -> tuple[bytes, int]:
    """Content and generation (GCS's object generation; a local file's mtime in ns, informational)."""
    if is_gcs(uri):
        blob = _blob(uri)
        with _gcs_errors(uri, "read"):
            data = blob.download_as_bytes(retry=retry_policy(), timeout=_timeout())  # checksum-validated
        return data, int(blob.generation)
    p = Path(uri)
    try:
        return p.read_bytes(), p.stat().st_mtime_ns
    except FileNotFoundError as e:
        raise ObjectNotFound(f"{uri} does not exist") from e


def download_file(uri: str, dest: str | Path) -> Path:
    """Copies `uri` to the local file `dest` (via a temp file in its directory, so `dest` is whole or absent)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        if is_gcs(uri):
            with _gcs_errors(uri, "download"):  # the library checks the server's md5/crc32c as it reads
                _blob(uri).download_to_filename(tmp, retry=retry_policy(), timeout=_timeout())
        else:
            try:
                shutil.copyfile(uri, tmp)
            except FileNotFoundError as e:
                raise ObjectNotFound(f"{uri} does not exist") from e
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def fetch(uri: str, cache_dir: str | Path) -> str:
    """A local path holding `uri`'s content: the path itself, or a download into `cache_dir`."""
    if not is_gcs(uri):
        if not Path(uri).is_file():
            raise DataError(f"{uri!r} does not exist or is not a file")
        return uri
    bucket, path = split_gcs(uri)
    local = Path(cache_dir) / bucket / path
    if not local.exists():
        download_file(uri, local)
    return str(local)


# ---------------------------------------------------------------- writing


def _local_write(target: Path, fill, if_generation_match: int | None) -> None:
    """Atomic local write: `fill(file)` into a temp file, fsync, then rename (or hard-link for create-only),
    then fsync the directory."""
    if if_generation_match not in (None, 0):
        raise StorageError(
            f"if_generation_match={if_generation_match} on local path {target}: only 0 "
            "(create if absent) works outside gs://"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        if if_generation_match == 0:
            try:
                os.link(tmp, target)  # atomic, and fails if target exists
            except FileExistsError as e:
                raise PreconditionFailed(f"{target} already exists (create-only write)") from e
            Path(tmp).unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)  # the rename itself survives a power loss


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(uri: str, data: bytes, *, if_generation_match: int | None = None) -> int | None:
    """Atomic write: readers see the old content or the new, never a part. Returns the new GCS generation.

    `if_generation_match`: 0 = only if the object does not exist; G > 0 = only if its generation is G
    (a pointer move); otherwise `PreconditionFailed`.
    """
    if not is_gcs(uri):
        _local_write(Path(uri), lambda f: f.write(data), if_generation_match)
        return None
    local = _bytes_hashes(data)
    blob = _blob(uri)
    try:
        with _gcs_errors(uri, "write"):
            blob.upload_from_string(
                data,
                content_type=_content_type(uri),
                if_generation_match=if_generation_match,
                checksum="crc32c",
                retry=retry_policy(),
                timeout=_timeout(),
            )
    except PreconditionFailed:
        if if_generation_match == 0 and (gen := _same_object_exists(uri, local)) is not None:
            return gen  # our own earlier attempt landed, its response was lost, the retry hit the precondition
        raise
    _verify_upload(blob, uri, local)
    return int(blob.generation)


def upload_file(
    path: str | Path, uri: str, *, if_generation_match: int | None = None, hashes: Hashes | None = None
) -> int | None:
    """Copies a local file to `uri`; over 8 MiB as a chunked resumable upload. Verified by checksum.

    `hashes` (from `file_hashes`) saves re-reading a file whose hashes the caller already has.
    """
    if not is_gcs(uri):

        def fill(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _READ_BLOCK)

        _local_write(Path(uri), fill, if_generation_match)
        return None
    local = hashes or file_hashes(path)
    resumable = local["size"] > RESUMABLE_THRESHOLD
    blob = _blob(uri, chunk_size=_chunk_size() if resumable else None)
    try:
        with _gcs_errors(uri, "upload"):
            blob.upload_from_filename(
                str(path),
                content_type=_content_type(uri),
                if_generation_match=if_generation_match,
                checksum="crc32c",
                crc32c_checksum_value=local["crc32c"] if resumable else None,
                retry=retry_policy(),
                timeout=_timeout(),
            )
    except PreconditionFailed:
        if if_generation_match == 0 and (gen := _same_object_exists(uri, local)) is not None:
            return gen
        raise
    _verify_upload(blob, uri, local)
    return int(blob.generation)


def delete(uri: str, *, if_generation_match: int | None = None) -> None:
    """Removes a file or object; a missing one is not an error."""
    if is_gcs(uri):
        try:
            with _gcs_errors(uri, "delete"):
                _blob(uri).delete(if_generation_match=if_generation_match, retry=retry_policy(), timeout=_timeout())
        except ObjectNotFound:
            pass
        return
    Path(uri).unlink(missing_ok=True)
