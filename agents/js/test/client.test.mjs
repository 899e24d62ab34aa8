// The JS client against a real control plane and a real agent (no policy file: the agent's own uid
// reads everything, as the Python client's tests do). Run: node --test agents/js/test/
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { inspect } from "node:util";

import { Secret, VaultEdgeClient, VaultEdgeError, b64urlDecode } from "../vault-edge.mjs";
import { Stack } from "../testing/stack.mjs";

const BINARY = Uint8Array.from([0x00, 0xff, 0xfe, 0x80, 0x0a, 0x7f, 0xc3, 0x28, 0x01]); // not UTF-8
const UNICODE = "clé-секрет-鍵-🔑";

let stack, agent, client;

before(async () => {
  stack = await new Stack().start();
  await stack.cli(["region", "create", "eu"]);
  await stack.put("app/key", "sk-one");
  await stack.rotate("app/key", "sk-two", ["--grace", "1h"]); // v1 stays readable as previous
  await stack.put("app/unicode", UNICODE);
  await stack.put("app/bin", BINARY);
  await stack.put("__proto__", "not-a-prototype");
  await stack.put("db/main", JSON.stringify({ username: "app_a", password: "pw-1", port: 5432 }));
  agent = await stack.startAgent("a1", { region: "eu" });
  client = new VaultEdgeClient({ socket: agent.socket });
});

after(async () => {
  await client?.close();
  await stack?.stop();
});

describe("reads", () => {
  test("get: the current version, its metadata and the Age header", async () => {
    const s = await client.get("app/key");
    assert.ok(s instanceof Secret);
    assert.equal(s.name, "app/key");
    assert.equal(s.value, "sk-two");
    assert.deepEqual(s.bytes, new TextEncoder().encode("sk-two"));
    assert.equal(s.version, 2);
    assert.equal(s.stage, "current");
    assert.equal(typeof s.revision, "number");
    assert.ok(Number.isInteger(s.age) && s.age >= 0, `age ${s.age}`);
  });

  test("get one field of a structured value", async () => {
    assert.equal((await client.get("db/main", { field: "password" })).value, "pw-1");
    assert.equal((await client.get("db/main", { field: "port" })).value, "5432");
    await assert.rejects(client.get("db/main", { field: "nope" }), (e) => e instanceof VaultEdgeError && e.status === 404);
  });

  test("get by stage and by version", async () => {
    const prev = await client.get("app/key", { stage: "previous" });
    assert.equal(prev.value, "sk-one");
    assert.equal(prev.version, 1);
    assert.equal(prev.stage, "previous");
    const v1 = await client.get("app/key", { version: 1 });
    assert.equal(v1.value, "sk-one");
    assert.equal(v1.version, 1);
    const cur = await client.get("app/key", { stage: "current" });
    assert.equal(cur.version, 2);
  });

  test("UTF-8 text comes back exactly, as value and as bytes", async () => {
    const s = await client.get("app/unicode");
    assert.equal(s.value, UNICODE);
    assert.deepEqual(s.bytes, new TextEncoder().encode(UNICODE));
  });

  test("binary values (sent base64url) come back as exact bytes; .value refuses", async () => {
    const s = await client.get("app/bin");
    assert.ok(s.bytes instanceof Uint8Array);
    assert.deepEqual([...s.bytes], [...BINARY]);
    assert.throws(() => s.value, (e) => e instanceof VaultEdgeError && e.code === "binary_value" &&
      !e.message.includes("\u0000"));
  });

  test("getMany: one round trip, keyed by name, prototype-safe", async () => {
    const many = await client.getMany(["app/key", "app/bin", "__proto__"]);
    assert.deepEqual(Object.keys(many).sort(), ["__proto__", "app/bin", "app/key"]);
    assert.equal(many["app/key"].value, "sk-two");
    assert.deepEqual([...many["app/bin"].bytes], [...BINARY]);
    assert.equal(many["__proto__"].value, "not-a-prototype");
    assert.equal(Object.getPrototypeOf(many), null);
    assert.equal(many["app/key"].revision, many["app/bin"].revision, "one revision for the batch");
  });

  test("getMany is all or nothing: one missing name fails the batch with 404", async () => {
    await assert.rejects(client.getMany(["app/key", "app/missing"]),
      (e) => e instanceof VaultEdgeError && e.status === 404 && e.code === "not_found");
  });

  test("names and health", async () => {
    assert.deepEqual((await client.names()).sort(), ["__proto__", "app/bin", "app/key", "app/unicode", "db/main"]);
    const h = await client.health();
    assert.equal(h.status, "ok");
    assert.equal(h.region, "eu");
    assert.match(h.node, /^n-[0-9a-f]{16}$/);
    assert.equal(h.secrets, 5);
    assert.equal(typeof h.revision, "number");
  });
});

describe("errors", () => {
  test("404 not_found, with the agent's code and message", async () => {
    await assert.rejects(client.get("app/nope"), (e) => {
      assert.ok(e instanceof VaultEdgeError);
      assert.ok(e instanceof Error);
      assert.equal(e.status, 404);
      assert.equal(e.code, "not_found");
      assert.match(e.message, /app\/nope/);
      return true;
    });
    await assert.rejects(client.get("app/key", { version: 99 }), (e) => e.status === 404 && e.code === "not_found");
    await assert.rejects(client.get("app/unicode", { stage: "pending" }), (e) => e.status === 404);
  });

  test("400 bad_request for an invalid name, a bad stage, version and stage together", async () => {
    for (const call of [
      () => client.get("../etc/passwd"),
      () => client.get("app/key", { stage: "bogus" }),
      () => client.get("app/key", { version: 1, stage: "current" }),
      () => client.get("app/key", { version: 0 }),
    ]) {
      await assert.rejects(call(), (e) => e instanceof VaultEdgeError && e.status === 400 && e.code === "bad_request");
    }
  });

  test("no agent at the socket: status 0, code unreachable, the path in the message", async () => {
    const c = new VaultEdgeClient({ socket: `${stack.dir}/nobody.sock` });
    await assert.rejects(c.get("app/key"), (e) => e instanceof VaultEdgeError && e.status === 0 &&
      e.code === "unreachable" && e.message.includes("nobody.sock"));
    await c.close();
  });

  test("values never show in inspect, JSON, spread or String()", async () => {
    const s = await client.get("app/key");
    for (const shown of [inspect(s), JSON.stringify(s), inspect({ ...s }), String(s), inspect([s], { depth: 5 }),
      inspect(await client.getMany(["app/key"]), { depth: 5, showHidden: true })]) {
      assert.ok(!shown.includes("sk-two"), `value leaked in: ${shown}`);
    }
    assert.match(inspect(s), /redacted/);
    assert.deepEqual(JSON.parse(JSON.stringify(s)), { name: "app/key", version: 2, stage: "current",
      revision: s.revision, age: s.age });
  });
});

describe("connections", () => {
  test("keep-alive: many reads, one connection", async () => {
    const c = new VaultEdgeClient({ socket: agent.socket });
    for (let i = 0; i < 20; i++) await c.get("app/key");
    await c.names();
    await c.health();
    const stats = c.stats;
    assert.equal(stats.requests, 22);
    assert.equal(stats.connections, 1);
    await c.close();
  });

  test("concurrent reads all answer correctly", async () => {
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) =>
      client.get(i % 2 ? "app/key" : "app/unicode")));
    results.forEach((s, i) => assert.equal(s.value, i % 2 ? "sk-two" : UNICODE));
  });

  test("socket from VAULT_EDGE_SOCKET when none is given", async () => {
    const saved = process.env.VAULT_EDGE_SOCKET;
    process.env.VAULT_EDGE_SOCKET = agent.socket;
    try {
      const c = new VaultEdgeClient();
      assert.equal(c.socket, agent.socket);
      assert.equal((await c.get("app/key")).value, "sk-two");
      await c.close();
    } finally {
      if (saved === undefined) delete process.env.VAULT_EDGE_SOCKET;
      else process.env.VAULT_EDGE_SOCKET = saved;
    }
  });
});

describe("rotation", () => {
  test("watch returns when a rotation reaches the agent; the next get sees it", async () => {
    const before = (await client.health()).revision;
    const quiet = await client.watch(before, 0.2);
    assert.deepEqual(quiet, { revision: before, changed: false });

    const watching = client.watch(before, 20);
    const t0 = Date.now();
    await stack.rotate("app/unicode", "rotated-✓");
    const w = await watching;
    assert.equal(w.changed, true);
    assert.ok(w.revision > before);
    assert.ok(Date.now() - t0 < 15000);
    const s = await client.get("app/unicode");
    assert.equal(s.value, "rotated-✓");
    assert.equal(s.version, 2);
    assert.ok(s.revision >= w.revision);
    assert.equal((await client.get("app/unicode", { stage: "previous" })).value, UNICODE);
  });

  test("pending stage: staged, not current", async () => {
    const rev = (await client.health()).revision;
    const watching = client.watch(rev, 20);
    await stack.rotate("app/key", "sk-three", ["--stage", "pending"]);
    assert.equal((await watching).changed, true);
    const pending = await client.get("app/key", { stage: "pending" });
    assert.equal(pending.value, "sk-three");
    assert.equal(pending.stage, "pending");
    assert.equal((await client.get("app/key")).value, "sk-two");
  });

  test("a kept-alive connection survives the agent restarting (served from its disk cache)", async () => {
    const c = new VaultEdgeClient({ socket: agent.socket });
    assert.equal((await c.get("app/key")).value, "sk-two");
    await stack.restartAgent(agent);
    assert.equal((await c.get("app/key")).value, "sk-two");
    await c.close();
  });
});

test("b64urlDecode is strict", () => {
  assert.deepEqual([...b64urlDecode("AP_-")], [0x00, 0xff, 0xfe]);
  assert.deepEqual([...b64urlDecode("")], []);
  for (const bad of ["AP+/", "A", "AP_-=", "a b"]) {
    assert.throws(() => b64urlDecode(bad), (e) => e.code === "bad_response");
  }
});
