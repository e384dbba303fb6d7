// The soak's socket.io-client v4 "browsers" (tests/soak): many sockets in one
// process, each from its own loopback address so that a proxy keeping a
// client on one instance (by source address, as an L4 balancer does) keeps
// its long-polling requests together.
//
//   node soak-records.mjs '<json config>'
// config: {url, origin, clients: [{name, token, transports, address}]}
// Prints one compact JSON line per happening:
//   {c, t: "connect", recovered, transport}   {c, t: "disconnect", reason}
//   {c, t: "rec", room, n}  (a records event carrying {soak: n})
//   {c, t: "notice", n}     (a notice carrying {soak_notice: n})
//   {c, t: "other", event}  (anything else)
// stdin, one JSON command a line:
//   {cmd: "away", c, ms}  the client closes its transport, reconnects after ms
//                         (ignored, {c, t: "away-skipped"}, unless connected)
//   {cmd: "quit"}
import { io } from "socket.io-client";
import http from "node:http";
import readline from "node:readline";

const config = JSON.parse(process.argv[2]);
const sockets = new Map();
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function open(spec) {
  // No keep-alive: xmlhttprequest-ssl 2.1.2 (engine.io-client's XHR in Node)
  // retries a request whose reused socket was reset without ever sending it
  // (no .end()), so a cut long-poll would hang until the ping timeout (45 s);
  // a browser's XHR fails at once and the client reconnects, as it does here.
  const agent = new http.Agent({ keepAlive: false, localAddress: spec.address });
  const socket = io(config.url, {
    forceNew: true,
    // A browser's defaults, shortened so the soak sees many reconnects.
    reconnectionDelay: 200,
    reconnectionDelayMax: 2000,
    randomizationFactor: 0.5,
    transports: spec.transports,
    timeout: 10000,
    agent,
    localAddress: spec.address,
    query: { channel_token: spec.token },
    extraHeaders: { Origin: config.origin },
  });
  const c = spec.name;
  sockets.set(c, socket);
  socket.on("connect", () =>
    out({ c, t: "connect", recovered: Boolean(socket.recovered), transport: socket.io.engine.transport.name }),
  );
  socket.on("disconnect", (reason) => out({ c, t: "disconnect", reason }));
  socket.on("connect_error", (err) => out({ c, t: "connect_error", message: String(err?.message) }));
  socket.onAny((event, ...args) => {
    const body = args[0];
    if (event === "records" && body && body.records && typeof body.records.soak === "number") {
      out({ c, t: "rec", room: body.room, n: body.records.soak });
    } else if (event === "notice" && body && typeof body.soak_notice === "number") {
      out({ c, t: "notice", n: body.soak_notice });
    } else {
      out({ c, t: "other", event: String(event) });
    }
  });
}

for (const spec of config.clients) open(spec);
out({ t: "started", clients: config.clients.length });

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch {
    return;
  }
  const socket = sockets.get(cmd.c);
  if (cmd.cmd === "away" && socket) {
    // The client closes its transport and does not reconnect until it is back.
    // Only from a connected state: turning reconnection off in the middle of
    // the manager's reconnection loop leaves it stuck (connect() then never
    // opens again), which no browser does.
    if (!socket.connected) {
      out({ c: cmd.c, t: "away-skipped" });
      return;
    }
    socket.io.reconnection(false);
    socket.io.engine?.close();
    setTimeout(() => {
      socket.io.reconnection(true);
      if (!socket.connected) socket.connect();
      out({ c: cmd.c, t: "back" });
    }, cmd.ms);
  } else if (cmd.cmd === "quit") {
    for (const s of sockets.values()) s.disconnect();
    process.exit(0);
  }
});
rl.on("close", () => process.exit(0));
