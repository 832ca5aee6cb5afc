"""A per-host summary of what the deploy left on each lab host, read over SSH."""

import json

from . import hosts

PROBE = r"""
cat /etc/gpufleet/host.json 2>/dev/null || echo '{}'
echo ---
systemctl is-active docker 2>/dev/null || true
echo ---
docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null || true
echo ---
dpkg-query -W -f '${Package}=${Version}\n' 'nvidia-*' 'libnvidia-*' 'libcuda1' 2>/dev/null | grep -v '=$' || true
echo ---
nvidia-smi --query-gpu=driver_version,name --format=csv,noheader 2>&1 | head -n1 || true
"""


def host_row(host):
    result = hosts.ssh(host, PROBE, check=False)
    if result.returncode != 0:
        return [host["name"], "unreachable", "", "", "", result.stderr.strip()[:60]]
    intent, docker, runtimes, packages, smi = (part.strip() for part in result.stdout.split("---"))
    intent = json.loads(intent)
    gpus = intent.get("gpus", "?")
    nvidia = ", ".join(p for p in packages.split() if p.startswith(("nvidia-container-toolkit=", "nvidia-smi=")))
    return [
        host["name"],
        f"{gpus} GPU" if gpus != 1 else "1 GPU",
        docker or "-",
        runtimes or "-",
        nvidia or "-",
        smi.splitlines()[0][:60] if smi else "-",
    ]


def table(lab_hosts):
    header = ["host", "gpus", "docker", "runtimes", "nvidia packages", "nvidia-smi"]
    rows = [header] + [host_row(h) for h in lab_hosts]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in rows)
