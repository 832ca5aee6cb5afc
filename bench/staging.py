"""Weight staging: gpufleet's staging against rsync -a over SSH to one host, each cell repeated
with its order rotated per repeat, the source's pages warm and the host's writes flushed before
every run: rsync with OpenSSH's default cipher and with AES-128-GCM (the cipher gpufleet
negotiates), gpufleet over pyinfra's paramiko connection and through the OpenSSH client. Then
N hosts, the fan-out inside the site, the no-op re-stage, a resume after a kill, hashing."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from operations.offline.bundle import sha256_file
from tests.lab import hosts as lab

from . import procmem, record

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO / "bench" / "out"
GCM = "aes128-gcm@openssh.com"
# The one-host cells, in the order of the first repeat (each later repeat starts one further on).
# gpufleet_openssh_cold: the control node has not hashed the set before (its hash cache emptied), so
# the run hashes every file while making the manifest, then sends.
CELLS = ("rsync", "rsync_gcm", "gpufleet_paramiko", "gpufleet_openssh", "gpufleet_openssh_cold")
# gpufleet's control-node hash cache for the bench's runs (GPUFLEET_CACHE), not the user's.
CACHE = OUT / "cache"
SIZES = {
    "full": {"large": 4, "large_mib": 500, "small": 256, "small_kib": 64},
    "small": {"large": 2, "large_mib": 8, "small": 16, "small_kib": 16},
}


def make_weight_set(size="full", log=print):
    """Several large files and many small ones (random bytes: nothing compresses), made once.
    Returns (directory, manifest path, manifest)."""
    shape = SIZES[size]
    where = OUT / ("weights" if size == "full" else f"weights-{size}")
    manifest_path = where.with_name(f"{where.name}-manifest.json")
    wanted = {f"model-{i:02d}.safetensors": shape["large_mib"] << 20 for i in range(shape["large"])}
    wanted |= {f"tokenizer/shard-{i:03d}.json": shape["small_kib"] << 10 for i in range(shape["small"])}
    if (
        manifest_path.exists()
        and set(json.loads(manifest_path.read_text())) == set(wanted)
        and all((where / p).exists() and (where / p).stat().st_size == s for p, s in wanted.items())
    ):
        return where, manifest_path, json.loads(manifest_path.read_text())
    for path, size_bytes in wanted.items():
        target = where / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            for _ in range(0, size_bytes, 16 << 20):
                fh.write(os.urandom(min(16 << 20, size_bytes)))
            fh.truncate(size_bytes)
    manifest = {path: {"size": size_bytes, "sha256": sha256_file(where / path)} for path, size_bytes in wanted.items()}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"weight set: {len(wanted)} files, {sum(wanted.values()) / 1e9:.2f} GB")
    return where, manifest_path, manifest


def gpufleet_stage(weights, names, dest, background=False, via=None, login=(), transport=None):
    """Stage the set ``weights`` (directory, manifest path) into ``dest`` on ``names``; returns
    seconds and the bytes the control node sent (with ``via``: the other hosts pull from that host
    of the site; ``login``: ``--data`` items that change how pyinfra logs in, e.g. a sudo user;
    ``transport``: gpufleet_stage_transport)."""
    command = [str(BIN / "pyinfra"), "-y", "inventories/lab.py", "bench/stage_deploy.py"]
    for name in names:
        command += ["--limit", name]
    if via:
        command += ["--data", f"gpufleet_stage_via={via}"]
    if transport:
        command += ["--data", f"gpufleet_stage_transport={transport}"]
    for item in login:
        command += ["--data", item]
    env = {
        **os.environ,
        "BENCH_WEIGHTS": str(weights[0]),
        "BENCH_DEST": dest,
        "GPUFLEET_CACHE": str(CACHE),
        "PYTHONPATH": str(REPO),
    }
    if background:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    seconds, _, result = procmem.run(command, cwd=REPO, env=env)
    if result.returncode:
        raise RuntimeError(result.stdout[-3000:])
    sent = sum(int(n) for n in re.findall(r"staged \d+ file\(s\), (\d+) bytes sent", result.stdout))
    return seconds, sent


def rsync(weights, hosts, dest, cipher=None):
    """rsync -a of the set to ``dest`` on ``hosts`` at once, over OpenSSH (``cipher``: forced)."""
    on_hosts(hosts, f"mkdir -p {dest}")
    ssh = f"ssh -F {lab.SSH_CONFIG} -o ControlMaster=no -o ControlPath=none" + (f" -c {cipher}" if cipher else "")
    started = time.perf_counter()
    procs = [subprocess.Popen(["rsync", "-a", "-e", ssh, f"{weights[0]}/", f"{h['name']}:{dest}/"]) for h in hosts]
    if any(p.wait() for p in procs):
        raise RuntimeError("rsync failed")
    return time.perf_counter() - started


def settle(weights, hosts):
    """The same start for every run: nothing left on the hosts, their writes flushed (the lab's hosts
    share this kernel's page cache and disk), the source's pages warm."""
    on_hosts(hosts, "rm -rf /srv/bench")
    os.sync()
    for path in Path(weights[0]).rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def one_host(weights, host, total, repeats, log=print):
    """Every cell of CELLS ``repeats`` times to ``host``; the order rotates by one each repeat."""
    seconds = {cell: [] for cell in CELLS}
    for repeat in range(repeats):
        order = CELLS[repeat % len(CELLS) :] + CELLS[: repeat % len(CELLS)]
        for cell in order:
            settle(weights, [host])
            if cell.startswith("rsync"):
                took = rsync(weights, [host], "/srv/bench/copy", cipher=GCM if cell == "rsync_gcm" else None)
            else:
                if cell.endswith("_cold"):
                    shutil.rmtree(CACHE, ignore_errors=True)
                took, sent = gpufleet_stage(weights, [host["name"]], "/srv/bench/copy", transport=cell.split("_")[1])
                assert sent == total, (cell, sent, total)
            seconds[cell].append(took)
        log(f"staging repeat {repeat + 1}/{repeats}: " + ", ".join(f"{c} {seconds[c][-1]:.1f}s" for c in CELLS))
    return {cell: record.spread(samples) for cell, samples in seconds.items()}


def sudo_vs_root(runs=3, size="full", log=print):
    """Staging to one host logged in as root and as a sudo user (the stream goes through
    ``sudo sh -c``), interleaved, ``runs`` times each, on the same lab host."""
    weights = make_weight_set(size, log=log)
    total = sum(entry["size"] for entry in weights[2].values())
    state = lab.up(count=2, airgapped=0, proxmox=0, log=lambda *_: None)
    host = next(h for h in state["hosts"] if h["user"] == "root")
    logins = {"root": (), "sudo": (f"ssh_user={lab.SUDO_USER}", "_sudo=True")}
    seconds = {name: [] for name in logins}
    for run in range(runs):
        for name in logins if run % 2 == 0 else reversed(list(logins)):
            settle(weights, [host])
            took, sent = gpufleet_stage(weights, [host["name"]], "/srv/bench/gpufleet", login=logins[name])
            assert sent == total, (name, sent, total)
            seconds[name].append(took)
    on_hosts([host], "rm -rf /srv/bench")
    log(f"staging as root {sorted(seconds['root'])}, through sudo {sorted(seconds['sudo'])}")
    return {
        "bytes": total,
        "files": len(weights[2]),
        "runs": runs,
        "host": host["name"],
        "root_s": seconds["root"],
        "sudo_s": seconds["sudo"],
    }


def on_hosts(hosts, command):
    for host in hosts:
        lab.ssh(host, command)


def measure(fan_out=4, repeats=5, size="full", log=print):
    weights = make_weight_set(size, log=log)
    manifest = weights[2]
    total = sum(entry["size"] for entry in manifest.values())
    state = lab.up(count=fan_out + 1, airgapped=0, proxmox=0, log=lambda *_: None)  # lab-1 logs in through sudo
    hosts = [h for h in state["hosts"] if h["user"] == "root"][:fan_out]
    on_hosts(
        hosts,
        "command -v rsync >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null)",
    )
    result = {
        "bytes": total,
        "files": len(manifest),
        "repeats": repeats,
        "cipher": GCM,
        "host": hosts[0]["name"],
        "one_host": one_host(weights, hosts[0], total, repeats, log=log),
    }

    settle(weights, hosts)
    gpufleet_stage(weights, [hosts[0]["name"]], "/srv/bench/gpufleet")  # staged: the next run has nothing to do
    result["gpufleet_noop_1_s"], sent = gpufleet_stage(weights, [hosts[0]["name"]], "/srv/bench/gpufleet")
    assert sent == 0
    rsync(weights, hosts[:1], "/srv/bench/rsync", cipher=GCM)  # likewise
    result["rsync_noop_1_s"] = rsync(weights, hosts[:1], "/srv/bench/rsync", cipher=GCM)
    result["fan_out"] = fan_out
    if fan_out > 1:
        names = [h["name"] for h in hosts]
        settle(weights, hosts)
        result[f"rsync_{fan_out}_s"] = rsync(weights, hosts, "/srv/bench/rsync", cipher=GCM)
        settle(weights, hosts)
        result[f"gpufleet_{fan_out}_s"], sent = gpufleet_stage(weights, names, "/srv/bench/gpufleet")
        result[f"gpufleet_noop_{fan_out}_s"], _ = gpufleet_stage(weights, names, "/srv/bench/gpufleet")
        # Fan-out inside the site: the first host stages from the control node, the others pull from it.
        settle(weights, hosts)
        result[f"relay_{fan_out}_s"], result[f"relay_{fan_out}_control_bytes"] = gpufleet_stage(
            weights, names, "/srv/bench/relay", via=hosts[0]["name"]
        )

    # Kill a transfer once about half the bytes are on the host, then run again.
    settle(weights, hosts[:1])
    process = gpufleet_stage(weights, [hosts[0]["name"]], "/srv/bench/resume", background=True)
    on_host, deadline = 0, time.monotonic() + 600
    while on_host < total // 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        on_host = int(
            lab.ssh(
                hosts[0], "du -sb --apparent-size /srv/bench/resume 2>/dev/null | cut -f1 || echo 0", check=False
            ).stdout.strip()
            or 0
        )
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # done already (a small set)
    process.wait()
    on_host = int(
        lab.ssh(
            hosts[0], "du -sb --apparent-size /srv/bench/resume 2>/dev/null | cut -f1 || echo 0", check=False
        ).stdout.strip()
        or 0
    )
    result["resume_on_host_bytes"] = on_host
    result["resume_s"], result["resume_sent_bytes"] = gpufleet_stage(weights, [hosts[0]["name"]], "/srv/bench/resume")

    paths = [weights[0] / p for p in manifest]
    started = time.perf_counter()
    assert all(sha256_file(p) == manifest[str(p.relative_to(weights[0]))]["sha256"] for p in paths)
    result["hash_gpufleet_s"] = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, paths)], check=True, stdout=subprocess.DEVNULL)
    result["hash_sha256sum_s"] = time.perf_counter() - started
    on_hosts(hosts, "rm -rf /srv/bench")
    return result
