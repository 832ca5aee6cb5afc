"""Weight staging: gpufleet's staging against rsync -a over the same SSH, to 1 and to N hosts;
no-op re-stage; bytes re-sent after a transfer killed half-way; hashing against sha256sum."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from operations.bundle import sha256_file
from tests.lab import hosts as lab

from . import procmem

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WEIGHTS = REPO / "bench" / "out" / "weights"
MANIFEST = REPO / "bench" / "out" / "weights-manifest.json"


def make_weight_set(large=4, large_mib=500, small=256, small_kib=64, log=print):
    """Several large files and many small ones (random bytes: nothing compresses), made once."""
    wanted = {f"model-{i:02d}.safetensors": large_mib << 20 for i in range(large)}
    wanted |= {f"tokenizer/shard-{i:03d}.json": small_kib << 10 for i in range(small)}
    if MANIFEST.exists() and set(json.loads(MANIFEST.read_text())) == set(wanted) and all(
            (WEIGHTS / p).exists() and (WEIGHTS / p).stat().st_size == s for p, s in wanted.items()):
        return json.loads(MANIFEST.read_text())
    for path, size in wanted.items():
        target = WEIGHTS / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            for _ in range(0, size, 16 << 20):
                fh.write(os.urandom(min(16 << 20, size)))
            fh.truncate(size)
    manifest = {path: {"size": size, "sha256": sha256_file(WEIGHTS / path)} for path, size in wanted.items()}
    MANIFEST.write_text(json.dumps(manifest, indent=1))
    log(f"weight set: {len(wanted)} files, {sum(wanted.values()) / 1e9:.2f} GB")
    return manifest


def gpufleet_stage(names, dest, background=False, via=None, login=()):
    """Stage the set into ``dest`` on ``names``; returns seconds and the bytes the control node sent
    (with ``via``: the other hosts pull from that host of the site; ``login``: ``--data`` items that
    change how pyinfra logs in, e.g. a sudo user)."""
    command = [str(BIN / "pyinfra"), "-y", "inventories/lab.py", "bench/stage_deploy.py"]
    for name in names:
        command += ["--limit", name]
    if via:
        command += ["--data", f"gpufleet_stage_via={via}"]
    for item in login:
        command += ["--data", item]
    env = {**os.environ, "BENCH_WEIGHTS": str(WEIGHTS), "BENCH_MANIFEST": str(MANIFEST), "BENCH_DEST": dest,
           "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    seconds, _, result = procmem.run(command, cwd=REPO, env=env)
    if result.returncode:
        raise RuntimeError(result.stdout[-3000:])
    sent = sum(int(n) for n in re.findall(r"staged \d+ file\(s\), (\d+) bytes sent", result.stdout))
    return seconds, sent


def rsync(hosts, dest):
    on_hosts(hosts, f"mkdir -p {dest}")
    started = time.perf_counter()
    procs = [subprocess.Popen(["rsync", "-a", "-e", f"ssh -F {lab.SSH_CONFIG}", f"{WEIGHTS}/", f"{h['name']}:{dest}/"])
             for h in hosts]
    if any(p.wait() for p in procs):
        raise RuntimeError("rsync failed")
    return time.perf_counter() - started


def sudo_vs_root(runs=3, log=print):
    """Staging to one host logged in as root and as a sudo user (the stream goes through
    ``sudo sh -c``), interleaved, ``runs`` times each, on the same lab host."""
    manifest = make_weight_set(log=log)
    total = sum(entry["size"] for entry in manifest.values())
    state = lab.up(count=2, airgapped=0, proxmox=0, log=lambda *_: None)
    host = next(h for h in state["hosts"] if h["user"] == "root")
    logins = {"root": (), "sudo": (f"ssh_user={lab.SUDO_USER}", "_sudo=True")}
    seconds = {name: [] for name in logins}
    for run in range(runs):
        for name in (logins if run % 2 == 0 else reversed(list(logins))):
            on_hosts([host], "rm -rf /srv/bench")
            took, sent = gpufleet_stage([host["name"]], "/srv/bench/gpufleet", login=logins[name])
            assert sent == total, (name, sent, total)
            seconds[name].append(took)
    on_hosts([host], "rm -rf /srv/bench")
    log(f"staging as root {sorted(seconds['root'])}, through sudo {sorted(seconds['sudo'])}")
    return {"bytes": total, "files": len(manifest), "runs": runs, "host": host["name"],
            "root_s": seconds["root"], "sudo_s": seconds["sudo"]}


def on_hosts(hosts, command):
    for host in hosts:
        lab.ssh(host, command)


def measure(fan_out=4, log=print):
    manifest = make_weight_set(log=log)
    total = sum(entry["size"] for entry in manifest.values())
    state = lab.up(count=fan_out, airgapped=0, proxmox=0, log=lambda *_: None)
    hosts = state["hosts"][:fan_out]
    on_hosts(hosts, "command -v rsync >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null)")
    on_hosts(hosts, "rm -rf /srv/bench")
    result = {"bytes": total, "files": len(manifest)}

    result["rsync_1_s"] = rsync(hosts[:1], "/srv/bench/rsync")
    result["gpufleet_1_s"], sent = gpufleet_stage([hosts[0]["name"]], "/srv/bench/gpufleet")
    assert sent == total, (sent, total)
    result["gpufleet_noop_1_s"], sent = gpufleet_stage([hosts[0]["name"]], "/srv/bench/gpufleet")
    assert sent == 0
    result["rsync_noop_1_s"] = rsync(hosts[:1], "/srv/bench/rsync")
    on_hosts(hosts, "rm -rf /srv/bench")
    result[f"rsync_{fan_out}_s"] = rsync(hosts, "/srv/bench/rsync")
    result[f"gpufleet_{fan_out}_s"], sent = gpufleet_stage([h["name"] for h in hosts], "/srv/bench/gpufleet")
    result[f"gpufleet_noop_{fan_out}_s"], _ = gpufleet_stage([h["name"] for h in hosts], "/srv/bench/gpufleet")
    result["fan_out"] = fan_out
    # Fan-out inside the site: the first host stages from the control node, the others pull from it.
    on_hosts(hosts, "rm -rf /srv/bench/relay")
    result[f"relay_{fan_out}_s"], result[f"relay_{fan_out}_control_bytes"] = gpufleet_stage(
        [h["name"] for h in hosts], "/srv/bench/relay", via=hosts[0]["name"])

    # Kill a transfer once about half the bytes are on the host, then run again.
    on_hosts(hosts[:1], "rm -rf /srv/bench/resume")
    process = gpufleet_stage([hosts[0]["name"]], "/srv/bench/resume", background=True)
    on_host = 0
    while on_host < total // 2 and process.poll() is None:
        time.sleep(0.2)
        on_host = int(lab.ssh(hosts[0], "du -sb --apparent-size /srv/bench/resume 2>/dev/null | cut -f1 || echo 0",
                              check=False).stdout.strip() or 0)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    on_host = int(lab.ssh(hosts[0], "du -sb --apparent-size /srv/bench/resume | cut -f1").stdout.strip())
    result["resume_on_host_bytes"] = on_host
    result["resume_s"], result["resume_sent_bytes"] = gpufleet_stage([hosts[0]["name"]], "/srv/bench/resume")

    paths = [WEIGHTS / p for p in manifest]
    started = time.perf_counter()
    assert all(sha256_file(p) == manifest[str(p.relative_to(WEIGHTS))]["sha256"] for p in paths)
    result["hash_gpufleet_s"] = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, paths)], check=True, stdout=subprocess.DEVNULL)
    result["hash_sha256sum_s"] = time.perf_counter() - started
    on_hosts(hosts, "rm -rf /srv/bench")
    log(f"staging: gpufleet {result['gpufleet_1_s']:.1f}s, rsync {result['rsync_1_s']:.1f}s")
    return result
