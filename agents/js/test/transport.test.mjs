// Transport edge cases that a healthy agent does not produce on demand, against small scripted
// servers on a unix socket: a kept-alive connection closed under the client, non-JSON answers,
// a silent server (timeout), and the fetch transport that workerd bindings use.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { VaultEdgeClient, VaultEdgeError } from "../vault-edge.mjs";
import { vaultEdge } from "../workerd.js";

let dir;
before(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), "ve-js-t-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const DOC = JSON.stringify({ name: "a", value: "v", encoding: "utf-8", version: 1, stage: "current", revision: 7 });

function answer(status, body, extra = "") {
  return `HTTP/1.1 ${status} X\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
    `Age: 3\r\n${extra}\r\n${body}`;
}

/** A unix-socket server calling `onRequest(conn, index on that connection, head)` per request head. */
async function scripted(name, onRequest) {
  const sock = path.join(dir, name);
  const conns = [];
  const server = net.createServer((conn) => {
    conns.push(conn);
    let buf = "", n = 0;
    conn.on("data", (d) => {
      buf += d;
      let end;
      while ((end = buf.indexOf("\r\n\r\n")) >= 0) {
        const head = buf.slice(0, end);
        buf = buf.slice(end + 4);
        onRequest(conn, n++, head);
      }
    });
    conn.on("error", () => {});
  });
  await new Promise((r) => server.listen(sock, r));
  return { sock, conns, close: () => new Promise((r) => { conns.forEach((c) => c.destroy()); server.close(r); }) };
}

test("a kept-alive connection dropped by the agent is retried once, on a new connection", async (t) => {
  // first connection: answers once, then drops the connection at the next request (no answer)
  const srv = await scripted("drop.sock", (conn, i) => {
    if (srv.conns.length === 1 && i === 1) conn.destroy();
    else conn.write(answer(200, DOC));
  });
  t.after(() => srv.close());
  const c = new VaultEdgeClient({ socket: srv.sock });
  t.after(() => c.close());
  assert.equal((await c.get("a")).value, "v");
  const s = await c.get("a");
  assert.equal(s.value, "v");
  assert.equal(s.age, 3);
  assert.deepEqual(c.stats, { requests: 3, connections: 2, retries: 1 });
});

test("a fresh connection that fails is not retried", async (t) => {
  const srv = await scripted("drop-all.sock", (conn) => conn.destroy());
  t.after(() => srv.close());
  const c = new VaultEdgeClient({ socket: srv.sock });
  t.after(() => c.close());
  await assert.rejects(c.get("a"), (e) => e instanceof VaultEdgeError && e.status === 0 && e.code === "unreachable");
  assert.equal(c.stats.retries, 0);
});

test("error answers that are not the agent's JSON shape; 200 that is not JSON", async (t) => {
  const srv = await scripted("odd.sock", (conn, i, head) => {
    if (head.includes("/v1/secrets/html")) conn.write(answer(502, "<html>secret-ish body</html>"));
    else if (head.includes("/v1/secrets/shape")) conn.write(answer(500, JSON.stringify({ detail: "x" })));
    else if (head.includes("names=")) conn.write(answer(200, "{}"));
    else if (head.includes("/v1/secrets/half")) conn.write(answer(200, JSON.stringify({ name: "half" })));
    else conn.write(answer(200, "not json"));
  });
  t.after(() => srv.close());
  const c = new VaultEdgeClient({ socket: srv.sock });
  t.after(() => c.close());
  await assert.rejects(c.get("html"), (e) => e.status === 502 && e.code === "error" && e.message === "HTTP 502");
  await assert.rejects(c.get("shape"), (e) => e.status === 500 && e.code === "error");
  await assert.rejects(c.get("x"), (e) => e.status === 200 && e.code === "bad_response" &&
    !e.message.includes("not json"));
  await assert.rejects(c.getMany(["a"]), (e) => e.code === "bad_response");
  await assert.rejects(c.get("half"), (e) => e.code === "bad_response");
});

test("a silent agent times out (status 0), after the client's timeout", async (t) => {
  const srv = await scripted("silent.sock", () => {});
  t.after(() => srv.close());
  const c = new VaultEdgeClient({ socket: srv.sock, timeout: 0.3 });
  t.after(() => c.close());
  const t0 = Date.now();
  await assert.rejects(c.get("a"), (e) => e.status === 0 && e.code === "unreachable" && /ETIMEDOUT/.test(e.message));
  assert.ok(Date.now() - t0 >= 250);
});

test("requests carry the token header, the escaped name and the query", async (t) => {
  const heads = [];
  const srv = await scripted("echo.sock", (conn, i, head) => {
    heads.push(head);
    conn.write(answer(200, head.includes("names=") ? `{"secrets":[${DOC}]}` : DOC));
  });
  t.after(() => srv.close());
  const c = new VaultEdgeClient({ socket: srv.sock, token: "tok-123" });
  t.after(() => c.close());
  await c.get("dir/name", { version: 3 });
  await c.get("dir/name", { stage: "previous" });
  await c.getMany(["a", "b/c"]);
  await assert.rejects(c.getMany("a"), TypeError);
  assert.match(heads[0], /^GET \/v1\/secrets\/dir\/name\?version=3 HTTP\/1\.1\r\n/);
  assert.match(heads[0], /\r\nX-Vault-Edge-Token: tok-123(\r\n|$)/i);
  assert.match(heads[1], /^GET \/v1\/secrets\/dir\/name\?stage=previous /);
  assert.match(heads[2], /^GET \/v1\/secrets\?names=a%2Cb%2Fc /);
  assert.ok(heads.every((h) => !/content-length|transfer-encoding/i.test(h)), "GETs carry no body framing");
  assert.throws(() => new VaultEdgeClient({ socket: srv.sock, token: "bad token\r\nX: y" }),
    (e) => e instanceof TypeError && !e.message.includes("bad token"));
});

test("the fetch transport (workerd bindings): same answers and errors, through a given fetch", async (t) => {
  const seen = [];
  const fakeBinding = {
    async fetch(url, init) {
      seen.push({ url, headers: init.headers });
      if (url.endsWith("/v1/secrets/missing")) {
        return new Response(JSON.stringify({ error: { code: "not_found", message: "no secret 'missing'" } }),
          { status: 404 });
      }
      if (url.endsWith("/v1/secrets/down")) throw new TypeError("fetch failed");
      return new Response(DOC, { headers: { Age: "4" } });
    },
  };
  const c = vaultEdge(fakeBinding);
  const s = await c.get("a");
  assert.equal(s.value, "v");
  assert.equal(s.age, 4);
  assert.equal(seen[0].url, "http://vault-edge/v1/secrets/a");
  assert.equal(seen[0].headers["X-Vault-Edge-Token"], undefined, "the binding injects the token, not the worker");
  await assert.rejects(c.get("missing"), (e) => e.status === 404 && e.code === "not_found");
  await assert.rejects(c.get("down"), (e) => e.status === 0 && e.code === "unreachable" &&
    e.message.includes("service binding"));
  assert.equal(c.stats.connections, null);
  assert.throws(() => vaultEdge({}), TypeError);
});
