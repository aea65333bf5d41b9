"""Fault injection with real processes and a real Redis.

Every case starts its own redis-server and its own `streamd gateway` /
`streamd fanout` subprocesses (see `faults_support.Cluster`), injects a fault
(SIGKILL, SIGTERM, a Redis restart, cut sockets, clients that stop reading,
trimmed or deleted histories) while posts flow, and then checks the
guarantees of PROTOCOL.md exactly:

- every post accepted with 201 is in each of its feeds once (the Redis
  histories are read directly), and
- every resuming subscriber received exactly each feed's history, in order,
  each item once (`tally_reader` compares the full lists, cursors included).

Each case prints one `FAULT-REPORT` line with its numbers (`pytest -s`).
Random choices use one seed per case, printed in the report; set
`FAULTS_SEED` to replay one. `FAULTS_SOAK_SECONDS` (5) sets how long the
concurrent-workers case runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from streamd import keys
from tests.faults_support import (
    Changes,
    Cluster,
    Gateway,
    Poster,
    Proxy,
    RawWs,
    SseSubscriber,
    StreamClientTally,
    Subscriber,
    Worker,
    WsClosed,
    caught_up,
    settle,
    established,
    history,
    host_port,
    kernel_queues,
    pending_total,
    poll,
    report,
    seeded_rng,
    tally_feeds,
    tally_reader,
    wait_fanned_out,
)

pytestmark = pytest.mark.timeout(150)

# The worker-crash cases test the worker writing the feeds: posts are not
# fanned out by the script that accepts them.
WORKER_WRITES = {"STREAMD_FANOUT_AT_ACCEPT": "false"}


async def resume_once(url: str, feed: str, cursor: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Subscribe with `cursor` on a fresh socket: the `subscribed` reply and the replayed items.

    A ping sent right after the subscribe is answered only once the replay is
    queued (the socket's frames are handled in order), so the pong marks its end.
    """
    ws = await RawWs.connect(url)
    try:
        ws.send_json({"op": "subscribe", "feed": feed, "cursor": cursor, "ref": "s"})
        ws.send_json({"op": "ping", "ref": "end"})
        subscribed = await asyncio.wait_for(ws.recv(), 10)
        assert subscribed["op"] == "subscribed", subscribed
        items: list[tuple[str, str]] = []
        while True:
            frame = await asyncio.wait_for(ws.recv(), 10)
            if frame["op"] == "pong":
                return subscribed, items
            assert frame["op"] == "post", frame
            items.append((frame["cursor"], frame["post"]["id"]))
    finally:
        await ws.close()


# -- 1. fan-out workers killed --------------------------------------------------------------

AUTHORS = ("ann", "bob", "cat")
EVENTS = ("race", "derby", "final", "heat-1", "heat-2")


async def setup_feeds(c: Cluster, gw: Gateway) -> tuple[dict[str, str], dict[str, set[str]], list[str]]:
    """Three authors, a public list of two of them; every feed their posts can reach."""
    tokens = {a: await c.user(gw, a) for a in AUTHORS}
    list_id = await c.public_list(gw, tokens["ann"], ["ann", "bob"])
    lists = {list_id: {"ann", "bob"}}
    feeds = [f"user:{a}" for a in AUTHORS] + [f"event:{e}" for e in EVENTS] + [f"list:{list_id}"]
    return tokens, lists, feeds


def replayed(poster: Poster) -> int:
    return sum(1 for s in poster.sent if s.replayed)


@pytest.mark.slow
async def test_fanout_workers_sigkilled_while_posts_flow(tmp_path: Any) -> None:
    rng, seed = seeded_rng()
    async with Cluster(tmp_path, env=WORKER_WRITES) as c:
        gw = await c.gateway()
        tokens, lists, feeds = await setup_feeds(c, gw)
        changes = Changes()
        poster = Poster(c.http, lambda: [gw.url], tokens)
        stream = keys.ingest_stream(0)
        kills: list[dict[str, Any]] = []
        workers: list[Worker] = []
        crashed: list[str] = []

        async def pending_of(consumer: str) -> int:
            return len(await c.redis.xpending_range(stream, keys.FANOUT_GROUP, "-", "+", 10_000, consumer))

        watchers: list[asyncio.Task[None]] = []

        async def spawn() -> None:
            worker = await c.worker()
            workers.append(worker)
            watchers.append(asyncio.create_task(supervise(worker)))

        async def supervise(worker: Worker) -> None:
            # A worker that exits without being signalled by the test is a bug of its
            # own (test_concurrent_workers_do_not_crash); like a supervisor, start a
            # new one in its place so that this case keeps testing delivery.
            assert worker.proc is not None
            await worker.proc.wait()
            if worker.signalled is None and worker in workers:
                crashed.append(f"{worker.name} exit {worker.returncode}: {worker.lines[-1]}")
                workers.remove(worker)
                await spawn()

        async def kill(victims: list[Worker], batch: int, how: str) -> None:
            # SIGKILL once a victim holds `batch` entries read but not acked (bounded
            # wait; an idle worker is killed anyway): another worker must take them over.
            async def holding() -> bool:
                return any([await pending_of(v.consumer) >= batch for v in victims])

            with contextlib.suppress(AssertionError):
                await poll(holding, 1, "a batch in flight", every=0.001)
            for v in victims:
                await v.kill()
                if v in workers:  # unless it had crashed just before
                    workers.remove(v)
            left = sum([await pending_of(v.consumer) for v in victims])
            kills.append({"after_accepted": poster.accepted, "killed": len(victims), "left_pending": left, "how": how})

        async def post_round(n: int) -> None:
            sem = asyncio.Semaphore(4)

            async def one() -> None:
                async with sem:
                    await poster.post(rng.choice(AUTHORS), rng.sample(EVENTS, rng.randint(1, 4)))

            await asyncio.gather(*(one() for _ in range(n)))

        async def fault(round_no: int, start: int, size: int) -> None:
            at = start + rng.randrange(size // 2)
            await poster.changes.until(lambda: poster.accepted >= at, 60, f"{at} accepted posts")
            while len(workers) < 2:
                await spawn()
            if round_no == 2:
                # Both at once; posts pile up with no worker; the next worker is
                # killed with a large batch in flight; then two again.
                await kill(list(workers), 1, "both at once")
                await poster.changes.until(lambda: poster.accepted >= start + size, 60, "a backlog")
                await spawn()
                await kill([workers[-1]], 50, "during the backlog")
            else:
                await kill([rng.choice(workers)], 1, "one of two")
            while len(workers) < 2:
                await spawn()

        await asyncio.gather(spawn(), spawn())
        size = 150
        try:
            async with (
                Subscriber("raw", feeds, lambda: gw.url, changes=changes) as raw,
                StreamClientTally("client", gw.url, feeds, changes=changes) as client,
            ):
                for round_no in range(7):
                    await asyncio.gather(post_round(size), fault(round_no, round_no * size, size))
                total = 7 * size
                expected = poster.expected(lists)
                histories = await settle(c.redis, changes, expected, feeds, (raw.items, client.items))
        finally:
            for task in watchers:
                task.cancel()
        feed_numbers, feed_problems = tally_feeds(expected, histories)
        raw_numbers, raw_problems = tally_reader("raw", raw.items, histories)
        client_numbers, client_problems = tally_reader("client", client.items, histories)
        report(
            "worker-sigkill",
            {"seed": seed, "posts_sent": len(poster.sent), "accepted": poster.accepted, "feeds": feed_numbers,
             "kills": kills, "workers_started": sum(1 for p in c.procs if isinstance(p, Worker)),
             "raw_subscriber": {**raw_numbers, "reconnects": raw.reconnects},
             "stream_client": {**client_numbers, "reconnects": client.reconnects},
             "workers_that_crashed_on_their_own": crashed},
        )  # fmt: skip
        assert poster.accepted == total, poster.refusals()
        assert feed_problems == [], feed_problems
        assert raw_problems == [] and client_problems == [], raw_problems + client_problems
        assert raw.gaps == [] and client.gaps == [] and raw.errors == []
        assert sum(k["left_pending"] for k in kills) > 0, "no kill landed with a batch in flight"


async def test_concurrent_workers_do_not_crash(tmp_path: Any) -> None:
    # Workers that run their claim-and-trim cycle on every loop turn, while
    # single posts keep the group's pending count going 1 -> 0.
    async with Cluster(tmp_path, env={**WORKER_WRITES, "STREAMD_CLAIM_EVERY_SECONDS": "0"}) as c:
        gw = await c.gateway()
        token = await c.user(gw, "tia")
        workers = [await c.worker() for _ in range(3)]
        poster = Poster(c.http, lambda: [gw.url], {"tia": token})
        started = time.monotonic()
        soak = float(os.environ.get("FAULTS_SOAK_SECONDS") or 5)  # longer by hand to hunt a race
        while time.monotonic() - started < soak and all(w.alive for w in workers):
            await poster.post("tia")
        died = [f"{w.name}: exit {w.returncode}: {list(w.lines)[-1]}" for w in workers if not w.alive]
        report("concurrent-workers", {"posts": len(poster.sent), "seconds": round(time.monotonic() - started, 1),
                                      "died": died})  # fmt: skip
        assert died == []


# -- 2. gateways killed -------------------------------------------------------------------


@pytest.mark.slow
async def test_gateway_sigkilled_subscribers_resume_on_another(tmp_path: Any) -> None:
    rng, seed = seeded_rng()
    async with Cluster(tmp_path) as c:
        g1, g2 = await c.gateway(), await c.gateway()
        await c.worker()
        tokens, lists, feeds = await setup_feeds(c, g1)
        gateways: list[Gateway] = [g1, g2]  # the current process of each slot
        changes = Changes()

        def alive_urls() -> list[str]:
            return [g.url for g in gateways if g.alive] or [g.url for g in gateways]

        def prefer(slot: int) -> Any:
            return lambda: gateways[slot].url if gateways[slot].alive else alive_urls()[0]

        # Posts go to both gateways; one refused by a dying gateway is retried on the
        # other with the same idempotency key, so none is accepted twice.
        poster = Poster(c.http, alive_urls, tokens)
        total = 900
        plan = sorted(rng.sample(range(80, total - 120), 3))
        faults: list[dict[str, Any]] = []

        async def one(sem: asyncio.Semaphore) -> None:
            async with sem:
                await poster.post(rng.choice(AUTHORS), rng.sample(EVENTS, rng.randint(1, 3)))

        async def killer(a: Subscriber, b: Subscriber, sc: StreamClientTally) -> None:
            for k, at in enumerate(plan):
                await poster.changes.until(lambda: poster.accepted >= at, 60, f"{at} accepted")  # noqa: B023
                slot = k % 2
                victim = gateways[slot]
                on_victim = [s for s in (a, b) if s.connected_to == victim.url]
                before = {s.name: s.connects for s in on_victim}
                client_before = sc.subscribes
                await victim.kill()
                # Restarted on the same port: StreamClient has one URL and comes back to it.
                gateways[slot] = await c.gateway(port=victim.port)

                def back() -> bool:
                    moved = all(s.connects > before[s.name] and s.ready.is_set() for s in on_victim)
                    return moved and (slot == 1 or sc.subscribes >= client_before + len(feeds))

                await changes.until(back, 30, "the subscribers of the killed gateway back")
                faults.append({"killed": victim.name, "after_accepted": at, "restarted_on_port": victim.port})

        sem = asyncio.Semaphore(6)
        async with (
            Subscriber("a", feeds, prefer(0), changes=changes) as a,  # g1, else g2
            Subscriber("b", feeds, prefer(1), changes=changes) as b,  # g2, else g1
            StreamClientTally("client", g1.url, feeds, changes=changes) as sc,  # g1's port only
        ):
            await asyncio.gather(killer(a, b, sc), *(one(sem) for _ in range(total)))
            expected = poster.expected(lists)
            histories = await settle(c.redis, changes, expected, feeds, (a.items, b.items, sc.items))
        feed_numbers, feed_problems = tally_feeds(expected, histories)
        tallies = {name: tally_reader(name, items, histories) for name, items in
                   (("a", a.items), ("b", b.items), ("client", sc.items))}  # fmt: skip
        report(
            "gateway-sigkill",
            {"seed": seed, "posts_sent": len(poster.sent), "accepted": poster.accepted,
             "post_refusals": dict(poster.refusals()), "idempotent_replays": replayed(poster),
             "feeds": feed_numbers, "faults": faults,
             "a": {**tallies["a"][0], "reconnects": a.reconnects, "closes": dict(a.closes)},
             "b": {**tallies["b"][0], "reconnects": b.reconnects, "closes": dict(b.closes)},
             "stream_client": {**tallies["client"][0], "reconnects": sc.reconnects}},
        )  # fmt: skip
        assert poster.accepted == total
        assert feed_problems == [], feed_problems
        problems = [p for _, ps in tallies.values() for p in ps]
        assert problems == [], problems
        assert a.gaps == [] and b.gaps == [] and sc.gaps == [] and a.errors == [] and b.errors == []
        assert a.reconnects >= 2 and b.reconnects >= 1 and sc.reconnects >= 2


# -- 3. Redis restarted under load ----------------------------------------------------------

# kill -9 of Redis with AOF and `appendfsync always`: the configuration in which
# "accepted with 201" can honestly mean durable. Redis fsyncs the AOF before it
# answers, and before it sends the PUBLISHes, so nothing a client was told or
# shown can be lost by a crash. With the default `everysec`, kill -9 may lose up
# to a second of accepted posts; a SIGTERM stop flushes the AOF with any policy
# and would be the weaker fault.
DURABLE_REDIS = ("--appendfsync", "always")


class Load:
    """Posting lanes that run until stopped (and retry refused posts with their key)."""

    def __init__(self, poster: Poster, rng: Any, lanes: int = 4) -> None:
        self.poster = poster
        self.rng = rng
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._lane()) for _ in range(lanes)]

    async def _lane(self) -> None:
        while not self.stop.is_set():
            await self.poster.post(self.rng.choice(AUTHORS), self.rng.sample(EVENTS, self.rng.randint(1, 3)))

    def refused(self) -> int:
        return sum(len(s.refusals) for s in self.poster.sent)

    async def until_accepted(self, n: int, what: str) -> None:
        await self.poster.changes.until(lambda: self.poster.accepted >= n, 60, what)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def readyz(c: Cluster, gw: Gateway) -> int:
    try:
        return await c.readyz(gw)
    except (OSError, TimeoutError) as err:
        raise AssertionError(f"/readyz did not answer: {err!r}") from err


async def wait_readyz(c: Cluster, gw: Gateway, status: int, timeout: float) -> float:
    started = time.monotonic()

    async def check() -> bool:
        return await readyz(c, gw) == status

    await poll(check, timeout, f"{gw.name} /readyz {status}")
    return round(time.monotonic() - started, 3)


@pytest.mark.slow
async def test_redis_killed_and_restarted_under_load(tmp_path: Any) -> None:
    """Accepted posts survive; /readyz and refused posts say 503; resuming is exact.

    The subscribers here are cut when Redis dies and resume by cursor (they
    retry while the gateway answers `unavailable`); sockets that stay open
    through the restart are the next case.
    """
    rng, seed = seeded_rng()
    async with Cluster(tmp_path, appendonly=True, redis_args=DURABLE_REDIS) as c:
        gw = await c.gateway()
        worker = await c.worker()
        tokens, lists, feeds = await setup_feeds(c, gw)
        changes = Changes()
        poster = Poster(c.http, lambda: [gw.url], tokens)
        numbers: dict[str, Any] = {"seed": seed}
        async with (
            Proxy(lambda: host_port(gw.url)) as proxy,
            Subscriber("raw", feeds, lambda: gw.url, changes=changes) as raw,
            StreamClientTally("client", proxy.url, feeds, changes=changes) as sc,
        ):
            load = Load(poster, rng)
            try:
                await load.until_accepted(rng.randrange(100, 300), "posts before the kill")
                numbers["accepted_before_kill"] = poster.accepted
                refused_before = load.refused()
                gw_lines, worker_lines = len(gw.lines), len(worker.lines)
                killed = time.monotonic()
                await asyncio.to_thread(c.server.kill)
                raw.cut()
                while proxy.cut_random(rng):
                    pass
                numbers["readyz_503_after_s"] = await wait_readyz(c, gw, 503, 10)

                async def some_refused() -> bool:
                    return load.refused() >= refused_before + 20

                await poll(some_refused, 60, "posts refused during the outage")
                # Down long enough for every process to notice and back off.
                await gw.wait_line("live: redis connection lost", 30, since=gw_lines)
                await worker.wait_line("redis unavailable", 30, since=worker_lines)
                numbers["readyz_during"] = await readyz(c, gw)
                numbers["outage_s"] = round(time.monotonic() - killed, 3)
                await asyncio.to_thread(c.server.start)  # same port, same data directory
                numbers["readyz_200_after_restart_s"] = await wait_readyz(c, gw, 200, 30)
                await load.until_accepted(poster.accepted + 200, "200 posts after the restart")
            finally:
                await load.finish()
            expected = poster.expected(lists)
            histories = await settle(c.redis, changes, expected, feeds, (raw.items, sc.items))
        feed_numbers, feed_problems = tally_feeds(expected, histories)
        raw_numbers, raw_problems = tally_reader("raw", raw.items, histories)
        client_numbers, client_problems = tally_reader("client", sc.items, histories)
        refusals = [r for s in poster.sent for r in s.refusals]
        never = [s.n for s in poster.sent if s.post_id is None]
        report(
            "redis-restart",
            {**numbers, "posts_sent": len(poster.sent), "accepted": poster.accepted, "never_accepted": len(never),
             "idempotent_replays": replayed(poster), "refusals": dict(poster.refusals()),
             "refusal_s_max": round(max((r[2] for r in refusals), default=0), 3), "feeds": feed_numbers,
             "raw": {**raw_numbers, "reconnects": raw.reconnects, "connect_failures": raw.connect_failures,
                     "errors": len(raw.errors), "closes": dict(raw.closes)},
             "stream_client": {**client_numbers, "reconnects": sc.reconnects}},
        )  # fmt: skip
        assert never == []
        assert feed_problems == [], feed_problems  # nothing accepted was lost
        assert numbers["readyz_during"] == 503
        # Refused clearly, and soon: 503 `unavailable`, never a hang or a 500.
        assert {f"{status} {code}" for status, code, _ in refusals} == {"503 unavailable"}, poster.refusals()
        assert max(r[2] for r in refusals) < 10
        assert raw_problems == [] and client_problems == [], raw_problems + client_problems
        assert raw.gaps == [] and sc.gaps == []
        assert {e.get("code") for e in raw.errors} <= {"unavailable"}, raw.errors
        assert raw.reconnects >= 1 and sc.reconnects >= 1


@pytest.mark.slow
async def test_redis_restart_sockets_that_stay_connected_miss_nothing(tmp_path: Any) -> None:
    """The gateway re-subscribes after a Redis restart and fills in from history.

    To make the window certain rather than likely, the subscribers' gateway is
    paused (SIGSTOP) while Redis comes back, so that the worker fans out posts
    (accepted by a second gateway) before it has re-subscribed; it is resumed
    (SIGCONT) while posts keep flowing. A gateway that is slow to reconnect
    (its back-off is up to 7.5 s after a long outage) does the same unpaused:
    test_redis_killed_and_restarted_under_load saw it in 2 of 4 runs with a
    6 s outage before its subscribers were made to reconnect.
    """
    rng, seed = seeded_rng()
    async with Cluster(tmp_path, appendonly=True, redis_args=DURABLE_REDIS) as c:
        g1, g2 = await c.gateway(), await c.gateway()
        await c.worker()
        tokens, lists, feeds = await setup_feeds(c, g2)
        changes = Changes()
        poster = Poster(c.http, lambda: [g2.url], tokens)
        numbers: dict[str, Any] = {"seed": seed}
        async with (
            Subscriber("stayed", feeds, lambda: g1.url, changes=changes) as stayed,
            StreamClientTally("client", g1.url, feeds, changes=changes) as sc,
        ):
            load = Load(poster, rng)
            try:
                await load.until_accepted(rng.randrange(100, 200), "posts before the kill")
                g1_lines = len(g1.lines)
                await asyncio.to_thread(c.server.kill)
                await g1.wait_line("live: redis connection lost", 30, since=g1_lines)
                os.kill(g1.pid, signal.SIGSTOP)
                try:
                    await asyncio.to_thread(c.server.start)
                    await wait_readyz(c, g2, 200, 30)
                    await load.until_accepted(poster.accepted + 150, "posts while g1 is paused")
                    await wait_fanned_out(c.redis, poster.expected(lists), 60)
                    numbers["fanned_out_while_paused"] = poster.accepted
                finally:
                    os.kill(g1.pid, signal.SIGCONT)
                numbers["g1_ready_after_resume_s"] = await wait_readyz(c, g1, 200, 30)
                await load.until_accepted(poster.accepted + 150, "posts after the resume")
            finally:
                await load.finish()
            expected = poster.expected(lists)
            histories = await settle(c.redis, changes, expected, feeds, (stayed.items, sc.items))
        feed_numbers, feed_problems = tally_feeds(expected, histories)
        stayed_numbers, stayed_problems = tally_reader("stayed", stayed.items, histories)
        client_numbers, client_problems = tally_reader("client", sc.items, histories)
        report(
            "redis-restart-stayed-connected",
            {**numbers, "posts_sent": len(poster.sent), "accepted": poster.accepted, "feeds": feed_numbers,
             "refusals": dict(poster.refusals()),
             "stayed": {**stayed_numbers, "reconnects": stayed.reconnects, "gaps": len(stayed.gaps),
                        "closes": dict(stayed.closes)},
             "stream_client": {**client_numbers, "reconnects": sc.reconnects, "gaps": len(sc.gaps),
                               "reasons": dict(sc.reconnect_reasons)},
             "first_problems": (stayed_problems + client_problems)[:2], "feeds_with_missing_items": [p.split(":")[0] + ":" + p.split(":")[1].split()[0] for p in stayed_problems]},
        )  # fmt: skip
        assert feed_problems == [], feed_problems
        assert stayed.reconnects == 0 and sc.reconnects == 0
        assert stayed_problems == [] and client_problems == [], stayed_problems + client_problems
        assert stayed.gaps == [] and sc.gaps == []


# -- 4. sockets cut at random ----------------------------------------------------------------


@pytest.mark.slow
async def test_sockets_cut_at_random_while_posts_flow(tmp_path: Any) -> None:
    rng, seed = seeded_rng()
    async with Cluster(tmp_path) as c:
        gw = await c.gateway()
        await c.worker()
        tokens, lists, feeds = await setup_feeds(c, gw)
        changes = Changes()
        poster = Poster(c.http, lambda: [gw.url], tokens)
        total = 900
        cuts: Counter[str] = Counter()

        def some_feeds() -> list[str]:
            return rng.sample(feeds, rng.randint(2, len(feeds)))

        async with Proxy(lambda: host_port(gw.url)) as proxy, contextlib.AsyncExitStack() as stack:
            # Cut client-side: the subscriber's own socket is closed with a RST.
            direct = [
                await stack.enter_async_context(Subscriber(f"direct{i}", some_feeds(), lambda: gw.url, changes=changes))
                for i in range(6)
            ]
            # Cut "server-side": the proxy resets the client's connection and aborts the gateway's.
            proxied = [
                await stack.enter_async_context(Subscriber(f"proxied{i}", some_feeds(), lambda: proxy.url, changes=changes))
                for i in range(4)
            ]
            clients = [
                await stack.enter_async_context(StreamClientTally(f"client{i}", proxy.url, some_feeds(), changes=changes))
                for i in range(3)
            ]

            async def cutter() -> None:
                at = 5
                while at < total - 20:
                    await poster.changes.until(lambda: poster.accepted >= at, 60, f"{at} accepted posts")
                    for _ in range(rng.randint(1, 3)):
                        if rng.random() < 0.5:
                            if rng.choice(direct).cut():
                                cuts["client-side RST"] += 1
                        elif proxy.cut_random(rng):
                            cuts["proxy RST"] += 1
                    at += rng.randint(5, 25)

            sem = asyncio.Semaphore(6)

            async def one() -> None:
                async with sem:
                    await poster.post(rng.choice(AUTHORS), rng.sample(EVENTS, rng.randint(1, 4)))

            await asyncio.gather(cutter(), *(one() for _ in range(total)))
            expected = poster.expected(lists)
            await wait_fanned_out(c.redis, expected, 60)
            histories = {f: await history(c.redis, f) for f in feeds}
            readers: list[Subscriber | StreamClientTally] = [*direct, *proxied, *clients]

            def mine(r: Subscriber | StreamClientTally) -> dict[str, Any]:
                return {f: histories[f] for f in r.feeds}

            await changes.until(
                lambda: all(caught_up(r.items, mine(r)) for r in readers), 30, "every item", check=False
            )  # the tallies below say what is missing
        feed_numbers, feed_problems = tally_feeds(expected, histories)
        tallies = {r.name: tally_reader(r.name, r.items, mine(r)) for r in readers}
        totals = Counter[str]()
        for numbers, _ in tallies.values():
            totals.update(numbers)
        reconnects = {r.name: r.reconnects for r in readers}
        report(
            "socket-cuts",
            {"seed": seed, "posts_sent": len(poster.sent), "accepted": poster.accepted, "feeds": feed_numbers,
             "cuts": dict(cuts), "subscribers": len(readers), "all_subscribers": dict(totals),
             "reconnects": reconnects, "reconnects_total": sum(reconnects.values())},
        )  # fmt: skip
        assert feed_problems == [], feed_problems
        problems = [p for _, ps in tallies.values() for p in ps]
        assert problems == [], problems
        assert all(r.gaps == [] for r in readers)
        assert all(s.errors == [] for s in (*direct, *proxied))
        assert sum(cuts.values()) >= 30 and all(r.reconnects >= 1 for r in (*direct, *proxied))


# -- 5. a thousand clients that never read ----------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def latency_ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(percentile(values, 0.5) * 1000, 1),
            "p99": round(percentile(values, 0.99) * 1000, 1), "max": round(max(values) * 1000, 1)}  # fmt: skip


async def stuck_client(url: str, feed: str) -> RawWs:
    """Subscribes, then never reads: a 4 KiB receive buffer and a 536-byte MSS keep
    what the kernels hold small (about 140 KB a socket instead of megabytes)."""
    ws = await RawWs.connect(url, rcvbuf=4096, maxseg=536, limit=1024)
    ws.send_json({"op": "subscribe", "feed": feed})
    reply = await asyncio.wait_for(ws.recv(), 30)
    assert reply["op"] == "subscribed", reply
    ws.pause_reading()
    return ws


async def read_to_the_end(ws: RawWs) -> tuple[str, list[tuple[str, str]]]:
    """Read again: the items still queued for it, and how it ended."""
    ws.resume_reading()
    items: list[tuple[str, str]] = []
    try:
        while True:
            frame = await asyncio.wait_for(ws.recv(), 10)
            if frame["op"] == "post":
                items.append((frame["cursor"], frame["post"]["id"]))
    except WsClosed as closed:
        return (f"close {closed.code}" if closed.code is not None else closed.reason), items
    except TimeoutError:
        return "still open", items


@pytest.mark.slow
async def test_a_thousand_clients_that_never_read(tmp_path: Any) -> None:
    n_stuck = 1000
    bound = 64 * 1024  # STREAMD_SOCKET_BUFFER_BYTES: small, so that the test is quick
    async with Cluster(tmp_path, env={"STREAMD_SOCKET_BUFFER_BYTES": str(bound)}) as c:
        gw = await c.gateway()
        await c.worker()
        token = await c.user(gw, "loud")
        feed = "user:loud"
        poster = Poster(c.http, lambda: [gw.url], {"loud": token}, text_size=900)  # ~1.1 KB frames
        changes = Changes()
        latency: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        rss: dict[str, int] = {}
        fds: dict[str, int] = {}

        async with Subscriber("reader", [feed], lambda: gw.url, changes=changes) as reader:

            async def timed_posts(phase: str, n: int, lanes: int = 4) -> None:
                sem = asyncio.Semaphore(lanes)

                async def one() -> None:
                    async with sem:
                        started = time.monotonic()
                        sent = await poster.post("loud")
                    assert sent.post_id is not None, sent.refusals
                    pid = sent.post_id
                    await changes.until(lambda: pid in reader.arrival, 30, "the reader to get a post")
                    latency[phase].append(reader.arrival[pid] - started)

                await asyncio.gather(*(one() for _ in range(n)))

            await timed_posts("before", 100)
            rss["before"], fds["before"] = gw.rss_kib(), gw.open_fds()
            stuck: list[RawWs] = []
            try:
                for _ in range(n_stuck // 100):
                    stuck += await asyncio.gather(*(stuck_client(gw.url, feed) for _ in range(100)))
                rss["connected"], fds["connected"] = gw.rss_kib(), gw.open_fds()
                assert fds["connected"] >= fds["before"] + n_stuck

                # 400 posts: about 440 KB for each stuck socket, twice what the kernels
                # and the 64 KiB bound hold together.
                rss["peak"] = 0
                started = time.monotonic()
                for _ in range(20):
                    await timed_posts("during", 20)
                    rss["peak"] = max(rss["peak"], gw.rss_kib())
                during_s = time.monotonic() - started
                await timed_posts("after", 100)
                rss["after"], fds["after"] = gw.rss_kib(), gw.open_fds()
                slow_closes = await metric(c, gw, "streamd_slow_closes_total")

                # Reading again, each finds a prefix of the feed in order, then 4008.
                ends = await asyncio.gather(*(read_to_the_end(ws) for ws in stuck))

                async def released() -> bool:
                    return established(gw.port) <= 1  # the reader

                with contextlib.suppress(AssertionError):  # asserted below, after the report
                    await poll(released, 30, "the gateway to let go of the stuck sockets")
                rss["released"], fds["released"] = gw.rss_kib(), gw.open_fds()
                still_open = established(gw.port) - 1
            finally:
                for ws in stuck:
                    ws.abort()
            hist = await history(c.redis, feed)
            await changes.until(lambda: caught_up(reader.items, {feed: hist}), 30, "the reader", check=False)
        numbers, problems = tally_reader("reader", reader.items, {feed: hist})
        fates = Counter(end for end, _ in ends)
        first = 100  # they subscribed after the posts of the first phase
        not_in_order = sum(1 for _, items in ends if items != hist[first : first + len(items)])
        queued = sorted(len(items) for _, items in ends)
        mib = {k: round(v / 1024, 1) for k, v in rss.items()}
        report(
            "stuck-clients",
            {"stuck_clients": n_stuck, "socket_buffer_bytes": bound, "posts": len(poster.sent),
             "posting_during_s": round(during_s, 2), "gateway_slow_closes_metric": slow_closes,
             "stuck_client_ends": dict(fates), "items_each_got_before_4008_min_median_max":
                 [queued[0], queued[len(queued) // 2], queued[-1]],
             "gateway_rss_mib": mib, "gateway_fds": fds, "still_open_after_reading": still_open,
             "reader_latency_ms": {k: latency_ms(v) for k, v in latency.items()},
             "reader": {**numbers, "reconnects": reader.reconnects}},
        )  # fmt: skip
        # Closed with 4008 (seen once they read again), or dropped with a reset.
        assert set(fates) <= {"close 4008", "ConnectionResetError", "IncompleteReadError"}, fates
        assert still_open == 0, f"{still_open} stuck sockets still open after they read everything"
        assert not_in_order == 0, "what a slow client gets before 4008 is the feed in order, without holes"
        assert problems == [] and reader.reconnects == 0, problems
        assert percentile(latency["during"], 0.99) < 1.0
        # Bounded: 1000 x 64 KiB of buffers is 64 MiB; allow for per-socket overhead and the allocator.
        assert rss["peak"] - rss["before"] < 400 * 1024, mib
        assert rss["after"] - rss["before"] < 400 * 1024, mib


async def test_a_client_that_fell_far_behind_resumes_from_its_cursor(tmp_path: Any) -> None:
    # Default limits. The client was away (or was closed with 4008) while 600
    # long posts were made; it comes back with its cursor.
    async with Cluster(tmp_path) as c:
        gw = await c.gateway()
        await c.worker()
        token = await c.user(gw, "far")
        feed = "user:far"
        poster = Poster(c.http, lambda: [gw.url], {"far": token}, text_size=990)  # ~1.2 KB frames
        changes = Changes()
        async with Subscriber("away", [feed], lambda: gw.url, changes=changes) as away:
            await poster.post("far")
            await changes.until(lambda: len(away.items[feed]) == 1, 10, "the first item")
        cursor = away.items[feed][0][0]
        sem = asyncio.Semaphore(8)

        async def one() -> None:
            async with sem:
                await poster.post("far")

        await asyncio.gather(*(one() for _ in range(600)))
        await wait_fanned_out(c.redis, poster.expected(), 30)
        rest = (await history(c.redis, feed))[1:]
        # About 700 KB to replay: milliseconds on loopback; 5 s is generous.
        async with Subscriber("back", [feed], lambda: gw.url, changes=changes, cursors={feed: cursor}) as back:
            caught = await changes.until(lambda: caught_up(back.items, {feed: rest}), 5, "the resume", check=False)
        from streamd.client import StreamClient

        # The project's client, from the same cursor.
        got: list[tuple[str, str]] = []
        reasons: Counter[str] = Counter()
        async with StreamClient(
            gw.url, [feed], cursors={feed: cursor}, backoff_base=0.02, backoff_cap=0.2,
            on_reconnect=lambda reason, _: reasons.update([reason[:40]]),
        ) as client:  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    async for item in client:
                        got.append((item.cursor, str(item.post_id)))  # type: ignore[union-attr]
                        if len(got) == len(rest):
                            break
        numbers, problems = tally_reader("back", back.items, {feed: rest})
        report(
            "resume-far-behind",
            {"backlog_items": len(rest), "raw": {**numbers, "caught_up": caught, "reconnects": back.reconnects,
                                                 "closes": dict(back.closes)},
             "stream_client": {"received": len(got), "reconnects": dict(reasons)}},
        )  # fmt: skip
        assert problems == [] and back.reconnects == 0, (problems, back.closes)
        assert got == rest, reasons


async def metric(c: Cluster, gw: Gateway, name: str) -> float | None:
    """A value from /metrics, for the report only (None where the gateway has none)."""
    with contextlib.suppress(Exception):
        async with c.http.get(gw.url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    return None


@pytest.mark.slow
async def test_sockets_closed_for_slowness_are_released(tmp_path: Any) -> None:
    async with Cluster(tmp_path, env={"STREAMD_SOCKET_BUFFER_BYTES": str(64 * 1024)}) as c:
        gw = await c.gateway()
        await c.worker()
        token = await c.user(gw, "slo")
        stuck = [await stuck_client(gw.url, "user:slo") for _ in range(50)]
        try:
            poster = Poster(c.http, lambda: [gw.url], {"slo": token}, text_size=900)
            for _ in range(400):  # ~440 KB each: well past what they can hold
                await poster.post("slo")
            closes = await metric(c, gw, "streamd_slow_closes_total")
            posted = time.monotonic()

            async def released() -> bool:
                return established(gw.port) == 0

            try:
                # The hub gives a close handshake 5 s; allow more than twice that.
                await poll(released, 12, "the gateway to release sockets it closed with 4008")
            finally:
                report("slow-sockets-released", {"stuck": 50, "slow_closes_metric": closes,
                                                 "still_open": established(gw.port),
                                                 "waited_s": round(time.monotonic() - posted, 1)})  # fmt: skip
        finally:
            for ws in stuck:
                ws.abort()


# -- 6. gap detection --------------------------------------------------------------------


async def test_trimmed_and_deleted_histories_answer_gap_then_the_retained_items(tmp_path: Any) -> None:
    async with Cluster(tmp_path, env={"STREAMD_FEED_HISTORY_LEN": "10"}) as c:
        gw = await c.gateway()
        await c.worker()
        token = await c.user(gw, "gus")
        feed = "user:gus"
        poster = Poster(c.http, lambda: [gw.url], {"gus": token})
        changes = Changes()
        async with Subscriber("live", [feed], lambda: gw.url, changes=changes) as live:
            for _ in range(40):
                await poster.post("gus")
            await changes.until(lambda: len(live.items[feed]) >= 40, 30, "40 live items")
        seen = live.items[feed]
        assert [pid for _, pid in seen] == [s.post_id for s in poster.sent]

        # Trimmed: the history keeps the newest 10..11 and remembers the newest trimmed id.
        kept = await history(c.redis, feed)
        assert 10 <= len(kept) <= 11 and kept == seen[-len(kept) :]
        trimmed_raw: Any = await c.redis.hget(keys.feed_meta(feed), "trimmed")
        trimmed = trimmed_raw.decode()
        k = next(i for i, (cursor, _) in enumerate(seen) if cursor.endswith("." + trimmed))
        assert k == len(seen) - len(kept) - 1
        outcomes = {}
        for label, i, gap, replay in [
            ("first item", 0, True, kept),
            ("before the newest trimmed", k - 1, True, kept),
            ("the newest trimmed", k, False, kept),  # nothing after it was lost
            ("a retained item", k + 4, False, kept[4:]),
            ("the head", len(seen) - 1, False, []),
        ]:
            subscribed, items = await resume_once(gw.url, feed, seen[i][0])
            outcomes[label] = (subscribed["gap"], len(items))
            assert (subscribed["gap"], items) == (gap, replay), label

        # The project's client reports the same gap in place, then the retained items.
        from streamd.client import Gap, StreamClient

        got: list[Any] = []
        async with StreamClient(gw.url, [feed], cursors={feed: seen[0][0]}) as client:
            async for item in client:
                got.append(item if isinstance(item, Gap) else (item.cursor, item.post_id))
                if len(got) == len(kept) + 1:
                    break
        assert got == [Gap(feed), *kept]

        # Deleted: the history stream and its meta are gone from Redis.
        async with Subscriber("across-del", [feed], lambda: gw.url, changes=changes) as across:
            await c.redis.delete(keys.feed_stream(feed), keys.feed_meta(feed))
            subscribed, items = await resume_once(gw.url, feed, seen[-1][0])
            assert (subscribed["gap"], items) == (True, []), "deleted history, nothing retained"
            for _ in range(3):
                await poster.post("gus")
            await changes.until(lambda: len(across.items[feed]) >= 3, 30, "3 items after the delete")
            fresh = await history(c.redis, feed)  # once fanned out: a 201 is not yet in the feed
        assert len(fresh) == 3 and fresh[0][0].split(".")[0] != seen[-1][0].split(".")[0], "a new epoch"
        assert [pid for _, pid in fresh] == [s.post_id for s in poster.sent[-3:]]
        assert across.items[feed] == fresh and across.gaps == []
        subscribed, items = await resume_once(gw.url, feed, seen[-1][0])
        assert (subscribed["gap"], items) == (True, fresh), "an old-epoch cursor after the delete"
        subscribed, items = await resume_once(gw.url, feed, fresh[0][0])
        assert (subscribed["gap"], items) == (False, fresh[1:]), "a cursor of the new history"
        report(
            "gap",
            {"posts_sent": len(poster.sent), "history_len": len(kept), "trimmed_id": trimmed,
             "resume_outcomes_gap_items": outcomes, "after_delete_retained": len(fresh)},
        )  # fmt: skip


# -- 7. SSE resume across a gateway kill ---------------------------------------------------


async def test_sse_resume_across_a_gateway_kill_matches_the_websocket(tmp_path: Any) -> None:
    rng, seed = seeded_rng()
    async with Cluster(tmp_path) as c:
        g1, g2 = await c.gateway(), await c.gateway()
        await c.worker()
        token = await c.user(g1, "sia")
        feed = "event:sse-cup"
        gateways = [g1, g2]

        def first_alive() -> str:
            return next(g.url for g in gateways if g.alive)

        # Both start from the feed's beginning and prefer g1; g1 is killed midway.
        changes = Changes()
        poster = Poster(c.http, lambda: [g.url for g in gateways if g.alive] or [g2.url], {"sia": token})
        total = 300
        kill_at = rng.randrange(60, 240)
        async with (
            SseSubscriber("sse", feed, first_alive, c.http, cursor="0.0-0", changes=changes) as sse,
            Subscriber("ws", [feed], first_alive, changes=changes, cursors={feed: "0.0-0"}) as ws,
        ):
            sem = asyncio.Semaphore(6)

            async def one() -> None:
                async with sem:
                    await poster.post("sia", ["sse-cup"])

            async def killer() -> None:
                await changes.until(
                    lambda: len(sse.items) >= kill_at and len(ws.items[feed]) >= kill_at, 60, "items before the kill"
                )
                await g1.kill()

            await asyncio.gather(killer(), *(one() for _ in range(total)))
            await wait_fanned_out(c.redis, poster.expected(), 30)
            hist = await history(c.redis, feed)
            await changes.until(
                lambda: caught_up({feed: sse.items}, {feed: hist}) and caught_up(ws.items, {feed: hist}),
                30, "every item on both", check=False,
            )  # the tallies below say what is missing  # fmt: skip
        sse_numbers, sse_problems = tally_reader("sse", {feed: sse.items}, {feed: hist})
        ws_numbers, ws_problems = tally_reader("ws", ws.items, {feed: hist})

        # The same cursor, resumed on the surviving gateway by both transports.
        mid = hist[rng.randrange(0, len(hist) - 1)][0]
        same = Changes()
        async with (
            SseSubscriber("sse2", feed, lambda: g2.url, c.http, cursor=mid, changes=same) as sse2,
            Subscriber("ws2", [feed], lambda: g2.url, changes=same, cursors={feed: mid}) as ws2,
        ):
            expect = len(hist) - 1 - next(i for i, (cur, _) in enumerate(hist) if cur == mid)
            await same.until(lambda: len(sse2.items) >= expect and len(ws2.items[feed]) >= expect, 30, "replays")
        report(
            "sse-resume",
            {"seed": seed, "posts_sent": len(poster.sent), "accepted": poster.accepted,
             "post_refusals": dict(poster.refusals()), "killed_after_items": kill_at,
             "sse": {**sse_numbers, "reconnects": sse.reconnects, "ends": dict(sse.ends)},
             "ws": {**ws_numbers, "reconnects": ws.reconnects, "closes": dict(ws.closes)},
             "same_cursor_replay": len(ws2.items[feed])},
        )  # fmt: skip
        assert len(hist) == total
        assert sse_problems == [] and ws_problems == [], sse_problems + ws_problems
        assert sse.items == ws.items[feed]
        assert sse.gaps == [] and ws.gaps == [] and sse.errors == [] and ws.errors == []
        assert sse.reconnects >= 1 and ws.reconnects >= 1
        assert sse2.items == ws2.items[feed] == hist[len(hist) - expect :]
        assert sse2.gaps == [] and ws2.gaps == []


# -- 8. graceful shutdown ------------------------------------------------------------------


async def test_gateway_sigterm_flushes_queued_frames_then_closes_1001(tmp_path: Any) -> None:
    # About 1.8 MB of frames are queued for a client that does not read (each
    # post reaches 11 of its feeds); its small MSS keeps the kernels' share to
    # ~140 KB, so most of it is still in the gateway when SIGTERM comes. The
    # socket bound is raised so that the client is not closed with 4008 instead.
    total = 150
    events = [f"lap-{i}" for i in range(10)]
    async with Cluster(tmp_path, env={"STREAMD_SOCKET_BUFFER_BYTES": str(16 << 20)}) as c:
        gw = await c.gateway()
        await c.worker()
        token = await c.user(gw, "quinn")
        feeds = ["user:quinn", *(f"event:{e}" for e in events)]
        # Subscribes, then stops reading with a tiny receive buffer: the frames
        # pile up in the kernel, then in the gateway's own buffers.
        stuck = await RawWs.connect(gw.url, rcvbuf=4096, maxseg=536, limit=1024)
        for feed in feeds:
            stuck.send_json({"op": "subscribe", "feed": feed, "ref": feed})
        for _ in feeds:
            assert (await asyncio.wait_for(stuck.recv(), 10))["op"] == "subscribed"
        stuck.pause_reading()
        poster = Poster(c.http, lambda: [gw.url], {"quinn": token}, text_size=900)
        changes = Changes()
        async with Subscriber("reference", feeds, lambda: gw.url, changes=changes) as ref:
            sem = asyncio.Semaphore(4)

            async def one() -> None:
                async with sem:
                    await poster.post("quinn", events)

            await asyncio.gather(*(one() for _ in range(total)))
            # The reference socket on the same gateway got every item: the hub
            # queues each live item for every subscriber of the feed at once.
            await changes.until(lambda: ref.count() >= total * len(feeds), 60, "the reference socket")
            server_q = kernel_queues(gw.port, stuck.local_port)
            client_q = kernel_queues(stuck.local_port, gw.port)
            assert server_q is not None and client_q is not None
            sigterm_at = time.monotonic()
            gw_proc = gw.proc
            assert gw_proc is not None
            gw_proc.send_signal(15)
            got: dict[str, list[tuple[str, str]]] = {f: [] for f in feeds}
            stuck.resume_reading()
            code: int | None = None
            try:
                while True:
                    frame = await asyncio.wait_for(stuck.recv(), 15)
                    if frame["op"] == "post":
                        got[frame["feed"]].append((frame["cursor"], frame["post"]["id"]))
            except WsClosed as closed:
                code = closed.code
            drained_in = time.monotonic() - sigterm_at
            exit_code = await asyncio.wait_for(gw_proc.wait(), 30)
        histories = {f: await history(c.redis, f) for f in feeds}
        numbers, problems = tally_reader("stuck", got, histories)
        in_kernel = server_q[0] + client_q[1]
        report(
            "gateway-sigterm",
            {"posts": total, "frames_queued": total * len(feeds), "frames_received_after_sigterm": numbers,
             "close_code": code, "bytes_received": stuck.bytes_read, "bytes_in_kernel_at_sigterm": in_kernel,
             "bytes_in_gateway_at_sigterm": stuck.bytes_read - in_kernel,
             "drained_and_closed_in_s": round(drained_in, 3), "exit_code": exit_code,
             "reference_closes": dict(ref.closes)},
        )  # fmt: skip
        assert all(len(h) == total for h in histories.values())
        # Part of it was still in the gateway when SIGTERM came, not only in the kernel.
        assert stuck.bytes_read - in_kernel > 1_000_000
        assert problems == [], "every queued frame, in order, before the close"
        assert code == 1001
        assert exit_code == 0
        assert ref.closes.get("1001") == 1, ref.closes


async def test_worker_sigterm_finishes_its_batch_and_exits_0(tmp_path: Any) -> None:
    rng, seed = seeded_rng()
    async with Cluster(tmp_path, env=WORKER_WRITES) as c:
        gw = await c.gateway()  # no worker yet: the posts wait in the ingest stream
        tokens = {h: await c.user(gw, h) for h in ("wes", "wyn")}
        poster = Poster(c.http, lambda: [gw.url], tokens)
        events = [f"e{i}" for i in range(12)]
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                await poster.post(("wes", "wyn")[i % 2], rng.sample(events, 8))

        await asyncio.gather(*(one(i) for i in range(1000)))
        expected = poster.expected()
        assert poster.accepted == 1000

        worker = await c.worker()
        stream = keys.ingest_stream(0)

        async def mine() -> int:
            rows = await c.redis.xpending_range(stream, keys.FANOUT_GROUP, "-", "+", 1000, worker.consumer)
            return len(rows)

        # SIGTERM at a random point of the backlog, while a batch is in flight (read, not acked).
        threshold = rng.randrange(1, 500)

        async def mid_batch() -> bool:
            written = await c.redis.xlen(keys.feed_stream("user:wes"))
            return written >= threshold and await mine() > 0

        await poll(mid_batch, 30, "the worker in the middle of a batch", every=0.002)
        in_flight = await mine()
        started = time.monotonic()
        code = await worker.terminate(15)
        took = time.monotonic() - started

        pending = await pending_total(c.redis)
        consumers = {
            row["name"].decode(): row["pending"] for row in await c.redis.xinfo_consumers(stream, keys.FANOUT_GROUP)
        }
        group = (await c.redis.xinfo_groups(stream))[0]
        last = tuple(int(x) for x in group["last-delivered-id"].decode().split("-"))
        # Every entry the worker read was written to all of its feeds, none beyond.
        delivered = {s.post_id for s in poster.sent if s.post_id and tuple(map(int, s.post_id.split("-"))) <= last}
        partial: dict[str, list[str]] = {f: [p for p in ids if p in delivered] for f, ids in expected.items()}
        histories = {f: await history(c.redis, f) for f in expected}
        numbers, problems = tally_feeds(partial, histories)

        await c.worker()
        await wait_fanned_out(c.redis, expected, 60)
        final, final_problems = tally_feeds(expected, {f: await history(c.redis, f) for f in expected})
        report(
            "worker-sigterm",
            {"seed": seed, "posts": 1000, "entries_in_flight_at_sigterm": in_flight, "exit_code": code,
             "exit_s": round(took, 3), "left_pending": pending, "delivered_before_exit": len(delivered),
             "feeds_at_exit": numbers, "after_second_worker": final},
        )  # fmt: skip
        assert code == 0
        assert pending == 0 and consumers.get(worker.consumer, 0) == 0, consumers
        assert problems == [], problems
        assert final_problems == [], final_problems
