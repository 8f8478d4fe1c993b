// A socket.io-client 4 driven over stdin/stdout, one JSON object per line, for
// tests/socketio.rs. Commands in:
//   {"op":"connect","url":URL,"opts":{…}}        io(URL, opts): reports connect / connect_error
//   {"op":"emit","event":E,"args":[…],"ack":true} socket.emit(E, …args[, ack]): reports the ack
//                                                ({"binary":[bytes]} in args is binary)
//   {"op":"transport"}                             reports the engine's transport name
//   {"op":"disconnect"}                            socket.disconnect()
//   {"op":"drop"}                                  socket.io.engine.close(): a lost connection
//   {"op":"reconnect","url":URL}                   socket.connect() again (to URL if given)
// Reports out: {"connect":{"id","recovered"}}, {"connect_error":{"message","data"}},
// {"event":E,"args":[…]} for every event, {"ack":N,"args":[…]}, {"transport":NAME},
// {"upgrade":NAME}, {"disconnect":REASON}.
import { io } from "socket.io-client";
import { createInterface } from "node:readline";

const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
// Binary anywhere in a value as {"binary":[bytes]}.
const plain = (v) => {
  if (v instanceof ArrayBuffer || ArrayBuffer.isView(v)) {
    return { binary: Array.from(new Uint8Array(v.buffer ?? v, v.byteOffset ?? 0, v.byteLength)) };
  }
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === "object") {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  }
  return v;
};
// {"binary":[bytes]} anywhere in an argument is sent as binary (an attachment).
const revive = (v) => {
  if (v && typeof v === "object") {
    if (Array.isArray(v.binary)) return Uint8Array.from(v.binary);
    if (Array.isArray(v)) return v.map(revive);
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, revive(x)]));
  }
  return v;
};
let socket;
let acks = 0;

createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  switch (cmd.op) {
    case "connect":
      socket = io(cmd.url, { reconnection: false, ...cmd.opts });
      socket.on("connect", () => say({ connect: { id: socket.id, recovered: socket.recovered } }));
      socket.on("connect_error", (e) => say({ connect_error: { message: e.message, data: e.data } }));
      socket.on("disconnect", (reason) => say({ disconnect: reason }));
      socket.onAny((event, ...args) => say({ event, args: args.map(plain) }));
      socket.io.on("open", () => socket.io.engine.on("upgrade", (t) => say({ upgrade: t.name })));
      break;
    case "emit": {
      const args = (cmd.args ?? []).map(revive);
      if (cmd.ack) {
        const n = ++acks;
        socket.emit(cmd.event, ...args, (...reply) => say({ ack: n, args: reply.map(plain) }));
      } else {
        socket.emit(cmd.event, ...args);
      }
      break;
    }
    case "transport":
      say({ transport: socket.io.engine.transport.name });
      break;
    case "disconnect":
      socket.disconnect();
      break;
    case "drop":
      // The connection is lost without a goodbye (the client may recover its session).
      socket.io.engine.close();
      break;
    case "reconnect":
      // To another server, when `url` is given.
      if (cmd.url) socket.io.uri = cmd.url;
      socket.connect();
      break;
  }
});
process.stdin.on("end", () => process.exit(0));
