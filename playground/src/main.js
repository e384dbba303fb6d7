// The playground page: the real Loomio client libraries against the local
// services. Configuration comes from the records service (/playground/config.json).
import { HocuspocusProvider } from "@hocuspocus/provider";
import { io } from "socket.io-client";
import * as Y from "yjs";

import { bindTextarea } from "./textarea-binding.js";

const MAX_EVENTS = 200;
const $ = (id) => document.getElementById(id);
const state = { events: [] };
window.playground = state;

function setStatus(id, status, text) {
  const el = $(id);
  el.dataset.state = status;
  el.textContent = text || status;
}

function showEvent(name, payload) {
  state.events.push({ name, payload });
  if (state.events.length > MAX_EVENTS) state.events.shift();
  const item = document.createElement("li");
  const label = document.createElement("span");
  label.className = `name ${name}`;
  label.textContent = `${name} · ${new Date().toLocaleTimeString()}`;
  const body = document.createElement("pre");
  body.textContent = JSON.stringify(payload);
  item.append(label, body);
  const list = $("events");
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function connectRecords(config) {
  // As Loomio's client does: the channel token in the query, default transports.
  const socket = io(window.location.origin, { query: { channel_token: config.channelToken } });
  socket.on("connect", () => setStatus("socket-status", "connected", socket.recovered ? "recovered" : "connected"));
  socket.on("disconnect", (reason) => setStatus("socket-status", "disconnected", `disconnected (${reason})`));
  socket.on("connect_error", (err) => setStatus("socket-status", "error", `error: ${err.message}`));
  socket.on("records", (data) => showEvent("records", data));
  socket.on("notice", (data) => showEvent("notice", data));
  state.socket = socket;
}

function connectEditor(config) {
  const url = config.collabUrl || `ws://${window.location.hostname}:4444`;
  const doc = new Y.Doc();
  const text = doc.getText("playground");
  const editor = $("editor");
  $("document-label").textContent = config.documentName;
  const provider = new HocuspocusProvider({
    url,
    name: config.documentName,
    document: doc,
    token: config.collabToken,
    onStatus: ({ status }) => {
      if (status !== "connected" || !provider.isSynced) setStatus("editor-status", status);
    },
    onSynced: () => {
      setStatus("editor-status", "synced");
      editor.disabled = false;
    },
    onAuthenticationFailed: ({ reason }) => setStatus("editor-status", "error", `denied: ${reason}`),
  });
  bindTextarea(editor, text);
  Object.assign(state, { doc, text, provider });
}

function wirePublishForm() {
  const kind = $("publish-kind");
  const room = $("publish-room");
  kind.addEventListener("change", () => {
    room.disabled = kind.value !== "records";
  });
  $("publish-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = $("publish-result");
    let payload;
    try {
      payload = JSON.parse($("publish-payload").value);
    } catch (err) {
      result.textContent = `not JSON: ${err.message}`;
      return;
    }
    const response = await fetch("/playground/publish", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ kind: kind.value, room: room.value, payload }),
    });
    const answer = await response.json().catch(() => ({}));
    result.textContent = response.ok
      ? `published (${answer.subscribers} Redis subscriber${answer.subscribers === 1 ? "" : "s"})`
      : `refused: ${answer.error || response.status}`;
  });
}

async function main() {
  const config = await (await fetch("/playground/config.json")).json();
  $("user-label").textContent = `${config.user.name} (#${config.user.id})`;
  $("rooms-label").textContent = config.rooms.join(", ");
  wirePublishForm();
  connectRecords(config);
  connectEditor(config);
}

main().catch((err) => {
  setStatus("socket-status", "error", `error: ${err.message}`);
  throw err;
});
