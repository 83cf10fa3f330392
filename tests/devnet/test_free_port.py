"""Ports for the servers the tests and the demo start: free, distinct, and out of outgoing connections' way."""

import socket

from devnet.anvil import LOWEST_PICKED_PORT, ephemeral_ports, free_port


def test_free_ports_are_free_distinct_and_below_the_ephemeral_range():
    """A port from the ephemeral range could be taken by any client's outgoing connection before its server
    binds it (a gateway once failed to start so, in the wheel test); free_port picks below that range."""
    low, _ = ephemeral_ports()
    assert low - LOWEST_PICKED_PORT >= 1000  # this machine has room below it (Linux's default: 32768)
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert LOWEST_PICKED_PORT <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_or_handed_out_before_is_not_picked(monkeypatch):
    """The picks come in as: a port in use, one this process handed out already, then a free one: the
    free one is the answer."""
    handed = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held, socket.socket() as probe:
        held.bind(("127.0.0.1", 0))
        held.listen()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        picks = iter([held.getsockname()[1], handed, free])
        monkeypatch.setattr("devnet.anvil.random.randrange", lambda lo, hi: next(picks))
        assert free_port() == free
