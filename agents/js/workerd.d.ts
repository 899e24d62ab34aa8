import type { ClientOptions, VaultEdgeClient } from "./vault-edge.mjs";

export { Secret, VaultEdgeClient, VaultEdgeError } from "./vault-edge.mjs";

/** A client over a workerd service binding (`env.VAULT`) or its fetch function. */
export declare function vaultEdge(
  binding: { fetch(url: string, init?: RequestInit): Promise<Response> } | ((url: string, init?: RequestInit) => Promise<Response>),
  options?: Omit<ClientOptions, "fetch" | "socket">,
): VaultEdgeClient;
