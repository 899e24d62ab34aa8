// vault-edge for workerd: a client that reads through a service binding instead of a socket.
//
// workerd workers cannot open unix sockets. The host's workerd config binds an `external` service
// to the agent's socket, one service per tenant, each injecting that tenant's capability token
// (injectRequestHeaders replaces any X-Vault-Edge-Token the worker sets itself, so a worker can
// neither drop nor swap its token). See deploy/workerd/config.capnp.
//
//   import { vaultEdge } from "./workerd.js";
//   export default {
//     async fetch(request, env) {
//       const key = (await vaultEdge(env.VAULT).get("tenant-a/openai")).value;
//       ...
//     },
//   };
import { VaultEdgeClient } from "./vault-edge.mjs";

export { VaultEdgeClient, VaultEdgeError, Secret } from "./vault-edge.mjs";

/**
 * A VaultEdgeClient over a workerd service binding (an object with `fetch`) or a bare fetch function.
 * Options as VaultEdgeClient's (`timeout`); `token` is normally left to the binding's injected header.
 */
export function vaultEdge(binding, options = {}) {
  const fetch = typeof binding === "function" ? binding : binding?.fetch?.bind(binding);
  if (typeof fetch !== "function") {
    throw new TypeError("vaultEdge() takes a service binding (env.VAULT) or its fetch function");
  }
  return new VaultEdgeClient({ ...options, fetch });
}
