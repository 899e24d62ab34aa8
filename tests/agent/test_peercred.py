"""Caller identity from the kernel, against real peers: this process, another uid, a dead process."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.support import NOBODY_ID
from vault_edge.agent.peercred import Caller, peer_of


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(sock_dir / "peer.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)  # a test socket, so that the unprivileged child can connect
    srv.listen(4)
    srv.settimeout(10)
    yield srv, path
    srv.close()


def test_this_process() -> None:
    a, b = socket.socketpair()
    with a, b:
        me = peer_of(a, with_exe=True)
        assert me == Caller(os.getpid(), os.getuid(), os.getgid(), os.path.realpath("/proc/self/exe"))
        assert peer_of(a).exe is None  # the path is read only when asked for


def _child(path: str, uid: int, hold: bool) -> int:
    """Fork a child that drops to ``uid``, connects, and either waits for EOF or exits at once."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            if hold:
                s.recv(1)
        finally:
            os._exit(0)
    return pid


def test_another_uid_in_another_process(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    pid = _child(path, NOBODY_ID, hold=True)
    conn, _ = srv.accept()
    with conn:
        caller = peer_of(conn, with_exe=True)
        assert (caller.pid, caller.uid, caller.gid) == (pid, NOBODY_ID, NOBODY_ID)
        assert caller.exe == os.path.realpath("/proc/self/exe")  # a fork runs the same binary
    os.waitpid(pid, 0)


def test_a_dead_peer_has_no_exe(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    pid = _child(path, NOBODY_ID, hold=False)
    os.waitpid(pid, 0)  # reaped: its pid may now be reused by anyone
    conn, _ = srv.accept()
    with conn:
        caller = peer_of(conn, with_exe=True)
        assert (caller.pid, caller.uid) == (pid, NOBODY_ID)
        assert caller.exe is None


def test_credentials_are_those_of_connect_time(listener: tuple[socket.socket, str]) -> None:
    srv, path = listener
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    conn, _ = srv.accept()
    with conn, client:
        first = peer_of(conn)
        time.sleep(0.01)
        assert peer_of(conn) == first == Caller(os.getpid(), os.getuid(), os.getgid())


def test_not_a_unix_socket() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with srv, socket.create_connection(srv.getsockname()) as c, pytest.raises(OSError):
        peer_of(c)
