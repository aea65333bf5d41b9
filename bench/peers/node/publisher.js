// Publisher for the Node socket.io peer: a second socket.io Server (no HTTP)
// on the same Redis streams adapter; `io.to(room).emit` reaches the server's
// sockets only through Redis. Driven by bench.compare with JSON lines on stdin,
// like bench.loadgen's poster: {"cmd": "post", t0_ns, period_ns, seq_start, count, feeds}.
//
// Open loop: post i is scheduled at t0 + i * period (CLOCK_MONOTONIC ns, the
// clock of process.hrtime); a late timer sends the overdue posts at once and
// the lateness is reported, never absorbed.
"use strict";
const readline = require("node:readline");
const { createClient } = require("redis");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-streams-adapter");

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

function summaryMs(ns) {
  const out = { count: ns.length };
  if (!ns.length) return { ...out, p50: null, p90: null, "p99": null, "p99.9": null, max: null, mean: null };
  const s = Float64Array.from(ns).sort();
  const pick = (q) => s[Math.min(Math.max(Math.ceil((q / 100) * s.length), 1), s.length) - 1];
  const r = (v) => Math.round(v / 1e3) / 1e3;
  let sum = 0;
  for (const v of s) sum += v;
  return { ...out, p50: r(pick(50)), p90: r(pick(90)), p99: r(pick(99)), "p99.9": r(pick(99.9)), max: r(s[s.length - 1]), mean: r(sum / s.length) };
}

async function main() {
  const redis = createClient({ url: arg("--redis-url") });
  redis.on("error", (err) => console.error("redis:", err.message));
  await redis.connect();
  const io = new Server({ adapter: createAdapter(redis) });
  const reply = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

  function post(cmd) {
    return new Promise((resolve) => {
      const t0 = BigInt(cmd.t0_ns);
      const period = BigInt(cmd.period_ns);
      const { seq_start: start, count, feeds } = cmd;
      const lag = [];
      let i = 0;
      const tick = () => {
        const now = process.hrtime.bigint();
        while (i < count && t0 + BigInt(i) * period <= now) {
          const seq = start + i;
          const scheduled = t0 + BigInt(i) * period;
          const feed = seq % feeds;
          const created = Date.now();
          io.to(`user:h${feed}`).emit("post", {
            op: "post",
            feed: `user:h${feed}`,
            cursor: `0.${created}-${seq}`,
            post: { id: `${created}-${seq}`, author: `h${feed}`, text: `${seq} ${scheduled}`, events: [], media: [], created_at: created },
          });
          lag.push(Number(now - scheduled));
          i++;
        }
        if (i < count) {
          const next = t0 + BigInt(i) * period;
          setTimeout(tick, Math.max(0, Number(next - process.hrtime.bigint()) / 1e6));
        } else {
          resolve({ ok: true, accepted: count, failed: [], statuses: { emitted: count }, send_lag_ms: summaryMs(lag), http_ms: summaryMs([]) });
        }
      };
      tick();
    });
  }

  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const cmd = JSON.parse(line);
    try {
      if (cmd.cmd === "setup") reply({ ok: true });
      else if (cmd.cmd === "post") reply(await post(cmd));
      else reply({ ok: false, error: `unknown command ${cmd.cmd}` });
    } catch (err) {
      reply({ ok: false, error: String(err) });
    }
  }
  await redis.quit().catch(() => {});
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
