"""Ports for the servers the tests and the demo start: free, distinct, and out of outgoing connections' way."""

import socket

import pytest

from devnet.anvil import LOWEST_PICKED_PORT, free_port


@pytest.fixture
def linux_default_range(monkeypatch):
    """The kernel's default ephemeral range, whatever this host's is."""
    monkeypatch.setattr("devnet.anvil.ephemeral_ports", lambda: (32768, 60999))


def test_free_ports_are_free_distinct_and_below_the_ephemeral_range(linux_default_range):
    """A port from the ephemeral range could be taken by any client's outgoing connection before its server
    binds it (a gateway once failed to start so, in the wheel test); free_port picks below that range."""
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert LOWEST_PICKED_PORT <= port < 32768
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_or_handed_out_before_is_not_picked(linux_default_range, monkeypatch):
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


def test_no_room_below_the_range_falls_back_to_the_kernels_pick(monkeypatch):
    """An ephemeral range that starts low leaves no room: the kernel picks, and a port it picks that was
    handed out before is not handed out again."""
    handed = free_port()
    monkeypatch.setattr("devnet.anvil.ephemeral_ports", lambda: (1024, 65535))
    kernel_picks = iter([handed, 40001])
    monkeypatch.setattr("devnet.anvil._bound_port", lambda port: next(kernel_picks) if port == 0 else port)
    assert free_port() == 40001
