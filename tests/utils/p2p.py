"""p2p test helpers: misbehaving servers and peer processes (packages come from tests/utils/factories.py).

A peer process is tests/utils/p2p_peer.py; with `--faults FILE` ({adapter_id: tamper|stall|drop|oversize})
its server is a FaultyServer that misbehaves on purpose for those adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

from node.p2p.fetcher import PROMPT_ANSWER_S
from node.p2p.protocol import NOT_HELD, Kind, encode_header, package_sections, write_frame
from node.p2p.server import AdapterServer

REPO = Path(__file__).resolve().parents[2]


# -- misbehaving server ---------------------------------------------------------------------


async def _tamper(server, stream, pkg_dir, adapter_id):
    """Flip one byte of the first DATA frame (sizes stay right, the hash does not)."""
    flipped = False
    for kind, payload in package_sections(pkg_dir, adapter_id):
        if kind == Kind.DATA and not flipped:
            payload, flipped = bytes([payload[0] ^ 0xFF]) + payload[1:], True
        await write_frame(stream, kind, payload, timeout=server.timeout)


async def _send_some(server, stream, pkg_dir, adapter_id):
    """Manifest, signature and half of the first DATA frame."""
    for kind, payload in package_sections(pkg_dir, adapter_id):
        if kind == Kind.DATA:
            await write_frame(stream, kind, payload[: len(payload) // 2], timeout=server.timeout)
            return
        await write_frame(stream, kind, payload, timeout=server.timeout)


async def _stall(server, stream, pkg_dir, adapter_id):
    """Send part of the package, then go silent with the stream open."""
    await _send_some(server, stream, pkg_dir, adapter_id)
    await trio.sleep_forever()


async def _drop(server, stream, pkg_dir, adapter_id):
    """Send part of the package, then reset the stream (a provider dying mid-transfer)."""
    await _send_some(server, stream, pkg_dir, adapter_id)
    await stream.reset()
    raise OSError("dropping the transfer on purpose")


async def _oversize(server, stream, pkg_dir, adapter_id):
    """Announce a 64 MiB DATA frame (the cap is 1 MiB) right after the signature."""
    for kind, payload in package_sections(pkg_dir, adapter_id):
        if kind == Kind.DATA:
            await stream.write(encode_header(Kind.DATA, 64 << 20) + b"\0" * 1024)
            await trio.sleep_forever()
        await write_frame(stream, kind, payload, timeout=server.timeout)


async def _late_not_held(server, stream, pkg_dir, adapter_id):
    """Say it does not hold the adapter, as a node that evicted it does, but only after a wait past a prompt answer."""
    await trio.sleep(PROMPT_ANSWER_S + 0.5)  # within the tests' read timeout (3 s)
    await server._refuse(stream, f"{NOT_HELD} {adapter_id}")


FAULTS = {
    "tamper": _tamper,
    "stall": _stall,
    "drop": _drop,
    "oversize": _oversize,
    "late_not_held": _late_not_held,
}


class FaultyServer(AdapterServer):
    """Serves each adapter id with the fault named for it in `faults` (honestly when none is)."""

    faults: dict[str, str] = {}

    async def send_package(self, stream, pkg_dir, adapter_id):
        fault = FAULTS.get(self.faults.get(adapter_id, ""))
        if fault is None:
            await super().send_package(stream, pkg_dir, adapter_id)
        else:
            await fault(self, stream, pkg_dir, adapter_id)


# -- peer processes -------------------------------------------------------------------------


class PeerProcess:
    """A peer in its own process (tests.utils.p2p_peer), driven over stdin/stdout JSON lines."""

    def __init__(
        self,
        *,
        store: Path,
        owners: Path,
        base: Path | None = None,
        bootstrap: list[str] = (),
        faults: Path | None = None,
        read_timeout: float = 3.0,
        discover_timeout: float = 8.0,
        announce_interval: float = 1.0,
        log_path: Path | None = None,
        start_timeout: float = 60.0,
        config: dict | None = None,
        max_cache_bytes: int | None = None,
    ):
        args = [
            "--store",
            str(store),
            "--owners",
            str(owners),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--read-timeout",
            str(read_timeout),
            "--discover-timeout",
            str(discover_timeout),
            "--announce-interval",
            str(announce_interval),
            "--log-level",
            "DEBUG",  # what strangers cause is logged at INFO once every 10 s (common.logs.Throttled), each at DEBUG
        ]
        if base is not None:
            args += ["--base", str(base)]
        if bootstrap:
            args += ["--bootstrap", *bootstrap]
        if faults is not None:
            args += ["--faults", str(faults)]
        if config:
            args += ["--config", json.dumps(config)]
        if max_cache_bytes is not None:
            args += ["--max-cache-bytes", str(max_cache_bytes)]
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.utils.p2p_peer", *args],
            cwd=REPO,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        hello = self._read(start_timeout)
        self.peer_id: str = hello["peer_id"]
        self.addrs: list[str] = hello["addrs"]

    def _read(self, timeout: float) -> dict:
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer process gave no answer within {timeout:g}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"peer process exited (rc={self.proc.poll()})")
                return json.loads(line)

    def call(self, cmd: str, timeout: float = 60.0, **kw) -> dict:
        """Send one command; returns its answer (ok true or false)."""
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=10)
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
