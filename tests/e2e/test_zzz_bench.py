"""The benchmark's own smoke run (after the lab is down; it brings up its own and removes it): one
host, a small weight set, one repeat of every staging row, its JSON, tables and plot. The full
benchmark stays outside CI (README, Benchmark)."""

import importlib.util
import json
import subprocess
import sys

from bench import record, report

from .conftest import REPO


def test_bench_runs_end_to_end_on_one_host(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "staging",
            "--fan-out",
            "1",
            "--repeats",
            "1",
            "--size",
            "small",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((tmp_path / "staging.json").read_text())
    assert document["part"] == "staging" and document["machine"]["cores"] >= 1
    assert document["machine"]["versions"]["pyinfra"] and document["machine"]["versions"]["openssh"]
    results = document["results"]
    assert results["bytes"] == 2 * (8 << 20) + 16 * (16 << 10)
    for cell in ("rsync", "rsync_gcm", "gpufleet_paramiko", "gpufleet_openssh"):
        assert len(results["one_host"][cell]["samples"]) == 1 and results["one_host"][cell]["median"] > 0
    assert results["resume_sent_bytes"] <= results["bytes"]
    table = (tmp_path / "table.md").read_text()
    assert table == report.markdown(record.load(tmp_path)) and "÷ rsync AES-128-GCM" in table
    plotted = importlib.util.find_spec("matplotlib") is not None  # bench-only: bench/requirements.txt
    assert (tmp_path / "results.png").exists() == plotted
