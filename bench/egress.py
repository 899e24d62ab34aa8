"""Keyless workers: what the agent's egress path adds, against calling the same upstream directly.

Real processes, all started here:

- a fast HTTPS upstream (this script with ``--serve-upstream``: asyncio on uvloop, TLS with a CA and a
  certificate for 127.0.0.1 made here with ``cryptography``); it checks the key (401 without it) and
  answers ``/v1/fixed`` with a fixed 64-byte JSON body (Content-Length, keep-alive) and ``/v1/sse?n=N&
  gap_us=G`` with N server-sent events G µs apart, each carrying its send time (``time.monotonic_ns()``,
  CLOCK_MONOTONIC, system-wide on Linux, so it compares across processes);
- a dev control plane (``vault-edge server --dev``), a region, the key as a secret, and the route made
  with the real CLI (``vault-edge egress create bench --upstream https://127.0.0.1:PORT --secret
  bench/key --inject 'header:Authorization=Bearer {value}'``);
- a real ``vault-edge agent run`` (``--egress-ca``, a policy giving this uid the route), enrolled and
  synced.

Latency (closed loop, keep-alive, one uvloop client process, C connections each with its own
connection and one request in flight): *direct* is HTTPS to the upstream with the key in the request;
*agent* is plain HTTP over the agent's unix socket to ``/v1/egress/bench/v1/fixed`` without the key,
the agent injecting it and keeping its own keep-alive pool to the upstream. A request's latency runs
from handing its bytes to the transport to reading the last byte of its answer. The series alternate
(direct c1, agent c1, direct c16, agent c16, then again, ``--runs`` times), ``-d`` measured seconds
after ``-W`` warm-up each; p50/p99 are nearest-rank over the samples of all runs of a series.

SSE: one connection, ``--events`` events per series (split over the runs, alternated direct / agent);
a sample is the client's ``time.monotonic_ns()`` when the bytes holding the event were read, minus
the upstream's when it wrote them.

    .venv/bin/python bench/egress.py                      # 3 runs x (c1, c16) x (direct, agent), -d 2 -W 0.5
    .venv/bin/python bench/egress.py --runs 5 -d 3 --events 1000 --out results.json
    .venv/bin/python bench/egress.py --http2 --runs 5 -d 3    # the upstream speaks HTTP/2 only

``--http2``: the upstream speaks HTTP/2 only (ALPN ``h2``; the ``h2`` package's server side), so the
agent's pool takes HTTP/2 to it (one connection, the calls as streams); *direct* is then HTTP/2 too,
through the agent's own pool (``vault_edge.agent.upstream.Pool``) as the client, one connection per
closed loop. The worker's side is HTTP/1.1 on the socket either way.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import platform
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent_footprint import http_get  # a GET over the agent's socket (bench/ is the script's path)

ROOT = Path(__file__).resolve().parent.parent
ROUTE, SECRET, REGION = "bench", "bench/key", "bench"
FIXED = b'{"ok":true,"pad":"' + b"x" * 44 + b'"}'  # 64 bytes
assert len(FIXED) == 64


# -- the upstream ------------------------------------------------------------------------------
class _Upstream(asyncio.Protocol):
    accepted = 0  # connections accepted so far (GET /v1/stats): the agent's pool at work

    def __init__(self, key: bytes) -> None:
        self.auth = b"authorization: bearer " + key.lower() + b"\r\n"
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _Upstream.accepted += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[: end + 4], self.buf[end + 4 :]
            self.request(head)

    def request(self, head: bytes) -> None:
        assert self.transport is not None
        target = head.split(b" ", 2)[1]
        if self.auth not in head.lower():
            self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        elif target == b"/v1/stats":
            body = b'{"accepted":%d}' % _Upstream.accepted
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        elif target.startswith(b"/v1/sse"):
            q = dict(p.split(b"=", 1) for p in target.partition(b"?")[2].split(b"&") if b"=" in p)
            asyncio.get_running_loop().create_task(self.sse(int(q.get(b"n", b"10")), int(q.get(b"gap_us", b"5000"))))
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (len(FIXED), FIXED)
            )

    async def sse(self, n: int, gap_us: int) -> None:
        t = self.transport
        assert t is not None
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(n):
            if i:
                await asyncio.sleep(gap_us / 1e6)
            if t.is_closing():
                return
            ev = b"id: %d\ndata: %d\n\n" % (i, time.monotonic_ns())
            t.write(b"%x\r\n%b\r\n" % (len(ev), ev))
        t.write(b"0\r\n\r\n")


class _H2Upstream(asyncio.Protocol):
    """The same upstream over HTTP/2 only (``--http2``; the ``h2`` package's server side): the same
    paths, answers and key check, each request a stream."""

    def __init__(self, key: bytes) -> None:
        import h2.config
        import h2.connection

        self.auth = b"bearer " + key.lower()
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _Upstream.accepted += 1
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        assert self.transport is not None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.h2.data_to_send())
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.heads[ev.stream_id] = {k: v for k, v in ev.headers}  # type: ignore[misc, union-attr]
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.StreamEnded):
                self.request(ev.stream_id, self.heads.pop(ev.stream_id))  # type: ignore[arg-type]
        self.transport.write(self.h2.data_to_send())

    def answer(self, sid: int, status: int, headers: list[tuple[bytes, bytes]], body: bytes, end: bool = True) -> None:
        self.h2.send_headers(sid, [(b":status", b"%d" % status), *headers], end_stream=not body and end)
        if body:
            self.h2.send_data(sid, body, end_stream=end)

    def request(self, sid: int, head: dict[bytes, bytes]) -> None:
        target = head[b":path"]
        if head.get(b"authorization", b"").lower() != self.auth:
            self.answer(sid, 401, [(b"content-length", b"0")], b"")
        elif target == b"/v1/stats":
            body = b'{"accepted":%d}' % _Upstream.accepted
            self.answer(sid, 200, [(b"content-length", b"%d" % len(body))], body)
        elif target.startswith(b"/v1/sse"):
            q = dict(p.split(b"=", 1) for p in target.partition(b"?")[2].split(b"&") if b"=" in p)
            self.answer(sid, 200, [(b"content-type", b"text/event-stream")], b"", end=False)
            asyncio.get_running_loop().create_task(
                self.sse(sid, int(q.get(b"n", b"10")), int(q.get(b"gap_us", b"5000")))
            )
        else:
            self.answer(
                sid, 200, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(FIXED))], FIXED
            )

    async def sse(self, sid: int, n: int, gap_us: int) -> None:
        t = self.transport
        assert t is not None
        for i in range(n):
            if i:
                await asyncio.sleep(gap_us / 1e6)
            if t.is_closing():
                return
            self.h2.send_data(sid, b"id: %d\ndata: %d\n\n" % (i, time.monotonic_ns()), end_stream=i == n - 1)
            t.write(self.h2.data_to_send())


def serve_upstream(port: int, cert: str, key: str, secret: str, http2: bool = False) -> None:
    import uvloop

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if http2:
        ctx.set_alpn_protocols(["h2"])
    proto = _H2Upstream if http2 else _Upstream

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: proto(secret.encode()), "127.0.0.1", port, ssl=ctx, backlog=1024
        )
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 and localhost, signed by it: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault-edge bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
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


# -- the client --------------------------------------------------------------------------------
Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def read_head(r: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split(b" ", 2)[1]), headers


Call = Callable[[], Awaitable[int]]  # one request, its answer read whole: its status
Client = Callable[[], Awaitable[tuple[Call, Callable[[], None]]]]  # a connection: (call, close)


def h1_client(opener: Opener, req: bytes) -> Client:
    async def make() -> tuple[Call, Callable[[], None]]:
        r, w = await opener()

        async def call() -> int:
            w.write(req)
            status, h = await read_head(r)
            await r.readexactly(int(h.get(b"content-length", b"0")))
            return status

        return call, w.close

    return make


async def closed_loop(client: Client, warm_at: int, stop_at: int, out: list[int], errors: list[str]) -> None:
    call, close = await client()
    try:
        while True:
            t0 = time.perf_counter_ns()
            if t0 >= stop_at:
                break
            status = await call()
            t1 = time.perf_counter_ns()
            if status != 200:
                errors.append(f"HTTP {status}")
            elif t0 >= warm_at:
                out.append(t1 - t0)
    finally:
        close()


async def latency_series(client: Client, conns: int, warmup: float, duration: float) -> dict[str, Any]:
    now = time.perf_counter_ns()
    warm_at, stop_at = now + int(warmup * 1e9), now + int((warmup + duration) * 1e9)
    lats: list[list[int]] = [[] for _ in range(conns)]
    errors: list[str] = []
    await asyncio.gather(*(closed_loop(client, warm_at, stop_at, lats[i], errors) for i in range(conns)))
    return {"samples": sorted(x for lat in lats for x in lat), "errors": errors}


class Events:
    """Server-sent events as their bytes arrive: each event's delay (now minus the upstream's send
    time in its ``data:``) goes to ``delays``."""

    def __init__(self, delays: list[int]) -> None:
        self.delays, self.buf = delays, b""

    def feed(self, data: bytes) -> None:
        arrived = time.monotonic_ns()
        self.buf += data
        *events, self.buf = self.buf.split(b"\n\n")
        for ev in events:
            for line in ev.split(b"\n"):
                if line.startswith(b"data: "):
                    self.delays.append(arrived - int(line[6:]))


async def sse_series(opener: Opener, req: bytes, n: int) -> dict[str, Any]:
    r, w = await opener()
    delays: list[int] = []
    try:
        w.write(req)
        status, h = await read_head(r)
        if status != 200 or h.get(b"transfer-encoding") != b"chunked":
            return {"samples": [], "errors": [f"HTTP {status} {h!r}"]}
        events = Events(delays)
        while True:
            size = int((await r.readuntil(b"\r\n")).strip(), 16)
            data = (await r.readexactly(size + 2))[:-2] if size else b""
            if not size:
                await r.readuntil(b"\r\n")
                break
            events.feed(data)
    finally:
        w.close()
    return {"samples": sorted(delays), "errors": [] if len(delays) == n else [f"{len(delays)} of {n} events"]}


# HTTP/2 to the upstream directly (``--http2``): the agent's own pool (``vault_edge.agent.upstream``,
# HTTP/2 through ``h2``) as the client, one pool and so one connection per closed loop; the request is
# the same HTTP/1.1 head the HTTP/1.1 series sends, which the pool turns into HTTP/2's fields.
Origin = tuple[str, str, int]


def h2_pool(ctx: ssl.SSLContext) -> Any:
    from vault_edge.agent.upstream import Pool

    return Pool(ctx, http2=True)


async def h2_exchange(pool: Any, origin: Origin, req: bytes) -> Any:
    leg = pool.idle_conn(origin) or await pool.connect(origin, 10)
    leg.begin(False)
    leg.start(req, b"", False, True)
    await leg.head(10)
    return leg


async def h2_call(pool: Any, origin: Origin, req: bytes) -> tuple[int, bytes]:
    leg = await h2_exchange(pool, origin, req)
    body = b""
    while chunk := await leg.read(10):
        body += chunk
    pool.release(leg)
    return int(leg.status), body


def h2_client(ctx: ssl.SSLContext, origin: Origin, req: bytes) -> Client:
    async def make() -> tuple[Call, Callable[[], None]]:
        pool = h2_pool(ctx)

        async def call() -> int:
            return (await h2_call(pool, origin, req))[0]

        return call, pool.close

    return make


async def sse_series_h2(ctx: ssl.SSLContext, origin: Origin, req: bytes, n: int) -> dict[str, Any]:
    pool = h2_pool(ctx)
    delays: list[int] = []
    try:
        leg = await h2_exchange(pool, origin, req)
        events = Events(delays)
        while data := await leg.read(10):
            events.feed(data)
        pool.release(leg)
    finally:
        pool.close()
    return {"samples": sorted(delays), "errors": [] if len(delays) == n else [f"{len(delays)} of {n} events"]}


def pct(samples: list[int], p: float) -> float:
    """Nearest-rank percentile of sorted samples, in µs."""
    if not samples:
        return float("nan")
    return samples[max(0, min(len(samples) - 1, int(-(-p * len(samples) // 100)) - 1))] / 1e3


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        try:
            if pred():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack:
    """Upstream, control plane, agent: real processes in a temporary directory."""

    def __init__(
        self, vault_edge: list[str], verbose: bool, agent_prefix: list[str] | None = None, http2: bool = False
    ) -> None:
        self.agent_prefix, self.http2 = agent_prefix or [], http2
        self.dir = Path(tempfile.mkdtemp(prefix="ve-egb-", dir="/tmp"))
        self.cmd, self.verbose = vault_edge, verbose
        self.procs: list[subprocess.Popen[bytes]] = []
        self.key = "sk-bench-" + secrets.token_hex(16)
        self.socket = str(self.dir / "a.sock")

    def popen(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.dir / log, "ab") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append(p)
        return p

    def start(self) -> None:
        import httpx

        from vault_edge.operator import OperatorClient

        self.ca, cert, key = make_ca(self.dir)
        self.up_port = free_port()
        self.upstream = self.popen(
            [
                *(sys.executable, __file__, "--serve-upstream", str(self.up_port), str(cert), str(key), self.key),
                *(["--http2"] if self.http2 else []),
            ],
            "upstream.log",
        )
        wait_for(lambda: "ready" in (self.dir / "upstream.log").read_text(), 20, "the upstream", self.upstream)

        port, token = free_port(), "vet_bench_" + secrets.token_urlsafe(16)
        addr = f"http://127.0.0.1:{port}"
        server = self.popen(
            [*self.cmd, "server", "--dev", "--dev-token", token, "--port", str(port), "--log-level", "warning"],
            "server.log",
        )

        def unsealed() -> bool:
            try:
                r = httpx.get(f"{addr}/v1/sys/status", timeout=1)
            except httpx.TransportError:
                return False
            return r.status_code == 200 and r.json().get("sealed") is False

        wait_for(unsealed, 60, "the control plane", server)
        with OperatorClient(addr, token) as c:
            c.create_region(REGION)
            c.put(SECRET, value=self.key, regions=[REGION])
            join = c.join_token(REGION)["token"]
        env = {**os.environ, "VAULT_EDGE_ADDR": addr, "VAULT_EDGE_TOKEN": token}
        r = subprocess.run(
            [
                *self.cmd,
                *("egress", "create", ROUTE, "--upstream", f"https://127.0.0.1:{self.up_port}"),
                *("--secret", SECRET, "--inject", "header:Authorization=Bearer {value}", "--path", "/v1/"),
            ],
            env=env,
            capture_output=True,
        )
        if r.returncode:
            raise RuntimeError(f"egress create: {r.stderr.decode()}")
        policy = self.dir / "policy.toml"
        policy.write_text(f'[[rule]]\nuid = {os.getuid()}\negress = ["{ROUTE}"]\n')
        self.agent = self.popen(
            [
                *self.agent_prefix,
                *self.cmd,
                *("agent", "run", "--server", addr, "--state-dir", str(self.dir / "state"), "--socket", self.socket),
                *("--join-token", join, "--egress-ca", str(self.ca), "--policy", str(policy), "--log-level", "warning"),
            ],
            "agent.log",
        )
        wait_for(
            lambda: http_get(self.socket, f"/v1/egress/{ROUTE}/v1/fixed", timeout=5)[0] == 200,
            60,
            "the route",
            self.agent,
        )

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the run -----------------------------------------------------------------------------------
async def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(stack.ca))
    port = stack.up_port

    def direct() -> Any:
        return asyncio.open_connection("127.0.0.1", port, ssl=ctx)

    def agent() -> Any:
        return asyncio.open_unix_connection(stack.socket)

    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    auth = b"Authorization: Bearer " + stack.key.encode() + b"\r\n"
    reqs = {
        "direct": (direct, b"GET /v1/fixed HTTP/1.1\r\n" + host + auth + b"\r\n"),
        "agent": (agent, f"GET /v1/egress/{ROUTE}/v1/fixed HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()),
    }
    results: dict[str, Any] = {"latency": {}, "sse": {}, "agent_cpu": {}, "upstream_conns": {}}

    origin = ("https", "127.0.0.1", port)

    async def accepted() -> int:
        """Connections the upstream has accepted, this one's included."""
        if args.http2:
            pool = h2_pool(ctx)
            try:
                _, body = await h2_call(pool, origin, b"GET /v1/stats HTTP/1.1\r\n" + host + auth + b"\r\n")
            finally:
                pool.close()
            return int(json.loads(body)["accepted"])
        r, w = await direct()
        w.write(b"GET /v1/stats HTTP/1.1\r\n" + host + auth + b"\r\n")
        _, h = await read_head(r)
        n = int(json.loads(await r.readexactly(int(h[b"content-length"])))["accepted"])
        w.close()
        return n

    for run_i in range(args.runs):
        for conns in args.conns:
            for target in ("direct", "agent"):
                opener, req = reqs[target]
                a0, c0 = await accepted(), cpu_s(stack.agent.pid)
                client = h2_client(ctx, origin, req) if target == "direct" and args.http2 else h1_client(opener, req)
                res = await latency_series(client, conns, args.warmup, args.duration)
                cpu = cpu_s(stack.agent.pid) - c0
                opened = await accepted() - a0 - 1 - (conns if target == "direct" else 0)
                slot = results["latency"].setdefault(f"{target} c{conns}", {"samples": [], "errors": [], "runs": []})
                slot["samples"] += res["samples"]
                slot["errors"] += res["errors"]
                n = len(res["samples"])
                slot["runs"].append(
                    {"n": n, "rps": n / args.duration, "p50": pct(res["samples"], 50), "p99": pct(res["samples"], 99)}
                )
                if target == "agent":
                    results["agent_cpu"].setdefault(f"c{conns}", []).append(cpu / max(1, n) * 1e6)
                    results["upstream_conns"].setdefault(f"c{conns}", []).append(opened)
                if args.verbose:
                    r = slot["runs"][-1]
                    print(
                        f"run {run_i + 1} {target} c{conns}: {r['rps']:,.0f} req/s p50 {r['p50']:.0f} µs "
                        f"p99 {r['p99']:.0f} µs errors {len(res['errors'])}, upstream connections opened {opened}",
                        file=sys.stderr,
                    )
    per = max(1, args.events // args.runs)
    for run_i in range(args.runs):
        for target in ("direct", "agent"):
            opener, _ = reqs[target]
            path = f"/v1/sse?n={per}&gap_us={args.gap_us}"
            if target == "direct":
                req = f"GET {path} HTTP/1.1\r\n".encode() + host + auth + b"\r\n"
            else:
                req = f"GET /v1/egress/{ROUTE}{path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            if target == "direct" and args.http2:
                res = await sse_series_h2(ctx, origin, req, per)
            else:
                res = await sse_series(opener, req, per)
            slot = results["sse"].setdefault(target, {"samples": [], "errors": []})
            slot["samples"] = sorted(slot["samples"] + res["samples"])
            slot["errors"] += res["errors"]
            if args.verbose:
                s = res["samples"]
                print(f"sse run {run_i + 1} {target}: p50 {pct(s, 50):.0f} µs p99 {pct(s, 99):.0f} µs", file=sys.stderr)
    for slot in results["latency"].values():
        slot["samples"].sort()
    return results


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lat = results["latency"]
    out = [
        "| conns | path | requests | req/s (median run) | p50 | p99 | added p50 | added p99 | agent CPU per request | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conns in args.conns:
        d, a = lat[f"direct c{conns}"], lat[f"agent c{conns}"]
        for name, slot in (("direct", d), ("agent", a)):
            rps = sorted(r["rps"] for r in slot["runs"])[len(slot["runs"]) // 2]
            s = slot["samples"]
            if name == "agent":
                added = f"**{pct(s, 50) - pct(d['samples'], 50):+.0f} µs** | **{pct(s, 99) - pct(d['samples'], 99):+.0f} µs**"
                cpus = sorted(results["agent_cpu"][f"c{conns}"])
                cpu = f"{cpus[len(cpus) // 2]:.0f} µs"
            else:
                added, cpu = "- | -", "-"
            out.append(
                f"| {conns} | {name} | {len(s):,} | {rps:,.0f} | {pct(s, 50):.0f} µs | {pct(s, 99):.0f} µs | "
                f"{added} | {cpu} | {len(slot['errors'])} |"
            )
    out += ["", "| SSE, 1 connection | events | p50 | p99 | max | added p50 | added p99 | errors |"]
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    d = results["sse"]["direct"]["samples"]
    for name in ("direct", "agent"):
        slot = results["sse"][name]
        s = slot["samples"]
        added = (
            f"**{pct(s, 50) - pct(d, 50):+.0f} µs** | **{pct(s, 99) - pct(d, 99):+.0f} µs**"
            if name == "agent"
            else "- | -"
        )
        out.append(
            f"| {name} | {len(s)} | {pct(s, 50):.0f} µs | {pct(s, 99):.0f} µs | {pct(s, 100):.0f} µs | {added} | "
            f"{len(slot['errors'])} |"
        )
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:] == ["--http2"])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="rounds of alternated series (default 3)")
    ap.add_argument("--conns", default="1,16", help="connection counts (default 1,16)")
    ap.add_argument("-d", "--duration", type=float, default=2.0, help="measured seconds per series (default 2)")
    ap.add_argument("-W", "--warmup", type=float, default=0.5, help="warm-up seconds per series (default 0.5)")
    ap.add_argument("--events", type=int, default=500, help="SSE events per path, over all runs (default 500)")
    ap.add_argument("--gap-us", type=int, default=3000, help="µs between SSE events (default 3000)")
    ap.add_argument("--vault-edge", default=str(Path(sys.executable).parent / "vault-edge"), help="the CLI to run")
    ap.add_argument("--agent-prefix", default="", help="run the agent under this (e.g. 'python -m cProfile -o F')")
    ap.add_argument("--http2", action="store_true", help="the upstream speaks HTTP/2 only (ALPN h2)")
    ap.add_argument("--out", help="write the summary (no raw samples) as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each series as it ends")
    args = ap.parse_args()
    args.conns = [int(c) for c in args.conns.split(",")]
    import uvloop

    stack = Stack([args.vault_edge], args.verbose, shlex.split(args.agent_prefix), args.http2)
    load0 = os.getloadavg()
    try:
        stack.start()
        results = uvloop.run(run(stack, args))
    finally:
        stack.close()
    load1 = os.getloadavg()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"bench/egress.py{' --http2' if args.http2 else ''} --runs {args.runs} -d {args.duration:g} -W {args.warmup:g} --events {args.events} "
        f"--gap-us {args.gap_us}, {when}, {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
        f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}\n"
    )
    print(table(results, args))
    if args.out:
        summary = {
            "load_start": load0,
            "load_end": load1,
            "latency": {k: {"runs": v["runs"], "errors": v["errors"][:5]} for k, v in results["latency"].items()},
            "sse": {k: {"p50": pct(v["samples"], 50), "p99": pct(v["samples"], 99)} for k, v in results["sse"].items()},
        }
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
