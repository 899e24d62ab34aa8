// Example tenant worker: reads its secret through its own vault-edge binding (env.VAULT).
//
//   GET /              reads env.SECRET_NAME and answers with its metadata (never the value)
//   GET /secret/NAME   the same for NAME: shows what this tenant's token may and may not read
//   GET /names         the names this tenant may read
//   GET /health        the agent's health
//
// A real worker would use the value (e.g. as an Authorization header to a model provider) and
// keep it out of responses and logs, as this one does.
import { vaultEdge, VaultEdgeError } from "./workerd.js";

const json = (doc, status = 200) =>
  new Response(JSON.stringify(doc), { status, headers: { "content-type": "application/json" } });

export default {
  async fetch(request, env) {
    const vault = vaultEdge(env.VAULT);
    const path = new URL(request.url).pathname;
    try {
      if (path === "/names") return json({ names: await vault.names() });
      if (path === "/health") return json(await vault.health());
      const name = path.startsWith("/secret/") ? decodeURIComponent(path.slice(8)) : env.SECRET_NAME;
      const secret = await vault.get(name);
      // metadata only: name, version, stage, revision, age (Secret.toJSON leaves the value out)
      return json({ ...secret.toJSON(), length: secret.bytes.length });
    } catch (err) {
      if (err instanceof VaultEdgeError) {
        // the agent's status where it gave one; 502 when the agent did not answer at all
        return json({ error: { code: err.code, message: err.message } }, err.status || 502);
      }
      throw err;
    }
  },
};
