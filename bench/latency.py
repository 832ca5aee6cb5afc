"""Streaming latency from the control node: one llama.cpp service on the host network against one
on a bridge with a published port, same host, same model; time to first token and gaps."""

import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import hosts as lab

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stream(address, port, key, max_tokens):
    """(time to first token, [gaps between tokens]) of one streamed completion, in seconds."""
    connection = http.client.HTTPConnection(address, port, timeout=60)
    body = json.dumps(
        {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "temperature": 0, "seed": 1}
    )
    started = time.perf_counter()
    connection.request(
        "POST",
        "/v1/completions",
        body=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{address}:{port}: HTTP {response.status}: {response.read()[:200]!r}")
    stamps = []
    while True:
        line = response.fp.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0].get("text"):
            stamps.append(time.perf_counter())
    connection.close()
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(runs=40, max_tokens=32, log=print):
    state = lab.up(count=1, airgapped=0, proxmox=0, log=lambda *_: None)
    deployed = subprocess.run(
        [str(BIN / "pyinfra"), "-y", "bench/inventory.py", "deploy.py"], cwd=REPO, capture_output=True, text=True
    )
    if deployed.returncode:
        raise RuntimeError(deployed.stdout[-3000:] + deployed.stderr[-2000:])
    address = state["hosts"][0]["address"]
    key = (lab.STATE_DIR / "secrets" / "chat-api-key").read_text().strip()
    result = {"runs": runs, "max_tokens": max_tokens}
    for _network, port in (("host", 8080), ("bridge", 8081)):
        stream(address, port, key, max_tokens)  # warm-up
    samples = {"host": ([], []), "bridge": ([], [])}
    for _ in range(runs):  # interleaved, so drift on the machine hits both alike
        for network, port in (("host", 8080), ("bridge", 8081)):
            ttft, gaps = stream(address, port, key, max_tokens)
            samples[network][0].append(ttft)
            samples[network][1].extend(gaps)
    for network, (ttfts, gaps) in samples.items():
        result[network] = {
            "ttft_p50_ms": statistics.median(ttfts) * 1e3,
            "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
            "gap_p50_ms": statistics.median(gaps) * 1e3,
            "gap_p99_ms": percentile(gaps, 99) * 1e3,
            "tokens": len(gaps) + runs,
        }
    log(
        f"latency: TTFT p50 host {result['host']['ttft_p50_ms']:.2f} ms, bridge {result['bridge']['ttft_p50_ms']:.2f} ms"
    )
    return result
