"""Benchmark deploy: stage the benchmark's weight set (BENCH_WEIGHTS, manifest BENCH_MANIFEST) to
BENCH_DEST on each host with gpufleet's resumable, verified staging (from a seed host of the site
when gpufleet_stage_via names one)."""

import json
import os

from operations import staging

staging.serve_relays()
staging.stage(name="Stage the benchmark weight set", src=os.environ["BENCH_WEIGHTS"],
              dest=os.environ["BENCH_DEST"], files=json.loads(open(os.environ["BENCH_MANIFEST"]).read()))
