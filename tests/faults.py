"""Real faults for tests: a TCP proxy a test can sever, and a redis-server of the test's own.

Nothing here patches a function. A test points a process (the gateway subprocess, usually)
at ``TcpProxy.address`` instead of the real PostgreSQL or Redis, then calls ``cut()`` — every
open connection is reset and new ones are closed as soon as they are accepted, as when the
service's host goes away — and ``restore()`` to let connections through again.
``RedisServer`` runs a throwaway ``redis-server`` on a free port, so a test can snapshot it,
flush it, and restart it from an old dump without touching the shared Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.gateway_server import free_port, wait_until

STARTUP_SECONDS = 10.0


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a vanished host's kernel would answer.

    ``shutdown()`` first: it wakes a pump thread blocked in ``recv()`` on this socket.
    Without it ``close()`` only drops the descriptor while that call keeps the connection
    alive, so an idle connection (a pooled database connection) would never be severed.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # close() alone does not end a connection while a pump thread is blocked in recv() on
    # it (the call keeps the socket alive): shutdown() wakes that thread first.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``cut()`` severs, ``restore()`` heals.

    One thread accepts; each connection gets two pump threads. While cut, accepted
    connections are reset at once, so a client sees a refused/broken connection quickly
    instead of hanging.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = threading.Event()
        self._closed = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until ``restore()``."""
        self._cut.set()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _reset(sock)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        # shutdown() wakes the accept() in progress, which close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._cut.is_set():
                    _reset(client)
                    _reset(server)
                    continue
                self._open.update((client, server))
                self.accepted += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), name="tcp-proxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class RedisServer:
    """A ``redis-server`` of the test's own, on a free port, with its dump in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def dump_path(self) -> Path:
        return self.directory / "dump.rdb"

    def _cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--dbfilename",
                "dump.rdb",
                # Snapshots only when the test asks (save()); never on shutdown.
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self._cli("ping") == "PONG", timeout=STARTUP_SECONDS)

    def save(self) -> Path:
        """Write a snapshot now (as a periodic RDB save would) and return a copy's path."""
        assert self._cli("save") == "OK"
        copy = self.directory / f"snapshot-{time.monotonic_ns()}.rdb"
        shutil.copy(self.dump_path, copy)
        return copy

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGKILL: no save-on-exit, exactly like a crash.
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart_from(self, snapshot: Path | None) -> None:
        """Crash, then come back with ``snapshot``'s data (or empty when None)."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.dump_path)
        if snapshot is not None:
            shutil.copy(snapshot, self.dump_path)
        self.start()

    def flushall(self) -> None:
        assert self._cli("flushall") == "OK"


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """``tcp_proxy(host, port)`` returns a proxy to that service; all are closed afterwards."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
