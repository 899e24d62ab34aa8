// workerd end to end: the example host config (deploy/workerd/config.capnp) with its two tenant
// workers, run by a real workerd against a real agent with a token policy. Skipped when no workerd
// binary is found ($WORKERD, agents/js/node_modules/.bin/workerd, or PATH; `npm install --no-save
// workerd` in agents/js fetches one).
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, test } from "node:test";

import { REPO, Stack, findWorkerd, launch, stopProcess, waitFor } from "../testing/stack.mjs";

const WORKERD = findWorkerd();
const skip = WORKERD ? false : "no workerd binary ($WORKERD, agents/js/node_modules/.bin/workerd or PATH)";

let stack, agent, tokens;
const ports = {};

/** Copy the files a config embeds into `root`, keeping the repository's layout so `embed` paths hold. */
function mirror(root, files) {
  for (const rel of files) {
    mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
    copyFileSync(path.join(REPO, rel), path.join(root, rel));
  }
}

function writeTokens(dir) {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  // no trailing newline: the file's bytes are the header value
  writeFileSync(path.join(dir, "tenant-a"), tokens.a.token, { mode: 0o600 });
  writeFileSync(path.join(dir, "tenant-b"), tokens.b.token, { mode: 0o600 });
}

/** Start workerd on `config` with its sockets on ephemeral ports (read back on --control-fd). */
async function startWorkerd(name, config, sockets, externals) {
  const args = ["serve", path.basename(config), "--control-fd", "3"];
  for (const s of sockets) args.push("--socket-addr", `${s}=127.0.0.1:0`);
  for (const e of externals) args.push("--external-addr", `${e}=unix:${agent.socket}`);
  const proc = launch(WORKERD, args, {
    cwd: path.dirname(config), logPath: path.join(stack.dir, `${name}.log`),
    stdio: ["ignore", "pipe", "pipe", "pipe"],
  });
  const out = [];
  proc.stdout.on("data", (d) => out.push(d));
  proc.stderr.on("data", (d) => out.push(d));
  stack.procs.push(proc);
  const found = {};
  const lines = createInterface({ input: proc.stdio[3] });
  lines.on("line", (line) => {
    const ev = JSON.parse(line);
    if (ev.event === "listen") found[ev.socket] = ev.port;
  });
  await waitFor(() => {
    if (proc.exitCode !== null) throw new Error(`workerd exited: ${Buffer.concat(out).toString().slice(-2000)}`);
    return sockets.every((s) => found[s]);
  }, { what: `workerd ${name} listening` });
  return found;
}

async function call(port, p = "/") {
  const res = await fetch(`http://127.0.0.1:${port}${p}`);
  return { status: res.status, body: await res.json() };
}

describe("workerd", { skip }, () => {
  before(async () => {
    stack = await new Stack().start();
    await stack.cli(["region", "create", "eu"]);
    await Promise.all([
      stack.put("tenant-a/openai", "sk-a-0123456789"),
      stack.put("tenant-b/openai", "sk-b-01234"),
      stack.put("host/only", "root-stuff"),
    ]);
    const [a, b] = await Promise.all([stack.agentToken(), stack.agentToken()]);
    tokens = { a, b };
    agent = await stack.startAgent("wd", { region: "eu", policy: `
[[rule]]
token_sha256 = "${a.token_sha256}"
secrets = ["tenant-a/*"]

[[rule]]
token_sha256 = "${b.token_sha256}"
secrets = ["tenant-b/*"]
` });
    const root = path.join(stack.dir, "tree");
    mirror(root, ["deploy/workerd/config.capnp", "deploy/workerd/worker.js", "agents/js/vault-edge.mjs",
      "agents/js/workerd.js", "agents/js/testing/workerd/forge.capnp", "agents/js/testing/workerd/forge-worker.js"]);
    writeTokens(path.join(root, "deploy/workerd/tokens"));
    writeTokens(path.join(root, "agents/js/testing/workerd/tokens"));
    const externals = ["vault-tenant-a", "vault-tenant-b"];
    const [example, forge] = await Promise.all([
      startWorkerd("workerd", path.join(root, "deploy/workerd/config.capnp"), ["tenant-a", "tenant-b"], externals),
      startWorkerd("workerd-forge", path.join(root, "agents/js/testing/workerd/forge.capnp"), ["forger"],
        ["vault-tenant-a"]),
    ]);
    Object.assign(ports, example, forge);
  });

  after(async () => {
    await stack?.stop();
  });

  test("each tenant worker reads its own secret through its binding (metadata only in the answer)", async () => {
    const a = await call(ports["tenant-a"]);
    assert.equal(a.status, 200, JSON.stringify(a.body));
    assert.equal(a.body.name, "tenant-a/openai");
    assert.equal(a.body.version, 1);
    assert.equal(a.body.length, "sk-a-0123456789".length);
    assert.equal(a.body.value, undefined);
    const b = await call(ports["tenant-b"]);
    assert.equal(b.status, 200);
    assert.equal(b.body.name, "tenant-b/openai");
    assert.equal(b.body.length, "sk-b-01234".length);
  });

  test("a tenant cannot read another tenant's or the host's secrets (403 from the agent)", async () => {
    for (const [port, name] of [[ports["tenant-a"], "tenant-b/openai"], [ports["tenant-b"], "tenant-a/openai"],
      [ports["tenant-a"], "host/only"]]) {
      const r = await call(port, `/secret/${name}`);
      assert.equal(r.status, 403, `${name}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error.code, "forbidden");
    }
    assert.deepEqual((await call(ports["tenant-a"], "/names")).body, { names: ["tenant-a/openai"] });
    assert.deepEqual((await call(ports["tenant-b"], "/names")).body, { names: ["tenant-b/openai"] });
    assert.equal((await call(ports["tenant-a"], "/secret/tenant-a/missing")).status, 404);
  });

  test("a worker cannot swap in another tenant's token: the binding's injected header wins", async () => {
    const stolen = await call(ports.forger, "/tenant-b/openai");
    assert.equal(stolen.status, 403, JSON.stringify(stolen.body));
    const own = await call(ports.forger, "/tenant-a/openai");
    assert.equal(own.status, 200, "judged as tenant A");
  });

  test("a rotation reaches the worker on its next request", async () => {
    await stack.rotate("tenant-a/openai", "sk-a-rotated-value-longer");
    const r = await waitFor(async () => {
      const x = await call(ports["tenant-a"]);
      return x.body.version === 2 && x;
    }, { timeout: 15000, what: "the rotated version through workerd" });
    assert.equal(r.body.length, "sk-a-rotated-value-longer".length);
  });

  test("agent down: the worker's client reports unreachable (502 from the example worker)", async () => {
    await stopProcess(agent.proc);
    const r = await call(ports["tenant-a"]);
    assert.equal(r.status, 502, JSON.stringify(r.body));
    assert.equal(r.body.error.code, "unreachable");
  });
});
