"""A local `mlflow server` in front of a SQLite store, for grids whose cells log in parallel.

Several processes writing one SQLite file directly contend for its single write lock; behind
one server process every write goes through one SQLAlchemy engine. The server is started in its
own process group (it spawns a uvicorn child), answers `/health` after a few seconds, and is
stopped as a group: TERM, up to `stop_timeout_s`, then KILL.

MLflow's job-execution workers (huey consumers, ~8 processes) are switched off: a tracking-only
server needs none of them, and this machine class has two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from flashctl.errors import UserError
from flashctl.system import free_port


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a recycled id owned by someone else
        return False
    return True


class MlflowServer:
    """`mlflow server` on loopback serving `backend_uri`; use as a context manager.

    Artifacts are not proxied (`--no-serve-artifacts`): experiments carry a `file:` artifact
    location next to the database, which clients on this machine write directly, so runs
    logged through the server and runs read later straight from SQLite see the same files.
    """

    def __init__(
        self,
        backend_uri: str,
        artifact_root: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 90.0,
        stop_timeout_s: float = 20.0,
    ):
        self.backend_uri = backend_uri
        self.artifact_root = artifact_root
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The tracking URI clients use (`http://host:port`)."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The server command line."""
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--host", self.host, "--port", str(self.port), "--workers", "1", "--no-serve-artifacts"]
        if self.artifact_root:
            cmd += ["--default-artifact-root", self.artifact_root]
        return cmd

    def healthy(self) -> bool:
        """True when `/health` answers 200."""
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> Self:
        """Start the server and wait for `/health`; raises UserError with the log tail if it dies."""
        if self.port is None:
            self.port = free_port(self.host)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path or os.devnull, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise UserError(f"mlflow server for {self.backend_uri} exited with code "
                                f"{self.proc.returncode} at start{self._log_hint()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise UserError(f"mlflow server for {self.backend_uri} did not answer /health within "
                        f"{self.startup_timeout_s:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def stop(self) -> None:
        """Stop the whole process group: TERM, wait up to `stop_timeout_s`, then KILL."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader so the group can disappear
                if not _group_alive(pgid):
                    break
                time.sleep(0.2)
            else:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - KILL cannot be ignored
            pass
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
