// The soak's editors (tests/soak): real @hocuspocus/provider (v3 or v4)
// documents, some sharing one HocuspocusProviderWebsocket (a browser tab with
// several editors open), some on a socket of their own.
//
//   node soak-collab.mjs '<json config>'
// config: {version, url, address, token, user, shared: [doc...], private: [doc...]}
// Each provider is known by a key: "s:<doc>" (shared socket) or "p:<doc>".
// Commands (stdin, one JSON object a line):
//   {op: "insert", key, marker, r}   insert marker at a marker boundary (r in [0,1) picks it)
//   {op: "delete", key, marker}      delete that marker where it now is
//   {op: "read", key}                -> {t: "content", key, text, unsynced, synced}
//   {op: "awareness", key}           -> {t: "aw", key, users}
//   {op: "exit"}
// Events: {t: "ready"}, {t: "auth", key}, {t: "denied", key}, {t: "synced", key},
//   {t: "edit", key, op, marker, seq}: the provider's seq-th edit was made;
//   {t: "acked", key, seq}: unsynced changes back at zero after `seq` edits of
//   that provider (each SyncStatus decrements the count; zero means every
//   edit so far was acknowledged by the server).
import WebSocket from "ws";
import readline from "node:readline";

const config = JSON.parse(process.argv[2]);
const lib = await import(config.version === "v4" ? "hocuspocus-provider-v4" : "hocuspocus-provider-v3");
const { HocuspocusProvider, HocuspocusProviderWebsocket } = lib;
const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");

class FromAddress extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols, { localAddress: config.address });
  }
}

function socket() {
  return new HocuspocusProviderWebsocket({
    url: config.url,
    WebSocketPolyfill: FromAddress,
    delay: 200,
    minDelay: 200,
    maxDelay: 2000,
    factor: 1.5,
  });
}

const providers = new Map();
const edits = new Map();

function attach(websocketProvider, doc, key) {
  edits.set(key, 0);
  const provider = new HocuspocusProvider({
    websocketProvider,
    name: doc,
    token: config.token,
    onAuthenticated: () => emit({ t: "auth", key }),
    onAuthenticationFailed: ({ reason }) => emit({ t: "denied", key, reason }),
    onSynced: () => emit({ t: "synced", key }),
    onUnsyncedChanges: ({ number }) => {
      if (number === 0) emit({ t: "acked", key, seq: edits.get(key) });
    },
  });
  provider.setAwarenessField("user", `${config.user}/${key}`);
  provider.attach();
  providers.set(key, provider);
}

const shared = socket();
for (const doc of config.shared ?? []) attach(shared, doc, `s:${doc}`);
for (const doc of config.private ?? []) attach(socket(), doc, `p:${doc}`);

function boundaries(text) {
  const at = [0];
  for (let i = 0; i < text.length; i++) if (text[i] === "]") at.push(i + 1);
  return at;
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  const provider = providers.get(cmd.key);
  try {
    switch (cmd.op) {
      case "insert": {
        const text = provider.document.getText("body");
        const at = boundaries(text.toString());
        text.insert(at[Math.floor(cmd.r * at.length)], cmd.marker);
        edits.set(cmd.key, edits.get(cmd.key) + 1);
        emit({ t: "edit", key: cmd.key, op: "insert", marker: cmd.marker, seq: edits.get(cmd.key) });
        break;
      }
      case "delete": {
        const text = provider.document.getText("body");
        const at = text.toString().indexOf(cmd.marker);
        if (at >= 0) {
          text.delete(at, cmd.marker.length);
          edits.set(cmd.key, edits.get(cmd.key) + 1);
          emit({ t: "edit", key: cmd.key, op: "delete", marker: cmd.marker, seq: edits.get(cmd.key) });
        } else {
          emit({ t: "delete-missed", key: cmd.key, marker: cmd.marker });
        }
        break;
      }
      case "read":
        emit({
          t: "content",
          key: cmd.key,
          text: provider.document.getText("body").toString(),
          unsynced: provider.unsyncedChanges,
          synced: provider.isSynced,
        });
        break;
      case "awareness": {
        const users = [...provider.awareness.getStates().values()].map((s) => s.user ?? null).filter(Boolean).sort();
        emit({ t: "aw", key: cmd.key, users });
        break;
      }
      case "exit":
        for (const p of providers.values()) p.destroy();
        setTimeout(() => process.exit(0), 50);
        break;
    }
  } catch (e) {
    emit({ t: "error", error: String(e?.stack ?? e) });
  }
});
rl.on("close", () => process.exit(0));
emit({ t: "ready" });
