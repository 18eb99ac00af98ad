"""A Hugging Face hub on 127.0.0.1 serving model folders, for tests of what a driver fetches.

``huggingface_hub`` talks to it through its real HTTP code (``repo_info``, ``list_repo_tree``,
``hf_hub_download``'s HEAD + GET): the four endpoints it uses are answered from local folders,
and every file request is recorded. An in-process thread, no subprocess: a unit test may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"  # the one commit of every repo
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack")


class FakeHub:
    """``repos``: repo id (``org/name``) → local folder. ``requested``: the repo-relative paths of
    every file HEAD or GET, in order; ``url``: the endpoint (``http://127.0.0.1:PORT``)."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.requested: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _files(self, repo: str) -> list[str]:
                root = hub.repos[repo]
                return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

            def _route(self, head: bool):
                path = unquote(urlparse(self.path).path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self._send(404, b'{"error": "Repository not found"}',
                                          {"X-Error-Code": "RepoNotFound"}, head)
                    if parts[4:5] == ["revision"]:
                        info = {"id": repo, "modelId": repo, "sha": SHA, "private": False,
                                "siblings": [{"rfilename": f} for f in self._files(repo)]}
                        return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
                    if parts[4:5] == ["tree"]:
                        root = hub.repos[repo]
                        tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                 "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in self._files(repo)]
                        return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, rel = "/".join(parts[:2]), "/".join(parts[4:])
                    file = hub.repos.get(repo, Path("/nonexistent")) / rel
                    if not file.is_file():
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    hub.requested.append(rel)
                    data = file.read_bytes()
                    return self._send(200, data, {"X-Repo-Commit": SHA,
                                                  "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, head)
                return self._send(404, b"", None, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def weights_requested(self) -> list[str]:
        return [p for p in self.requested if p.endswith(WEIGHT_SUFFIXES)]


@contextlib.contextmanager
def serving(monkeypatch, repos: dict[str, Path], cache: Path):
    """Point ``huggingface_hub`` (online) at a ``FakeHub`` of ``repos`` with an empty cache at
    ``cache`` for the duration of the block; yields the hub."""
    from huggingface_hub import constants

    hub = FakeHub(repos)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    try:
        yield hub
    finally:
        hub.close()


def with_weights(folder: Path, dest: Path) -> Path:
    """A copy of the model ``folder`` at ``dest`` with what a large hub repo also holds: sharded
    weights in several formats and an ``original/`` folder of checkpoints (small files here: the
    test is whether they are fetched at all)."""
    import shutil

    shutil.copytree(folder, dest)
    for name in ("pytorch_model.bin", "original/consolidated.00.pth", "original/tokenizer.model.pt",
                 "model.gguf", "optimizer.pt"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(b"\0" * 4096)
    return dest
