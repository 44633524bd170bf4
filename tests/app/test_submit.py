"""`funmatch submit` / `funmatch schedule` against a loopback stub of the KFP v2beta1 endpoints kfp.Client calls."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import yaml

from funmatch import __version__, config
from funmatch.app import cli, kfp_client

API = "/apis/v2beta1"


class KfpStub:
    """Enough of the KFP v2beta1 API for kfp.Client: healthz, pipelines (+ upload), versions, experiments,
    runs, recurring runs, with the JSON field names of the real API (note `recurringRuns`, the proto's own
    spelling). Records every request (header names lower-cased); answers 401 unless the bearer token is `token`."""

    def __init__(self, token: str | None = "tok-123"):
        self.token = token
        self.requests: list[SimpleNamespace] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self._ids = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = SimpleNamespace(
                    method=self.command,
                    path=url.path,
                    query=query,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=None,
                    files={},
                )
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):
                    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                        f"Content-Type: {ctype}\r\n\r\n".encode() + raw
                    )
                    for part in msg.iter_parts():
                        req.files[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
                elif raw:
                    req.body = json.loads(raw)
                stub.requests.append(req)
                if stub.token and self.headers.get("Authorization") != f"Bearer {stub.token}":
                    return self._send(401, {"error": "unauthenticated", "message": "bad token"})
                status, payload = stub.route(req)
                self._send(status, payload)

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def new_id(self, kind: str) -> str:
        self._ids += 1
        return f"{kind}-{self._ids}"

    @staticmethod
    def _matches(item: dict, query: dict) -> bool:
        for p in json.loads(query.get("filter") or "{}").get("predicates", []):
            assert p["operation"] in ("EQUALS", 1) and p["key"] == "display_name", p
            if item["display_name"] != p.get("stringValue", p.get("string_value")):
                return False
        return True

    def route(self, r) -> tuple[int, dict]:
        parts = r.path[len(API) :].strip("/").split("/")
        if r.path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if parts[0] == "pipelines":
            if r.method == "GET" and len(parts) == 1:
                return 200, {"pipelines": [p for p in self.pipelines.values() if self._matches(p, r.query)]}
            if r.method == "POST" and parts[1:] == ["upload"]:
                pid = self.new_id("pipeline")
                self.pipelines[pid] = {
                    "pipeline_id": pid,
                    "display_name": r.query["name"],
                    "description": r.query.get("description", ""),
                }
                self.versions[pid] = [
                    {
                        "pipeline_id": pid,
                        "pipeline_version_id": self.new_id("version"),
                        "display_name": r.query["name"],
                        "description": "",
                    }
                ]
                return 200, self.pipelines[pid]
            if r.method == "POST" and parts[1:] == ["upload_version"]:
                pid = r.query["pipelineid"]
                if any(v["display_name"] == r.query["name"] for v in self.versions[pid]):
                    return 409, {"error": "exists", "message": "version name taken"}
                v = {
                    "pipeline_id": pid,
                    "pipeline_version_id": self.new_id("version"),
                    "display_name": r.query["name"],
                    "description": r.query.get("description", ""),
                }
                self.versions[pid].append(v)
                return 200, v
            if r.method == "GET" and len(parts) == 3 and parts[2] == "versions":
                return 200, {"pipeline_versions": [v for v in self.versions[parts[1]] if self._matches(v, r.query)]}
        if parts[0] == "experiments":
            if r.method == "GET":
                return 200, {"experiments": [e for e in self.experiments.values() if self._matches(e, r.query)]}
            eid = self.new_id("experiment")
            self.experiments[eid] = r.body | {"experiment_id": eid}
            return 200, self.experiments[eid]
        if parts[0] == "runs" and r.method == "POST":
            rid = self.new_id("run")
            self.runs[rid] = r.body | {"run_id": rid}
            return 200, self.runs[rid]
        if parts[0] == "recurringruns":
            if r.method == "GET":
                return 200, {
                    "recurringRuns": [
                        x
                        for x in self.recurring.values()
                        if self._matches(x, r.query) and x["experiment_id"] == r.query.get("experiment_id")
                    ]
                }
            if r.method == "POST":
                rid = self.new_id("recurring")
                self.recurring[rid] = r.body | {"recurring_run_id": rid}
                return 200, self.recurring[rid]
            if r.method == "DELETE":
                del self.recurring[parts[1]]
                return 200, {}
        return 404, {"error": "not found", "message": r.path}

    def calls(self, since: int = 0) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests[since:]]


@pytest.fixture
def stub(monkeypatch, tmp_path):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-123")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", raising=False)
    server = KfpStub()
    server._thread.start()
    yield server
    server._server.shutdown()
    server._server.server_close()


def version_name(*overrides: str, caching: bool = False) -> str:
    cfg = config.load("demo-tiny", list(overrides))
    name = f"{__version__}-{hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]}"
    return name if caching else f"{name}-nocache"


def task_caching(ir: bytes) -> dict[str, bool]:
    """Every container task of the IR (nested DAGs included) → whether KFP may answer it from its cache."""
    spec = yaml.safe_load(ir.split(b"\n---")[0])
    dags = [("root", spec["root"])] + [(n, c) for n, c in spec["components"].items() if "dag" in c]
    return {
        f"{dag}/{task}": bool(t.get("cachingOptions", {}).get("enableCache", False))
        for dag, c in dags
        for task, t in c["dag"]["tasks"].items()
        if "executorLabel" in spec["components"][t["componentRef"]["name"]]
    }


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("funmatch: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_submit_uploads_a_version_once_then_reuses_it(stub, capsys):
    argv = [
        "submit",
        "--host",
        stub.url,
        "--preset",
        "demo-tiny",
        "--set",
        "distill.epochs=3",
        "--experiment",
        "nightly",
        "--publish-uri",
        "gs://bkt/models/fashion",
    ]
    assert cli.main(argv) == 0
    name = version_name("distill.epochs=3")
    p = f"{API}/pipelines"
    assert stub.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/healthz"),  # funmatch's preflight, then kfp.Client's
        ("GET", p),
        ("POST", f"{p}/upload"),
        ("GET", f"{p}/pipeline-1/versions"),
        ("POST", f"{p}/upload_version"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    assert all(r.headers.get("authorization") == "Bearer tok-123" for r in stub.requests)
    upload = stub.requests[5]
    assert upload.query["name"] == name and upload.query["pipelineid"] == "pipeline-1"
    ir = upload.files["uploadfile"]
    assert f"IR sha256 {hashlib.sha256(ir).hexdigest()}" in upload.query["description"]
    spec = yaml.safe_load(ir.split(b"\n---")[0])
    assert spec["pipelineInfo"]["name"] == "funmatch"
    assert spec["root"]["inputDefinitions"]["parameters"]["distill_epochs"]["defaultValue"] == 3
    caching = task_caching(ir)  # a resubmitted config retrains: no stage is answered from KFP's cache
    assert "root/prepare-data" in caching and any(k.endswith("/distill") for k in caching)
    assert not any(caching.values()), caching
    assert "KFP caching off" in upload.query["description"]
    assert json.loads(stub.requests[4].query["filter"])["predicates"][0]["stringValue"] == name
    assert stub.requests[7].body["display_name"] == "nightly"
    run = stub.requests[8].body
    assert run["experiment_id"] == "experiment-4" and run["display_name"].startswith("funmatch-demo-tiny-")
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipeline-1", "pipeline_version_id": "version-3"}
    assert run["runtime_config"]["parameters"] == {"publish_uri": "gs://bkt/models/fashion"}
    # v2beta1 has no per-run caching field: a run of a version gets the version's IR, caching off, not an inline spec
    assert "pipeline_spec" not in run and set(run["runtime_config"]) == {"parameters"}
    out = capsys.readouterr().out
    assert f"version {name} (uploaded)" in out and f"{stub.url}/#/runs/details/run-5" in out
    assert "KFP caching off" in out

    mark = len(stub.requests)
    assert cli.main(argv) == 0  # same config: nothing uploaded, a new run of the same version
    assert ("POST", f"{p}/upload") not in stub.calls(mark) and ("POST", f"{p}/upload_version") not in stub.calls(mark)
    assert ("POST", f"{API}/experiments") not in stub.calls(mark)
    assert stub.requests[-1].body["pipeline_version_reference"]["pipeline_version_id"] == "version-3"
    assert f"version {name} (reused)" in capsys.readouterr().out

    mark = len(stub.requests)
    assert cli.main([*argv[:6], "distill.epochs=4", *argv[7:]]) == 0  # another config: another version
    assert stub.calls(mark).count(("POST", f"{p}/upload_version")) == 1
    assert stub.calls(mark).count(("POST", f"{p}/upload")) == 0
    assert [v["display_name"] for v in stub.versions["pipeline-1"]] == [
        "funmatch",
        name,
        version_name("distill.epochs=4"),
    ]


def test_a_same_named_version_with_other_ir_is_refused(stub, capsys):
    name = version_name()
    stub.pipelines["p0"] = {"pipeline_id": "p0", "display_name": "funmatch"}
    stub.versions["p0"] = [
        {
            "pipeline_id": "p0",
            "pipeline_version_id": "v0",
            "display_name": name,
            "description": f"funmatch; IR sha256 {'0' * 64}",
        }
    ]
    assert cli.main(["submit", "--host", stub.url, "--preset", "demo-tiny"]) == 2
    err = one_line_error(capsys)
    assert f"pipeline version '{name}' already exists with other IR (sha256 000000000000" in err
    assert ("POST", f"{API}/runs") not in stub.calls()


def test_schedule_creates_then_keeps_then_replaces(stub, capsys):
    argv = ["schedule", "--host", stub.url, "--preset", "demo-tiny", "--name", "weekly"]
    assert cli.main([*argv, "--cron", "0 0 3 * * 0"]) == 0
    assert "recurring run weekly (recurring-5) created: cron '0 0 3 * * 0'" in capsys.readouterr().out
    body = stub.requests[-1].body
    assert stub.calls()[-1] == ("POST", f"{API}/recurringruns")
    assert body["display_name"] == "weekly" and body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["experiment_id"] == "experiment-4"
    assert body["pipeline_version_reference"] == {"pipeline_id": "pipeline-1", "pipeline_version_id": "version-3"}
    assert "pipeline_spec" not in body and "namespace" not in body
    (upload,) = [r for r in stub.requests if r.path.endswith("/upload_version")]
    assert upload.query["name"] == version_name()
    caching = task_caching(upload.files["uploadfile"])  # each scheduled run retrains, export included
    assert caching and not any(caching.values())

    mark = len(stub.requests)
    assert cli.main([*argv, "--cron", "0 0 3 * * 0"]) == 0  # identical: left alone
    assert "unchanged" in capsys.readouterr().out
    assert ("POST", f"{API}/recurringruns") not in stub.calls(mark)
    assert not any(m == "DELETE" for m, _ in stub.calls(mark))

    mark = len(stub.requests)
    assert cli.main([*argv, "--cron", "0 30 4 * * MON-FRI"]) == 0  # changed: new one first, then the old goes
    assert "updated" in capsys.readouterr().out
    calls = stub.calls(mark)
    assert calls.index(("POST", f"{API}/recurringruns")) < calls.index(("DELETE", f"{API}/recurringruns/recurring-5"))
    assert [(r["display_name"], r["trigger"]["cron_schedule"]["cron"]) for r in stub.recurring.values()] == [
        ("weekly", "0 30 4 * * MON-FRI")
    ]
    assert all(r.headers.get("authorization") == "Bearer tok-123" for r in stub.requests)


def test_cache_flag_is_another_version_with_caching_on(stub, capsys):
    argv = ["submit", "--host", stub.url, "--preset", "demo-tiny"]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--cache"]) == 0
    assert "KFP caching on" in capsys.readouterr().out
    uploads = [r for r in stub.requests if r.path.endswith("/upload_version")]
    assert [u.query["name"] for u in uploads] == [version_name(), version_name(caching=True)]
    assert not any(task_caching(uploads[0].files["uploadfile"]).values())
    on = task_caching(uploads[1].files["uploadfile"])
    assert on["root/prepare-data"] and any(v for k, v in on.items() if k.endswith("/distill"))
    assert "KFP caching on" in uploads[1].query["description"]
    runs = [
        r.body["pipeline_version_reference"]["pipeline_version_id"] for r in stub.requests if r.path.endswith("/runs")
    ]
    assert runs == ["version-3", "version-6"]


def test_namespace_reaches_pipeline_experiment_and_recurring_run(stub, capsys):
    argv = ["--host", stub.url, "--preset", "demo-tiny", "--namespace", "team-a", "--experiment", "nightly"]
    assert cli.main(["submit", *argv]) == 0
    assert "experiment nightly (namespace team-a)" in capsys.readouterr().out
    by_call = {(r.method, r.path): r for r in stub.requests}  # the last request of each kind
    assert by_call[("GET", f"{API}/pipelines")].query["namespace"] == "team-a"
    assert by_call[("POST", f"{API}/pipelines/upload")].query["namespace"] == "team-a"
    assert by_call[("GET", f"{API}/experiments")].query["namespace"] == "team-a"
    assert by_call[("POST", f"{API}/experiments")].body == {"display_name": "nightly", "namespace": "team-a"}
    run = by_call[("POST", f"{API}/runs")].body  # V2beta1Run has no namespace: it runs in its experiment's
    assert stub.experiments[run["experiment_id"]]["namespace"] == "team-a"

    assert cli.main(["schedule", *argv, "--cron", "0 0 3 * * 0"]) == 0
    body = stub.requests[-1].body
    assert stub.calls()[-1] == ("POST", f"{API}/recurringruns")
    assert body["namespace"] == "team-a" and body["experiment_id"] == run["experiment_id"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}} and body["mode"] == "ENABLE"


@pytest.mark.parametrize(
    "cron, words",
    [
        ("0 3 * * 0", ["'0 3 * * 0' has 5 fields", "expected 6, seconds first"]),
        ("0 0 25 * * 0", ["hour '25' is not in 0-23"]),
        ("0 0 3 * * MON-FRX", ["day-of-week 'FRX'"]),
        ("0 */0 3 * * 0", ["minute step '0'"]),
    ],
)
def test_a_bad_cron_is_one_line_before_any_request(stub, capsys, cron, words):
    assert cli.main(["schedule", "--host", stub.url, "--cron", cron]) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err
    assert stub.requests == []


def test_refused_token_bad_and_unreachable_hosts_are_one_line(stub, monkeypatch, capsys):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "wrong")
    assert cli.main(["submit", "--host", stub.url, "--preset", "demo-tiny"]) == 2
    assert (
        f"KFP at {stub.url} refused the credentials (401 Unauthorized); the token came from KF_PIPELINES_TOKEN"
        in one_line_error(capsys)
    )
    assert len(stub.requests) == 1  # one preflight, not kfp.Client's five retries 5 s apart
    assert cli.main(["submit", "--host", "kfp.example.com"]) == 2
    assert "--host 'kfp.example.com' is not a URL" in one_line_error(capsys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert cli.main(["submit", "--host", f"http://127.0.0.1:{closed}"]) == 2
    assert f"cannot reach KFP at http://127.0.0.1:{closed}" in one_line_error(capsys)


def test_token_from_the_service_account_file(stub, monkeypatch, tmp_path, capsys):
    (tmp_path / "token").write_text("sa-token\n")
    monkeypatch.delenv("KF_PIPELINES_TOKEN")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "token"))
    stub.token = "sa-token"
    assert cli.main(["submit", "--host", stub.url, "--preset", "demo-tiny"]) == 0
    assert {r.headers.get("authorization") for r in stub.requests} == {"Bearer sa-token"}


def test_token_precedence_and_google_default_credentials(monkeypatch, tmp_path):
    import google.auth
    from google.auth import exceptions as gexc
    from google.oauth2 import id_token

    class Creds:
        token, id_token = None, None

        def refresh(self, request):
            self.token = "access-token"

    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", raising=False)
    monkeypatch.setattr(google.auth, "default", lambda scopes=None: (Creds(), "proj"))
    monkeypatch.setattr(id_token, "fetch_id_token", lambda request, audience: f"id-token-for-{audience}")
    (tmp_path / "token").write_text("sa-token")
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "env-token")
    assert kfp_client.resolve_token() == ("env-token", "KF_PIPELINES_TOKEN")
    monkeypatch.delenv("KF_PIPELINES_TOKEN")
    assert kfp_client.resolve_token() == ("sa-token", f"service account token {tmp_path / 'token'}")
    (tmp_path / "token").unlink()
    assert kfp_client.resolve_token() == ("access-token", "Google access token")
    monkeypatch.setenv("KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "iap-client.apps")
    assert kfp_client.resolve_token() == (
        "id-token-for-iap-client.apps",
        "Google ID token for audience iap-client.apps",
    )

    def no_credentials(scopes=None):
        raise gexc.DefaultCredentialsError("none")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    assert kfp_client.resolve_token() == (None, "no credentials")
