"""The benchmark tools of bench/tools/ build from the repository alone and measure what they say.

The C tools are compiled with the system ``cc`` into a temporary directory (skipped without one).
``udsbench`` runs for about a second against ``udsceiling`` and briefly against ``pyserve.py`` and
a scripted server that answers each path in its own way (framing, interim answers, Connection:
close, refused chunked bodies, garbage, a hang): counts and ordered percentiles are checked, never
a speed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "bench" / "tools"
PERCENTILES = ["min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-tools")
    for tool in ("udsbench", "udsceiling"):
        subprocess.run(
            ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(out / tool), str(TOOLS / f"{tool}.c")],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return out


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # unix socket paths are short (108 bytes): pytest's tmp_path can be too long
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ve-bt-") as d:
        yield Path(d)


def connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def server(argv: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not connectable(sock):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, f"{argv} did not listen on {sock}"
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def udsbench(build: Path, sock: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [str(build / "udsbench"), "-u", str(sock), "-j", *args], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip(), out.stderr
    return out.returncode, json.loads(out.stdout)


def assert_clean(rc: int, doc: dict[str, Any]) -> None:
    assert doc["requests"] > 0, doc
    assert doc["errors"] == 0 and doc["non_2xx"] == 0, doc
    assert doc["ok_2xx"] == doc["requests"] and doc["status"] == {"200": doc["requests"]}, doc
    assert rc == 0
    assert doc["rps"] == pytest.approx(doc["requests"] / doc["seconds"], rel=0.01)
    values = [doc[k] for k in PERCENTILES]
    assert values == sorted(values) and values[0] > 0, doc
    assert doc["min_us"] <= doc["mean_us"] <= doc["max_us"]


def test_udsbench_against_the_c_ceiling(build: Path, sock_dir: Path) -> None:
    sock = sock_dir / "c.sock"
    with server([str(build / "udsceiling"), str(sock)], sock):
        rc, doc = udsbench(build, sock, "-c", "4", "-d", "1", "-W", "0.2", "-p", "/v1/secrets/s000", "-H", "X-Bench: 1")
        assert_clean(rc, doc)
        assert doc["conns"] == 4 and doc["pipeline"] == 1 and doc["seconds"] == 1.0 and doc["warmup_s"] == 0.2
        rc, doc = udsbench(build, sock, "-c", "3", "-t", "2", "-P", "4", "-d", "0.3")
        assert_clean(rc, doc)
    assert not sock.exists()  # SIGTERM removes the socket


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_udsbench_against_pyserve(build: Path, sock_dir: Path, loop: str) -> None:
    sock = sock_dir / "p.sock"
    argv = [sys.executable, str(TOOLS / "pyserve.py"), str(sock)] + (["--uvloop"] if loop == "uvloop" else [])
    with server(argv, sock):
        rc, doc = udsbench(build, sock, "-c", "2", "-P", "2", "-d", "0.3")
        assert_clean(rc, doc)
    assert not sock.exists()


@pytest.mark.parametrize("ceiling", ["udsceiling", "pyserve"])
def test_the_ceilings_frame_requests(build: Path, sock_dir: Path, ceiling: str) -> None:
    sock = sock_dir / "f.sock"
    argv = (
        [str(build / "udsceiling"), str(sock)]
        if ceiling == "udsceiling"
        else [sys.executable, str(TOOLS / "pyserve.py"), str(sock)]
    )
    with server(argv, sock), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        # a body skipped (it looks like a request but is not one), a pipelined GET, then close
        s.sendall(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\nGET /no HTTP/1.1\r\n"
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    heads = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(heads) == 3, data
    for h in heads:
        assert b"Content-Length: 64\r\n" in h and len(h.split(b"\r\n\r\n", 1)[1]) == 64


# -- answer framing, against a scripted server --------------------------------------------------

BODY = b'{"ok":true}'
CL = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
SCRIPT: dict[str, tuple[list[bytes], bool]] = {  # path: (writes, close afterwards)
    "/cl": ([CL], False),
    "/dribble": ([CL[i : i + 1] for i in range(len(CL))], False),
    "/204": ([b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"], False),
    "/100": ([b"HTTP/1.1 100 Continue\r\n\r\n", CL], False),
    "/close": ([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\n" + BODY], True),
    "/eof": ([b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + BODY], True),
    "/500": ([b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\noops!"], False),
    "/chunked": ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"], False),
    "/garbage": ([b"SPDY/9 what\r\n\r\n"], True),
    "/two-lengths": ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"], False),
    "/extra": ([CL + b"EXTRA"], False),
    "/hang": ([], False),
}


class Scripted(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while line := self.rfile.readline():
                path = line.split()[1].decode()
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                writes, close = SCRIPT[path]
                for w in writes:
                    self.wfile.write(w)
                if close:
                    return


@pytest.fixture(scope="module")
def scripted() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ve-bt-") as d:
        path = Path(d) / "s.sock"
        srv = socketserver.ThreadingUnixStreamServer(str(path), Scripted)
        srv.daemon_threads = True
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            yield path
        finally:
            srv.shutdown()
            srv.server_close()
            t.join()


CASES: list[tuple[str, list[str], dict[str, Any]]] = [
    # path, extra flags, what the JSON must say ("+" means > 0)
    ("/cl", [], {"requests": "+", "errors": 0, "reconnects": 0}),
    ("/cl", ["-P", "4"], {"requests": "+", "errors": 0, "reconnects": 0}),
    ("/dribble", [], {"requests": "+", "errors": 0}),
    ("/204", [], {"requests": "+", "errors": 0}),
    ("/100", [], {"requests": "+", "errors": 0, "status": "200 only"}),
    ("/close", [], {"requests": "+", "errors": 0, "reconnects": "+"}),
    ("/close", ["-P", "3"], {"requests": "+", "err_io": "+", "reconnects": "+", "rc": 1}),
    ("/eof", [], {"requests": "+", "errors": 0, "reconnects": "+"}),
    ("/500", [], {"requests": "+", "errors": 0, "non_2xx": "requests", "rc": 1}),
    ("/chunked", [], {"requests": 0, "err_chunked": "+", "rc": 1}),
    ("/garbage", [], {"requests": 0, "err_parse": "+", "rc": 1}),
    ("/two-lengths", [], {"requests": 0, "err_parse": "+", "rc": 1}),
    ("/extra", [], {"err_parse": "+", "rc": 1}),
    ("/hang", ["-T", "0.1"], {"requests": 0, "err_timeout": "+", "rc": 1}),
]


@pytest.mark.parametrize(("path", "flags", "expect"), CASES, ids=[f"{p}{''.join(f)}" for p, f, _ in CASES])
def test_udsbench_frames_answers(
    build: Path, scripted: Path, path: str, flags: list[str], expect: dict[str, Any]
) -> None:
    rc, doc = udsbench(build, scripted, "-c", "1", "-d", "0.2", "-p", path, *flags)
    for key, want in expect.items():
        if key == "rc":
            assert rc == want, doc
        elif want == "+":
            assert doc[key] > 0, (key, doc)
        elif want == "requests":
            assert doc[key] == doc["requests"], (key, doc)
        elif want == "200 only":
            assert doc[key] == {"200": doc["requests"]}, doc
        else:
            assert doc[key] == want, (key, doc)
    assert doc["requests"] == doc["ok_2xx"] + doc["non_2xx"]
    if doc["requests"]:
        values = [doc[k] for k in PERCENTILES]
        assert values == sorted(values), doc
    if "rc" not in expect:
        assert rc == 0, doc
