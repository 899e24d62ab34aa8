"""Request-head parsing for the agent's socket: httptools (what the endpoint uses) against a hand-written parser.

Both extract what the endpoint needs (method, target, Accept, X-Vault-Edge-Token, keep-alive,
Content-Length) from the same heads and refuse the same malformed ones; the endpoint keeps one
httptools parser per connection, as here. Prints nanoseconds per head, best of --repeat.

    .venv/bin/python bench/head_parse.py
"""

from __future__ import annotations

import argparse
import re
import timeit
from collections.abc import Callable

from vault_edge.agent.endpoint import BadRequest, HeadParser, Request

HEADS = {
    "udsload (2 lines)": b"GET /v1/secrets/s000 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "httpx (6 lines)": (
        b"GET /v1/secrets/db/main HTTP/1.1\r\nHost: agent\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.28.1\r\n\r\n"
    ),
    "workerd binding (8 lines)": (
        b"GET /v1/secrets/tenant-a/openai?stage=current HTTP/1.1\r\nHost: vault-edge\r\n"
        b"Accept: application/octet-stream\r\nX-Vault-Edge-Token: Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWpr\r\n"
        b"User-Agent: workerd/1.20250101\r\nAccept-Encoding: gzip, br\r\nCF-Ray: 8a1b2c3d4e5f6789\r\n"
        b"Connection: keep-alive\r\n\r\n"
    ),
}
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (method, header name)
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB


def hand_parse_head(head: bytes) -> Request:
    """The hand-written alternative: split lines, check each against the RFC 9110/9112 grammar."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    elif version.startswith(b"HTTP/"):
        raise BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are served")
    else:
        raise BadRequest(400, "malformed request line")
    if _TOKEN_RE.fullmatch(method) is None:
        raise BadRequest(400, "malformed method")
    if _TARGET_RE.fullmatch(target) is None:
        raise BadRequest(400, "the request target must be a path (origin-form, ASCII)")
    accept: bytes | None = None
    token: bytes | None = None
    body_len: int | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN_RE.fullmatch(name) is None:
            raise BadRequest(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE_RE.search(value) is not None:
            raise BadRequest(400, "control character in a header value")
        lname = name.lower()
        if lname == b"accept":
            accept = value if accept is None else accept + b"," + value
        elif lname == b"x-vault-edge-token":
            if token is not None:
                raise BadRequest(400, "more than one X-Vault-Edge-Token header")
            token = value
        elif lname == b"connection":
            opts = {o.strip() for o in value.lower().split(b",")}
            if b"close" in opts:
                keep_alive = False
            elif b"keep-alive" in opts:
                keep_alive = True
        elif lname == b"content-length":
            if body_len is not None or not value.isdigit() or len(value) > 18:
                raise BadRequest(400, "invalid Content-Length")
            body_len = int(value)
        elif lname == b"transfer-encoding":
            raise BadRequest(400, "request bodies are not accepted (Transfer-Encoding)")
    return Request(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        accept=accept.decode("latin-1") if accept is not None else None,
        token=token.decode("latin-1") if token is not None else None,
        keep_alive=keep_alive,
        body_len=body_len or 0,
    )


def bench(fn: Callable[[bytes], Request], head: bytes, number: int, repeat: int) -> float:
    return min(timeit.repeat(lambda: fn(head), number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    parser = HeadParser()
    print("| head | httptools (endpoint) | hand-written |")
    print("|---|---:|---:|")
    for label, head in HEADS.items():
        assert parser.parse(head) == hand_parse_head(head), label  # the same answer before comparing speed
        tools = bench(parser.parse, head, args.number, args.repeat)
        hand = bench(hand_parse_head, head, args.number, args.repeat)
        print(f"| {label} | {tools:,.0f} ns | {hand:,.0f} ns |")


if __name__ == "__main__":
    main()
