// Test-only (see forge.capnp): reads through tenant A's binding while sending tenant B's token.
import { vaultEdge, VaultEdgeError } from "./workerd.js";

export default {
  async fetch(request, env) {
    const name = new URL(request.url).pathname.slice(1);
    const vault = vaultEdge(env.VAULT, { token: env.STOLEN_TOKEN });
    try {
      const s = await vault.get(name);
      return Response.json({ ...s.toJSON(), length: s.bytes.length });
    } catch (err) {
      if (err instanceof VaultEdgeError) return Response.json({ error: { code: err.code } }, { status: err.status || 502 });
      throw err;
    }
  },
};
