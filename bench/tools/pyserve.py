"""The ceiling for a pure-Python server: asyncio, one fixed 64-byte answer, no routing.

    python bench/tools/pyserve.py SOCKET              # the stdlib event loop
    python bench/tools/pyserve.py --uvloop SOCKET     # the same protocol on uvloop

It reads just enough of a request to answer it, as ``udsceiling.c`` does: the head up to the blank
line (at most 8 KiB), a Content-Length body skipped, ``Connection: close`` honoured, pipelined
requests answered in order with one write per read. Whatever a Python server does per request on
top of this (parsing, routing, a policy, JSON) is its own cost. SIGTERM or SIGINT removes the socket
and exits 0. Standard library only (uvloop when asked for).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys

BODY = b'{"server":"pyserve","value":"0123456789abcdef0123456789abcdef0"}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n" + BODY
HEAD_MAX = 8192
assert len(BODY) == 64


def head_fields(head: bytes) -> tuple[int, bool]:
    """(Content-Length, Connection: close) of one request head; ValueError for one not served."""
    length, close = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise ValueError("chunked request bodies are not served")
        elif name == b"connection" and b"close" in value.lower():
            close = True
    return length, close


class Fixed(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.skip = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data if self.buf else data
        pos, n, close = 0, 0, False
        while pos < len(buf):
            if self.skip:
                take = min(self.skip, len(buf) - pos)
                pos += take
                self.skip -= take
                continue
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = buf[pos:end]
            lower = head.lower()  # the usual two-line head has none of these: no parse
            if b"content-length" in lower or b"connection" in lower or b"transfer-encoding" in lower:
                try:
                    self.skip, close = head_fields(head)
                except ValueError:
                    self.transport.close()
                    return
            pos = end + 4
            n += 1
            if close:
                break
        rest = buf[pos:] if pos < len(buf) and not close else b""
        if len(rest) > HEAD_MAX and not self.skip:
            self.transport.close()
            return
        self.buf = rest
        if n:
            self.transport.write(ANSWER * n)
        if close:
            self.transport.close()


async def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket, never another file
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(Fixed, path, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"pyserve serving {path} on {type(loop).__module__}", file=sys.stderr, flush=True)
    try:
        await stop
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("socket")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of the stdlib event loop")
    args = p.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.socket))
    else:
        asyncio.run(serve(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
