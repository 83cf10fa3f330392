"""anvil as a subprocess: find the binary, start it on 127.0.0.1 with persisted state, stop it."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ANVIL_ENV = "LORAMESH_ANVIL"
# A checkout's root, when this package runs from one (the editable install): scripts/setup.sh puts the pinned
# anvil under it. Installed from the wheel this is site-packages, which has no .tools.
CHECKOUT_ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_ANVIL = Path(".tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
# the npm manifest that pins anvil (shipped in the wheel); its version goes into the install hint
TOOLCHAIN_MANIFEST = Path(__file__).resolve().parent / "toolchain" / "package.json"
ANVIL_PACKAGE = "@foundry-rs/anvil-linux-amd64"
CHAIN_ID = 424242  # fixed, distinct from anvil's default 31337 so a stray anvil is noticed
# contracts/build.mjs compiles for the same hardfork.
HARDFORK = "cancun"
GAS_LIMIT = 300_000_000
# The well-known anvil/hardhat dev mnemonic ("test test ... junk"): account 0 deploys and administers.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)


class AnvilError(RuntimeError):
    """anvil could not be found, started or reached."""


class PortInUseError(AnvilError):
    """Something already listens on the port anvil was asked to use."""


def find_anvil() -> Path:
    """The anvil binary: $LORAMESH_ANVIL, else a checkout's .tools (the version scripts/setup.sh pins), else
    `anvil` on PATH. The checkout's comes before PATH so that the tests run the pinned anvil even where another
    one is installed; outside a checkout (installed from the wheel) PATH is where anvil is found."""
    env = os.environ.get(ANVIL_ENV)
    if env:
        path = Path(env).expanduser()
        if _executable(path):
            return path
        raise AnvilError(
            f"anvil not found at {path} ({ANVIL_ENV}): point {ANVIL_ENV} at the anvil binary, or unset it to use "
            "a checkout's .tools (run make setup) or anvil on PATH"
        )
    local = CHECKOUT_ROOT / CHECKOUT_ANVIL
    if _executable(local):
        return local
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise AnvilError(
        f"anvil not found: set {ANVIL_ENV} to its path, put it on PATH (npm install -g {_anvil_spec()}), "
        "or in a checkout run make setup (installs it into .tools/)"
    )


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _anvil_spec() -> str:
    """The npm package of the pinned anvil, with its version when the toolchain manifest says it."""
    try:
        version = json.loads(TOOLCHAIN_MANIFEST.read_text())["dependencies"][ANVIL_PACKAGE]
    except (OSError, ValueError, KeyError, TypeError):
        return ANVIL_PACKAGE
    return f"{ANVIL_PACKAGE}@{version}"


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


LOWEST_PICKED_PORT = 10_000
_handed_out: set[int] = set()


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from (Linux; else the IANA range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not one handed out before in this process.

    Picked below the ephemeral range where there is room: the kernel gives every outgoing connection a
    port from that range, so a port picked there (bind to 0 picks there) could be taken by some client's
    connection before its server binds it, which failed a server's start now and then with "address
    already in use"."""
    low = ephemeral_ports()[0]
    for _ in range(200 if low - LOWEST_PICKED_PORT >= 1000 else 0):
        port = random.randrange(LOWEST_PICKED_PORT, low)
        if port not in _handed_out and _bindable(port):
            break
    else:  # no room below the range (or none free there): the kernel's pick, as before
        while (port := _bound_port(0)) in _handed_out:
            pass
    _handed_out.add(port)
    return port


def _bound_port(port: int) -> int:
    """Bind 127.0.0.1:port (0: the kernel picks) for a moment; the port bound. OSError when taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    try:
        _bound_port(port)
    except OSError:
        return False
    return True


def rpc(url: str, method: str, params: list | None = None, timeout: float = 5.0):
    """One raw JSON-RPC call; raises AnvilError when unreachable or answered with an error."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise AnvilError(f"no JSON-RPC answer from {url}: {e}") from e
    if "error" in answer:
        raise AnvilError(f"{method} failed at {url}: {answer['error']}")
    return answer["result"]


@dataclass(slots=True)
class AnvilConfig:
    """How to launch anvil. block_time None = mine each transaction at once (fast tests)."""

    port: int
    state_file: Path | None = None
    chain_id: int = CHAIN_ID
    block_time: float | None = 1.0
    log_file: Path | None = None
    state_interval: int | None = None  # also dump state every N seconds (survives a hard kill)
    # The genesis base fee in wei; zero for the devnet (see argv). Tests set a public chain's (30 gwei).
    base_fee: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.block_time is not None and self.block_time <= 0:
            raise ValueError(f"block_time must be positive or None, got {self.block_time}")
        if self.base_fee < 0:
            raise ValueError(f"base_fee must not be negative, got {self.base_fee}")

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        # Zero base fee and a large gas limit: with 1-second blocks and the default 30M gas limit the base
        # fee climbs until pre-signed transactions are underpriced and anvil silently drops them (224-520
        # of 10k lost when measured with anvil 1.7.1); with these two settings none were.
        args = [
            str(find_anvil()),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--hardfork",
            HARDFORK,
            "--gas-limit",
            str(GAS_LIMIT),
            "--block-base-fee-per-gas",
            str(self.base_fee),
            "--mnemonic",
            DEV_MNEMONIC,
            "--accounts",
            "10",
        ]
        if self.block_time is not None:
            args += ["--block-time", f"{self.block_time:g}"]
        if self.state_file is not None:
            args += ["--state", str(self.state_file)]
            if self.state_interval:
                args += ["--state-interval", str(self.state_interval)]
        return args


class Anvil:
    """One anvil process. `start()` waits until it answers; `stop()` lets it write its state."""

    def __init__(self, config: AnvilConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen | None = None

    @property
    def rpc_url(self) -> str:
        return self.config.rpc_url

    def start(
        self,
        *,
        detached: bool = False,
        timeout: float = 20.0,
        on_spawn: Callable[[subprocess.Popen], None] | None = None,
    ) -> Anvil:
        """Launch anvil; detached = survives this Python process (own session, output to log file).
        `on_spawn` is called with the process as soon as it exists (before it answers: a caller killed while
        anvil starts has written its pid by then). Anvil is stopped when it never answers, or when waiting
        for it is interrupted (Ctrl-C), so no orphan keeps its port."""
        if port_in_use(self.config.port):
            raise PortInUseError(
                f"port {self.config.port} on 127.0.0.1 is already in use: stop what runs there or pick --port"
            )
        if self.config.state_file is not None:
            self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.DEVNULL
        if self.config.log_file is not None:
            self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.config.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.config.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detached,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            if on_spawn is not None:
                on_spawn(self.proc)
            wait_ready(self.rpc_url, timeout=timeout, proc=self.proc)
        except BaseException:
            self.stop(timeout=5.0)
            raise
        # DEBUG: the commands that start anvil (devnet up, the demo) print their own line; INFO is for services
        log.debug("anvil pid %d on %s", self.proc.pid, self.rpc_url)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (anvil dumps its --state file on the way out), SIGKILL if it hangs."""
        if self.proc is None:
            return
        stop_pid(self.proc.pid, timeout=timeout, proc=self.proc)
        self.proc = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(url: str, *, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Poll eth_chainId until anvil answers; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AnvilError(f"anvil exited with code {proc.returncode} before answering on {url}")
        try:
            rpc(url, "eth_chainId", timeout=1.0)
            return
        except AnvilError:
            if time.monotonic() > deadline:
                raise AnvilError(f"anvil did not answer on {url} within {timeout:.0f}s") from None
            time.sleep(0.1)


def process_started(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot: /proc/<pid>/stat, field 22), None where unknown.
    With the pid it names one process: a pid file outlives its process (a SIGKILL, a reboot), and the pid
    may be another process's by then."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # fields from the third on follow the command's ")"
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie we could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours still "exists": reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop_pid(pid: int, *, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    """Terminate one process by pid and wait for it to go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not pid_alive(pid):
            return
        time.sleep(0.05)
    log.warning("anvil pid %d ignored SIGTERM for %.0fs: killing it", pid, timeout)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(timeout=5)
