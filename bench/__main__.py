"""python -m bench [--fleet 1,4,8] [--fan-out 4] [--runs 40] [--only fleet,staging,sudo,latency]

Brings up lab hosts (replacing the lab), measures gpufleet against its baselines side by side in
this run, prints the table and writes bench/out/results.json, table.md and results.png."""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from tests.lab import hosts as lab

from . import fleet, latency, report, staging

OUT = Path(__file__).resolve().parent / "out"


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    return f"{platform.node()}: {os.cpu_count()} × {cpu}, {mem:.0f} GiB, {platform.platform()}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--fleet", default="1,4,8", help="host counts for the fleet runs")
    parser.add_argument("--fan-out", type=int, default=4, help="hosts for the staging fan-out")
    parser.add_argument("--runs", type=int, default=40, help="streamed completions per network mode")
    parser.add_argument("--sudo-runs", type=int, default=3, help="staging runs per login, root and sudo")
    parser.add_argument("--only", default="fleet,staging,sudo,latency")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    started = time.time()
    try:
        if "fleet" in parts:
            results["fleet"] = fleet.measure([int(n) for n in args.fleet.split(",")])
        if "staging" in parts:
            results["staging"] = staging.measure(fan_out=args.fan_out)
        if "sudo" in parts:
            results["sudo"] = staging.sudo_vs_root(runs=args.sudo_runs)
        if "latency" in parts:
            results["latency"] = latency.measure(runs=args.runs)
    finally:
        lab.down(log=lambda *_: None)
        report.write(results, OUT)  # what was measured, even when a later part failed
    results["seconds"] = round(time.time() - started)
    print(report.write(results, OUT))
    print(f"\n(written to {OUT}: results.json, table.md, results.png; {results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
