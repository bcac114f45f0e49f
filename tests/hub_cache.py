"""A Hugging Face hub cache exactly as `huggingface_hub` leaves it after a real download, made by the client itself.

The Hub is out of reach in tests, so a stand-in for its file endpoint (`/<repo>/resolve/<revision>/<file>`) serves the
files on localhost with the headers the real Hub sends (X-Repo-Commit, ETag: the git blob sha1, or for LFS files
X-Linked-Etag: the sha256) and huggingface_hub's own `hf_hub_download` fetches every file through it into the cache:
`blobs/<etag>`, `snapshots/<commit>/<path>` as relative symlinks to the blobs, `refs/<branch>` holding the commit.
Nothing of the layout is written here by hand, so it is what a user's `hf download` / first online run leaves.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

LFS_SUFFIXES = (".parquet", ".safetensors", ".model", ".bin")  # stored in LFS on the Hub (its .gitattributes)


@dataclass
class Repo:
    repo_id: str
    repo_type: str  # "dataset" | "model"
    files: dict[str, bytes]
    branch: str = "main"
    commit: str = field(init=False)

    def __post_init__(self):
        # A commit sha of its content (the real repo's sha is not knowable offline; any 40-hex id is one to the client)
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        self.commit = digest.hexdigest()

    @property
    def url_prefix(self) -> str:
        return f"/datasets/{self.repo_id}" if self.repo_type == "dataset" else f"/{self.repo_id}"


def _etag(name: str, data: bytes) -> tuple[str, str | None]:
    """(ETag, X-Linked-Etag) as the Hub sends them: git's blob sha1 for a regular file, the sha256 for an LFS one."""
    git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return (git_sha, hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else None)


def _handler(repos: list[Repo]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _find(self) -> tuple[int, dict[str, str], bytes]:
            path = unquote(self.path.split("?")[0])
            for repo in repos:
                head = f"{repo.url_prefix}/resolve/"
                if not path.startswith(head):
                    continue
                revision, _, name = path[len(head) :].partition("/")
                if revision not in (repo.branch, repo.commit):
                    return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
                if name not in repo.files:
                    return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, b""
                data = repo.files[name]
                etag, linked = _etag(name, data)
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Content-Length": str(len(data))}
                if linked:
                    headers |= {"X-Linked-Etag": f'"{linked}"', "X-Linked-Size": str(len(data))}
                return 200, headers, data
            return 404, {"X-Error-Code": "RepoNotFound"}, b""

        def _answer(self, body: bool) -> None:
            status, headers, data = self._find()
            self.send_response(status)
            headers.setdefault("Content-Length", "0")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body and status == 200:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

    return Handler


@contextmanager
def _hub_stand_in(repos: list[Repo]):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(repos))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fill_hub_cache(cache_dir: Path, repos: list[Repo]) -> None:
    """Download every file of `repos` at their branch into `cache_dir` with huggingface_hub's hf_hub_download."""
    from huggingface_hub import constants, hf_hub_download

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False  # the tests run offline; this one reaches
    try:  # only the stand-in on localhost
        with _hub_stand_in(repos) as endpoint:
            for repo in repos:
                for name in sorted(repo.files):
                    hf_hub_download(
                        repo.repo_id,
                        name,
                        repo_type=repo.repo_type,
                        revision=repo.branch,
                        cache_dir=cache_dir,
                        endpoint=endpoint,
                    )
    finally:
        constants.HF_HUB_OFFLINE = offline
