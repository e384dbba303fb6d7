// Reference records server: what Loomio ran before us (socket.io 4.8 with
// connection state recovery, the records contract of shared/spec/contracts.md).
// It exists only so `make bench` can measure ours against it in the same run.
// Unlike the original, it survives bad JSON and Redis restarts, so a benchmark
// run cannot be cut short by the reference itself.
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createClient } from "redis";

const port = Number(process.env.PORT || 5000);
const redisUrl = process.env.REDIS_URL || "redis://localhost:6379/0";

const httpServer = createServer((req, res) => {
  if (req.url === "/healthz" || req.url === "/readyz") {
    res.writeHead(200, { "content-type": "text/plain" }).end("ok");
  }
});

const io = new Server(httpServer, {
  cors: { origin: process.env.PUBLIC_APP_URL || true, credentials: true },
  connectionStateRecovery: { maxDisconnectionDuration: 30 * 60 * 1000 },
});

const reader = createClient({ url: redisUrl });
const subscriber = reader.duplicate();
for (const client of [reader, subscriber]) {
  client.on("error", (err) => console.error("redis:", err.message));
}
await reader.connect();
await subscriber.connect();

function parse(message) {
  try {
    return JSON.parse(message);
  } catch {
    console.error("dropped a message that is not JSON");
    return null;
  }
}

await subscriber.subscribe("/records", (message) => {
  const data = parse(message);
  if (data && typeof data.room === "string") io.to(data.room).emit("records", data);
});
await subscriber.subscribe("/system_notice", (message) => {
  const data = parse(message);
  if (data !== null) io.to("notice").emit("notice", data);
});

io.on("connection", async (socket) => {
  // A recovered socket got its rooms back from the recovery state.
  if (socket.recovered) return;
  socket.join("notice");
  const token = socket.handshake.query.channel_token;
  if (!token) return;
  try {
    const user = parse(await reader.get(`/current_users/${token}`));
    if (!user) return;
    if (user.id) socket.join(`user-${user.id}`);
    for (const group of user.group_ids || []) socket.join(`group-${group}`);
  } catch (err) {
    console.error("token lookup failed:", err.message);
  }
});

httpServer.listen(port, process.env.HOST || "127.0.0.1", () => {
  console.error(`reference records server on ${port}`);
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
