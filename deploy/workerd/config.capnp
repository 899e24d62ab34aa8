# workerd host config: two tenant workers in one workerd process, each reading its own secrets
# from the local vault-edge agent through its own service binding.
#
# Why bindings: a workerd worker cannot open a unix socket, and every worker in the process shares
# the process's uid, so the agent's SO_PEERCRED identity cannot tell tenants apart. Each tenant
# therefore gets its own `external` service pointing at the agent's socket, and that service
# injects the tenant's capability token as X-Vault-Edge-Token. workerd *replaces* a header of the
# same name set by the worker, so a worker can neither drop its token nor send another tenant's.
# The agent's policy file maps each token's SHA-256 to the names that tenant may read:
#
#   vault-edge agent token --output json     # {"token": ..., "token_sha256": ...}
#
#   # /etc/vault-edge/policy.toml
#   [[rule]]
#   token_sha256 = "<tenant-a's token_sha256>"
#   secrets = ["tenant-a/*"]
#   [[rule]]
#   token_sha256 = "<tenant-b's token_sha256>"
#   secrets = ["tenant-b/*"]
#
# The tokens themselves are not in this file: each is embedded at load time from tokens/<tenant>
# (next to this file; mode 0600, owned by the workerd user; no trailing newline:
#  `vault-edge agent token --output json | python3 -c 'import json,sys;print(json.load(sys.stdin)["token"],end="")' > tokens/tenant-a`),
# so this config can live in version control. workerd reads them once, at start. Mind the newline:
# with one at the end of a token file workerd still starts, but every request through that binding
# fails (workerd refuses the header value; the JS client reports `unreachable`).
#
# The workerd user must be able to connect to the socket: the socket is mode 0660, so put that
# user in the agent's group (deploy/systemd: SupplementaryGroups=vault-edge).
#
# Run:   workerd serve config.capnp
# Paths: `embed` paths are relative to this file; the client modules are taken from the repository
#        (agents/js). Copy them next to the config when deploying elsewhere and adjust the paths.
# Tested: tests in agents/js/test/workerd.test.mjs run this file, with --socket-addr and
#         --external-addr overrides, against a real agent.

using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "tenant-a", worker = .tenantA),
    (name = "tenant-b", worker = .tenantB),

    # One binding per tenant, all to the same agent socket, each with its own token.
    (name = "vault-tenant-a", external = (
      address = "unix:/run/vault-edge/agent.sock",
      http = (injectRequestHeaders = [(name = "X-Vault-Edge-Token", value = embed "tokens/tenant-a")]),
    )),
    (name = "vault-tenant-b", external = (
      address = "unix:/run/vault-edge/agent.sock",
      http = (injectRequestHeaders = [(name = "X-Vault-Edge-Token", value = embed "tokens/tenant-b")]),
    )),
  ],

  sockets = [
    (name = "tenant-a", address = "*:8080", http = (), service = "tenant-a"),
    (name = "tenant-b", address = "*:8081", http = (), service = "tenant-b"),
  ],
);

const modules :List(Workerd.Worker.Module) = [
  (name = "worker.js", esModule = embed "worker.js"),
  (name = "workerd.js", esModule = embed "../../agents/js/workerd.js"),
  (name = "vault-edge.mjs", esModule = embed "../../agents/js/vault-edge.mjs"),
];

const tenantA :Workerd.Worker = (
  modules = .modules,
  compatibilityDate = "2025-06-01",
  bindings = [
    (name = "VAULT", service = "vault-tenant-a"),       # the only way this worker reaches the agent
    (name = "SECRET_NAME", text = "tenant-a/openai"),
  ],
);

const tenantB :Workerd.Worker = (
  modules = .modules,
  compatibilityDate = "2025-06-01",
  bindings = [
    (name = "VAULT", service = "vault-tenant-b"),
    (name = "SECRET_NAME", text = "tenant-b/openai"),
  ],
);
