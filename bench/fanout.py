"""Fan-out: N WebSocket subscribers over F user feeds, posts at fixed rates.

One run starts a private Redis, `streamd fanout` and `streamd gateway` (the
gateway alone on CPU 0; Redis, the fan-out worker and the load generator on
CPU 1), subscribes N sockets spread evenly over F feeds `user:h<k>`, then for
each target rate posts open-loop for warmup + duration seconds and measures:

- latency from each post's scheduled send time to its frame at each subscriber;
- deliveries per second received in the measurement window;
- lost and duplicated deliveries, per subscriber and post;
- CPU of every process over the window, from /proc/<pid>/stat: gateway
  microseconds per delivery, fan-out microseconds per post, load generator %.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.harness import (
    CLOCK_TICKS,
    REPO_ROOT,
    BenchError,
    Child,
    CpuSnapshot,
    Pinning,
    ServerUnderTest,
    snapshot,
    terminate_on_sigterm,
)
from bench.stats import cpu_percent, micros_per, summary_ms

HELP = "WebSocket fan-out: latency, loss and server CPU per delivery at fixed delivery rates"
LOADGEN_CPU_FLAG = 70.0  # % of one core; past this the load generator may be what limits the numbers
OTHER_LOAD_FLAG = 5.0  # % of a core used by processes not ours: the numbers are disturbed
START_DELAY_S = 0.3  # between sending the schedule and its first post
# The gateway's abuse limits are meant for clients on the internet; here one
# address opens every socket and a few authors post hundreds of times a
# second. Settings a streamd version does not have are ignored.
SERVER_ENV = {
    "STREAMD_POSTS_PER_MINUTE": str(10**9),
    "STREAMD_CONNECTIONS_PER_SECOND": str(10**9),
    "STREAMD_CONNECTIONS_BURST": str(10**9),
}


def _rates(text: str) -> list[int]:
    try:
        rates = [int(float(r)) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subscribers", type=int, default=1000, help="WebSocket subscribers in all (default 1000)")
    p.add_argument("--feeds", type=int, default=10, help="feeds the subscribers are spread over (default 10)")
    p.add_argument(
        "--rates",
        type=_rates,
        default=[10_000, 20_000, 50_000],
        help="target deliveries per second, comma-separated, run in turn (default 10000,20000,50000)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window (default 2)")
    p.add_argument("--loadgen-procs", type=int, default=1, help="subscriber processes sharing the sockets (default 1)")
    p.add_argument("--senders", type=int, default=64, help="concurrent HTTP senders of the poster (default 64)")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=32,
        help="subscribes in flight at once over all processes while connecting (default 32: below "
        "the gateway's Redis pool of 64, which fails a burst of subscribes instead of queueing them)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="after a step, seconds without a delivery before the missing ones count as lost (default 2)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--keep-workdir", action="store_true", help="keep the logs of every process (printed at the end)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/fanout-<timestamp>.json)")


@dataclass(frozen=True, slots=True)
class Plan:
    subscribers: int
    feeds: int
    duration: float
    warmup: float
    senders: int
    settle: float
    connect_concurrency: int

    @property
    def deliveries_per_post(self) -> float:
        return self.subscribers / self.feeds

    def subscriber_feeds(self) -> list[tuple[int, int]]:
        """(subscriber, feed) pairs: subscriber i reads feed i % F, so feeds differ by at most one reader."""
        return [(i, i % self.feeds) for i in range(self.subscribers)]

    def period_ns(self, rate: float) -> int:
        return max(1, round(1e9 * self.deliveries_per_post / rate))

    def post_count(self, period_ns: int) -> int:
        return math.ceil((self.warmup + self.duration) * 1e9 / period_ns)


@dataclass(slots=True)
class LoadGen:
    poster: Child
    subscribers: list[Child]

    def pids(self) -> dict[str, int]:
        return {"poster": self.poster.pid, **{c.name: c.pid for c in self.subscribers}}


def run(args: argparse.Namespace) -> int:
    if args.subscribers < 1 or args.feeds < 1 or args.feeds > args.subscribers:
        print("bench fanout: need 1 <= --feeds <= --subscribers", file=sys.stderr)
        return 2
    if args.loadgen_procs < 1 or args.senders < 1 or args.duration <= 0 or args.warmup < 0:
        print("bench fanout: --loadgen-procs, --senders and --duration must be positive", file=sys.stderr)
        return 2
    plan = Plan(
        args.subscribers, args.feeds, args.duration, args.warmup, args.senders, args.settle, args.connect_concurrency
    )
    started = datetime.datetime.now(datetime.UTC)
    out = args.out or REPO_ROOT / "bench" / "results" / f"fanout-{started:%Y%m%d-%H%M%S}.json"
    pinning = Pinning() if args.no_pin else Pinning.two_cores()

    with terminate_on_sigterm(), _workdir(args.keep_workdir) as workdir:
        sut = ServerUnderTest(workdir, pinning, env=SERVER_ENV)
        try:
            with contextlib.ExitStack() as stack:
                sut.start(stack)
                print(f"bench fanout: gateway {sut.base_url}, pinning {_pin_text(pinning)}")
                lg = _start_loadgen(stack, workdir, pinning, args.loadgen_procs)
                _prepare(plan, sut, lg)
                steps: list[dict[str, Any]] = []
                seq = 0
                for rate in args.rates:
                    step = _run_step(plan, rate, seq, sut, lg)
                    seq = step["seq_hi"]
                    steps.append(step)
                    _print_progress(step)
                issues = sut.log_issues()
        except BenchError as err:
            print(f"bench fanout: {err}", file=sys.stderr)
            for name, lines in sut.log_issues().items():
                print(f"--- {name} log ---", *lines, sep="\n", file=sys.stderr)
            return 1

    results = {
        "scenario": "fanout",
        "started_at": started.isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]],
        "params": {
            "subscribers": plan.subscribers,
            "feeds": plan.feeds,
            "rates": args.rates,
            "duration_s": plan.duration,
            "warmup_s": plan.warmup,
            "loadgen_procs": args.loadgen_procs,
            "senders": plan.senders,
            "settle_s": plan.settle,
            "connect_concurrency": plan.connect_concurrency,
            "pinning": _pin_text(pinning),
            "server_env": SERVER_ENV,
        },
        "environment": _environment(),
        "steps": steps,
        "server_log_issues": issues,
    }
    print()
    print_table(steps)
    _print_notes(steps, issues)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"\nresults: {out}")
    return 0


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="streamd-bench-"))
        print(f"bench fanout: logs of every process in {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp:
            yield Path(tmp)


def _start_loadgen(stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, procs: int) -> LoadGen:
    def child(name: str, role: str) -> Child:
        c = Child(name, [sys.executable, "-m", "bench.loadgen", role], workdir / f"{name}.log", pinning.rest)
        stack.callback(c.stop)  # children go first (LIFO), before the servers they talk to
        return c

    poster = child("poster", "poster")
    return LoadGen(poster, [child(f"subscriber-{k}", "subscriber") for k in range(procs)])


def _prepare(plan: Plan, sut: ServerUnderTest, lg: LoadGen) -> None:
    """Create the authors, then connect and subscribe every socket."""
    lg.poster.request("setup", timeout=60, base=sut.base_url, admin_token=sut.admin_token, feeds=plan.feeds)
    pairs = plan.subscriber_feeds()
    procs = len(lg.subscribers)
    concurrency = max(1, plan.connect_concurrency // procs)
    began = time.monotonic()
    for k, c in enumerate(lg.subscribers):
        c.send("open", base=sut.base_url, feeds=plan.feeds, subs=pairs[k::procs], concurrency=concurrency, timeout_s=30)
    for c in lg.subscribers:
        c.receive(timeout=60 + plan.subscribers / 20)
    print(f"bench fanout: {plan.subscribers} subscribers on {plan.feeds} feeds in {time.monotonic() - began:.1f}s")


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _run_step(plan: Plan, rate: int, seq_lo: int, sut: ServerUnderTest, lg: LoadGen) -> dict[str, Any]:
    period = plan.period_ns(rate)
    count = plan.post_count(period)
    seq_hi = seq_lo + count
    t0 = time.monotonic_ns() + int(START_DELAY_S * 1e9)
    lg.poster.send("post", t0_ns=t0, period_ns=period, seq_start=seq_lo, count=count, senders=plan.senders)

    pids = {**sut.pids(), **lg.pids(), "bench": os.getpid()}
    _sleep_until(t0 + int(plan.warmup * 1e9))
    before = snapshot(pids)
    _sleep_until(t0 + int((plan.warmup + plan.duration) * 1e9))
    after = snapshot(pids)
    sut.check_alive()

    # The poster finishes once the last post is answered; a saturated server can take a while.
    posted = lg.poster.receive(timeout=120)
    failed: list[int] = posted["failed"]
    w0, w1 = before.at_ns, after.at_ns
    for c in lg.subscribers:
        c.send(
            "collect",
            lo=seq_lo,
            hi=seq_hi,
            failed=failed,
            w0_ns=w0,
            w1_ns=w1,
            quiet_s=plan.settle,
            max_wait_s=plan.settle * 5 + 10,
        )
    parts = [c.receive(timeout=plan.settle * 5 + 60) for c in lg.subscribers]

    latencies: list[int] = []
    to_accept: list[int] = []
    to_receive: list[int] = []
    loop_lag: list[int] = []
    by_second: dict[int, list[int]] = {}
    for part in parts:
        latencies += part["latencies_ns"]
        to_accept += part["to_accept_ns"]
        to_receive += part["accept_to_receive_ns"]
        loop_lag += part["loop_lag_ns"]
        for second, latency in zip(part["seconds"], part["latencies_ns"], strict=True):
            by_second.setdefault(second, []).append(latency)
    window_s = (w1 - w0) / 1e9
    delivered = sum(p["received_in_window"] for p in parts)
    # Posts scheduled inside the window: what the fan-out worker had to process in it.
    first = max(0, math.ceil((w0 - t0) / period))
    last = min(count, math.ceil((w1 - t0) / period))
    failed_set = set(failed)
    posts_in_window = sum(1 for i in range(first, last) if seq_lo + i not in failed_set)

    cpu = _cpu(before, after, window_s)
    cpu["other"] = _other_load(cpu, sut.pinning)
    loadgen_names = lg.pids().keys()
    ticks = _ticks(before, after)
    loadgen_cpu = sum(cpu["procs"].get(n, 0.0) for n in loadgen_names)
    subscribed = Counter(f for _, f in plan.subscriber_feeds())
    expected = sum(subscribed[(seq_lo + i) % plan.feeds] for i in range(count) if seq_lo + i not in failed_set)
    return {
        "target_deliveries_per_s": rate,
        "posts_per_s": round(1e9 / period, 3),
        "seq_lo": seq_lo,
        "seq_hi": seq_hi,
        "window_s": round(window_s, 3),
        "achieved_deliveries_per_s": round(delivered / window_s, 1),
        "latency_ms": summary_ms(latencies),
        # Per second of the window (by scheduled send time): shows stalls that a whole-window percentile hides.
        "latency_ms_by_second": [summary_ms(by_second[s]) for s in sorted(by_second)],
        # One subscriber per feed, split at the post's created_at (server clock, whole ms).
        "latency_stages_ms": {
            "scheduled_to_accepted": summary_ms(to_accept),
            "accepted_to_received": summary_ms(to_receive),
        },
        "posts": count,
        "posts_failed": len(failed),
        "post_statuses": posted["statuses"],
        "post_http_ms": posted["http_ms"],
        "send_lag_ms": posted["send_lag_ms"],
        "expected_deliveries": expected,
        "lost": sum(p["lost"] for p in parts),
        "dup": sum(p["dup"] for p in parts),
        "ws_closed": _merge(p["closed"] for p in parts),
        "unexpected_frames": _merge(p["unexpected"] for p in parts),
        "deliveries_in_window": delivered,
        "posts_in_window": posts_in_window,
        "gateway_us_per_delivery": _round(micros_per(ticks.get("gateway", 0), CLOCK_TICKS, delivered)),
        "fanout_us_per_post": _round(micros_per(ticks.get("fanout", 0), CLOCK_TICKS, posts_in_window)),
        "loadgen_cpu_pct": round(loadgen_cpu, 1),
        # How late the subscriber processes' event loops ran a 5 ms timer (timer granularity ~1 ms).
        "loadgen_loop_lag_ms": summary_ms(loop_lag),
        "loadgen_saturated": loadgen_cpu > LOADGEN_CPU_FLAG,
        "other_load": any(v > OTHER_LOAD_FLAG for v in cpu["other"].values()),
        "cpu_pct": cpu,
    }


def _ticks(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, int]:
    return {n: after.procs[n] - before.procs[n] for n in after.procs if n in before.procs}


def _cpu(before: CpuSnapshot, after: CpuSnapshot, window_s: float) -> dict[str, dict[str, float]]:
    """% of one core per process; per CPU, % running processes, in interrupts and stolen."""
    procs = {n: round(cpu_percent(t, CLOCK_TICKS, window_s), 1) for n, t in _ticks(before, after).items()}
    out: dict[str, dict[str, float]] = {"procs": procs, "cores": {}, "irq": {}, "steal": {}}
    for name, a in after.cores.items():
        b = before.cores.get(name)
        if b is None or a.total <= b.total:
            continue
        span = a.total - b.total
        out["cores"][name] = round(100.0 * (a.busy - b.busy) / span, 1)
        out["irq"][name] = round(100.0 * (a.irq - b.irq) / span, 1)
        out["steal"][name] = round(100.0 * (a.steal - b.steal) / span, 1)
    return out


def _other_load(cpu: dict[str, dict[str, float]], pinning: Pinning) -> dict[str, float]:
    """Per CPU, busy % not explained by our processes (other work on the machine, or irqs)."""
    ours: dict[str, float] = {}
    for name, pct in cpu["procs"].items():
        cpus = pinning.gateway if name == "gateway" else pinning.rest
        if cpus is None:  # unpinned: only the total can be compared
            ours["all"] = ours.get("all", 0.0) + pct
        else:
            for c in cpus:  # spread evenly over its CPUs: an approximation
                ours[f"cpu{c}"] = ours.get(f"cpu{c}", 0.0) + pct / len(cpus)
    if "all" in ours:
        return {"all": round(max(0.0, sum(cpu["cores"].values()) - ours["all"]), 1)}
    return {c: round(max(0.0, busy - ours.get(c, 0.0)), 1) for c, busy in cpu["cores"].items()}


def _merge(counters: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return dict(total)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# -- output ------------------------------------------------------------------------------

COLUMNS: tuple[tuple[str, str], ...] = (
    ("target/s", "{:>9}"),
    ("achieved/s", "{:>10}"),
    ("p50 ms", "{:>7}"),
    ("p90 ms", "{:>7}"),
    ("p99 ms", "{:>7}"),
    ("p99.9 ms", "{:>8}"),
    ("max ms", "{:>7}"),
    ("lost", "{:>6}"),
    ("dup", "{:>5}"),
    ("gw us/dlv", "{:>9}"),
    ("fo us/post", "{:>10}"),
    ("loadgen cpu%", "{:>12}"),
)


def _cell(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_row(step: dict[str, Any]) -> list[str]:
    lat = step["latency_ms"]
    flag = " !" if step["loadgen_saturated"] else ""
    return [
        str(step["target_deliveries_per_s"]),
        f"{step['achieved_deliveries_per_s']:.0f}",
        _cell(lat["p50"]),
        _cell(lat["p90"]),
        _cell(lat["p99"]),
        _cell(lat["p99.9"]),
        _cell(lat["max"], 1),
        str(step["lost"]),
        str(step["dup"]),
        _cell(step["gateway_us_per_delivery"]),
        _cell(step["fanout_us_per_post"], 1),
        f"{step['loadgen_cpu_pct']:.0f}{flag}",
    ]


def print_table(steps: list[dict[str, Any]]) -> None:
    print("  ".join(fmt.format(name) for name, fmt in COLUMNS))
    for step in steps:
        print("  ".join(fmt.format(cell) for (_, fmt), cell in zip(COLUMNS, table_row(step), strict=True)))


def _print_progress(step: dict[str, Any]) -> None:
    lat = step["latency_ms"]
    print(
        f"  {step['target_deliveries_per_s']:>7}/s target: {step['achieved_deliveries_per_s']:.0f}/s achieved, "
        f"p99 {_cell(lat['p99'])} ms, lost {step['lost']}, dup {step['dup']}, "
        f"busy {_cores_text(step['cpu_pct'])}",
        flush=True,
    )


def _print_notes(steps: list[dict[str, Any]], issues: dict[str, list[str]]) -> None:
    notes: list[str] = []
    for s in steps:
        rate = s["target_deliveries_per_s"]
        procs = s["cpu_pct"]["procs"]
        notes.append(
            f"{rate}/s: cpu% gateway {procs.get('gateway', 0):.0f}, fanout {procs.get('fanout', 0):.0f}, "
            f"redis {procs.get('redis', 0):.0f}, loadgen {s['loadgen_cpu_pct']:.0f}; "
            f"busy {_cores_text(s['cpu_pct'])}; "
            f"send lag p99 {_cell(s['send_lag_ms']['p99'])} ms; POST p99 {_cell(s['post_http_ms']['p99'])} ms"
        )
        accept, receive = (
            s["latency_stages_ms"]["scheduled_to_accepted"],
            s["latency_stages_ms"]["accepted_to_received"],
        )
        notes.append(
            f"{rate}/s: latency p50/p99 split at created_at: scheduled->accepted "
            f"{_cell(accept['p50'])}/{_cell(accept['p99'])} ms, "
            f"accepted->received {_cell(receive['p50'])}/{_cell(receive['p99'])} ms"
        )
        lag = s["loadgen_loop_lag_ms"]
        notes.append(f"{rate}/s: subscriber event loop lag p99 {_cell(lag['p99'])} ms, max {_cell(lag['max'])} ms")
        if s["other_load"]:
            other = s["cpu_pct"]["other"]
            notes.append(f"{rate}/s: ! other processes used CPU in the window ({other} %): numbers disturbed")
        if s["loadgen_saturated"]:
            notes.append(f"{rate}/s: ! load generator over {LOADGEN_CPU_FLAG:.0f}% of a core: it may be the limit")
        if s["posts_failed"]:
            notes.append(f"{rate}/s: {s['posts_failed']} posts failed: {s['post_statuses']}")
        if s["ws_closed"]:
            notes.append(f"{rate}/s: sockets closed by the server: {s['ws_closed']} (close code: count)")
        if s["unexpected_frames"]:
            notes.append(f"{rate}/s: unexpected frames: {s['unexpected_frames']}")
    for name, lines in issues.items():
        notes.append(f"{name} logged {len(lines)} warning/error line(s), first: {lines[0]}")
    print(*(f"  {n}" for n in notes), sep="\n")


def _cores_text(cpu: dict[str, dict[str, float]]) -> str:
    def one(name: str, busy: float) -> str:
        irq, stolen = cpu["irq"].get(name, 0.0), cpu["steal"].get(name, 0.0)
        return f"{name} {busy + irq:.0f}%" + (f" (+{stolen:.0f}% stolen)" if stolen >= 1 else "")

    return ", ".join(one(n, b) for n, b in cpu["cores"].items())


def _pin_text(pinning: Pinning) -> str:
    if pinning.gateway is None:
        return "none"
    return f"gateway on CPU {sorted(pinning.gateway)}, redis+fanout+loadgen on CPU {sorted(pinning.rest or [])}"


def _environment() -> dict[str, Any]:
    import aiohttp

    import streamd

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "streamd": streamd.__version__,
        "aiohttp": aiohttp.__version__,
    }
    source = Path(streamd.__file__).resolve().parent
    env["streamd_source"] = str(source)

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else ""

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["git_commit"] = git("rev-parse", "HEAD") or None
        env["streamd_dirty"] = bool(git("status", "--porcelain", "--", "."))
    return env
