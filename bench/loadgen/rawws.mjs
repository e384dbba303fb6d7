// A minimal RFC 6455 websocket client on a bare TCP socket, for the records
// load generator: thousands of these must cost less CPU than the server they
// measure. It offers no extensions (so frames arrive uncompressed, as both
// servers under test are configured anyway), answers pings, reassembles
// fragmented messages and masks what it sends, as a client must.
//
// Interface: the subset of the `ws` package the load generator uses:
//   new RawWebSocket(url); .on("open"|"message"|"error"|"close", fn);
//   .send(text); .close(); .terminate()
import { createHash, randomBytes } from "node:crypto";
import { EventEmitter } from "node:events";
import { connect } from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const HEADER_END = Buffer.from("\r\n\r\n");
// Every socket reads into this one buffer (net's `onread`): no Buffer and no
// stream 'data' event per read, which at one read per delivery was a large
// part of the load generator's CPU. Safe because each read is handled before
// the next one starts (one thread), and whatever must outlive the callback
// (an incomplete frame, a fragment) is copied out of it.
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);

export class RawWebSocket extends EventEmitter {
  constructor(url) {
    super();
    const { hostname, port, pathname, search } = new URL(url);
    this.key = randomBytes(16).toString("base64");
    this.handshaken = false;
    this.pending = null; // bytes of an incomplete frame (or handshake)
    this.fragments = null; // parts of a fragmented message
    this.fragmentOpcode = 0;
    this.closed = false;
    const onread = { buffer: READ_BUFFER, callback: (n, buf) => this.onData(buf.subarray(0, n)) };
    this.socket = connect({ host: hostname, port: Number(port) || 80, onread }, () => {
      this.socket.setNoDelay(true);
      this.socket.write(
        `GET ${pathname}${search} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${this.key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    this.socket.on("error", (err) => this.emit("error", err));
    this.socket.on("close", () => this.finish());
  }

  finish() {
    if (this.closed) return;
    this.closed = true;
    this.emit("close");
  }

  fail(reason) {
    this.emit("error", new Error(reason));
    this.terminate();
  }

  onData(chunk) {
    let buf = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = null;
    if (!this.handshaken) {
      const end = buf.indexOf(HEADER_END);
      if (end < 0) {
        if (buf.length > 16384) return this.fail("handshake response too long");
        this.pending = Buffer.from(buf);
        return;
      }
      const head = buf.toString("latin1", 0, end);
      if (!/^HTTP\/1\.1 101 /.test(head)) return this.fail(`handshake refused: ${head.split("\r\n")[0]}`);
      const accept = createHash("sha1").update(this.key + GUID).digest("base64");
      const match = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(head);
      if (!match || match[1] !== accept) return this.fail("bad Sec-WebSocket-Accept");
      this.handshaken = true;
      this.emit("open");
      buf = buf.subarray(end + HEADER_END.length);
    }
    let offset = 0;
    while (buf.length - offset >= 2) {
      const b0 = buf[offset];
      const b1 = buf[offset + 1];
      if (b1 & 0x80) return this.fail("server frames must not be masked");
      let length = b1 & 0x7f;
      let header = 2;
      if (length === 126) {
        if (buf.length - offset < 4) break;
        length = buf.readUInt16BE(offset + 2);
        header = 4;
      } else if (length === 127) {
        if (buf.length - offset < 10) break;
        if (buf.readUInt32BE(offset + 2) !== 0) return this.fail("frame too large");
        length = buf.readUInt32BE(offset + 6);
        header = 10;
      }
      if (buf.length - offset < header + length) break;
      const payload = buf.subarray(offset + header, offset + header + length);
      offset += header + length;
      this.onFrame(b0 & 0x80, b0 & 0x0f, payload);
      if (this.closed) return;
    }
    if (offset < buf.length) this.pending = Buffer.from(buf.subarray(offset));
  }

  onFrame(fin, opcode, payload) {
    if (opcode === 0x1 || opcode === 0x2) {
      if (fin) this.emit("message", payload, opcode === 0x2);
      else {
        this.fragments = [Buffer.from(payload)];
        this.fragmentOpcode = opcode;
      }
    } else if (opcode === 0x0) {
      if (!this.fragments) return this.fail("continuation without a first frame");
      this.fragments.push(Buffer.from(payload));
      if (fin) {
        const whole = Buffer.concat(this.fragments);
        this.fragments = null;
        this.emit("message", whole, this.fragmentOpcode === 0x2);
      }
    } else if (opcode === 0x8) {
      this.writeFrame(0x8, payload.subarray(0, 2));
      this.socket.end();
      this.finish();
    } else if (opcode === 0x9) {
      this.writeFrame(0xa, payload);
    }
  }

  writeFrame(opcode, data) {
    if (this.closed || this.socket.destroyed) return;
    const body = typeof data === "string" ? Buffer.from(data) : data;
    if (body.length > 125) throw new Error("the load generator only sends short frames");
    const frame = Buffer.allocUnsafe(6 + body.length);
    frame[0] = 0x80 | opcode;
    frame[1] = 0x80 | body.length;
    randomBytes(4).copy(frame, 2);
    for (let i = 0; i < body.length; i++) frame[6 + i] = body[i] ^ frame[2 + (i & 3)];
    this.socket.write(frame);
  }

  send(text) {
    this.writeFrame(0x1, text);
  }

  close() {
    this.writeFrame(0x8, Buffer.from([0x03, 0xe8]));
    this.socket.end();
  }

  terminate() {
    this.socket.destroy();
    this.finish();
  }
}
