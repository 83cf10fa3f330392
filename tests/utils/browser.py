"""Headless Chromium driven through chromedriver's W3C WebDriver HTTP protocol (httpx, no selenium).

    with Browser.start() as b:
        b.get(url); b.find("a.record-link").click(); b.find("#proof-status").text; b.screenshot(path)

Binaries: $LORAMESH_CHROMIUM / $LORAMESH_CHROMEDRIVER, else /usr/bin/chromium and /usr/bin/chromedriver
(Debian packages chromium and chromium-driver; scripts/setup.sh --browser installs them).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from devnet.anvil import free_port

CHROMIUM = os.environ.get("LORAMESH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORAMESH_CHROMEDRIVER", "/usr/bin/chromedriver")
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element reference key
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


class BrowserError(RuntimeError):
    """chromedriver refused a command or could not be started."""


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing: apt-get install -y chromium chromium-driver (or make test)"
    return None


@dataclass
class Element:
    browser: Browser
    ref: str

    def _url(self, tail: str) -> str:
        return f"/element/{self.ref}/{tail}"

    def click(self) -> None:
        self.browser._cmd("POST", self._url("click"), {})

    @property
    def text(self) -> str:
        return self.browser._cmd("GET", self._url("text"))

    def attribute(self, name: str) -> str | None:
        return self.browser._cmd("GET", self._url(f"attribute/{name}"))


class Browser:
    """One chromedriver process and one Chromium session with a fresh profile folder."""

    def __init__(self, driver: subprocess.Popen, port: int, session_id: str, profile: Path) -> None:
        self.driver, self.port, self.session_id, self.profile = driver, port, session_id, profile
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}/session/{session_id}", timeout=60)

    @classmethod
    def start(cls, *, width: int = 1280, height: int = 1600, timeout: float = 30.0) -> Browser:
        """Launch chromedriver on a free port and open a headless Chromium session."""
        port = free_port()
        profile = Path(tempfile.mkdtemp(prefix="loramesh-chromium-"))
        driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).json()["value"]["ready"]:
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if driver.poll() is not None or time.monotonic() > deadline:
                    raise BrowserError(f"chromedriver did not become ready on port {port}")
                time.sleep(0.1)
            caps = {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {
                            "binary": CHROMIUM,
                            "args": [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"],
                        },
                    }
                }
            }
            r = httpx.post(f"http://127.0.0.1:{port}/session", json=caps, timeout=timeout)
            value = r.json().get("value", {})
            if r.status_code != 200 or "sessionId" not in value:
                raise BrowserError(f"chromedriver refused a session: {value.get('message', r.text)[:300]}")
            return cls(driver, port, value["sessionId"], profile)
        except BaseException:
            _stop(driver)
            shutil.rmtree(profile, ignore_errors=True)
            raise

    def _cmd(self, method: str, path: str, body: dict | None = None):
        r = self.http.request(method, path, json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            msg = value.get("message", "") if isinstance(value, dict) else str(value)
            raise BrowserError(f"{method} {path}: {msg.splitlines()[0] if msg else r.status_code}")
        return value

    def get(self, url: str) -> None:
        self._cmd("POST", "/url", {"url": url})

    def execute(self, script: str, *args):
        """Run `script` (a function body: `return ...`) in the page; its JSON-able result."""
        return self._cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    @property
    def url(self) -> str:
        return self._cmd("GET", "/url")

    @property
    def title(self) -> str:
        return self._cmd("GET", "/title")

    def find(self, css: str) -> Element:
        """The first element matching a CSS selector (BrowserError when none)."""
        return Element(self, self._cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY])

    def find_all(self, css: str) -> list[Element]:
        found = self._cmd("POST", "/elements", {"using": "css selector", "value": css})
        return [Element(self, e[ELEMENT_KEY]) for e in found]

    def wait_for(self, css: str, timeout: float = 10.0) -> Element:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.find(css)
            except BrowserError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._cmd("GET", "/screenshot")))
        return path

    def close(self) -> None:
        try:
            self.http.delete(f"http://127.0.0.1:{self.port}/session/{self.session_id}")  # quits Chromium
        except httpx.HTTPError:
            pass
        finally:
            self.http.close()
            _stop(self.driver)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
