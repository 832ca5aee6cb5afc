"""What a benchmark part measured, kept as JSON under bench/results/ (one file per part) with the
machine it ran on and the versions of everything timed; the tables and the plot are made from
these files only."""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("fleet", "scale", "staging", "sudo", "latency", "rollout")


def _first_line(command):
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ((done.stdout or done.stderr).strip().splitlines() or [None])[0]


def _package(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine():
    """The control node (which, in the lab, is also every host's CPU and kernel)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    rsync = _first_line(["rsync", "--version"])
    return {
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
            platform.processor(),
        ),
        "cores": os.cpu_count(),
        "aes_ni": " aes " in f" {cpuinfo} ",
        "memory_gib": round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME")
        if hasattr(platform, "freedesktop_os_release")
        else None,
        "versions": {
            "python": platform.python_version(),
            "pyinfra": _package("pyinfra"),
            "paramiko": _package("paramiko"),
            "ansible-core": _package("ansible-core"),
            "ansible": _package("ansible"),
            "mitogen": _package("mitogen"),
            "openssh": _first_line(["ssh", "-V"]),
            "rsync": rsync and " ".join(rsync.split()[:3]),
            "docker": _first_line(["docker", "version", "--format", "{{.Server.Version}}"]),
        },
    }


def commit():
    """The commit measured (with "+changes" when the work tree differs from it), or None outside git."""
    repo = Path(__file__).resolve().parents[1]
    head = _first_line(["git", "-C", str(repo), "rev-parse", "HEAD"])
    if not head or not re.fullmatch(r"[0-9a-f]{40}", head):
        return None
    dirty = _first_line(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return head + ("+changes" if dirty else "")


def spread(samples):
    """A cell's samples with their median and range, as the tables print them."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def save(part, results, out=RESULTS, command=None, measured_commit=None):
    """Write ``out/part.json``: the part's results, the machine, the date, the command and the commit
    (``measured_commit``: the one checked out when the run began; else the one checked out now)."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "part": part,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command or " ".join(["python -m bench", *sys.argv[1:]]),
        "commit": measured_commit or commit(),
        "machine": machine(),
        "results": results,
    }
    (out / f"{part}.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return document


def load(out=RESULTS):
    """part -> its document, for the parts with a file in ``out``."""
    return {part: json.loads((out / f"{part}.json").read_text()) for part in PARTS if (out / f"{part}.json").exists()}
