// Types for vault-edge.mjs (the worker-side client of the vault-edge node agent).

export declare const DEFAULT_SOCKET: "/run/vault-edge/agent.sock";
export declare const TOKEN_HEADER: "X-Vault-Edge-Token";

/** An error answer from the agent, or no agent answering (`status` 0). */
export declare class VaultEdgeError extends Error {
  constructor(status: number, code: string, message: string);
  readonly name: "VaultEdgeError";
  /** HTTP status from the agent; 0 when it did not answer (`unreachable`) or on a client-side check. */
  status: number;
  /** The agent's code (`not_found`, `forbidden`, `not_ready`, `too_stale`, `bad_request`, ...), or the
   *  client's (`unreachable`, `bad_response`, `binary_value`, `unsupported_runtime`, `error`). */
  code: string;
}

/** One secret version. `value` and `bytes` are getters: never shown by inspect, JSON or spread. */
export declare class Secret {
  readonly name: string;
  readonly version: number;
  readonly stage: "current" | "previous" | "pending" | string;
  readonly revision: number;
  /** Seconds since the agent last heard from the control plane (the `Age` header), or null. */
  readonly age: number | null;
  /** The value as UTF-8 text; throws VaultEdgeError `binary_value` when it is not UTF-8. */
  readonly value: string;
  /** The exact bytes of the value. */
  readonly bytes: Uint8Array;
  /** Metadata only: the value is left out. */
  toJSON(): { name: string; version: number; stage: string; revision: number; age: number | null };
}

export interface Health {
  status: "ok" | "stale" | "starting";
  node: string;
  region: string;
  revision: number;
  last_sync_age_s: number | null;
  secrets: number;
}

export interface WatchResult {
  revision: number;
  changed: boolean;
}

export interface ClientStats {
  requests: number;
  /** Connections opened (Node); null where the runtime's fetch pools them. */
  connections: number | null;
  retries: number;
}

export type FetchLike = (url: string, init: { method: string; headers: Record<string, string>; signal?: AbortSignal })
  => Promise<Response>;

export interface ClientOptions {
  /** Agent socket; default VAULT_EDGE_SOCKET, else /run/vault-edge/agent.sock. */
  socket?: string;
  /** Capability token, sent as X-Vault-Edge-Token. */
  token?: string;
  /** Seconds per request (default 5; watch adds its wait). */
  timeout?: number;
  /** Send requests through this fetch instead of a socket (a workerd service binding's fetch). */
  fetch?: FetchLike;
}

export declare class VaultEdgeClient {
  constructor(options?: ClientOptions);
  readonly socket: string;
  readonly stats: ClientStats;
  get(
    name: string,
    options?: { version?: number; stage?: "current" | "previous" | "pending"; field?: string },
  ): Promise<Secret>;
  /** One round trip, one revision, all or nothing. */
  getMany(names: string[]): Promise<Record<string, Secret>>;
  names(): Promise<string[]>;
  health(): Promise<Health>;
  /** Block until the agent passes revision `since` (default: its current one) or `wait` seconds pass. */
  watch(since?: number, wait?: number): Promise<WatchResult>;
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export declare function socketPath(path?: string): string;
export declare function b64urlDecode(text: string): Uint8Array;
