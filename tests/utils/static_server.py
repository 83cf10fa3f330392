"""Test servers of files, each a real `http.server` process: `python -m tests.utils.static_server MODE ROOT PORT`.

    static  ROOT's files as they are (an adapter registry: <adapter id>.tar; a PEFT folder over HTTP)
    hub     ROOT/<org>/<name>/<file> answered as the Hugging Face Hub's file endpoint answers
            (HEAD and GET /<org>/<name>/resolve/<revision>/<file>, with X-Repo-Commit, ETag and the
            X-Error-Code a missing repository or file gets), so huggingface_hub itself downloads from
            it into its own cache, as from the Hub; nothing else of the Hub's API is served.

Started with `start(mode, root)`, which returns (process, base URL); the caller stops the process.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision every repository has


class HubHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet: the test's output is the test's
        pass

    def _resolve(self, with_body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            return self._missing("RepoNotFound")
        org, name, _, _revision, file = parts
        repo = Path(self.directory) / org / name
        if not repo.is_dir():
            return self._missing("RepoNotFound")
        path = repo / file
        if not path.is_file():
            return self._missing("EntryNotFound")
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def _missing(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._resolve(False)

    def do_GET(self) -> None:  # noqa: N802
        self._resolve(True)


class QuietStatic(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def start(mode: str, root: Path) -> tuple[subprocess.Popen, str]:
    """The server as a process of its own, ready; (process, base URL)."""
    from devnet.anvil import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.utils.static_server", mode, str(root), str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.head(url + "/", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{mode} server did not start on {url}")


if __name__ == "__main__":
    mode, root, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    handler = HubHandler if mode == "hub" else QuietStatic
    ThreadingHTTPServer(("127.0.0.1", port), partial(handler, directory=root)).serve_forever()
