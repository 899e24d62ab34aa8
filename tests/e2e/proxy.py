"""A man in the middle between agents and the control plane, for tamper tests: real sockets, real
HTTP. It forwards everything, records sync answers per node, and when armed rewrites them."""

from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from vault_edge import wire


class Proxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"  # pass | tamper | other_node | replay | forge_revoked
        # A hostile path, apart from `mode`: every answer to a request under one of `hostile_paths` is
        # replaced by `hostile` (bad_gzip | gzip_bomb | oversized | refuse | overloaded | sealed_now)
        # without asking the control plane.
        self.hostile: str | None = None
        self.hostile_paths: tuple[str, ...] = ("/v1/agent/sync",)
        self.hostile_sent = 0
        self._bomb: bytes | None = None
        self.answers: dict[str, list[tuple[bytes, str]]] = {}  # node → [(body, signature)]
        # A slow path, apart from `mode`: the next answers to requests under a path prefix are sent only
        # after these delays (seconds, one per answer, consumed in order), the control plane having
        # answered at once; each answer held is recorded in `held` as (path, status, body).
        self.holds: dict[str, list[float]] = {}
        self.held: list[tuple[str, int, bytes]] = []
        self.arrivals: list[tuple[float, str, str]] = []  # (time.monotonic(), method, path) of every request
        self.rewritten = 0
        self.wire = bytearray()  # every request and answer that crossed it, as bytes
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self, "GET")

            def do_POST(self) -> None:
                proxy.forward(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.addr = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def forward(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.wire += h.requestline.encode() + str(h.headers).encode() + body
            self.arrivals.append((time.monotonic(), method, h.path))
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        if self.hostile and h.path.startswith(self.hostile_paths):
            self.hostile_answer(h, self.hostile)
            return
        if self.mode == "forge_revoked" and h.path.startswith("/v1/agent/sync"):
            self.forge_revocation(h)
            return
        with httpx.Client(timeout=120) as c:
            resp = c.request(method, self.upstream + h.path, content=body, headers=headers)
        out, sig = resp.content, resp.headers.get(wire.H_SERVER_SIGNATURE, "")
        node = h.headers.get(wire.H_NODE, "")
        if h.path.startswith("/v1/agent/sync") and resp.status_code == 200:
            out, sig = self.rewrite(node, out, sig)
        with self.lock:
            self.wire += out
            prefix = next((p for p, delays in self.holds.items() if delays and h.path.startswith(p)), None)
            delay = self.holds[prefix].pop(0) if prefix is not None else 0.0
        if delay:
            time.sleep(delay)
            with self.lock:
                self.held.append((h.path, resp.status_code, out))
        try:
            h.send_response(resp.status_code)
            h.send_header("content-type", resp.headers.get("content-type", "application/json"))
            if sig:
                h.send_header(wire.H_SERVER_SIGNATURE, sig)
            if resp.headers.get("retry-after"):
                h.send_header("retry-after", resp.headers["retry-after"])
            h.send_header("content-length", str(len(out)))
            h.end_headers()
            h.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a held answer)
            h.close_connection = True

    BOMB_DECODED = 256 << 20  # what the gzip bomb inflates to (about 250 KiB on the wire)
    OVERSIZED = 160 << 20  # an identity body this long, chunked (no Content-Length to refuse it by)

    def bomb(self) -> bytes:
        if self._bomb is None:
            z, zeros = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)  # wbits 31: a gzip stream
            self._bomb = b"".join(z.compress(zeros) for _ in range(self.BOMB_DECODED >> 20)) + z.flush()
        return self._bomb

    def hostile_answer(self, h: BaseHTTPRequestHandler, kind: str) -> None:
        with self.lock:
            self.hostile_sent += 1
        if kind in ("overloaded", "sealed_now"):
            # overloaded: a load-shedding 503, as the control plane sends it past its in-flight limit;
            # sealed_now: a sealed control plane's "poll again at once", sent at once, without the hold
            code, retry, message = (
                ("overloaded", "2", "too many enrolments in progress")
                if kind == "overloaded"
                else ("sealed", "0", "the vault is sealed")
            )
            out = json.dumps({"error": {"code": code, "message": message}}).encode()
            h.send_response(503)
            h.send_header("content-type", "application/json")
            h.send_header("retry-after", retry)
            h.send_header("content-length", str(len(out)))
            h.end_headers()
            h.wfile.write(out)
            return
        if kind == "refuse":  # the control plane's refusal, as a relay would forge it: unsigned
            out = json.dumps({"error": {"code": "unauthorized", "message": "join token already used"}}).encode()
            h.send_response(401)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(out)))
            h.end_headers()
            h.wfile.write(out)
            return
        h.send_response(200)
        h.send_header("content-type", "application/json")
        try:
            if kind == "oversized":
                h.send_header("transfer-encoding", "chunked")
                h.end_headers()
                chunk = b"0" * (1 << 20)
                for _ in range(self.OVERSIZED >> 20):
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                h.wfile.write(b"0\r\n\r\n")
                return
            out = {"bad_gzip": b"this is not a gzip stream" * 8, "gzip_bomb": self.bomb()}[kind]
            h.send_header("content-encoding", "gzip")
            h.send_header("content-length", str(len(out)))
            h.end_headers()
            h.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):  # the agent stopped reading: what it should do
            h.close_connection = True

    def forge_revocation(self, h: BaseHTTPRequestHandler) -> None:
        """A 403 shaped like the control plane's revocation, naming the node and echoing its nonce,
        but not signed by the control plane (signed by nobody, or with a made-up signature); or a
        403 whose body is JSON nested deep enough to overflow a recursive parser."""
        with self.lock:
            self.rewritten += 1
            variant = self.rewritten % 3
        out = json.dumps(
            {
                "error": {"code": "revoked", "message": "node revoked"},
                "v": wire.PROTOCOL_VERSION,
                "kind": "revoked",
                "node": h.headers.get(wire.H_NODE, ""),
                "nonce": h.headers.get(wire.H_NONCE, ""),
            }
        ).encode()
        if variant == 2:
            out = b"[" * 200_000
        h.send_response(403)
        h.send_header("content-type", "application/json")
        if variant:
            h.send_header(wire.H_SERVER_SIGNATURE, wire.b64e(bytes(64)))
        h.send_header("content-length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def rewrite(self, node: str, body: bytes, sig: str) -> tuple[bytes, str]:
        with self.lock:
            mine = self.answers.setdefault(node, [])
            if self.mode == "pass" or not mine:
                mine.append((body, sig))
                return body, sig
            self.rewritten += 1
            if self.mode == "tamper":  # one byte of the signed body changed
                i = body.index(b'"revision":') + len(b'"revision":')
                return body[:i] + (b"9" if body[i : i + 1] != b"9" else b"8") + body[i + 1 :], sig
            if self.mode == "other_node":  # a genuine answer, signed, but made for another node
                other = next(v for k, v in self.answers.items() if k != node and v)
                return other[-1]
            if self.mode == "replay":  # this node's own genuine, older answer
                return mine[0]
            raise AssertionError(self.mode)
