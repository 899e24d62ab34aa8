"""A small API provider with a key-management API, for the webhook rotator's tests (the one stand-in
allowed: a SaaS cannot run on this machine). ``python webhook_provider.py PORT ADMIN_TOKEN``.

    POST   /keys        admin bearer; Idempotency-Key → the same key for the same idempotency key
    GET    /whoami      bearer = a live key → 200, else 401
    DELETE /keys/{id}   admin bearer → 200, or 404 for an unknown/revoked key
    GET    /keys        admin bearer → {"live": [ids]}
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADMIN = sys.argv[2] if len(sys.argv) > 2 else "admin"
LOCK = threading.Lock()
KEYS: dict[str, str] = {}  # id → key, live ones
BY_IDEM: dict[str, dict[str, str]] = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _bearer(self) -> str:
        h = self.headers.get("Authorization", "")
        return h[7:] if h.startswith("Bearer ") else ""

    def do_POST(self) -> None:
        if self.path != "/keys":
            return self._send(404, {"error": "no such path"})
        if self._bearer() != ADMIN:
            return self._send(401, {"error": "admin token required"})
        idem = self.headers.get("Idempotency-Key", "")
        with LOCK:
            if idem and idem in BY_IDEM:
                return self._send(200, BY_IDEM[idem])
            doc = {"id": "k_" + secrets.token_hex(6), "key": "sk_" + secrets.token_urlsafe(24)}
            KEYS[doc["id"]] = doc["key"]
            if idem:
                BY_IDEM[idem] = doc
        self._send(200, doc)

    def do_GET(self) -> None:
        with LOCK:
            if self.path == "/whoami":
                live = self._bearer() in KEYS.values()
                return self._send(200 if live else 401, {"ok": live})
            if self.path == "/keys" and self._bearer() == ADMIN:
                return self._send(200, {"live": sorted(KEYS)})
        self._send(404, {"error": "no such path"})

    def do_DELETE(self) -> None:
        if not self.path.startswith("/keys/") or self._bearer() != ADMIN:
            return self._send(401, {"error": "admin token required"})
        with LOCK:
            gone = KEYS.pop(self.path[6:], None)
        self._send(200 if gone else 404, {"revoked": gone is not None})


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
