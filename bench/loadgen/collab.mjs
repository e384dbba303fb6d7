// Collab load generator: real @hocuspocus/provider clients (v3, the version
// shipped with the original server) editing Yjs documents.
//
// Per document: an editor and an observer, each with its own websocket as a
// browser tab would have. The editor inserts text and stamps the wall time
// in a Y.Map; the observer measures how long the update took to arrive.
//
// Driven over stdin/stdout, one JSON object per line:
//   {"cmd":"load","url":"ws://127.0.0.1:4444","docs":D}        -> {"event":"loaded",...}
//     (with "observerUrl": the observers connect there: another instance)
//   {"cmd":"edit","rate":1,"seconds":10,"drainMs":3000}        -> {"event":"edited",...}
//   {"cmd":"bigsync","bytes":100000,"repeats":3}               -> {"event":"bigsync",...}
//   {"cmd":"close"}
import { now } from "./clock.mjs";
import { PerformanceObserver } from "node:perf_hooks";
import { HocuspocusProvider } from "@hocuspocus/provider";
import WebSocket from "ws";
import * as Y from "yjs";
import { out, serveCommands } from "./commands.mjs";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const pairs = [];
let latencies = [];
let url = null;
let observerUrl = null;
let errors = 0;
// Loomio's token shape is "{user_id},{secret}"; the stand-in Rails allows all.
const TOKEN = "1,bench-secret";

function provider(name, doc, target = url) {
  return new HocuspocusProvider({
    url: target,
    name,
    document: doc,
    token: TOKEN,
    WebSocketPolyfill: WebSocket,
    onAuthenticationFailed: () => errors++,
  });
}

function synced(p, timeoutMs = 30000) {
  if (p.isSynced) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    p.on("synced", ({ state }) => {
      if (state) {
        clearTimeout(timer);
        resolve(true);
      }
    });
  });
}

function acked(p, timeoutMs = 30000) {
  const deadline = now() + timeoutMs;
  return (async () => {
    while (p.hasUnsyncedChanges) {
      if (now() > deadline) return false;
      await sleep(5);
    }
    return true;
  })();
}

async function loadPair(i) {
  const name = `comment-${i + 1}-body`;
  const editorDoc = new Y.Doc();
  const observerDoc = new Y.Doc();
  const pair = {
    name,
    editorDoc,
    observerDoc,
    editor: provider(name, editorDoc),
    observer: provider(name, observerDoc, observerUrl ?? url),
    sent: 0,
  };
  observerDoc.getMap("bench").observe((event) => {
    if (!event.keysChanged.has("t")) return;
    const t = observerDoc.getMap("bench").get("t");
    if (typeof t === "number") latencies.push(now() - t);
  });
  const ok = (await synced(pair.editor)) && (await synced(pair.observer));
  pairs.push(pair);
  return ok;
}

async function load({ url: target, observerUrl: observerTarget = null, docs, concurrency = 20 }) {
  url = target;
  observerUrl = observerTarget;
  const started = now();
  let next = 0;
  let failed = 0;
  async function worker() {
    while (next < docs) {
      const i = next++;
      if (!(await loadPair(i))) failed++;
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, docs) }, worker));
  out({ event: "loaded", docs: pairs.length - failed, failed, ms: now() - started });
}

const WORDS = "the quick brown fox jumps over the lazy dog ";

function edit(pair) {
  const text = pair.editorDoc.getText("default");
  pair.editorDoc.transact(() => {
    text.insert(text.length, WORDS.slice(0, 12));
    pair.editorDoc.getMap("bench").set("t", now());
  });
  pair.sent++;
}

// This process's own garbage collection pauses every update in flight to
// it, whichever server is measured: its pauses during the edit phase are
// reported beside the latencies, as the floor under their tail.
function gcPauses() {
  const pauses = [];
  const observer = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) pauses.push(entry.duration);
  });
  observer.observe({ entryTypes: ["gc"] });
  return () => {
    observer.disconnect();
    return {
      count: pauses.length,
      totalMs: pauses.reduce((a, b) => a + b, 0),
      maxMs: pauses.length ? Math.max(...pauses) : 0,
    };
  };
}

async function editPhase({ rate = 1, seconds = 10, drainMs = 3000 }) {
  latencies = [];
  for (const p of pairs) p.sent = 0;
  const stopGc = gcPauses();
  const periodMs = 1000 / rate;
  const timers = [];
  // Stagger the editors over one period so the server sees a steady stream.
  pairs.forEach((pair, i) => {
    const offset = (periodMs * i) / pairs.length;
    timers.push(
      setTimeout(() => {
        edit(pair);
        timers.push(setInterval(() => edit(pair), periodMs));
      }, offset),
    );
  });
  await sleep(seconds * 1000);
  for (const t of timers) {
    clearTimeout(t);
    clearInterval(t);
  }
  const sent = pairs.reduce((n, p) => n + p.sent, 0);
  const deadline = now() + drainMs;
  while (latencies.length < sent && now() < deadline) await sleep(20);
  const gc = stopGc();
  const sorted = Float64Array.from(latencies).sort();
  const pct = (q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] : null);
  out({
    event: "edited",
    sent,
    received: sorted.length,
    p50: pct(0.5),
    p99: pct(0.99),
    max: sorted.length ? sorted[sorted.length - 1] : null,
    seconds,
    errors,
    gc,
  });
}

async function bigSync({ bytes = 100000, repeats = 3 }) {
  const times = [];
  let failed = 0;
  for (let r = 0; r < repeats; r++) {
    const name = `discussion-${900000 + r}-description`;
    const doc = new Y.Doc();
    const writer = provider(name, doc);
    await synced(writer);
    // Typed in paragraphs rather than one insert, so the document has the
    // many small items a real edited document has.
    const text = doc.getText("default");
    const chunk = WORDS.repeat(Math.ceil(100 / WORDS.length)).slice(0, 100);
    for (let written = 0; written < bytes; written += chunk.length) {
      text.insert(text.length, chunk);
    }
    await acked(writer);
    const fresh = new Y.Doc();
    const started = now();
    const reader = provider(name, fresh);
    const ok = await synced(reader);
    const elapsed = now() - started;
    if (ok && fresh.getText("default").length === text.length) times.push(elapsed);
    else failed++;
    reader.destroy();
    writer.destroy();
  }
  times.sort((a, b) => a - b);
  out({ event: "bigsync", bytes, times, median: times.length ? times[Math.floor(times.length / 2)] : null, failed });
}

async function shutdown() {
  for (const p of pairs) {
    p.editor.destroy();
    p.observer.destroy();
  }
  out({ event: "closed" });
  process.exit(0);
}

serveCommands({ load, edit: editPhase, bigsync: bigSync, close: shutdown });
