"""python -m bench [--only fleet,scale,staging,sudo,latency,rollout] [--fleet 1,4] [--samples 3] [--scale 1,4,8,16]
                   [--fan-out 4] [--repeats 5]
                   [--size full|small] [--out DIR]
python -m bench report [--out DIR]

Brings up lab hosts (replacing the lab), measures gpufleet against its baselines side by side, and
writes each part's results as JSON (bench/results/PART.json: results, machine, versions, date,
command); then the tables (table.md), the plot (results.png) and the bench section of docs/benchmark.md are
made from the JSON files. ``report`` only remakes them from the JSON."""

import argparse
import sys
import time
from pathlib import Path

from tests.lab import hosts as lab

from . import fleet, latency, record, report, rollout, scale, staging


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(record.PARTS), help="parts to run, comma-separated")
    parser.add_argument("--fleet", default="1,4", help="host counts for the fleet runs")
    parser.add_argument("--scale", default="1,4,8,16", help="host counts for the scale runs (deploy.py alone)")
    parser.add_argument("--variants", default=",".join(fleet.VARIANTS), help="fleet variants to run")
    parser.add_argument("--samples", type=int, default=3, help="samples of each fleet cell, order rotated")
    parser.add_argument("--fan-out", type=int, default=4, help="hosts for the staging fan-out (1: none)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each one-host staging row")
    parser.add_argument("--size", choices=sorted(staging.SIZES), default="full", help="the staged weight set")
    parser.add_argument("--runs", type=int, default=40, help="streamed completions per network mode")
    parser.add_argument("--sudo-runs", type=int, default=5, help="staging runs per login, root and sudo")
    parser.add_argument("--out", type=Path, default=record.RESULTS, help="where the JSON, table and plot go")
    if argv[:1] == ["report"]:
        args = parser.parse_args(argv[1:])
        print(report.write(args.out, readme=args.out == record.RESULTS))
        return 0
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench", *argv])
    parts = {part: part in args.only.split(",") for part in record.PARTS}
    runs = {
        "fleet": lambda: fleet.measure(
            [int(n) for n in args.fleet.split(",")], args.variants.split(","), samples=args.samples
        ),
        "scale": lambda: scale.measure([int(n) for n in args.scale.split(",")]),
        "staging": lambda: staging.measure(fan_out=args.fan_out, repeats=args.repeats, size=args.size),
        "sudo": lambda: staging.sudo_vs_root(runs=args.sudo_runs, size=args.size),
        "latency": lambda: latency.measure(runs=args.runs),
        "rollout": rollout.measure,
    }
    started, measured = time.time(), record.commit()
    try:
        for part, wanted in parts.items():
            if wanted:
                record.save(part, runs[part](), args.out, command=command, measured_commit=measured)
    finally:
        lab.down(log=lambda *_: None)
    print(report.write(args.out, readme=args.out == record.RESULTS))
    print(f"\n(written to {args.out}: one JSON per part, table.md, results.png; {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
