"""A rolling driver upgrade timed: two lab hosts and an air-gapped one serving llama.cpp on their lab
address go from Debian's 535.261.03 to 535.309.01 with upgrade.py, one at a time, while the
control node sends each a completion twice a second. Reported: the rollout's wall time, each
batch's (one host each), and the longest window any host did not answer."""

import json
import subprocess
import sys
import time
from pathlib import Path

from operations.core import settings
from tests.lab import bundle as lab_bundle
from tests.lab import hosts as lab
from tests.lab import probe

REPO = Path(__file__).resolve().parents[1]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
NEW = "535.309.01"
OLD = settings.DEFAULTS["nvidia_driver_version"]
HOSTS = ("lab-1", "lab-2", "lab-gap-1")


def _run(args, marks=()):
    """Run pyinfra, returning its exit code and, for each line starting with one of ``marks``, the
    monotonic time it was printed (the first time)."""
    seen = {}
    process = subprocess.Popen(
        [PYINFRA, "-y", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in process.stdout:
        for mark in marks:
            if line.strip().startswith(mark) and line.strip() not in seen:
                seen[line.strip()] = time.monotonic()
    return process.wait(), seen


def measure(log=print):
    state = lab.up(count=2, airgapped=1, proxmox=0, fresh=True, log=lambda *_: None)
    addresses = {host["name"]: host["address"] for host in state["hosts"]}
    networks = sorted({".".join(addresses[name].split(".")[:2]) + ".0.0/16" for name in HOSTS})
    common = [
        "inventories/lab.py",
        "upgrade.py",
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps(networks)}",
    ]
    rc, _ = _run([*common, "--data", f'nvidia_driver_version="{OLD}"'])
    assert rc == 0, "the lab did not converge at the old driver"
    bundle = lab_bundle.build(log=lambda *_: None, driver_version=NEW, out=lab_bundle.LAB / f"bundle-{NEW}")
    key = (lab.STATE_DIR / "secrets" / "chat-api-key").read_text().strip()
    prober = probe.Prober({name: f"http://{addresses[name]}:8080" for name in HOSTS}, key, limit_s=1800)
    prober.start()
    started = time.monotonic()
    try:
        rc, marks = _run(
            [*common, "--data", f'nvidia_driver_version="{NEW}"', "--data", f"gpufleet_bundle={bundle}"],
            marks=("--> Starting operation: Rollout batch", "--> Disconnecting"),
        )
    finally:
        ended = time.monotonic()
        rounds = prober.stop()
    assert rc == 0, "the rollout failed"
    gates = sorted(at for line, at in marks.items() if "Rollout batch" in line)
    ends = gates[1:] + [marks.get("--> Disconnecting from hosts...", ended)]
    longest, host = probe.longest_window(rounds)
    result = {
        "hosts": len(HOSTS),
        "from": OLD,
        "to": NEW,
        "wall_s": round(ended - started, 1),
        "batch_s": [round(end - start, 1) for start, end in zip(gates, ends, strict=False)],
        "longest_out_of_service_s": round(longest, 1),
        "longest_out_of_service_host": host,
        "fewest_answering": probe.fewest_answering(rounds),
        "probe_rounds": len(rounds),
    }
    log(f"rollout: {result}")
    return result
