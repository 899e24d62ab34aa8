"""Keyless workers in a real workerd: one worker calls the upstream with a plain ``fetch`` through
``globalOutbound`` (the agent as its forward proxy, ``style = proxy``), another through a service
binding to the agent's socket (``/v1/egress/{route}/...``); each binding injects its own token. The
upstream gets the key; the workers never see it, in what they receive or in the agent's log.

Needs a workerd binary ($WORKERD, agents/js/node_modules/.bin/workerd or PATH); skipped without one
(tests/agents_js installs it under CI)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent.egress_upstream import Upstream, make_ca
from tests.conftest import IN_CI, free_port, stop_process
from tests.e2e.conftest import ControlPlane

KEY = "sk-live-workerd-0123456789"
TOKENS = {"proxy": "token-of-the-proxy-worker-0001", "binding": "token-of-the-binding-worker-02"}

WORKER = """
export default {
  async fetch(req, env) {
    const url = new URL(req.url);
    const r = url.pathname === "/proxy"
      ? await fetch(env.UPSTREAM + "/v1/echo", {method: "POST", body: "{}", headers: {"Authorization": "Bearer mine"}})
      : await env.AGENT.fetch("http://agent/v1/egress/openai/v1/echo", {method: "POST", body: "{}"});
    const forbidden = await fetch("https://api.example.com/v1/ok").then(x => x.status, e => "error " + e);
    return Response.json({status: r.status, headers: [...r.headers], body: await r.text(), forbidden});
  }
};
"""


def _workerd_or_skip() -> str:
    """A workerd binary: found, or (under CI, or VAULT_EDGE_INSTALL_WORKERD=1) installed from the npm
    registry as the JS client's tests do; under CI a missing one fails the run, never a silent skip."""
    from tests.agents_js.test_js_client import WORKERD_VERSION, _install_workerd, _workerd

    workerd, why = _workerd(), "not attempted outside CI"
    if workerd is None and (IN_CI or os.environ.get("VAULT_EDGE_INSTALL_WORKERD") == "1"):
        why = _install_workerd()
        workerd = _workerd()
    if workerd is None:
        message = (
            f"no workerd binary ($WORKERD, agents/js/node_modules/.bin/workerd or PATH; install: {why}); "
            f"`npm install --no-save workerd@{WORKERD_VERSION}` in agents/js provides one"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return workerd


def test_workerd_workers_call_the_upstream_without_the_key(
    control_plane: ControlPlane, start_agent: Any, workdir: Path
) -> None:
    workerd = _workerd_or_skip()
    pki = workdir / "pki"
    pki.mkdir()
    ca, cert, key = make_ca(pki)
    upstream = Upstream(cert, key)
    proc = None
    try:
        op = control_plane.op
        op.put("openai/api-key", value=KEY, regions=["eu"])
        op.request(
            "POST",
            "/v1/egress",
            json={
                "name": "openai",
                "upstream": upstream.url,
                "secret": "openai/api-key",
                "inject": ["header:Authorization=Bearer {value}"],
            },
        )
        policy = workdir / "policy.toml"
        policy.write_text(
            "".join(
                f'[[rule]]\ntoken_sha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\negress = ["openai"]\n\n'
                for t in TOKENS.values()
            )
        )
        agent = start_agent("eu1", "eu", "--policy", str(policy), "--egress-ca", str(ca))
        port, port2 = free_port(), free_port()
        (workdir / "worker.js").write_text(WORKER)
        sock = agent.socket
        (workdir / "config.capnp").write_text(f"""
using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "proxy", worker = .proxied),
    (name = "binding", worker = .bound),
    (name = "agent-proxy", external = (address = "unix:{sock}",
      http = (style = proxy, injectRequestHeaders = [(name = "X-Vault-Edge-Token", value = "{TOKENS["proxy"]}")]))),
    (name = "agent-binding", external = (address = "unix:{sock}",
      http = (injectRequestHeaders = [(name = "X-Vault-Edge-Token", value = "{TOKENS["binding"]}")]))),
  ],
  sockets = [
    (name = "proxy", address = "127.0.0.1:{port}", http = (), service = "proxy"),
    (name = "binding", address = "127.0.0.1:{port2}", http = (), service = "binding"),
  ],
);
const proxied :Workerd.Worker = (
  modules = [(name = "worker.js", esModule = embed "worker.js")], compatibilityDate = "2025-06-01",
  globalOutbound = "agent-proxy",
  bindings = [(name = "UPSTREAM", text = "{upstream.url}"), (name = "AGENT", service = "agent-proxy")],
);
const bound :Workerd.Worker = (
  modules = [(name = "worker.js", esModule = embed "worker.js")], compatibilityDate = "2025-06-01",
  globalOutbound = "agent-proxy",
  bindings = [(name = "UPSTREAM", text = "{upstream.url}"), (name = "AGENT", service = "agent-binding")],
);
""")
        with open(workdir / "workerd.log", "wb") as log:
            proc = subprocess.Popen(
                [workerd, "serve", str(workdir / "config.capnp")], stdout=log, stderr=subprocess.STDOUT
            )
        results = {}
        for name, p, path in (("proxy", port, "/proxy"), ("binding", port2, "/binding")):
            deadline = time.monotonic() + 30
            while True:
                try:
                    r = httpx.get(f"http://127.0.0.1:{p}{path}", timeout=20)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline, (workdir / "workerd.log").read_text()
                    time.sleep(0.2)
            assert r.status_code == 200, (r.text, (workdir / "workerd.log").read_text()[-2000:], agent.log()[-2000:])
            results[name] = r.text
            doc = json.loads(r.text)
            assert doc["status"] == 200, doc
            got = {k.lower(): v for k, v in json.loads(doc["body"])["headers"]}
            assert got["authorization"] == "Bearer " + "*" * len(KEY)  # the upstream's echo, scrubbed
            assert doc["forbidden"] == 403  # a host no route names
            seen = upstream.last()
            assert seen.header("Authorization") == [f"Bearer {KEY}"] and seen.header("X-Vault-Edge-Token") == []
        assert all(KEY not in text for text in results.values())
        agent.stop()
        assert KEY not in agent.log()
    finally:
        stop_process(proc)
        upstream.close()
