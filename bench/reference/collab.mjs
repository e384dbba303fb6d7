// Reference collab server: @hocuspocus/server 3.4 configured as Loomio ran it
// (timeouts, debounce), with ephemeral in-memory storage and onAuthenticate
// asking the same stand-in Rails as our service does.
import { Server } from "@hocuspocus/server";
import { Redis } from "@hocuspocus/extension-redis";
import * as Y from "yjs";

const port = Number(process.env.PORT || 4444);
const rails = (process.env.PRIVATE_APP_URL || process.env.APP_URL || "http://127.0.0.1:3000").replace(/\/$/, "");
const drafts = new Map();
// REFERENCE_CLUSTER=1: several instances share documents through Redis, as
// @hocuspocus/extension-redis does it (pub/sub; 3.4.4, the newest 3.x, has no
// awaitInitialSyncTimeout option).
const extensions = [];
if (process.env.REFERENCE_CLUSTER === "1") {
  const redisUrl = new URL(process.env.REDIS_URL || "redis://127.0.0.1:6379/0");
  extensions.push(new Redis({ host: redisUrl.hostname, port: Number(redisUrl.port || 6379) }));
}

const server = new Server({
  port,
  address: process.env.HOST || "127.0.0.1",
  timeout: 30000,
  debounce: 5000,
  maxDebounce: 30000,
  quiet: true,
  extensions,
  async onRequest({ request, response }) {
    if (request.url === "/healthz" || request.url === "/readyz") {
      response.writeHead(200, { "content-type": "text/plain" });
      response.end("ok");
      // Hocuspocus treats a rejection without error as "handled".
      throw null;
    }
  },
  async onAuthenticate({ token, documentName }) {
    const res = await fetch(`${rails}/api/hocuspocus`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user_secret: token, document_name: documentName }),
    });
    if (res.status !== 200) throw new Error("unauthorized");
  },
  async onLoadDocument({ document, documentName }) {
    const saved = drafts.get(documentName);
    if (saved) Y.applyUpdate(document, saved);
    return document;
  },
  async onStoreDocument({ document, documentName }) {
    drafts.set(documentName, Y.encodeStateAsUpdate(document));
  },
});

await server.listen();
console.error(`reference collab server on ${port}`);
