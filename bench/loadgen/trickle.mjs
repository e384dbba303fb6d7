// Trickle load generator: one websocket client that declares a single large
// binary frame and sends its payload in small segments, a fixed gap apart,
// as a hostile client may without any token. What it measures is the
// server's cost of receiving a frame in many small reads.
//
// A bare TCP socket (node:net), so every segment is one write() with
// Nagle off, and the gap is slept with Atomics.wait (sub-millisecond, where
// timers round up to 1 ms) instead of a spinning loop that would take the
// core the server runs on.
//
// Driven over stdin/stdout, one JSON object per line:
//   {"cmd":"trickle","url":"ws://127.0.0.1:4444","bytes":9437184,"segment":1024,"gapMs":0.4}
//       -> {"event":"trickled","bytes":...,"sent":...,"segments":...,"ms":...,"meanGapMs":...,
//           "closedByServer":bool,"closeCode":n|null}
//   {"cmd":"close"}
import { createHash, randomBytes } from "node:crypto";
import { once } from "node:events";
import { connect } from "node:net";
import { performance } from "node:perf_hooks";
import { out, serveCommands } from "./commands.mjs";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const SLEEPER = new Int32Array(new SharedArrayBuffer(4));
const sleepMs = (ms) => Atomics.wait(SLEEPER, 0, 0, ms);

function handshake(url) {
  const { hostname, port, pathname, search } = new URL(url);
  const key = randomBytes(16).toString("base64");
  const socket = connect({ host: hostname, port: Number(port) || 80 });
  socket.setNoDelay(true);
  const state = { socket, closed: false, closeCode: null, received: Buffer.alloc(0) };
  return new Promise((resolve, reject) => {
    let head = Buffer.alloc(0);
    const onData = (chunk) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf("\r\n\r\n");
      if (end < 0) return;
      socket.off("data", onData);
      const text = head.toString("latin1", 0, end);
      const accept = createHash("sha1").update(key + GUID).digest("base64");
      if (!/^HTTP\/1\.1 101 /.test(text) || !text.toLowerCase().includes(accept.toLowerCase())) {
        socket.destroy();
        return reject(new Error(`handshake refused: ${text.split("\r\n")[0]}`));
      }
      // Whatever the server sends from here on: only a close frame matters.
      const onFrames = (more) => {
        state.received = Buffer.concat([state.received, more]);
        const buf = state.received;
        if (buf.length >= 2 && (buf[0] & 0x0f) === 0x8 && state.closeCode === null) {
          state.closeCode = buf.length >= 4 && (buf[1] & 0x7f) >= 2 ? buf.readUInt16BE(2) : 1005;
        }
      };
      onFrames(head.subarray(end + 4));
      socket.on("data", onFrames);
      resolve(state);
    };
    socket.on("data", onData);
    socket.on("error", (err) => {
      state.closed = true;
      reject(err);
    });
    socket.on("close", () => {
      state.closed = true;
    });
    socket.on("connect", () => {
      socket.write(
        `GET ${pathname}${search} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
  });
}

function frameHeader(length, mask) {
  const header = Buffer.alloc(14);
  header[0] = 0x82; // FIN, binary
  header[1] = 0x80 | 127; // masked, 64-bit length
  header.writeBigUInt64BE(BigInt(length), 2);
  mask.copy(header, 10);
  return header;
}

async function trickle({ url, bytes = 9 * 1024 * 1024, segment = 1024, gapMs = 0.4 }) {
  const state = await handshake(url);
  const { socket } = state;
  socket.on("error", () => {}); // a server closing mid-frame is a result, not a crash
  const mask = randomBytes(4);
  // Zeros, masked: a message both servers drop cheaply (no document name),
  // so what is measured is receiving the frame.
  const payload = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) payload[i] = mask[i & 3];
  socket.write(frameHeader(bytes, mask));
  const started = performance.now();
  let next = started;
  let sent = 0;
  let segments = 0;
  while (sent < bytes && !state.closed) {
    const n = Math.min(segment, bytes - sent);
    const flushed = socket.write(payload.subarray(sent, sent + n));
    sent += n;
    segments++;
    if (!flushed) await once(socket, "drain");
    else if (segments % 64 === 0) await new Promise(setImmediate); // let socket events run
    // On a schedule, so a wake-up's overshoot is taken off the next gap; but
    // never a burst to catch up, which would hand the server fewer, larger reads.
    next += gapMs;
    const wait = next - performance.now();
    if (wait > 0) sleepMs(wait);
    else if (wait < -gapMs) next = performance.now();
  }
  const ms = performance.now() - started;
  // The server's answer to the finished frame, if any (a close, say).
  const deadline = performance.now() + 500;
  while (!state.closed && state.closeCode === null && performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 10));
  }
  const closedByServer = state.closed || state.closeCode !== null;
  socket.destroy();
  out({
    event: "trickled",
    bytes,
    sent,
    segments,
    ms,
    meanGapMs: segments > 1 ? ms / segments : null,
    closedByServer,
    closeCode: state.closeCode,
  });
}

serveCommands({
  trickle,
  close: () => {
    out({ event: "closed" });
    process.exit(0);
  },
});
