"""`python -m bench <scenario> [options]`: pick a scenario by name and run it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bench import cluster, compare, ingest, peersetup, report, worker


@dataclass(frozen=True, slots=True)
class Scenario:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# One entry per scenario module; each exposes HELP, add_arguments() and run().
SCENARIOS: dict[str, Scenario] = {
    "compare": Scenario(compare.HELP, compare.add_arguments, compare.run),
    "ingest": Scenario(ingest.HELP, ingest.add_arguments, ingest.run),
    "cluster": Scenario(cluster.HELP, cluster.add_arguments, cluster.run),
    "worker": Scenario(worker.HELP, worker.add_arguments, worker.run),
    "setup": Scenario(peersetup.HELP, peersetup.add_arguments, peersetup.run),
    "report": Scenario(report.HELP, report.add_arguments, report.run),
}


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = top.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, scenario in SCENARIOS.items():
        p = sub.add_parser(name, help=scenario.help, description=scenario.help)
        scenario.add_arguments(p)
    args = top.parse_args(argv)
    return SCENARIOS[args.scenario].run(args)


if __name__ == "__main__":
    sys.exit(main())
