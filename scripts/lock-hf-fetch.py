#!/usr/bin/env python3
"""Write operations/weights/hf_fetch.lock.json: for each host Python and architecture gpufleet supports,
the exact wheels of huggingface_hub (the version pinned in requirements.txt) and of everything it
needs, with their SHA-256. Hosts that fetch weights from a hub get exactly these files (staged from
the control node, checked against this lock), whatever PyPI serves later. hf_xet is left out:
gpufleet downloads over HTTP with the client's http_get, which resumes across runs.

    python scripts/lock-hf-fetch.py      # run again after changing the pin in requirements.txt
"""

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "operations" / "weights" / "hf_fetch.lock.json"
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]  # Ubuntu 22.04, Debian 12, Ubuntu 24.04, Debian 13
ARCHES = ["x86_64", "aarch64"]
MANYLINUX = ["manylinux_2_17", "manylinux2014", "manylinux_2_28", "manylinux_2_34"]


def pinned_version():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"huggingface[-_]hub==(\S+)", line.strip())
        if match:
            return match.group(1)
    sys.exit("requirements.txt pins no huggingface-hub")


def target_flags(python, arch):
    abi = "cp" + python.replace(".", "")
    flags = [
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in MANYLINUX:
        flags += ["--platform", f"{tag}_{arch}"]
    return flags


def main():
    version = pinned_version()
    targets = {}
    for python in PYTHONS:
        for arch in ARCHES:
            with tempfile.TemporaryDirectory() as out:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "-q",
                        *target_flags(python, arch),
                        "-d",
                        out,
                        f"huggingface_hub=={version}",
                    ],
                    check=True,
                )
                targets[f"cp{python.replace('.', '')}-{arch}"] = {
                    wheel.name: hashlib.sha256(wheel.read_bytes()).hexdigest()
                    for wheel in sorted(Path(out).iterdir())
                    if not wheel.name.startswith("hf_xet-")
                }
    LOCK.write_text(json.dumps({"huggingface_hub": version, "targets": targets}, indent=1, sort_keys=True) + "\n")
    print(f"{LOCK}: huggingface_hub {version}, {len(targets)} targets")


if __name__ == "__main__":
    main()
