// The load generators' stdin protocol: one JSON command per line, run one at
// a time in arrival order; stdin closing means {"cmd": "close"}. Replies and
// errors are JSON lines on stdout.
import { createInterface } from "node:readline";

export const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// handlers: {cmd: async (msg) => ...}; a command with no handler is ignored.
export function serveCommands(handlers) {
  const queue = [];
  let busy = false;
  async function pump() {
    if (busy) return;
    busy = true;
    while (queue.length) {
      let msg;
      try {
        msg = JSON.parse(queue.shift());
      } catch {
        out({ event: "error", error: "bad command" });
        continue;
      }
      try {
        const handler = Object.hasOwn(handlers, msg.cmd) ? handlers[msg.cmd] : null;
        if (handler) await handler(msg);
      } catch (err) {
        out({ event: "error", error: String(err && err.stack ? err.stack : err) });
      }
    }
    busy = false;
  }
  const rl = createInterface({ input: process.stdin });
  rl.on("line", (line) => {
    queue.push(line);
    pump();
  });
  rl.on("close", () => {
    queue.push('{"cmd":"close"}');
    pump();
  });
}
