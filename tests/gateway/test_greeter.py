"""gateway.greeter and the node's heartbeat sender against servers that answer slowly or wrongly: one such
server never holds up the greetings or heartbeats of anyone else (found by an attack review: a dripping
answer used to stall a whole round)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import aiohttp
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from eth_account import Account

from common.identity import Identity
from gateway import dns
from gateway.greeter import NodeGreeter
from gateway.node_client import NodeClient
from node.heartbeat import HeartbeatSender
from tests.utils.gateway import StandInNode
from tests.utils.servers import ServerThread

NODE = "0x" + "ab" * 32


class RawServer:
    """A TCP server on 127.0.0.1 answering every connection with `answer(conn)` in a thread of its own."""

    def __init__(self, answer) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer, self.hits, self.stopped = answer, 0, False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn) -> None:
        try:
            conn.recv(65536)
            self.answer(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


def drip(conn) -> None:
    """200, chunked, one byte every 0.3 s for ever: each read is quick, the answer never ends."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\ncontent-type: application/json\r\n\r\n")
    for _ in range(200):
        conn.sendall(b"1\r\n \r\n")
        time.sleep(0.3)


def json_answer(doc: dict):
    def answer(conn) -> None:
        body = json.dumps(doc).encode()
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body)

    return answer


def three_rounds(g: NodeGreeter) -> list[dict[str, str]]:
    """Three greeting rounds, each waited for: node id -> "ok" or why it failed, a round each."""

    async def run():
        async with httpx.AsyncClient(timeout=1.0) as client:
            return [await g.greet_once(client) for _ in range(3)]

    return asyncio.run(run())


@pytest.fixture
def dripping():
    server = RawServer(drip)
    yield server
    server.close()


def greeter(nodes: dict[str, str], **kw) -> NodeGreeter:
    registry = SimpleNamespace(
        nodes={n: SimpleNamespace(node_id=n, active=True, api_url=url) for n, url in nodes.items()}
    )
    directory = SimpleNamespace(get=lambda _n: None, ttl=10.0, accept_heartbeat=lambda doc: None)
    return NodeGreeter(
        Account.create(),
        registry=registry,
        directory=directory,
        gateway_url="http://127.0.0.1:9",
        gateway_key="12" * 32,
        timeout=1.0,
        **kw,
    )


def test_a_dripping_node_costs_one_deadline_and_holds_up_no_other_greeting(dripping):
    other = RawServer(json_answer({"body": {"node_id": "0x" + "cd" * 32}, "signature": "00"}))
    g = greeter({NODE: dripping.url, "0x" + "cd" * 32: other.url}, deadline=1.0)

    async def run():
        async with httpx.AsyncClient(timeout=1.0) as client:
            started = time.monotonic()
            tasks = g.start_due(client)
            assert time.monotonic() - started < 0.9  # a round starts greetings, it does not wait for them (1 s)
            assert len(tasks) == 2 and not g.due()  # a greeting in flight is not started again
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - started

    (slow, fast), took = asyncio.run(run())
    other.close()
    assert "no whole answer within 1 s" in slow and took < 2.5
    assert fast == "ok"


def test_a_hello_answered_with_another_nodes_heartbeat_is_refused():
    liar = RawServer(json_answer({"body": {"node_id": "0x" + "ee" * 32}, "signature": "00"}))
    g = greeter({NODE: liar.url})

    async def run():
        async with httpx.AsyncClient(timeout=1.0) as client:
            return await g.greet_once(client)

    assert "not its own" in asyncio.run(run())[NODE]
    liar.close()


@pytest.mark.parametrize("url", ["http://10.0.0.1/x?y=", "http://a@10.0.0.1", "http://h/#frag", "ftp://h"])
def test_registered_urls_that_could_pick_another_path_or_carry_credentials_are_not_called(url):
    assert greeter({NODE: url}).due() == []


def test_a_dripping_gateway_does_not_stop_the_heartbeats_to_the_others(dripping):
    """A gateway that said hello and drips its answer: the operator's gateway still gets a beat every interval
    plus at most the deadline."""
    beats: list[float] = []

    def ok(conn) -> None:
        beats.append(time.monotonic())
        json_answer({"accepted": True})(conn)

    good = RawServer(ok)
    sender = HeartbeatSender(
        Identity.generate(), [good.url], api_url="http://n", base_model_id=NODE, status_fn=dict, timeout=0.5
    )
    sender.gateway_keys[good.url] = "12" * 32
    sender.add_gateway(dripping.url, "34" * 32, "0x" + "aa" * 20)

    async def run():
        sender.interval = 0.2
        sender.start()
        await asyncio.sleep(6.0)
        await sender.stop()

    asyncio.run(run())
    good.close()
    # each round lasts at most the 1 s deadline plus the 0.2 s interval: at least 3 beats in 6 s (4 s left one
    # round of margin on a loaded machine)
    assert len(beats) >= 3 and sender.failing.get(dripping.url, 0) >= 2


def test_many_registrations_naming_one_server_get_one_hello_a_round_between_them():
    """A registration costs only its gas: a stranger who registers 200 nodes at someone else's server (paths
    varied) had every gateway send it 200 hellos at once, then one a node per back-off. An origin gets one hello
    a round; a node at another origin is greeted in the same round."""
    victim = RawServer(json_answer({"not": "a heartbeat"}))
    other = RawServer(json_answer({"body": {"node_id": "0x" + "cd" * 32}, "signature": "00"}))
    nodes = {f"0x{i:064x}": f"{victim.url}/n{i}" for i in range(200)} | {"0x" + "cd" * 32: other.url}
    g = greeter(nodes)

    rounds = three_rounds(g)
    victim.close()
    other.close()
    assert [len(r) for r in rounds] == [2, 2, 2]  # one at the victim a round, and the other node each round
    assert victim.hits == 3 and other.hits == 3
    assert len({n for r in rounds for n in r} - {"0x" + "cd" * 32}) == 3  # a different node of the 200 each round


@pytest.mark.parametrize("bad", ["http://h:99999", "http://h:port", "http://[::1"])
def test_a_registered_url_with_no_port_to_call_costs_nobody_else_a_greeting(bad):
    """The registry takes these; reading their origin raised in `due`, and every round failed for every node."""
    g = greeter({"0x" + "01" * 32: bad, "0x" + "02" * 32: "http://good.example"})
    assert [n for n, _ in g.due()] == ["0x" + "02" * 32]


def test_a_flood_at_a_real_nodes_origin_never_keeps_it_from_its_hello():
    """200 registrations at a real node's origin, each failing and backing off: the origin's one hello a round
    went to the first due in registry order, a fake for ever. The node with the fewest failures in a row, then
    the one tried longest ago, goes first: the real node is greeted once each fake has been tried once (nothing
    tells them apart before), and never waits behind a fake that failed."""
    now = [0.0]
    fakes = {f"0x{i:064x}": f"http://legit.example/fake{i}" for i in range(1, 201)}
    real = "0x" + "cd" * 32
    g = greeter(fakes | {real: "http://legit.example/node"}, clock=lambda: now[0])
    rounds_to_real = None
    for k in range(1000):  # 2,000 s of 2 s rounds; every fake's hello fails and backs off (at most 300 s)
        for node_id, url in g.due():
            if node_id == real and rounds_to_real is None:
                rounds_to_real = k
            elif node_id != real:
                g._failed(node_id, url, "404")
        now[0] += 2.0
    assert rounds_to_real is not None and rounds_to_real <= len(fakes)


def test_many_host_names_of_one_address_get_one_hello_a_round_between_them(monkeypatch):
    """Host names cost nothing (a wildcard DNS record: any name, one address), so the bound per origin did not hold
    a flood back: 200 registrations at n0.wild.test ... n199.wild.test, all one server, got 200 hellos a round. The
    greeter resolves each host, calls that address (the name kept in the Host header), and greets an address once
    a round; the nodes left waiting are not held to have failed."""
    requests: list[bytes] = []

    def answer(conn) -> None:
        requests.append(conn.recv(65536))
        json_answer({"not": "a heartbeat"})(conn)

    class Recording(RawServer):
        def _one(self, conn) -> None:
            try:
                answer(conn)
            except OSError:
                pass
            finally:
                conn.close()

    victim = Recording(answer)
    port = victim.url.rsplit(":", 1)[1]

    async def wildcard(host: str, port: int) -> str:
        assert host.endswith(".wild.test")
        return ["127.0.0.1"]

    monkeypatch.setattr(dns.GREETER, "addresses", wildcard)
    nodes = {f"0x{i:064x}": f"http://n{i}.wild.test:{port}/node" for i in range(200)}
    g = greeter(nodes)

    rounds = three_rounds(g)
    victim.close()
    assert victim.hits == 3 and g.refused == 3  # one hello a round; only the node called is held to have failed
    assert [sum(v != "address busy" for v in r.values()) for r in rounds] == [1, 1, 1]
    assert [len(r) for r in rounds] == [200, 199, 198]  # the nodes left waiting are due again the next round
    host_headers = [line for req in requests for line in req.split(b"\r\n") if line.lower().startswith(b"host:")]
    assert len(host_headers) == 3 and all(b".wild.test:" in h for h in host_headers)


# ---- hellos pinned to an address: TLS and dual-stack hosts

A, B = "0x" + "aa" * 32, "0x" + "bb" * 32


def _cert_for(name: str, tmp_path):
    """A CA, and a server certificate for `name` only, signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scratch ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "srv.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem", tmp_path / "srv.pem"


class TLSKeepAliveServer:
    """HTTPS on 127.0.0.1 with a certificate for `name` only; keep-alive; records each request's Host."""

    def __init__(self, certfile) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certfile)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hosts: list[str] = []
        self.snis: list[str | None] = []
        self.ctx.sni_callback = lambda s, name, c: self.snis.append(name)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            return
        buf = b""
        try:
            while True:
                data = tls.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, rest = buf.split(b"\r\n\r\n", 1)
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"host":
                            self.hosts.append(v.strip().decode())
                        if k.strip().lower() == b"content-length":
                            length = int(v)
                    while len(rest) < length:
                        rest += tls.recv(65536)
                    buf = rest[length:]
                    body = b'{"nope": 1}'
                    tls.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            return


def test_a_tls_connection_checked_for_one_name_never_carries_a_hello_for_another(tmp_path, monkeypatch):
    """Found by a review: a certificate valid for a.test only, and b.test resolving to the same address. A fresh
    connection for b.test fails verification; but a pool keys connections by (scheme, address, port), not by TLS's
    server name, so the hello for b.test rode the connection verified for a.test. Hellos keep no connection."""
    ca, srv = _cert_for("a.test", tmp_path)
    server = TLSKeepAliveServer(srv)

    async def resolve(host, port):
        return ["127.0.0.1"]

    monkeypatch.setattr(dns.GREETER, "addresses", resolve)
    g = greeter({A: f"https://a.test:{server.port}", B: f"https://b.test:{server.port}"})

    async def run():
        async with httpx.AsyncClient(timeout=2.0, verify=ssl.create_default_context(cafile=str(ca))) as client:
            # control: b.test alone on a fresh client fails TLS verification
            async with httpx.AsyncClient(timeout=2.0, verify=ssl.create_default_context(cafile=str(ca))) as fresh:
                g_b = greeter({B: f"https://b.test:{server.port}"})
                fresh_b = await g_b.greet_once(fresh)
            r1 = await g.greet_once(client)  # one address a round: a.test goes, b.test waits ("address busy")
            r2 = await g.greet_once(client)  # a.test backs off (404): b.test's turn, on the pooled connection
            return fresh_b, r1, r2

    fresh_b, *rounds = asyncio.run(run())
    assert "unreachable" in fresh_b[B]  # a fresh connection to b.test does verify the name
    assert not any(h.startswith("b.test") for h in server.hosts), (
        f"a hello for b.test went over a TLS connection verified for a.test only (Host headers: {server.hosts})"
    )


def test_a_host_whose_first_address_answers_nothing_is_greeted_at_the_next(monkeypatch):
    """Found by a review: a call by name tries every address the host resolves to; pinned to the first one, a
    dual-stack node whose first (IPv6) address this gateway cannot reach was never greeted. The next is tried."""
    node = "0x" + "cd" * 32
    live = RawServer(json_answer({"body": {"node_id": node}, "signature": "00"}))
    port = int(live.url.rsplit(":", 1)[1])
    real = socket.getaddrinfo

    def fake_getaddrinfo(host, p, *a, **kw):
        if host == "dual.test":
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", p, 0, 0)),  # nothing listens there
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)),
            ]
        return real(host, p, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    g = greeter({node: f"http://dual.test:{port}"})

    async def run():
        async with httpx.AsyncClient(timeout=1.0) as client:
            return await g.greet_once(client)

    got = asyncio.run(run())
    live.close()
    assert got[node] == "ok", got


class NeverAnsweringZone:
    """socket.getaddrinfo for names in a zone whose nameserver never answers (a stranger's own: glibc's stub resolver
    then waits 5 s x 2 tries), held until released, each lookup's thread noted; honest.test answers at once (an
    honest node registered by its name); other names as the system resolves them. A zone of its own per test: the
    lookups' tables (gateway.dns) outlive a test."""

    def __init__(self, monkeypatch) -> None:
        self.zone = f".slow{secrets.token_hex(4)}.test"
        self.release = threading.Event()
        self.threads: list[str] = []
        self.hosts: list[str] = []
        self.honest: list[str] = []
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kw):
            if isinstance(host, str) and host.endswith(self.zone):
                self.threads.append(threading.current_thread().name)
                self.hosts.append(host)
                self.release.wait(60)
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            if host == "honest" + self.zone.replace(".slow", ".fast", 1):
                self.honest.append(threading.current_thread().name)
                return real("127.0.0.1", port, *args, **kw)
            return real(host, port, *args, **kw)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def name(self, i: int) -> str:
        return f"n{i}{self.zone}"

    @property
    def honest_name(self) -> str:
        return "honest" + self.zone.replace(".slow", ".fast", 1)


def test_host_names_that_never_resolve_hold_none_of_the_threads_the_gateways_own_work_runs_on(monkeypatch):
    """Red team: 32 registered nodes (gas only), each named in a zone whose nameserver never answers. The greeter
    resolved them on the event loop's default executor, and its deadline freed its coroutines, never the threads:
    a key lookup, a usage record or a heartbeat (asyncio.to_thread) waited 19.5 s behind them. The node client's
    calls (a registered node that heartbeats is called by its name) resolved there too."""
    zone = NeverAnsweringZone(monkeypatch)
    g = greeter({f"0x{i:064x}": f"http://{zone.name(i)}:8000" for i in range(32)}, deadline=0.5)

    async def run():
        async with httpx.AsyncClient(timeout=1.0) as client:
            greeting = asyncio.gather(*g.start_due(client))
            nodes = NodeClient()  # its streams and its other calls (abort, receipt, load)
            calls = [
                asyncio.create_task(nodes.abort(f"http://{zone.name(100 + i)}:8000", NODE, "0x" + "ab" * 32))
                for i in range(16)
            ]
            await asyncio.sleep(0.3)
            # with every lookup thread held, the gateway's own blocking work still runs at once
            on_a_thread = await asyncio.wait_for(asyncio.to_thread(lambda: threading.current_thread().name), 10)
            results = await greeting  # each greeting ends at its deadline, its lookup queued or held
            for task in calls:
                task.cancel()
            await nodes.aclose()
            return on_a_thread, results

    try:
        on_a_thread, results = asyncio.run(run())
    finally:
        zone.release.set()
    assert not on_a_thread.startswith("dns")
    assert len(results) == 32 and all(r != "ok" for r in results)
    # the lookups ran on the lookup threads only, at most as many at once as they have, and the greeter's still
    # queued when their greetings gave up never ran
    assert zone.threads and all(name.startswith(("dns-greeter", "dns-nodes")) for name in zone.threads)
    assert sum(n.startswith("dns-greeter") for n in zone.threads) <= dns.GREETER.threads


def test_a_node_that_heartbeats_is_called_by_its_name_while_strangers_names_hold_every_lookup_thread(monkeypatch):
    """Review: four stalled names held every thread of the one lookup pool, and an honest node registered by its
    name waited behind them for its stream until first_byte_timeout: taken for dead. Its heartbeat now looks its name
    up ahead (dns.NODES.warm) and the node client connects on that answer; a name asked for many times at once is
    looked up once."""
    zone = NeverAnsweringZone(monkeypatch)
    with ServerThread(StandInNode(Identity.generate(), "0x" + "b0" * 32).app()) as srv:
        port = srv.url.rsplit(":", 1)[1]

        async def run():
            nodes = NodeClient(first_byte_timeout=2.0)
            dns.NODES.warm(f"http://{zone.honest_name}:{port}")  # as its heartbeat does
            await asyncio.sleep(0.3)
            # every lookup thread held by strangers' names, twenty callers to each
            stalled = [
                asyncio.create_task(nodes.receipt(f"http://{zone.name(i)}:8000", "0x" + "ab" * 32))
                for i in range(dns.NODES.threads + 4)
                for _ in range(20)
            ]
            await asyncio.sleep(0.3)
            body = {"adapter_id": None, "prompt": "x", "max_tokens": 3, "request_id": "0x" + "01" * 32}
            up = await nodes.open_stream(f"http://{zone.honest_name}:{port}", "0x" + "00" * 32, body)
            await up.aclose(drain=False)
            asked = list(zone.hosts)  # the stalled lookups so far
            for task in stalled:
                task.cancel()
            await nodes.aclose()
            return asked

        try:
            asked = asyncio.run(run())  # served: NodeUnavailable before
        finally:
            zone.release.set()
    assert len(zone.honest) == 1  # looked up once, ahead of the request
    # each stalled name looked up once for its twenty callers, as many at once as there are threads
    assert asked and len(asked) == len(set(asked)) <= dns.NODES.threads, asked


def test_the_lookup_threads_resolve_as_the_system_does(monkeypatch):
    """The node client's aiohttp resolver and the greeter's lookups answer what socket.getaddrinfo does."""

    async def run():
        resolver = dns.LookupThreadsResolver()
        by_name = await resolver.resolve("localhost", 8080, socket.AF_INET)
        literal = await dns.GREETER.addresses("127.0.0.1", 80)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as session:
            server = RawServer(lambda conn: conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"))
            try:
                port = server.url.rsplit(":", 1)[1]
                async with session.get(f"http://localhost:{port}/") as r:
                    status = r.status
            finally:
                server.close()
        return by_name, literal, status

    by_name, literal, status = asyncio.run(run())
    assert {(r["host"], r["port"], r["family"]) for r in by_name} == {("127.0.0.1", 8080, socket.AF_INET)}
    assert literal == ["127.0.0.1"] and status == 204


def test_a_nodes_refusal_never_makes_a_line_of_the_gateways_log(caplog):
    """Anyone who registers a node and answers the hello with a 500 wrote its own lines, and terminal escapes,
    into the gateway's log (red team): its words are quoted."""
    forged = "\n2026-12-07 23:59:59,000 ERROR gateway.settlement: deposit stolen\x1b[2J"
    body = forged.encode()
    server = RawServer(
        lambda conn: conn.sendall(
            f"HTTP/1.1 500 X\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
        )
    )
    caplog.set_level(logging.INFO, logger="gateway")

    async def run():
        async with httpx.AsyncClient(timeout=1.0) as client:
            return await greeter({NODE: server.url}).greet_once(client)

    try:
        assert "refused (500)" in asyncio.run(run())[NODE]
    finally:
        server.close()
    (line,) = [r.getMessage() for r in caplog.records if "hello to node" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line and "\\n2026-12-07" in line
