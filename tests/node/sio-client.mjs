// Drives real socket.io-client sockets for the Python tests.
//
//   node sio-client.mjs '<json config>'
// config: {url, origin?, reconnectionDelay?, quietEvents?, clients: [{name, token?, transports?}], generate?}
// Prints one JSON line per happening:
//   {c, type: "connect", id, recovered, transport, pid}   {c, type: "event", event, args}
//   {c, type: "open", transport} (engine.io)   {c, type: "disconnect", reason}   {c, type: "connect_error", message}   {c, type: "upgrade", transport}
// stdin, one JSON command a line:
//   {cmd: "add", client: {...}}       open one more client
//   {cmd: "drop", c}                  simulate a network drop (the client reconnects by itself)
//   {cmd: "disconnect", c}            socket.disconnect(), as a user leaving
//   {cmd: "connect", c}               socket.connect() again
//   {cmd: "status"}                   {type: "status", clients: {name: {connected, id, events}}}
//   {cmd: "quit"}
import { io } from "socket.io-client";
import readline from "node:readline";

const config = JSON.parse(process.argv[2]);
const sockets = new Map();
const counts = new Map();

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function open(spec) {
  const opts = {
    forceNew: true,
    reconnectionDelay: config.reconnectionDelay ?? 100,
    reconnectionDelayMax: config.reconnectionDelayMax ?? 500,
    transports: spec.transports ?? ["polling", "websocket"],
    timeout: config.timeout ?? 20000,
  };
  if (spec.token !== undefined && spec.token !== null) opts.query = { channel_token: spec.token };
  const origin = spec.origin ?? config.origin;
  if (origin) opts.extraHeaders = { Origin: origin };
  const socket = io(config.url, opts);
  const name = spec.name;
  sockets.set(name, socket);
  counts.set(name, 0);
  socket.on("connect", () => {
    const transport = socket.io.engine.transport.name;
    // _pid is private to socket.io-client; printed so tests can check it never reaches the logs.
    out({ c: name, type: "connect", id: socket.id, recovered: Boolean(socket.recovered), transport, pid: socket._pid ?? null });
  });
  socket.io.on("open", () => {
    const engine = socket.io.engine;
    out({ c: name, type: "open", transport: engine.transport.name });
    engine.once("upgrade", (t) => out({ c: name, type: "upgrade", transport: t.name }));
  });
  socket.on("disconnect", (reason) => out({ c: name, type: "disconnect", reason }));
  socket.on("connect_error", (err) => out({ c: name, type: "connect_error", message: String(err && err.message) }));
  socket.onAny((event, ...args) => {
    counts.set(name, counts.get(name) + 1);
    if (!config.quietEvents) out({ c: name, type: "event", event, args });
  });
}

const specs = [...(config.clients ?? [])];
// {count, name, token, transports}: clients `${name}${i}` with tokens `${token}${i}`
// (thousands of specs would not fit on a command line).
if (config.generate) {
  const g = config.generate;
  for (let i = 0; i < g.count; i++) specs.push({ name: `${g.name}${i}`, token: `${g.token}${i}`, transports: g.transports });
}
for (const spec of specs) open(spec);
out({ type: "started", clients: specs.length });

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch {
    return;
  }
  const socket = sockets.get(cmd.c);
  switch (cmd.cmd) {
    case "add":
      open(cmd.client);
      break;
    case "drop":
      socket?.io.engine.close();
      break;
    case "disconnect":
      socket?.disconnect();
      break;
    case "connect":
      socket?.connect();
      break;
    case "status": {
      const clients = {};
      for (const [n, s] of sockets) clients[n] = { connected: s.connected, id: s.id, events: counts.get(n) };
      out({ type: "status", clients });
      break;
    }
    case "quit":
      for (const s of sockets.values()) s.disconnect();
      process.exit(0);
  }
});
rl.on("close", () => {
  for (const s of sockets.values()) s.disconnect();
  process.exit(0);
});
