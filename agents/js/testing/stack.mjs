// Real processes for the JS client's tests: a vault-edge control plane (--dev, SQLite in a temp dir),
// secrets put through the real CLI, and real agents on real unix sockets. Not a test file itself.
//
// Python: $VAULT_EDGE_PYTHON, else the repository's .venv/bin/python, else python3.

import { execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { VaultEdgeClient } from "../vault-edge.mjs";

const run = promisify(execFile);
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.VAULT_EDGE_PYTHON ||
  (existsSync(path.join(REPO, ".venv/bin/python")) ? path.join(REPO, ".venv/bin/python") : "python3");

const live = new Set(); // child processes still running, killed on exit whatever happens
process.on("exit", () => {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch { /* gone */ }
  }
});

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(pred, { timeout = 20000, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await pred();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${last.message})` : ""}`);
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Spawn a long-running process, output to `logPath`; tracked so that it dies with the test. */
export function launch(cmd, args, { logPath, env, cwd, stdio } = {}) {
  const fd = openSync(logPath, "a");
  const p = spawn(cmd, args, { stdio: stdio ?? ["ignore", fd, fd], env: { ...process.env, ...env }, cwd });
  closeSync(fd);
  live.add(p);
  p.exited = new Promise((resolve) => p.on("exit", (code, signal) => {
    live.delete(p);
    resolve(code ?? signal);
  }));
  return p;
}

export async function stopProcess(p, signal = "SIGTERM") {
  if (!p || p.exitCode !== null || p.signalCode !== null) return p?.exitCode ?? null;
  p.kill(signal);
  const timer = setTimeout(() => p.kill("SIGKILL"), 10000);
  const code = await p.exited;
  clearTimeout(timer);
  return code;
}

export class Stack {
  constructor() {
    // unix socket paths are limited to 108 bytes: keep the directory short
    this.dir = mkdtempSync(path.join(os.tmpdir(), "ve-js-"));
    this.token = "vet_js_test_root";
    this.agents = [];
    this.procs = [];
  }

  /** Start the control plane (--dev: initialized and unsealed) and wait for /v1/sys/health. */
  async start() {
    this.port = await freePort();
    this.addr = `http://127.0.0.1:${this.port}`;
    this.server = launch(PYTHON, ["-m", "vault_edge", "server", "--dev", "--dev-token", this.token,
      "--port", String(this.port), "--db", path.join(this.dir, "vault.db"), "--log-level", "warning"],
    { logPath: path.join(this.dir, "server.log") });
    this.procs.push(this.server);
    await waitFor(async () => {
      if (this.server.exitCode !== null) throw new Error(`server exited: ${this.log("server.log")}`);
      return (await fetch(`${this.addr}/v1/sys/health`)).status === 200;
    }, { what: "the control plane" });
    return this;
  }

  log(name) {
    try {
      return readFileSync(path.join(this.dir, name), "utf8").slice(-3000);
    } catch {
      return "";
    }
  }

  /** `vault-edge ARGS...` against this control plane; JSON-parsed when `--output json` is given. */
  async cli(args, { input } = {}) {
    const env = { ...process.env, VAULT_EDGE_ADDR: this.addr, VAULT_EDGE_TOKEN: this.token };
    let out;
    if (input !== undefined) {
      out = await new Promise((resolve, reject) => {
        const p = spawn(PYTHON, ["-m", "vault_edge", ...args], { env, stdio: ["pipe", "pipe", "pipe"] });
        let stdout = "", stderr = "";
        p.stdout.on("data", (d) => (stdout += d));
        p.stderr.on("data", (d) => (stderr += d));
        p.on("exit", (code) => (code === 0 ? resolve(stdout)
          : reject(new Error(`vault-edge ${args[0]} exited ${code}: ${stderr.trim()}`))));
        p.stdin.end(input);
      });
    } else {
      try {
        out = (await run(PYTHON, ["-m", "vault_edge", ...args], { env })).stdout;
      } catch (err) {
        throw new Error(`vault-edge ${args.slice(0, 2).join(" ")} failed: ${err.stderr?.trim() || err.message}`);
      }
    }
    return args.includes("json") ? JSON.parse(out) : out;
  }

  /** `put` a value: a string, or bytes (written to a file, then --from-file). */
  async put(name, value, extra = []) {
    if (typeof value === "string") return this.cli(["put", name, "-", ...extra, "--output", "json"], { input: value });
    const file = path.join(this.dir, `value-${Math.random().toString(36).slice(2)}`);
    writeFileSync(file, value, { mode: 0o600 });
    try {
      return await this.cli(["put", name, "--from-file", file, ...extra, "--output", "json"]);
    } finally {
      rmSync(file, { force: true });
    }
  }

  async rotate(name, value, extra = []) {
    return this.cli(["rotate", name, "-", ...extra, "--output", "json"], { input: value });
  }

  /** A new capability token: {token, token_sha256}. */
  agentToken() {
    return this.cli(["agent", "token", "--output", "json"]);
  }

  /** Enrol and start an agent of `region`; resolves when its /v1/health says ok. */
  async startAgent(name, { region, policy, extra = [] } = {}) {
    const join = (await this.cli(["node", "token", "--region", region, "--output", "json"])).token;
    const agent = {
      name,
      socket: path.join(this.dir, `${name}.sock`),
      stateDir: path.join(this.dir, `${name}-state`),
      logName: `${name}.log`,
    };
    let args = ["--join-token", join];
    if (policy !== undefined) {
      agent.policyPath = path.join(this.dir, `${name}-policy.toml`);
      writeFileSync(agent.policyPath, policy);
      args.push("--policy", agent.policyPath);
    }
    agent.args = ["-m", "vault_edge", "agent", "run", "--server", this.addr, "--state-dir", agent.stateDir,
      "--socket", agent.socket, "--wait", "2s", "--log-level", "warning", ...extra];
    await this.#launchAgent(agent, args);
    this.agents.push(agent);
    return agent;
  }

  /** Stop an agent (SIGTERM) and start it again on the same socket and state (already enrolled). */
  async restartAgent(agent) {
    await stopProcess(agent.proc);
    await this.#launchAgent(agent, agent.policyPath ? ["--policy", agent.policyPath] : []);
  }

  async #launchAgent(agent, args) {
    agent.proc = launch(PYTHON, [...agent.args, ...args], { logPath: path.join(this.dir, agent.logName) });
    this.procs.push(agent.proc);
    // The agent's own uid reads health with or without a policy (health is not policy-gated).
    const probe = new VaultEdgeClient({ socket: agent.socket, timeout: 2 });
    try {
      await waitFor(async () => {
        if (agent.proc.exitCode !== null) throw new Error(`agent exited: ${this.log(agent.logName)}`);
        return (await probe.health()).status === "ok";
      }, { what: `agent ${agent.name} in sync` });
    } finally {
      await probe.close();
    }
  }

  async stop() {
    for (const p of [...this.procs].reverse()) await stopProcess(p);
    if (!process.env.VE_KEEP) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Where a workerd binary is, or null: $WORKERD, agents/js/node_modules/.bin/workerd, then PATH. */
export function findWorkerd() {
  const candidates = [process.env.WORKERD, path.join(REPO, "agents/js/node_modules/.bin/workerd")];
  for (const dir of (process.env.PATH || "").split(path.delimiter)) if (dir) candidates.push(path.join(dir, "workerd"));
  return candidates.find((c) => c && existsSync(c)) ?? null;
}
