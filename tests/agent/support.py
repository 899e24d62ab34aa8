"""Helpers for the agent tests: the fixture agent process, a raw HTTP/1.1 client, a real other user."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

FIXTURE = Path(__file__).with_name("fixture_agent.py")
NOBODY_ID = 65534  # uid and gid of nobody/nogroup: a real other user for the refusal tests


class Agent:
    """A running ``fixture_agent.py``; ``client`` speaks HTTP to it through its socket."""

    def __init__(self, sock: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.sock, self.proc, self.log_path = sock, proc, log
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://agent", timeout=10)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_fixture(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, str(FIXTURE), *args], stdout=f, stderr=subprocess.STDOUT)


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"fixture agent exited {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.02)
    raise AssertionError(f"fixture agent did not listen on {path}: {log.read_text()[-2000:]}")


# -- raw HTTP --------------------------------------------------------------------------------------


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def connect(path: str, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


class RawConn:
    """Send bytes as they are; read responses one at a time (Content-Length framing)."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.sock = connect(path, timeout)
        self.buf = b""

    @classmethod
    def over(cls, sock: socket.socket) -> RawConn:
        """A RawConn on an already connected socket (one end of a socketpair)."""
        conn = cls.__new__(cls)
        conn.sock, conn.buf = sock, b""
        return conn

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> RawResponse:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before a response head: {self.buf[:200]!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers["content-length"])
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed inside a response body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return RawResponse(status, headers, body)

    def closed(self) -> bool:
        """True when the server has closed the connection (after everything it sent was read)."""
        try:
            return not self.buf and not self._fill()
        except ConnectionResetError:
            return True


def get(target: str, headers: str = "") -> bytes:
    """A GET request head; ``headers`` are lines ending in CRLF."""
    return f"GET {target} HTTP/1.1\r\nHost: agent\r\n{headers}\r\n".encode()


def run_as(uid: int, gid: int, fn: Callable[[], bytes]) -> bytes:
    """Run ``fn`` in a forked child with the given uid/gid (a real other user); return its bytes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for real, then report through the pipe
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = fn()
        except BaseException as exc:
            out, code = f"child failed: {exc!r}".encode(), 1
        with os.fdopen(w, "wb") as f:
            f.write(out)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    return out


class MockExchange:
    """A fake control plane for :class:`vault_edge.agent.sync.Syncer` in one process: ``handler`` (an
    ``httpx.MockTransport`` handler) answers each request; the answer is read whole, as
    :class:`vault_edge.agent.http1.Client` would give it (the real client's reading of hostile answers
    is tested on real sockets in test_http1.py)."""

    def __init__(self, handler: Callable[[httpx.Request], Any]) -> None:
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://cp")

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Any,
        content: bytes | None = None,
        limit: int,
        error_limit: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        from vault_edge.agent.http1 import Answer, PathFailure

        try:
            resp = await self.http.request(method, target, headers=dict(headers), content=content)
            body = await resp.aread()
        except (httpx.HTTPError, OSError) as exc:
            raise PathFailure(type(exc).__name__) from None
        return Answer(resp.status_code, resp.headers, body)

    async def aclose(self) -> None:
        await self.http.aclose()
