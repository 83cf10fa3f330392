"""Child processes of the demo: started with logs to files, waited on until they answer, stopped cleanly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ProcessError(RuntimeError):
    """A child process died or never became ready."""


class ManagedProcess:
    """One `loramesh ...` child process with its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.log_path = name, list(args), log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            # own session: a Ctrl-C in the terminal reaches only the parent, which stops children in order
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devnet", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll `ready` until it is true; fail with the process's last log line if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(
                    f"{self.name} exited ({self.proc.returncode if self.proc else '?'}) before "
                    f"{what}: {self.last_log_line()} (log: {self.log_path})"
                )
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
        raise ProcessError(f"{self.name} did not get {what} within {timeout:.0f}s (log: {self.log_path})")

    def wait_http(self, url: str, *, timeout: float = 120.0) -> None:
        self.wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, timeout=timeout, what=f"ready at {url}")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash, for failure tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT first (graceful shutdown), SIGKILL if it does not finish in time; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGINT for %.0fs: killing it", self.name, timeout)
            self.proc.kill()
            return self.proc.wait(timeout=5)


class ProcessGroup:
    """Processes stopped together, newest first, however the demo ends."""

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []

    def start(self, proc: ManagedProcess) -> ManagedProcess:
        self.procs.append(proc.start())
        return proc

    def stop_all(self) -> dict[str, int | None]:
        codes = {}
        for p in reversed(self.procs):
            codes[p.name] = p.stop()
        self.procs.clear()
        return codes

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
