"""Streaming latency from the control node, one lab host, the lab's llama.cpp model everywhere: a
service on the host network and one on a bridge with a published port (plain HTTP, straight to the
engine), one behind its TLS front, and that one again through the site's gateway (TLS to the gateway,
TLS from it to the front). Time to first token and the gaps between tokens on a kept-alive
connection (what an OpenAI client does), the first token on a new connection (handshakes included),
and completions per second for N concurrent streams, straight to the engine and through the gateway."""

import http.client
import json
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.lab import hosts as lab

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# path -> (scheme, port, the service's URL prefix there, whether it keeps a connection open after a
# streamed answer); bench/inventory.py deploys them. llama-cpp-python's server closes the connection
# after each streamed answer without saying so (measured: 121 of 121 reuses failed), so a
# client of the engine connects anew each time: it is measured so. HAProxy keeps them open.
PATHS = {
    "host": ("http", 8080, "", False),
    "bridge": ("http", 8081, "", False),
    "front": ("https", 8443, "", True),
    "gateway": ("https", 9443, "/chat-front", True),
}
TARGET_ADDED_TTFT_MS = 1.0  # the gateway's TLS hops may add at most this to the p50 time to first token


class Route:
    """One way to the model (a name of PATHS): a kept-alive connection to it and its URL prefix."""

    def __init__(self, name, address, ca):
        self.name, self.address, self.ca = name, address, ca
        self.scheme, self.port, self.prefix, self.keeps_alive = PATHS[name]
        self.connection = self.connect()
        self.reconnects = 0  # kept-alive connections the server had closed

    def connect(self):
        if self.scheme == "https":
            context = ssl.create_default_context(cafile=self.ca)
            return http.client.HTTPSConnection(self.address, self.port, timeout=60, context=context)
        return http.client.HTTPConnection(self.address, self.port, timeout=60)

    def stream(self, key, max_tokens, fresh=False):
        """(time to first token, [gaps between tokens]) of one streamed completion, in seconds; on a
        new connection when ``fresh`` (its TCP and TLS handshakes in the time to first token)."""
        if fresh or not self.keeps_alive:
            self.connection.close()
            self.connection = self.connect()
        body = json.dumps(
            {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "temperature": 0, "seed": 1}
        )
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        started = time.perf_counter()
        try:
            self.connection.request("POST", f"{self.prefix}/v1/completions", body=body, headers=headers)
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # the server closed the kept-alive connection as the request went out: once more on a new
            # one, as OpenAI's client does; counted, and timed from the first try
            self.reconnects += 1
            self.connection.close()
            self.connection.request("POST", f"{self.prefix}/v1/completions", body=body, headers=headers)
            response = self.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status}: {response.read()[:200]!r}")
        stamps = []
        while (line := response.readline()) and line.strip() != b"data: [DONE]":
            if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0].get("text"):
                stamps.append(time.perf_counter())
        response.read()  # the rest of the chunked answer: the connection is reused
        return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _summary(ttfts, gaps):
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "gap_p50_ms": statistics.median(gaps) * 1e3,
        "gap_p99_ms": percentile(gaps, 99) * 1e3,
        "tokens": len(gaps) + len(ttfts),
    }


def one_round(paths, key, runs, max_tokens, fresh=False):
    """Every path's summary over ``runs`` completions, interleaved so drift hits all alike."""
    samples = {path.name: ([], []) for path in paths}
    for _ in range(runs):
        for path in paths:
            ttft, gaps = path.stream(key, max_tokens, fresh=fresh)
            samples[path.name][0].append(ttft)
            samples[path.name][1].extend(gaps)
    return {name: _summary(*values) for name, values in samples.items()}


def throughput(address, ca, name, key, streams, per_stream, max_tokens):
    """Completions per second with ``streams`` clients at once on path ``name``, each sending
    ``per_stream`` streamed completions one after another on its own kept-alive connection."""
    clients = [Route(name, address, ca) for _ in range(streams)]
    ttfts, errors = [], []

    def client(path):
        try:
            for _ in range(per_stream):
                ttfts.append(path.stream(key, max_tokens)[0])
        except (OSError, RuntimeError, http.client.HTTPException) as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=client, args=(path,)) for path in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{name}, {streams} streams: {errors[:3]}")
    return {
        "streams": streams,
        "requests": len(ttfts),
        "per_s": len(ttfts) / wall,
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
    }


def _range(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(runs=40, max_tokens=32, rounds=3, streams=(1, 4, 8), per_stream=10, log=print):
    state = lab.up(count=1, airgapped=0, proxmox=0, log=lambda *_: None)
    deployed = subprocess.run(
        [str(BIN / "pyinfra"), "-y", "bench/inventory.py", "deploy.py"], cwd=REPO, capture_output=True, text=True
    )
    if deployed.returncode:
        raise RuntimeError(deployed.stdout[-3000:] + deployed.stderr[-2000:])
    address = state["hosts"][0]["address"]
    key = (lab.STATE_DIR / "secrets" / "chat-api-key").read_text().strip()
    ca = str(lab.STATE_DIR / "site-tls" / "ca.crt")
    paths = [Route(name, address, ca) for name in PATHS]
    one_round(paths, key, 2, max_tokens)  # warm-up: connections open, caches warm
    kept = [one_round(paths, key, runs, max_tokens) for _ in range(rounds)]
    fresh = one_round([p for p in paths if p.name in ("host", "gateway")], key, runs, max_tokens, fresh=True)
    result = {"runs": runs, "max_tokens": max_tokens, "kept_alive_rounds": kept, "new_connection": fresh}
    added = {
        name: _range([r[name]["ttft_p50_ms"] - r["host"]["ttft_p50_ms"] for r in kept]) for name in ("front", "gateway")
    }
    result["added_ttft_p50_ms"] = added
    result["target_added_ttft_p50_ms"] = TARGET_ADDED_TTFT_MS
    result["met"] = added["gateway"]["max"] <= TARGET_ADDED_TTFT_MS
    result["reconnects"] = {route.name: route.reconnects for route in paths}
    result["throughput"] = {
        name: [throughput(address, ca, name, key, n, per_stream, max_tokens) for n in streams]
        for name in ("host", "gateway")
    }
    log(
        f"latency: TTFT p50 host {kept[-1]['host']['ttft_p50_ms']:.2f} ms, gateway {kept[-1]['gateway']['ttft_p50_ms']:.2f} "
        f"ms (added {added['gateway']['median']:.2f} ms, range {added['gateway']['min']:.2f}-{added['gateway']['max']:.2f})"
    )
    return result
