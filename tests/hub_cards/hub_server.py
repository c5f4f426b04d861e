"""A real Hub-compatible server for the tests: olah (PyPI), serving local git repositories offline on 127.0.0.1.

olah runs from its own virtualenv, ``.venv-olah`` at the repository root (``.ci/run`` makes it:
``python3 -m venv .venv-olah && .venv-olah/bin/pip install olah==0.5.4``; its pins would clash with ours).
Its ``mirrors-path`` serves every git repository at ``<path>/models/<owner>/<name>`` through the Hub's read
API (``/api/models/{repo}/revision/{rev}``, ``/{repo}/resolve/{rev}/{file}``, refs, tree, paths-info);
``offline = true`` keeps it from ever calling huggingface.co. It has no upload routes (no repo creation,
preupload or commit), so pushes against it test the read side and the failure of the upload itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OLAH = Path(os.environ.get("HF_LINATTN_OLAH", REPO / ".venv-olah" / "bin" / "olah-cli"))
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit_folder(repo: Path, message: str = "upload") -> str:
    """git add and commit everything in ``repo`` (initialized on first use, branch main); returns the commit hash."""
    env = {**os.environ, **GIT_ENV}
    if not (repo / ".git").exists():
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", message], check=True, env=env)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, env=env, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


class OlahServer:
    """olah on a free port of 127.0.0.1 serving the git repositories under ``root / "mirrors"``; ``stop()`` ends it."""

    def __init__(self, root: Path):
        self.mirrors = root / "mirrors"
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = root / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{root / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n\n[accessibility]\noffline = true\n'
        )
        self.log = root / "olah.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(OLAH), "--config", str(config)], cwd=root, stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/whoami-v2", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (whoami without a token is refused): the server is up
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"olah did not start:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.3)

    def repo(self, repo_id: str) -> Path:
        """The git folder that serves ``repo_id``."""
        return self.mirrors / "models" / repo_id

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
