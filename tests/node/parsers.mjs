// The reference parsers' verdict on inputs, for the Python core's byte-vector tests.
//   node parsers.mjs '{"socketio": [...], "engineio": [...]}'
// Prints {socketio: [{ok} | {error} | {pending}], engineio: [{type, data}]} as one JSON line.
import { Decoder } from "socket.io-parser";
import { decodePacket } from "engine.io-parser";

const input = JSON.parse(process.argv[2]);
const socketio = input.socketio.map((text) => {
  const decoder = new Decoder();
  let result = { pending: true };
  decoder.on("decoded", (packet) => {
    result = { ok: packet };
  });
  try {
    decoder.add(text);
  } catch (err) {
    result = { error: err.message };
  }
  return result;
});
const engineio = input.engineio.map((text) => {
  const packet = decodePacket(text, "nodebuffer");
  if (Buffer.isBuffer(packet.data)) return { type: packet.type, binary: [...packet.data] };
  return packet;
});
process.stdout.write(JSON.stringify({ socketio, engineio }) + "\n");
