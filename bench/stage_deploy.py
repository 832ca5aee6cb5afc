"""Benchmark deploy: stage the benchmark's weight set (the directory BENCH_WEIGHTS) to BENCH_DEST on
each host as deploy.py stages a weight volume whose source is a control-node directory: its manifest
made by ``weights.directory_manifest`` (hashes kept under GPUFLEET_CACHE and trusted while a file's
size and mtime hold), then gpufleet's resumable, verified staging (from a seed host of the site when
gpufleet_stage_via names one)."""

import os

from operations.offline import staging
from operations.weights.volumes import directory_manifest

staging.serve_relays()
staging.stage(
    name="Stage the benchmark weight set",
    src=os.environ["BENCH_WEIGHTS"],
    dest=os.environ["BENCH_DEST"],
    files=directory_manifest(os.environ["BENCH_WEIGHTS"]),
)
