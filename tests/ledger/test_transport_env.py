"""make_web3 reads the environment's proxy settings once, when it is made (ledger.transport._session), and
still honours them: HTTP_PROXY sends the JSON-RPC calls through the proxy, NO_PROXY bypasses it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ledger.transport import make_web3


class _Server:
    """An HTTP server on 127.0.0.1 answering every POST with eth_chainId's answer; it records the request
    lines it saw (a proxy sees the absolute URL of the target)."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                seen.append(self.requestline)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                out = json.dumps({"jsonrpc": "2.0", "id": json.loads(body)["id"], "result": "0x7a69"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers(monkeypatch):
    rpc, proxy = _Server(), _Server()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    yield rpc, proxy
    rpc.close()
    proxy.close()


def test_calls_go_through_the_environments_proxy(servers):
    rpc, proxy = servers
    assert make_web3(rpc.url).eth.chain_id == 31337
    assert proxy.seen == [f"POST {rpc.url}/ HTTP/1.1"] and rpc.seen == []


def test_no_proxy_bypasses_it(servers, monkeypatch):
    rpc, proxy = servers
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    w3 = make_web3(rpc.url)
    monkeypatch.delenv("NO_PROXY")  # read when the Web3 was made, not on every call
    assert w3.eth.chain_id == 31337
    assert rpc.seen == ["POST / HTTP/1.1"] and proxy.seen == []
