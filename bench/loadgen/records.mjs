// Records load generator: many lean Socket.IO websocket clients in one process.
//
// Each client speaks just enough of Engine.IO 4 / Socket.IO 5 over a bare
// websocket (rawws.mjs; or the `ws` package with "client":"ws") to be
// a real websocket client of both servers (open, CONNECT to "/", ping/pong,
// EVENT) without socket.io-client's per-socket machinery, so 2,000 of them
// fit beside the servers on a 2-core machine. The real client library is
// proven against our service by the integration tests, not here.
//
// Driven over stdin/stdout, one JSON object per line:
//   {"cmd":"connect","url":"ws://127.0.0.1:5000/socket.io/","clients":N,"groups":G,"tokenPrefix":"t-",
//    "client":"raw"|"ws"|"polling"}   ("polling": Engine.IO long-polling over node:http, url http://...)
//   {"cmd":"status"}                  -> {"event":"status","open":..,"heard":..}
//   {"cmd":"peek","step":K}            -> {"event":"peek","step":K,"received":..}
//   {"cmd":"stats","step":K}          -> {"event":"stats","step":K,"received":..,"p50":..,...}
//   {"cmd":"close"}
// Latency = receive wall time - the send wall time the publisher stamped in
// the payload as "bench":[step, seq, sendTimeMs, group].
import http from "node:http";
import { createInterface } from "node:readline";
import { now } from "./clock.mjs";
import WebSocket from "ws";
import { RawWebSocket } from "./rawws.mjs";

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const clients = [];
// step -> {latencies: Float64Array, n, misrouted}
const steps = new Map();
let other = 0;
let malformed = 0;
let closedUnexpectedly = 0;

function stepRecord(step) {
  let rec = steps.get(step);
  if (!rec) {
    rec = { latencies: new Float64Array(4096), n: 0, misrouted: 0, first: null, last: null };
    steps.set(step, rec);
  }
  return rec;
}

function record(step, received, latency, misrouted) {
  const rec = stepRecord(step);
  if (rec.first === null) rec.first = received;
  rec.last = received;
  if (rec.n === rec.latencies.length) {
    const bigger = new Float64Array(rec.latencies.length * 2);
    bigger.set(rec.latencies);
    rec.latencies = bigger;
  }
  rec.latencies[rec.n++] = latency;
  if (misrouted) rec.misrouted++;
}

const MARK = Buffer.from('"bench":');
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACKET = 0x5d;

// Works on the raw frame bytes: no UTF-8 decoding or JSON parsing of the
// 1 KB payload, so the clients stay cheaper than the servers they measure.
function onEvent(client, frame) {
  // frame is a Socket.IO EVENT packet: 42["records",{...},offset?]
  const at = frame.indexOf(MARK);
  if (at < 0) {
    other++;
    return;
  }
  const open = frame.indexOf(OPEN_BRACKET, at + MARK.length);
  const end = frame.indexOf(CLOSE_BRACKET, open);
  if (open < 0 || end < 0) {
    malformed++;
    return;
  }
  const parts = frame.toString("latin1", open + 1, end).split(",");
  if (parts.length !== 4) {
    malformed++;
    return;
  }
  const received = now();
  client.heard = true;
  record(Number(parts[0]), received, received - Number(parts[2]), Number(parts[3]) !== client.group);
}

function connectOne(url, token, group, kind) {
  return new Promise((resolve) => {
    const client = { ws: null, group, open: false, heard: false, sid: null };
    const sep = url.includes("?") ? "&" : "?";
    const full = `${url}${sep}EIO=4&transport=websocket&channel_token=${encodeURIComponent(token)}`;
    // "raw" (default) is the leanest; "ws" cross-checks it with the `ws` package.
    // Neither validates UTF-8: that is client work the bench does not measure.
    const ws = kind === "ws" ? new WebSocket(full, { skipUTF8Validation: true }) : new RawWebSocket(full);
    client.ws = ws;
    let settled = false;
    const settle = (ok, why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve({ client, ok, why });
    };
    const timer = setTimeout(() => {
      settle(false, "timeout");
      ws.terminate();
    }, 20000);
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      const type = data[0];
      if (type === 0x34 /* '4' message */) {
        const sio = data[1];
        if (sio === 0x32 /* '2' EVENT */) onEvent(client, data);
        else if (sio === 0x30 /* '0' CONNECT ack */) {
          client.open = true;
          settle(true);
        } else if (sio === 0x34 /* '4' CONNECT_ERROR */) settle(false, "connect_error");
      } else if (type === 0x32 /* '2' ping */) {
        ws.send("3");
      } else if (type === 0x30 /* '0' open */) {
        ws.send("40");
      } else if (type === 0x31 /* '1' close */) {
        ws.close();
      }
    });
    ws.on("error", (err) => settle(false, err.code || err.message));
    ws.on("close", () => {
      if (client.open && !client.closing) closedUnexpectedly++;
      client.open = false;
      settle(false, "closed");
    });
  });
}

// Long-polling clients share one keep-alive agent: a held GET and, now and
// then, a POST (CONNECT, PONG) per client, as a browser behind a proxy does.
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

function httpRequest(method, url, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, agent, headers: body ? { "content-type": "text/plain;charset=UTF-8" } : {} }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks) }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

function connectPolling(url, token, group) {
  return new Promise((resolve) => {
    const client = { ws: null, group, open: false, heard: false, sid: null, closing: false };
    client.ws = { terminate: () => { client.closing = true; } };
    let settled = false;
    const settle = (ok, why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve({ client, ok, why });
    };
    const timer = setTimeout(() => {
      client.closing = true;
      settle(false, "timeout");
    }, 20000);
    const sep = url.includes("?") ? "&" : "?";
    const base = `${url}${sep}EIO=4&transport=polling&channel_token=${encodeURIComponent(token)}`;
    const onPacket = (q, packet) => {
      const type = packet[0];
      if (type === 0x34 /* '4' message */) {
        const sio = packet[1];
        if (sio === 0x32) onEvent(client, packet);
        else if (sio === 0x30) {
          client.open = true;
          settle(true);
        } else if (sio === 0x34) settle(false, "connect_error");
      } else if (type === 0x32 /* ping */) {
        httpRequest("POST", q, "3").catch(() => {});
      } else if (type === 0x31 /* close */) {
        client.closing = true;
      }
    };
    (async () => {
      const hs = await httpRequest("GET", base);
      if (hs.status !== 200) throw new Error(`handshake ${hs.status}`);
      client.sid = JSON.parse(hs.body.toString("latin1").slice(1)).sid;
      const q = `${base}&sid=${client.sid}`;
      await httpRequest("POST", q, "40");
      while (!client.closing) {
        const res = await httpRequest("GET", q);
        if (res.status !== 200) throw new Error(`poll ${res.status}`);
        let start = 0;
        for (let i = 0; i <= res.body.length; i++) {
          if (i === res.body.length || res.body[i] === 0x1e) {
            if (i > start) onPacket(q, res.body.subarray(start, i));
            start = i + 1;
          }
        }
      }
    })().catch((err) => settle(false, err.code || err.message)).finally(() => {
      if (client.open && !client.closing) closedUnexpectedly++;
      client.open = false;
      settle(false, "closed");
    });
  });
}

async function connectAll({ url, clients: n, groups, tokenPrefix, concurrency = 50, client: kind = "raw" }) {
  const started = now();
  let next = 0;
  let failed = 0;
  const reasons = {};
  async function worker() {
    while (next < n) {
      const i = next++;
      const connect = kind === "polling" ? connectPolling : (u, t, g) => connectOne(u, t, g, kind);
      const { client, ok, why } = await connect(url, `${tokenPrefix}${i}`, i % groups);
      clients.push(client);
      if (!ok) {
        failed++;
        reasons[why] = (reasons[why] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  out({ event: "connected", count: n - failed, failed, reasons, ms: now() - started });
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[idx];
}

function stats(step) {
  const rec = steps.get(step) || { latencies: new Float64Array(0), n: 0, misrouted: 0 };
  steps.delete(step);
  const sorted = rec.latencies.subarray(0, rec.n).sort();
  return {
    event: "stats",
    step,
    received: rec.n,
    misrouted: rec.misrouted,
    p50: percentile(sorted, 0.5),
    p99: percentile(sorted, 0.99),
    max: rec.n ? sorted[rec.n - 1] : null,
    first: rec.first,
    last: rec.last,
    open: clients.filter((c) => c.open).length,
    closed_unexpectedly: closedUnexpectedly,
    malformed,
    other,
  };
}

const rl = createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    out({ event: "error", error: "bad command" });
    return;
  }
  if (msg.cmd === "connect") await connectAll(msg);
  else if (msg.cmd === "status") {
    out({
      event: "status",
      open: clients.filter((c) => c.open).length,
      heard: clients.filter((c) => c.heard).length,
    });
  } else if (msg.cmd === "peek") {
    const rec = steps.get(msg.step);
    out({ event: "peek", step: msg.step, received: rec ? rec.n : 0 });
  } else if (msg.cmd === "stats") out(stats(msg.step));
  else if (msg.cmd === "close") shutdown();
});
rl.on("close", shutdown);

function shutdown() {
  for (const c of clients) {
    c.closing = true;
    try {
      c.ws.terminate();
    } catch {}
  }
  out({ event: "closed" });
  process.exit(0);
}
