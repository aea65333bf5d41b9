// Node socket.io 4 with @socket.io/redis-streams-adapter: rooms across processes via a Redis stream.
//
//     node server.js --redis-url redis://... [--port 0]
//
// A client joins a room with the acked `join` event; posts reach the room from
// another process (publisher.js) through the adapter's Redis stream.
"use strict";
const http = require("node:http");
const { createClient } = require("redis");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-streams-adapter");

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

async function main() {
  const redis = createClient({ url: arg("--redis-url") });
  redis.on("error", (err) => console.error("redis:", err.message));
  await redis.connect();
  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(redis),
    transports: ["websocket"],
    serveClient: false,
  });
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      socket.join(room);
      if (typeof ack === "function") ack(true);
    });
  });
  httpServer.listen(Number(arg("--port", "0")), arg("--host", "127.0.0.1"), 4096, () => {
    const a = httpServer.address();
    console.log(`listening on http://${a.address}:${a.port}`);
  });
  process.on("SIGTERM", () => process.exit(0));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
