"""A real HTTPS upstream for the egress tests: a test CA made with ``cryptography``, a threaded server
that records every request it gets (method, path, headers, body) and answers by path:

    /echo            200 JSON: what it got (headers included: an upstream that echoes the key)
    /ok              200 JSON {"ok": true}
    /auth            200 JSON {"ok": true} if Authorization is ``Upstream.accept``, else 401 echoing what it got
                     (an upstream that has not yet taken a rotated key)
    /redirect?to=U   302 to U
    /slow?s=N        waits N seconds, then 200
    /big?n=N         200 with a Content-Length of N (and N bytes)
    /stream?n=N      200, N bytes in chunks of 64 KiB, chunked (no Content-Length)
    /sse?n=N&gap=S   200 text/event-stream, N events S seconds apart, each with its send time
    /status?code=N   N with a small JSON body
    anything else    404
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost and 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault-edge test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class Seen:
    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
        seen = Seen(self.command, self.path, list(self.headers.items()), body)
        self.server.upstream.record(seen)
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        path = u.path
        if path.endswith("/echo"):
            self._json(
                200,
                {"method": self.command, "target": self.path, "headers": seen.headers, "body": body.decode("latin-1")},
            )
        elif path.endswith("/ok"):
            self._json(200, {"ok": True})
        elif path.endswith("/auth"):
            got = self.headers.get("Authorization")
            if got == self.server.upstream.accept:
                self._json(200, {"ok": True, "body": body.decode("latin-1")})
            else:
                self._json(401, {"error": "bad key", "got": got})
        elif path.endswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", q["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.endswith("/status"):
            self._json(int(q["code"]), {"status": int(q["code"])})
        elif path.endswith("/slow"):
            time.sleep(float(q.get("s", "3")))
            self._json(200, {"slow": True})
        elif path.endswith("/big"):
            size = int(q["n"])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for _ in range(0, size, 65536):
                try:
                    self.wfile.write(b"x" * min(65536, size))
                except OSError:
                    return
        elif path.endswith("/stream"):
            self._chunked("application/octet-stream", (b"y" * 65536 for _ in range(int(q["n"]) // 65536)))
        elif path.endswith("/sse"):
            gap = float(q.get("gap", "0.2"))

            def events() -> Any:
                for i in range(int(q.get("n", "3"))):
                    if i:
                        time.sleep(gap)
                    yield f"id: {i}\ndata: {json.dumps({'i': i, 'sent': time.time()})}\n\n".encode()

            self._chunked("text/event-stream", events())
        else:
            self._json(404, {"error": "no such path"})

    def _read_chunked(self) -> bytes:
        """A chunked request body, strictly (what the agent sends up must be well framed); each chunk's
        arrival time is kept in ``Upstream.chunk_times``."""
        out = b""
        while True:
            line = self.rfile.readline(1024)
            assert line.endswith(b"\r\n") and line[:-2].isalnum(), line
            size = int(line[:-2], 16)
            if not size:
                assert self.rfile.readline(1024) == b"\r\n"  # the agent sends no trailers
                return out
            out += self.rfile.read(size)
            self.server.upstream.chunk_times.append(time.monotonic())
            assert self.rfile.read(2) == b"\r\n"

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _any

    def _json(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "keep-alive, X-Upstream-Private")
        self.send_header("X-Upstream-Private", "hop")
        self.send_header("Keep-Alive", "timeout=30")
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(OSError):  # the agent gave up waiting (a timeout test)
                self.wfile.write(body)

    def _chunked(self, ctype: str, pieces: Any) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for p in pieces:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(p), p))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.server.upstream.aborted += 1  # the agent hung up: its worker went away


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    upstream: Upstream

    def get_request(self) -> Any:
        conn, addr = super().get_request()
        self.upstream.conns.append(conn)
        return conn, addr


class Record:
    """What an upstream got, for the tests to look at (either protocol's)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.chunk_times: list[float] = []  # when each piece of a streamed request body arrived
        self.aborted = 0  # streams the agent hung up on
        self.accept: str | None = None  # the Authorization /auth takes
        self.conns: list[Any] = []  # the connections accepted (``shutdown`` drops one)
        self._lock = threading.Lock()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def last(self) -> Seen:
        with self._lock:
            return self.seen[-1]


class Upstream(Record):
    """``Upstream(ca_dir)`` serves HTTPS on 127.0.0.1 (a free port) until ``close()``."""

    protocol = "http/1.1"

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.upstream = self
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop listening and drop the connections kept alive: the upstream is down."""
        self.server.shutdown()
        self.server.server_close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
