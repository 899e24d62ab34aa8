// vault-edge worker client for JavaScript runtimes: reads secrets from the local vault-edge agent.
//
//   import { VaultEdgeClient } from "./vault-edge.mjs";
//   const vault = new VaultEdgeClient();                  // socket from VAULT_EDGE_SOCKET
//   const key = (await vault.get("openai/api-key")).value; // one round trip on the host, no network
//   const many = await vault.getMany(["db/user", "db/password"]);
//
// It mirrors the Python client (vault_edge/client.py): same calls, same error shape, same rules.
// Transports, chosen once per client:
//   Node  node:http with socketPath and a keep-alive Agent            (tested)
//   Bun   fetch(url, { unix: socket }), Bun keeps connections alive    (written, untested here)
//   Deno  fetch(url, { client: Deno.createHttpClient({ proxy: { transport: "unix", path } }) })
//                                                                       (written, untested here)
//   any   a `fetch` you pass in, e.g. a workerd service binding's fetch (see workerd.js; tested)
// No runtime dependencies. Values never appear in errors, logs, JSON or console output of a Secret.

export const DEFAULT_SOCKET = "/run/vault-edge/agent.sock";
export const TOKEN_HEADER = "X-Vault-Edge-Token";
const DEFAULT_TIMEOUT_MS = 5000;
const WATCH_MAX_S = 300;
const INSPECT = Symbol.for("nodejs.util.inspect.custom");
const RETRYABLE = new Set(["ECONNRESET", "EPIPE"]);
const TOKEN_RE = /^[\x21-\x7e]+$/;
const clampMs = (ms) => Math.min(Math.max(Number(ms) || 0, 1), 2 ** 31 - 1); // setTimeout's range

/** An error answer from the agent (`status`, `code`), or no agent answering (status 0). */
export class VaultEdgeError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "VaultEdgeError";
    this.status = status;
    this.code = code;
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });
const B64URL = /^[A-Za-z0-9_-]*$/;

/** Strict unpadded base64url (what the agent sends for values that are not UTF-8). */
export function b64urlDecode(text) {
  if (typeof text !== "string" || !B64URL.test(text) || text.length % 4 === 1) {
    throw new VaultEdgeError(0, "bad_response", "the agent sent an invalid base64url value");
  }
  const std = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const bin = atob(std);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/**
 * One secret version as the agent serves it. `value` (UTF-8 text) and `bytes` are getters over a
 * private field, so neither shows in console.log / util.inspect, JSON.stringify or `{...secret}`.
 */
export class Secret {
  #text;
  #bytes;

  constructor(doc, age) {
    this.name = String(doc.name);
    this.version = Number(doc.version);
    this.stage = String(doc.stage);
    this.revision = Number(doc.revision);
    this.age = age; // seconds since the agent last heard from the control plane (null if unknown)
    if (doc.encoding === "base64") {
      this.#bytes = b64urlDecode(doc.value);
    } else {
      this.#text = String(doc.value);
    }
    Object.freeze(this);
  }

  /** The value as text. Throws (code `binary_value`) when the value is not UTF-8: read `bytes`. */
  get value() {
    if (this.#text === undefined) {
      try {
        this.#text = utf8.decode(this.#bytes);
      } catch {
        throw new VaultEdgeError(0, "binary_value", `secret ${this.name} is not UTF-8 text; read .bytes`);
      }
    }
    return this.#text;
  }

  /** The exact bytes of the value. */
  get bytes() {
    if (this.#bytes === undefined) this.#bytes = new TextEncoder().encode(this.#text);
    return this.#bytes;
  }

  toJSON() {
    return { name: this.name, version: this.version, stage: this.stage, revision: this.revision, age: this.age };
  }

  toString() {
    return `Secret(${this.name} v${this.version} ${this.stage})`;
  }

  [INSPECT]() {
    return `Secret { name: ${JSON.stringify(this.name)}, version: ${this.version}, stage: ${JSON.stringify(this.stage)}, ` +
      `revision: ${this.revision}, age: ${this.age}, value: [redacted] }`;
  }
}

function envVar(name) {
  try {
    if (globalThis.Deno?.env) return globalThis.Deno.env.get(name) ?? undefined;
    return globalThis.process?.env?.[name] || undefined;
  } catch {
    return undefined; // Deno without --allow-env
  }
}

/** The socket path: the argument, else VAULT_EDGE_SOCKET, else /run/vault-edge/agent.sock. */
export function socketPath(path) {
  return path || envVar("VAULT_EDGE_SOCKET") || DEFAULT_SOCKET;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) q.set(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : "";
}

function secretPath(name) {
  if (typeof name !== "string") throw new TypeError("secret name must be a string");
  return "/v1/secrets/" + encodeURIComponent(name).replace(/%2F/gi, "/");
}

// -- transports: request(path, headers, timeoutMs) → { status, header(name), text }

function unreachable(where, err) {
  const why = err?.code || err?.name || "error";
  return new VaultEdgeError(0, "unreachable", `no agent answering at ${where} (${why})`);
}

async function nodeTransport(socket, stats) {
  const http = await import("node:http");
  const agent = new http.Agent({ keepAlive: true, scheduling: "lifo" });
  const request = (path, headers, timeoutMs, retried = false) =>
    new Promise((resolve, reject) => {
      const req = http.request({ socketPath: socket, path, method: "GET", headers, agent }, (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("error", (err) => reject(unreachable(socket, err)));
        res.on("end", () => {
          resolve({
            status: res.statusCode,
            header: (n) => res.headers[n.toLowerCase()] ?? null,
            text: Buffer.concat(chunks).toString("utf8"),
          });
        });
      });
      stats.requests++;
      req.on("socket", () => {
        if (!req.reusedSocket) stats.connections++;
      });
      req.setTimeout(timeoutMs, () => req.destroy(Object.assign(new Error("timeout"), { code: "ETIMEDOUT" })));
      req.on("error", (err) => {
        // A kept-alive connection the agent closed (e.g. it restarted) fails on first use; a GET is
        // safe to send again, once, on a fresh connection (the pattern the Node docs give).
        if (req.reusedSocket && !retried && RETRYABLE.has(err.code)) {
          stats.retries++;
          resolve(request(path, headers, timeoutMs, true));
        } else {
          reject(unreachable(socket, err));
        }
      });
      req.end();
    });
  return { request, close: () => agent.destroy() };
}

function fetchTransport(fetchFn, where, stats, extraInit = {}, close = () => {}) {
  stats.connections = null; // the runtime's fetch pools connections out of our sight
  return {
    close,
    async request(path, headers, timeoutMs) {
      stats.requests++;
      let res, text;
      try {
        const signal = typeof AbortSignal?.timeout === "function" ? AbortSignal.timeout(timeoutMs) : undefined;
        res = await fetchFn(`http://vault-edge${path}`, { method: "GET", headers, signal, ...extraInit });
        text = await res.text();
      } catch (err) {
        throw unreachable(where, err);
      }
      return { status: res.status, header: (n) => res.headers.get(n), text };
    },
  };
}

async function defaultTransport(socket, stats) {
  const Deno = globalThis.Deno;
  if (Deno?.createHttpClient) {
    // Deno 2.x: a fetch client whose every connection goes to the unix socket. Needs --allow-read
    // (and, depending on the Deno version, --allow-net) for the socket path.
    const client = Deno.createHttpClient({ proxy: { transport: "unix", path: socket } });
    return fetchTransport(globalThis.fetch, socket, stats, { client }, () => client.close());
  }
  if (globalThis.Bun) {
    return fetchTransport(globalThis.fetch, socket, stats, { unix: socket }); // Bun pools keep-alive itself
  }
  if (globalThis.process?.versions?.node) {
    return nodeTransport(socket, stats);
  }
  throw new VaultEdgeError(0, "unsupported_runtime",
    "this runtime cannot open a unix socket: pass { fetch } (e.g. a workerd service binding, see workerd.js)");
}

// -- the client

function badShape(what) {
  return new VaultEdgeError(200, "bad_response", `the agent's answer has no valid ${what}`);
}

function secretOf(doc, age) {
  const ok = doc && typeof doc === "object" && typeof doc.name === "string" && typeof doc.value === "string" &&
    Number.isInteger(doc.version) && Number.isInteger(doc.revision);
  if (!ok) throw badShape("secret");
  return new Secret(doc, age);
}

export class VaultEdgeClient {
  /**
   * @param {object} [opts]
   * @param {string} [opts.socket]  agent socket (default: VAULT_EDGE_SOCKET, else /run/vault-edge/agent.sock)
   * @param {string} [opts.token]   capability token, sent as X-Vault-Edge-Token
   * @param {number} [opts.timeout] seconds per request (default 5; watch adds its wait)
   * @param {Function} [opts.fetch] send requests through this fetch instead of a socket (workerd bindings)
   */
  constructor({ socket, token, timeout, fetch } = {}) {
    this.socket = fetch ? "<fetch>" : socketPath(socket);
    this.timeoutMs = timeout !== undefined ? clampMs(timeout * 1000) : DEFAULT_TIMEOUT_MS;
    this.#headers = { Accept: "application/json" };
    if (token) {
      // checked here so that a bad token fails early and by name, never echoed back
      if (typeof token !== "string" || !TOKEN_RE.test(token)) {
        throw new TypeError("token must be visible ASCII (as `vault-edge agent token` makes them)");
      }
      this.#headers[TOKEN_HEADER] = token;
    }
    this.#fetch = fetch;
    Object.defineProperty(this, "socket", { enumerable: true, writable: false });
  }

  #headers;
  #fetch;
  #transport = null;
  #stats = { requests: 0, connections: 0, retries: 0 };

  #open() {
    if (!this.#transport) {
      this.#transport = this.#fetch
        ? Promise.resolve(fetchTransport(this.#fetch, "the service binding", this.#stats))
        : defaultTransport(this.socket, this.#stats);
      this.#transport.catch(() => { this.#transport = null; });
    }
    return this.#transport;
  }

  /**
   * Requests sent, connections opened (Node; null where the runtime's fetch pools them) and requests
   * re-sent after a kept-alive connection turned out closed. Keep-alive shows as connections < requests.
   */
  get stats() {
    return { ...this.#stats };
  }

  async #get(path, timeoutMs = this.timeoutMs) {
    const t = await this.#open();
    const res = await t.request(path, this.#headers, timeoutMs);
    let doc;
    try {
      doc = JSON.parse(res.text);
    } catch {
      doc = undefined;
    }
    if (res.status >= 400) {
      const err = doc?.error;
      if (err && typeof err.code === "string" && typeof err.message === "string") {
        throw new VaultEdgeError(res.status, err.code, err.message);
      }
      throw new VaultEdgeError(res.status, "error", `HTTP ${res.status}`);
    }
    if (doc === undefined) {
      throw new VaultEdgeError(res.status, "bad_response", "the agent answered with something other than JSON");
    }
    const age = res.header("age");
    return { doc, age: age !== null && /^\d+$/.test(age) ? Number(age) : null };
  }

  /** One secret: the current version, or `{ version }`, or `{ stage: "previous" | "pending" }`;
   *  `{ field }`: one field of a structured (JSON object) value, e.g. a rotated credential's "password". */
  async get(name, { version, stage, field } = {}) {
    const { doc, age } = await this.#get(secretPath(name) + query({ version, stage, field }));
    return secretOf(doc, age);
  }

  /** All of `names` in one round trip, at one revision (all or nothing): an object keyed by name. */
  async getMany(names) {
    if (!Array.isArray(names)) throw new TypeError("getMany takes an array of names");
    const { doc, age } = await this.#get("/v1/secrets" + query({ names: names.join(",") }));
    if (!Array.isArray(doc?.secrets)) throw badShape("secrets");
    const out = Object.create(null); // names like "__proto__" are valid secret names
    for (const d of doc.secrets) out[d.name] = secretOf(d, age);
    return out;
  }

  /** The names this caller may read. */
  async names() {
    const { doc } = await this.#get("/v1/secrets");
    if (!Array.isArray(doc?.names)) throw badShape("names");
    return doc.names;
  }

  /** `{status: "ok"|"stale"|"starting", node, region, revision, last_sync_age_s, secrets}` */
  async health() {
    return (await this.#get("/v1/health")).doc;
  }

  /** Block until the agent passes revision `since` (or `wait` seconds pass): `{revision, changed}`. */
  async watch(since, wait = 30) {
    const path = "/v1/watch" + query({ since, wait });
    const held = Math.min(Number(wait) || 0, WATCH_MAX_S); // the agent holds at most 300 s
    return (await this.#get(path, clampMs((held + 5) * 1000))).doc;
  }

  /** Drop pooled connections (Node) or the runtime's client (Deno). */
  async close() {
    const t = this.#transport;
    this.#transport = null;
    if (t) (await t.catch(() => null))?.close();
  }
}

if (typeof Symbol.asyncDispose === "symbol") {
  VaultEdgeClient.prototype[Symbol.asyncDispose] = VaultEdgeClient.prototype.close;
}
