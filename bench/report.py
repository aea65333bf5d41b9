"""`python -m bench report RESULTS.json...`: the tables and plots of bench/RESULTS.md.

Reads one or more `compare` results (a later file's run of the same scenario
and engine replaces an earlier one), writes the generated part of
bench/RESULTS.md (between the `generated` markers; the text around them is
kept as written) and one PNG per rate scenario: latency against delivery rate
for each engine. Plots need matplotlib, which is in bench/.venv-peers: run
from another interpreter, this re-runs itself there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

HELP = "write bench/RESULTS.md and its plots from compare results JSON"
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
START, END = "<!-- generated:start -->", "<!-- generated:end -->"
ENGINE_ORDER = ("streamd", "streamd-http", "psio", "channels", "node")
COLORS = {"streamd": "#1f77b4", "streamd-http": "#9467bd", "psio": "#2ca02c", "channels": "#d62728", "node": "#ff7f0e"}
TITLES = {
    "a": "a: 1,000 subscribers in 10 feeds",
    "b": "b: hot feed, 5,000 subscribers on one feed",
    "c": "c: follow graph, 1,000 feeds with 1-5 subscribers",
    "d": "d: idle connections",
    "e": "e: reconnect storm",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", type=Path, help="compare results JSON, oldest first")
    p.add_argument("--out", type=Path, default=RESULTS_MD, help="the Markdown file (default bench/RESULTS.md)")


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        peers = BENCH_DIR / ".venv-peers" / "bin" / "python"
        if not peers.exists():
            print("bench report: matplotlib missing; run `python -m bench setup`", file=sys.stderr)
            return 2
        argv = [str(peers), "-m", "bench.report", *map(str, args.results), "--out", str(args.out)]
        env = {**os.environ, "PYTHONPATH": str(BENCH_DIR.parent)}
        return subprocess.run(argv, cwd=BENCH_DIR.parent, env=env, check=False).returncode
    return write(args.results, args.out)


def load(paths: list[Path]) -> tuple[dict[tuple[str, str], dict[str, Any]], list[dict[str, Any]]]:
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    files: list[dict[str, Any]] = []
    for path in paths:
        data = orjson.loads(path.read_bytes())
        files.append({"path": path, **data})
        for r in data["runs"]:
            runs[(r["scenario"], r["engine"])] = {**r, "file": path.name}
    return runs, files


def fmt(v: Any, digits: int = 1) -> str:
    """A figure for a table: thousands separated, `-` for none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _flags(step: dict[str, Any]) -> str:
    out = []
    if step.get("loadgen_saturated"):
        out.append("L")
    if step.get("other_load"):
        other = step["cpu_pct"]["other"]
        out.append("O " + "/".join(f"{v:.0f}" for v in other.values()))
    if step.get("steal"):
        out.append("S " + "/".join(f"{v:.0f}" for v in step["cpu_pct"]["steal"].values()))
    if step.get("posts_failed"):
        out.append(f"F{step['posts_failed']}")
    if step.get("ws_closed"):
        out.append("C " + ",".join(f"{k}x{v}" for k, v in step["ws_closed"].items()))
    return " ".join(out)


def rate_table(runs: dict[tuple[str, str], dict[str, Any]], scenario: str) -> list[str]:
    lines = [
        "| engine | sustained/s | target/s | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup "
        "| SUT us/dlv | SUT CPU % | SUT RSS MB | loadgen CPU % | CPU0/CPU1 busy % | flags |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for engine in ENGINE_ORDER:
        r = runs.get((scenario, engine))
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {engine} | error: {r['error'][:120]} |" + " |" * 14)
            continue
        for k, s in enumerate(r["steps"]):
            lat = s["latency_ms"]
            cores = s["cpu_pct"]["cores"]
            irq = s["cpu_pct"]["irq"]
            busy = "/".join(f"{cores.get(c, 0) + irq.get(c, 0):.0f}" for c in ("cpu0", "cpu1"))
            rss = sum(s.get("rss_mb", {}).values())
            lines.append(
                f"| {engine if k == 0 else ''} | {fmt(r.get('sustained_deliveries_per_s'), 0) if k == 0 else ''} "
                f"| {fmt(s['target_deliveries_per_s'])} | {fmt(s['achieved_deliveries_per_s'], 0)} "
                f"| {fmt(lat['p50'], 2)} | {fmt(lat['p99'], 2)} | {fmt(lat['p99.9'], 2)} | {fmt(lat['max'], 1)} "
                f"| {fmt(s['lost'])} | {fmt(s['dup'])} | {fmt(s['sut_us_per_delivery'], 1)} | {fmt(s['sut_cpu_pct'], 0)} "
                f"| {fmt(rss, 0)} | {fmt(s['loadgen_cpu_pct'], 0)} | {busy} | {_flags(s)} |"
            )
        if r.get("skipped_rates"):
            skipped = ", ".join(fmt(x) for x in r["skipped_rates"])
            lines.append(f"| | | {skipped} | not run: the previous rate overloaded {engine} |" + " |" * 12)
    return lines


def summary_table(runs: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """One row per engine: the headline figure of each scenario."""

    def rate_cells(scenario: str, engine: str, p99: bool = False) -> list[str]:
        r = runs.get((scenario, engine))
        n = 3 if p99 else 2
        if r is None:
            return [""] * n
        if "error" in r or not r.get("steps"):
            return ["error"] + [""] * (n - 1)
        first = r["steps"][0]
        cells = [fmt(r.get("sustained_deliveries_per_s"), 0), fmt(first["sut_us_per_delivery"], 1)]
        return cells + ([fmt(first["latency_ms"]["p99"], 0)] if p99 else [])

    def most_cells(engine: str) -> list[str]:
        """(a) at any latency: the highest rate delivered without a loss, and
        the deliveries per second that one SUT core does at that step."""
        r = runs.get(("a", engine))
        clean = [s for s in (r or {}).get("steps", []) if not (s["lost"] or s["dup"] or s["posts_failed"])]
        if not clean:
            return ["-", ""]
        top = max(clean, key=lambda s: s["achieved_deliveries_per_s"])
        per_core = top["achieved_deliveries_per_s"] / (top["sut_cpu_pct"] / 100) if top["sut_cpu_pct"] else None
        return [fmt(top["achieved_deliveries_per_s"], 0), fmt(per_core, 0)]

    lines = [
        "| engine | a: sustained/s | a: SUT us/dlv | a: most/s, no loss | a: there, per SUT core/s "
        "| b: sustained/s | b: SUT us/dlv | b: p99 ms "
        "| c: sustained/s | c: SUT us/dlv | d: KiB/conn at 10k | d: idle CPU % at 10k | e: all live after ms | e: lost |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine in ENGINE_ORDER:
        if not any(e == engine for _, e in runs):
            continue
        cells = [*rate_cells("a", engine), *most_cells(engine), *rate_cells("b", engine, p99=True)]
        cells += rate_cells("c", engine)
        d = runs.get(("d", engine))
        if d and "error" not in d and d["points"]:
            last = d["points"][-1]
            cells += [fmt(last["rss_kb_per_connection"]), fmt(last["idle_cpu_pct"], 2)]
        else:
            cells += ["", ""]
        e = runs.get(("e", engine))
        if e and "error" not in e:
            cells += [fmt(e["steps"][0].get("storm", {}).get("all_live_ms"), 0), fmt(e["steps"][0]["lost"])]
        else:
            cells += ["", ""]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    return lines


def idle_table(runs: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [
        "| engine | base RSS MB | connections | SUT RSS MB | KiB per connection | KiB per connection (marginal) "
        "| idle SUT CPU % | connect s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine in ENGINE_ORDER:
        r = runs.get(("d", engine))
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {engine} | error: {r['error'][:120]} |" + " |" * 6)
            continue
        for k, p in enumerate(r["points"]):
            lines.append(
                f"| {engine if k == 0 else ''} | {fmt(r['base_rss_mb']) if k == 0 else ''} | {fmt(p['connections'])} "
                f"| {fmt(p['rss_mb'])} | {fmt(p['rss_kb_per_connection'])} | {fmt(p.get('marginal_kb_per_connection'))} "
                f"| {fmt(p['idle_cpu_pct'], 2)} | {fmt(p['connect_s'], 2)} |"
            )
    return lines


def storm_table(runs: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [
        "| engine | subscribers | all live after ms | p50 live ms | retries | posts/s meanwhile | lost | dup "
        "| p99 ms (step) | flags |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for engine in ENGINE_ORDER:
        r = runs.get(("e", engine))
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {engine} | error: {r['error'][:120]} |" + " |" * 8)
            continue
        s = r["steps"][0]
        st = s.get("storm", {})
        live = st.get("live_ms") or {}
        lines.append(
            f"| {engine} | {fmt(r['subscribers'])} | {fmt(st.get('all_live_ms'), 0)} | {fmt(live.get('p50'), 0)} "
            f"| {fmt(st.get('retries'))} | {fmt(s['posts_per_s'], 0)} | {fmt(s['lost'])} | {fmt(s['dup'])} "
            f"| {fmt(s['latency_ms']['p99'], 1)} | {_flags(s)} |"
        )
    return lines


def plot_rates(runs: dict[tuple[str, str], dict[str, Any]], scenario: str, path: Path) -> bool:
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    fig, (ax_lat, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.6))
    drew = False
    for engine in ENGINE_ORDER:
        r = runs.get((scenario, engine))
        if not r or "error" in r or not r.get("steps"):
            continue
        steps = r["steps"]
        x = [s["achieved_deliveries_per_s"] for s in steps]
        color = COLORS[engine]
        for key, style in (("p50", ":"), ("p99", "-"), ("p99.9", "--")):
            y = [s["latency_ms"][key] for s in steps]
            ax_lat.plot(x, y, style, marker="o", color=color, label=f"{engine} {key}")
        ax_cpu.plot(x, [s["sut_us_per_delivery"] for s in steps], "-", marker="o", color=color, label=engine)
        drew = True
    if not drew:
        plt.close(fig)
        return False
    ax_lat.axhline(25, color="grey", lw=0.8)
    ax_lat.text(ax_lat.get_xlim()[0], 27, " 25 ms", color="grey", fontsize=8)
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("deliveries/s achieved")
    ax_lat.set_ylabel("latency from scheduled send, ms (log)")
    ax_lat.set_title("latency: p50 dotted, p99 solid, p99.9 dashed", fontsize=10)
    ax_lat.legend(fontsize=7, ncol=2)
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_cpu.set_xlabel("deliveries/s achieved")
    ax_cpu.set_ylabel("server CPU per delivery, us")
    ax_cpu.set_title("server (SUT) CPU per delivery", fontsize=10)
    ax_cpu.set_yscale("log")
    ax_cpu.grid(True, which="both", alpha=0.3)
    ax_cpu.legend(fontsize=8)
    fig.suptitle(TITLES[scenario])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_idle(runs: dict[tuple[str, str], dict[str, Any]], path: Path) -> bool:
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    fig, ax = plt.subplots(figsize=(7, 4))
    drew = False
    for engine in ENGINE_ORDER:
        r = runs.get(("d", engine))
        if not r or "error" in r:
            continue
        pts = r["points"]
        ax.plot([0] + [p["connections"] for p in pts], [r["base_rss_mb"]] + [p["rss_mb"] for p in pts],
                marker="o", color=COLORS[engine], label=engine)
        drew = True
    if not drew:
        plt.close(fig)
        return False
    ax.set_xlabel("idle subscribed connections")
    ax.set_ylabel("server RSS, MB")
    ax.set_title(TITLES["d"])
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def generated(paths: list[Path], out: Path) -> str:
    runs, files = load(paths)
    env = files[-1]["environment"]
    lines = [
        f"Generated by `python -m bench report {' '.join(p.name for p in paths)}` from bench/results/.",
        "",
        f"- Machine: {env.get('cpu_model', '?')}, {env.get('cpus')} CPUs, Linux {env.get('kernel')}; "
        f"Python {env.get('python')}, Node {env.get('node')}, {env.get('redis_server', '').split(' sha=')[0]}",
        f"- streamd {env.get('streamd')} at {str(env.get('git_commit'))[:12]}"
        f"{' (with uncommitted changes)' if env.get('streamd_dirty') else ''}",
        "- Node packages: " + ", ".join(f"{k} {v}" for k, v in sorted((env.get("node_packages") or {}).items())),
        "- Python peer packages: "
        + ", ".join(
            ln
            for ln in (env.get("peers_python_packages") or "").splitlines()
            if ln.split("==")[0].lower()
            in ("python-socketio", "python-engineio", "django", "channels", "channels-redis", "uvicorn", "websockets",
                "redis", "aiohttp", "uvloop", "msgpack")
        ),
        "",
        "Commands of these runs:",
        "",
        "```sh",
        *(" ".join(f["command"]) for f in files),
        "```",
        "",
        "Flags: `L` load generator over 70% of a core; `O a/b` CPU0/CPU1 busy % that our processes do not "
        "explain (other sessions on this machine: the numbers are disturbed); `S a/b` CPU0/CPU1 % stolen by the "
        "hypervisor (over 5%: the host ran other machines, every latency of the step grows; such a step is "
        "re-run and the least disturbed attempt kept); `F` posts failed; `C` sockets "
        "closed by the server (close code x count). *sustained/s*: the highest achieved rate with p99 <= 25 ms, "
        "no loss, no duplicate (`-`: no rate run met that). *most/s, no loss*: the highest achieved rate of (a) "
        "with no loss and no duplicate, at any latency; *there, per SUT core/s*: that rate divided by the share of "
        "a core the SUT used in that step.",
        "",
        "### Summary",
        "",
        *summary_table(runs),
        "",
    ]
    for scenario in ("a", "b", "c"):
        if not any(k[0] == scenario for k in runs):
            continue
        r0 = next(r for (s, _), r in runs.items() if s == scenario and "error" not in r)
        lines += [f"### {TITLES[scenario]}", ""]
        lines.append(f"{r0.get('subscribers', '?')} subscribers on {r0.get('feeds', '?')} feeds.")
        lines.append("")
        lines += rate_table(runs, scenario)
        png = out.parent / f"results-{scenario}.png"
        if plot_rates(runs, scenario, png):
            lines += ["", f"![{TITLES[scenario]}]({png.name})"]
        lines.append("")
    if any(k[0] == "d" for k in runs):
        lines += [f"### {TITLES['d']}", "", *idle_table(runs)]
        png = out.parent / "results-d.png"
        if plot_idle(runs, png):
            lines += ["", f"![{TITLES['d']}]({png.name})"]
        lines.append("")
    if any(k[0] == "e" for k in runs):
        lines += [f"### {TITLES['e']}", "", *storm_table(runs), ""]
    return "\n".join(lines)


def write(paths: list[Path], out: Path) -> int:
    body = generated(paths, out)
    if out.exists():
        text = out.read_text()
        if START in text and END in text:
            head, _, rest = text.partition(START)
            _, _, tail = rest.partition(END)
            out.write_text(f"{head}{START}\n{body}\n{END}{tail}")
            print(f"bench report: {out}")
            return 0
    out.write_text(f"# Benchmarks: streamd and its peers\n\n{START}\n{body}\n{END}\n")
    print(f"bench report: {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
