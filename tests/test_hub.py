"""Hub ids against a fake Hugging Face hub on 127.0.0.1: every failure is one line a user can act on (issue #3).

The fake hub answers the requests huggingface_hub makes for a whole-repository download (model info for a revision, the
file tree at a commit, then HEAD and GET of each file under `resolve/`) the way huggingface.co does, including the
`X-Error-Code` headers that huggingface_hub turns into its error types. The CLI runs in a subprocess pointed at it
with HF_ENDPOINT, an empty HF_HOME and no token; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from csmcli import checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT = 120


def _error(status: int, code: str | None, message: str):
    """An error answer as the hub gives it: status, `X-Error-Code` / `X-Error-Message` headers and a JSON body."""
    headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
    return status, headers, json.dumps({"error": message}).encode()


ERRORS = {
    "someone/gated-model": _error(
        403, "GatedRepo", "Access to model someone/gated-model is restricted. You must have access to it and be "
        "authenticated to access it. Please log in."),
    "someone/private-model": _error(401, "RepoNotFound", "Repository not found"),
    "someone/plain-401": _error(401, None, "Unauthorized"),
    "someone/bad-token": _error(401, None, "Invalid credentials in Authorization header"),
    "someone/plain-403": _error(403, None, "Forbidden"),
    "someone/no-such-model": _error(404, "RepoNotFound", "Repository not found"),
    "someone/broken-hub": _error(500, None, "Internal Error - We're working hard to fix this as soon as possible!"),
    "someone/no-main": _error(404, "RevisionNotFound", "Invalid rev id: main"),
}
# huggingface.co shows a gated repo's info and file list to anyone; only its files answer 401 (no token) or 403
# (a token whose user has not accepted the license).
GATED_FILES = {
    "someone/gated-files-401": _error(401, "GatedRepo", "Access to model someone/gated-files-401 is restricted. "
                                      "You must have access to it and be authenticated to access it. Please log in."),
    "someone/gated-files-403": _error(403, "GatedRepo", "Access to model someone/gated-files-403 is restricted and "
                                      "you are not in the authorized list."),
}


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> {path in repo: content}
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path = urlsplit(self.path).path
        self.server.requests.append((self.command, self.path))
        status, headers, body = self._route(path)
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))} | headers
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, path: str):
        parts = path.strip("/").split("/")
        api = parts[0] == "api"
        repo = "/".join(parts[2:4] if api else parts[0:2])
        if repo in ERRORS:
            return ERRORS[repo]
        files = self.server.files.get(repo)
        if files is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if api and parts[4:6] == ["revision", "main"]:  # model info at a branch: its commit and file list
            info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": name} for name in sorted(files)]}
            return 200, {}, json.dumps(info).encode()
        if api and parts[4:6] == ["tree", SHA]:  # the recursive file tree at that commit
            tree = [{"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                    for name, data in sorted(files.items())]
            return 200, {}, json.dumps(tree).encode()
        if not api and repo in GATED_FILES:
            return GATED_FILES[repo]
        if not api and parts[2:4] == ["resolve", SHA] and "/".join(parts[4:]) in files:
            data = files["/".join(parts[4:])]
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": SHA,
                       "ETag": f'"{_git_oid(data)}"'}
            return 200, headers, data
        return _error(404, "EntryNotFound", f"{path} not found")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def hub():
    server = FakeHub()
    for repo in GATED_FILES:
        server.files[repo] = {"config.json": b"{}", "model.safetensors": b"weights"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def hub_env(endpoint: str, hf_home: Path, offline: bool = False) -> dict[str, str]:
    """The child's environment: our endpoint and cache, no token, and HF_HUB_OFFLINE only when asked (conftest sets
    it in this process, so it is removed, not inherited)."""
    drop = {"HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
            "HF_ENDPOINT", "HF_HOME", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE", "CSMCLI_DEBUG"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def say(model: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csmcli", "say", "hi", "--model", model, "--torch-device", "cpu", "-o", "x.wav"],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


LOGIN = "accept the license at https://huggingface.co/{repo} and log in with `hf auth login` (or set HF_TOKEN)"


@pytest.mark.parametrize(
    ("repo", "expected"),
    [
        ("someone/gated-model", "error: someone/gated-model is gated: " + LOGIN),
        ("someone/gated-files-403", "error: someone/gated-files-403 is gated: " + LOGIN),
        ("someone/private-model",
         "error: someone/private-model: not found, or private and you are not logged in (401): " + LOGIN),
    ],
)
def test_cli_says_accept_the_license_and_log_in(hub, tmp_path, repo, expected):
    result = say(repo, hub_env(hub.url, tmp_path / "hf"), tmp_path)
    assert one_line(result) == expected.format(repo=repo)
    assert ("GET", f"/api/models/{repo}/revision/main") in hub.requests  # the fake hub was asked, not the real one
    assert not (tmp_path / "x.wav").exists()


def test_cli_offline_with_an_empty_cache(hub, tmp_path):
    requests = len(hub.requests)
    result = say("someone/gated-model", hub_env(hub.url, tmp_path / "hf", offline=True), tmp_path)
    line = one_line(result)
    assert line.startswith("error: someone/gated-model is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in line
    assert len(hub.requests) == requests  # offline means no request at all


# Every other answer, through `resolve_hub` in one child process (one torch import for all of them).
MAPPING = {
    "someone/gated-files-401": "someone/gated-files-401 is gated: " + LOGIN,
    # huggingface_hub reads a bare 401 from https://... as RepoNotFound (the someone/private-model line); from our
    # http:// fake it stays a plain HTTP error
    "someone/plain-401": "someone/plain-401: access denied (401): " + LOGIN,
    "someone/bad-token": "someone/bad-token: access denied (401): " + LOGIN,
    "someone/plain-403": "someone/plain-403: access denied (403): " + LOGIN,
    "someone/no-such-model": "someone/no-such-model: not found on the hub (404); check the id, or "
    "if it is private: log in with `hf auth login` (or set HF_TOKEN)",
    "someone/broken-hub": "someone/broken-hub: the hub answered 500 and the model is not in the local Hugging Face "
    "cache; try again later",
    "someone/no-main": "someone/no-main: hub request failed (404): Invalid rev id: main",
}
RESOLVE_ALL = """
import json, sys
from csmcli import checkpoint
from csmcli.errors import CsmError
out = {}
for repo in sys.argv[1:]:
    try:
        out[repo] = "ok " + str(checkpoint.resolve_hub(repo))
    except CsmError as e:
        out[repo] = str(e)
print(json.dumps(out))
"""


def resolve_in_child(repos: list[str], env: dict[str, str], cwd: Path) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-c", RESOLVE_ALL, *repos], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_each_hub_answer_maps_to_one_clear_line(hub, tmp_path):
    got = resolve_in_child(list(MAPPING), hub_env(hub.url, tmp_path / "hf"), tmp_path)
    assert got == {repo: line.format(repo=repo) for repo, line in MAPPING.items()}
    assert all("\n" not in line for line in got.values())


def test_unreachable_hub_says_so(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = resolve_in_child(["someone/any-model"], hub_env(f"http://127.0.0.1:{port}", tmp_path / "hf"), tmp_path)
    assert got["someone/any-model"].startswith(
        "someone/any-model is not in the local Hugging Face cache and the hub cannot be reached")


# ---------------------------------------------------------------- a real download


@pytest.fixture(scope="module")
def served(hub, hf_checkpoint):
    hub.files["tiny/model"] = {p.name: p.read_bytes() for p in hf_checkpoint.iterdir() if p.is_file()}
    return hub.files["tiny/model"]


LOAD = """
import sys, torch
from csmcli import checkpoint
ck = checkpoint.load("tiny/model")
torch.save(ck.model.state_dict(), sys.argv[1])
print(ck.source)
"""


def test_download_from_the_hub_then_load_offline(hub, served, hf_checkpoint, tmp_path):
    hf_home, saved = tmp_path / "hf", tmp_path / "state.pt"
    online = subprocess.run([sys.executable, "-c", LOAD, str(saved)], capture_output=True, text=True,
                            timeout=TIMEOUT, env=hub_env(hub.url, hf_home), cwd=tmp_path)
    assert online.returncode == 0, online.stderr
    snapshot = hf_home / "hub" / "models--tiny--model" / "snapshots" / SHA
    assert online.stdout.strip() == str(snapshot)
    wanted = {name for name in served if any(Path(name).match(pattern) for pattern in checkpoint.HUB_PATTERNS)}
    assert "model.safetensors" in wanted and "tokenizer.json" in wanted
    assert {p.name for p in snapshot.iterdir()} == wanted
    assert all((snapshot / name).read_bytes() == served[name] for name in wanted)
    expected = checkpoint.load(str(hf_checkpoint)).model.state_dict()
    got = torch.load(saved, weights_only=True)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    requests = len(hub.requests)  # from the cache alone: offline, nothing asked
    offline = subprocess.run([sys.executable, "-c", LOAD, str(saved)], capture_output=True, text=True,
                             timeout=TIMEOUT, env=hub_env(hub.url, hf_home, offline=True), cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip() == str(snapshot) and len(hub.requests) == requests

    (snapshot / "model.safetensors").unlink()  # an interrupted download, then offline
    got = resolve_in_child(["tiny/model"], hub_env(hub.url, hf_home, offline=True), tmp_path)
    assert got == {"tiny/model": "tiny/model: its copy in the local Hugging Face cache is incomplete (an interrupted "
                                 "download?) and the hub cannot be reached: download it again online"}
