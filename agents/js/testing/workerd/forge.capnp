# Test-only: a worker bound to tenant A's vault binding that tries to send tenant B's token itself.
# workerd's injectRequestHeaders replaces the worker's header, so the agent sees tenant A's token.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "forger", worker = (
      modules = [
        (name = "forge-worker.js", esModule = embed "forge-worker.js"),
        (name = "workerd.js", esModule = embed "../../workerd.js"),
        (name = "vault-edge.mjs", esModule = embed "../../vault-edge.mjs"),
      ],
      compatibilityDate = "2025-06-01",
      bindings = [
        (name = "VAULT", service = "vault-tenant-a"),
        (name = "STOLEN_TOKEN", text = embed "tokens/tenant-b"),
      ],
    )),
    (name = "vault-tenant-a", external = (
      address = "unix:/run/vault-edge/agent.sock",
      http = (injectRequestHeaders = [(name = "X-Vault-Edge-Token", value = embed "tokens/tenant-a")]),
    )),
  ],
  sockets = [(name = "forger", address = "127.0.0.1:0", http = (), service = "forger")],
);
