"""The fault tools themselves: a cut must sever what a test relies on it to sever."""

from __future__ import annotations

import socket
import time

from tests.faults import TcpProxy


def test_cut_severs_an_idle_connection_on_both_sides():
    # An idle pooled connection (a database or Redis client between queries) is exactly
    # what an outage test needs severed; nothing is in flight to notice the cut.
    with socket.create_server(("127.0.0.1", 0)) as service:
        proxy = TcpProxy("127.0.0.1", service.getsockname()[1])
        try:
            client = socket.create_connection(proxy.address, timeout=5)
            server_side, _ = service.accept()
            server_side.settimeout(5)
            client.sendall(b"ping")
            assert server_side.recv(4) == b"ping"
            # The condition under test, not a wait for an event: the connection lies idle,
            # as a pooled one does between queries, with both pump threads inside recv().
            time.sleep(0.2)

            proxy.cut()

            assert _closed(server_side)
            assert _closed(client)
        finally:
            proxy.close()


def _closed(sock: socket.socket) -> bool:
    """Whether the peer went away: end of stream or a reset, not a timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()
