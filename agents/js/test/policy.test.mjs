// Capability tokens (X-Vault-Edge-Token) against a real agent run with a policy file: the token
// rules of vault_edge/agent/policy.py, seen from the JS client.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { VaultEdgeClient, VaultEdgeError } from "../vault-edge.mjs";
import { Stack } from "../testing/stack.mjs";

let stack, agent, tokenA, tokenB;
const clients = [];
const open = (token) => {
  const c = new VaultEdgeClient({ socket: agent.socket, token });
  clients.push(c);
  return c;
};
const forbidden = (e) => e instanceof VaultEdgeError && e.status === 403 && e.code === "forbidden";

before(async () => {
  stack = await new Stack().start();
  await stack.cli(["region", "create", "eu"]);
  await Promise.all([
    stack.put("tenant-a/openai", "sk-a-secret"),
    stack.put("tenant-a/db", "pw-a"),
    stack.put("tenant-b/openai", "sk-b-secret"),
    stack.put("shared/flag", "on"),
  ]);
  [tokenA, tokenB] = await Promise.all([stack.agentToken(), stack.agentToken()]);
  assert.match(tokenA.token_sha256, /^[0-9a-f]{64}$/);
  const uid = process.getuid();
  // Kernel identity (this test's uid) may read shared/* only; each token its tenant's names.
  const policy = `
[[rule]]
uid = ${uid}
secrets = ["shared/*"]

[[rule]]
token_sha256 = "${tokenA.token_sha256}"
secrets = ["tenant-a/*"]

[[rule]]
token_sha256 = "${tokenB.token_sha256}"
secrets = ["tenant-b/*", "shared/*"]
`;
  agent = await stack.startAgent("pol", { region: "eu", policy });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await stack?.stop();
});

describe("token rules", () => {
  test("no token: judged by uid rules only, so a tenant's secret is 403", async () => {
    const c = open();
    await assert.rejects(c.get("tenant-a/openai"), forbidden);
    assert.equal((await c.get("shared/flag")).value, "on");
    assert.deepEqual(await c.names(), ["shared/flag"]);
  });

  test("a wrong token: 403, even for what the caller's uid may read", async () => {
    const c = open("not-a-real-token");
    await assert.rejects(c.get("tenant-a/openai"), forbidden);
    await assert.rejects(c.get("shared/flag"), forbidden);
    await assert.rejects(c.names(), forbidden);
    await assert.rejects(c.getMany(["shared/flag"]), forbidden);
  });

  test("the right token: 200 for its patterns, 403 elsewhere", async () => {
    const a = open(tokenA.token);
    const s = await a.get("tenant-a/openai");
    assert.equal(s.value, "sk-a-secret");
    assert.equal(s.version, 1);
    const many = await a.getMany(["tenant-a/openai", "tenant-a/db"]);
    assert.equal(many["tenant-a/db"].value, "pw-a");
    await assert.rejects(a.get("tenant-b/openai"), forbidden);
    await assert.rejects(a.get("shared/flag"), forbidden, "a token does not inherit the uid's rules");
    await assert.rejects(a.getMany(["tenant-a/openai", "tenant-b/openai"]), forbidden, "a batch is all or nothing");
    assert.deepEqual((await a.names()).sort(), ["tenant-a/db", "tenant-a/openai"]);

    const b = open(tokenB.token);
    assert.equal((await b.get("tenant-b/openai")).value, "sk-b-secret");
    assert.equal((await b.get("shared/flag")).value, "on");
    await assert.rejects(b.get("tenant-a/openai"), forbidden);
    assert.deepEqual((await b.names()).sort(), ["shared/flag", "tenant-b/openai"]);
  });

  test("a forbidden name is 403 whether or not it exists (no probing)", async () => {
    const a = open(tokenA.token);
    await assert.rejects(a.get("tenant-b/does-not-exist"), forbidden);
    await assert.rejects(a.get("tenant-a/does-not-exist"), (e) => e.status === 404 && e.code === "not_found");
  });

  test("errors name the secret, never its value", async () => {
    const a = open(tokenA.token);
    const err = await a.get("tenant-b/openai").catch((e) => e);
    assert.ok(forbidden(err));
    assert.ok(!err.message.includes("sk-b"), err.message);
    assert.ok(!JSON.stringify(err).includes("sk-b"));
  });

  test("health answers any caller (it holds no values)", async () => {
    assert.equal((await open("not-a-real-token").health()).status, "ok");
  });
});
