// One "browser tab" of Loomio's editor: a real @hocuspocus/provider (v3 or v4)
// sharing one HocuspocusProviderWebsocket across any number of documents.
// Driven by the Python tests: JSON commands on stdin, JSON events on stdout.
//
//   node hocuspocus-client.mjs v3|v4 ws://127.0.0.1:PORT
//
// Commands ({"op": ...}):
//   attach   {doc, token, user?, session?, key?}  open a document (user -> awareness
//            state; session -> v4 session awareness; key -> name it for later commands)
//   text     {doc, insert, at?}         insert into the Y.Text "body"
//   delete   {doc, at, length}          delete from the Y.Text "body"
//   type     {doc, chars}               insert each character as its own change (one update each)
//   para     {doc, insert}              append <paragraph>insert</paragraph> to the Y.XmlFragment "default"
//   read     {doc}                      -> {event: "content", text, xml, unsynced}
//   awareness {doc}                     -> {event: "awareness", states: [{clientId, user}]}
//   detach   {doc}                      destroy that provider (socket stays)
//   exit                                destroy everything and exit
//
// Events: open, authenticated, denied, synced, close/disconnect (with code),
// frame (every frame received for a document: {doc, type}), awareness-change.
import WebSocket from "ws";
import * as Y from "yjs";
import readline from "node:readline";

const [version = "v3", url] = process.argv.slice(2);
const lib = await import(version === "v4" ? "hocuspocus-provider-v4" : "hocuspocus-provider-v3");
const { HocuspocusProvider, HocuspocusProviderWebsocket } = lib;

const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");

function readVarUint(bytes, pos) {
  let value = 0, shift = 0;
  for (;;) {
    const b = bytes[pos++];
    value += (b & 0x7f) * 2 ** shift;
    shift += 7;
    if (b < 0x80) return [value, pos];
  }
}

function frameInfo(data) {
  const bytes = new Uint8Array(data);
  if (bytes.length === 1) return { doc: null, type: bytes[0] };
  let [len, pos] = readVarUint(bytes, 0);
  const doc = new TextDecoder().decode(bytes.slice(pos, pos + len));
  const [type] = readVarUint(bytes, pos + len);
  return { doc, type };
}

const socket = new HocuspocusProviderWebsocket({
  url,
  WebSocketPolyfill: WebSocket,
  // Reconnect fast so the tests see recovery quickly.
  delay: 100,
  minDelay: 100,
  maxDelay: 500,
  factor: 1.5,
  onOpen: () => emit({ event: "open" }),
  onClose: ({ event }) => emit({ event: "close", code: event?.code ?? null }),
  onDisconnect: ({ event }) => emit({ event: "disconnect", code: event?.code ?? null }),
  onMessage: (message) => {
    try {
      // The socket passes the WebSocket MessageEvent itself.
      emit({ event: "frame", ...frameInfo(message.data ?? message.event?.data) });
    } catch (e) {
      emit({ event: "frame-error", error: String(e) });
    }
  },
});

const providers = new Map();

function attach({ doc, token, user, session, key }) {
  const label = key ?? doc;
  const provider = new HocuspocusProvider({
    websocketProvider: socket,
    name: doc,
    token,
    // v4: several providers of one document on one socket (name\0sessionId).
    sessionAwareness: !!session,
    onAuthenticated: ({ scope }) => emit({ event: "authenticated", doc: label, scope }),
    onAuthenticationFailed: ({ reason }) => emit({ event: "denied", doc: label, reason }),
    onSynced: ({ state }) => emit({ event: "synced", doc: label, state }),
    onAwarenessChange: ({ states }) =>
      emit({ event: "awareness-change", doc: label, users: states.map((s) => s.user ?? null).filter(Boolean).sort() }),
  });
  if (user) provider.setAwarenessField("user", user);
  provider.attach();
  providers.set(label, provider);
}

function read(doc) {
  const provider = providers.get(doc);
  const ydoc = provider.document;
  return {
    event: "content",
    doc,
    text: ydoc.getText("body").toString(),
    xml: ydoc.getXmlFragment("default").toString(),
    unsynced: provider.unsyncedChanges,
    synced: provider.isSynced,
    authenticated: provider.isAuthenticated,
  };
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  try {
    switch (cmd.op) {
      case "attach":
        attach(cmd);
        break;
      case "text": {
        const text = providers.get(cmd.doc).document.getText("body");
        text.insert(cmd.at ?? text.length, cmd.insert);
        break;
      }
      case "delete":
        providers.get(cmd.doc).document.getText("body").delete(cmd.at, cmd.length);
        break;
      case "type": {
        const text = providers.get(cmd.doc).document.getText("body");
        for (const ch of cmd.chars) text.insert(text.length, ch);
        emit({ event: "typed", doc: cmd.doc, count: cmd.chars.length });
        break;
      }
      case "para": {
        const fragment = providers.get(cmd.doc).document.getXmlFragment("default");
        const paragraph = new Y.XmlElement("paragraph");
        paragraph.insert(0, [new Y.XmlText(cmd.insert)]);
        fragment.insert(fragment.length, [paragraph]);
        break;
      }
      case "read":
        emit(read(cmd.doc));
        break;
      case "awareness": {
        const states = [...providers.get(cmd.doc).awareness.getStates().entries()];
        emit({ event: "awareness", doc: cmd.doc, users: states.map(([, s]) => s.user ?? null).filter(Boolean).sort() });
        break;
      }
      case "detach":
        providers.get(cmd.doc).destroy();
        providers.delete(cmd.doc);
        emit({ event: "detached", doc: cmd.doc });
        break;
      case "exit":
        shutdown();
        break;
      default:
        emit({ event: "error", error: `unknown op ${cmd.op}` });
    }
  } catch (e) {
    emit({ event: "error", error: String(e?.stack ?? e) });
  }
});

function shutdown() {
  for (const provider of providers.values()) provider.destroy();
  socket.destroy();
  emit({ event: "exited" });
  setTimeout(() => process.exit(0), 50);
}

rl.on("close", shutdown);
emit({ event: "ready", version });
