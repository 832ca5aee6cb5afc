"""The benchmark's table (Markdown), JSON and PNG, with each target marked met or missed."""

import json
from statistics import median


def _mark(ok):
    return "met" if ok else "**missed**"


def table(results):
    lines = [f"Machine: {results['machine']}", ""]
    fleet = results.get("fleet") or []
    if fleet:
        lines += ["| hosts | pyinfra first (s) | Ansible first (s) | pyinfra no-op (s) | Ansible no-op (s) | "
                  "no-op ratio (target ≤ 0.33) | changes on no-op (gpufleet / Ansible) |",
                  "|---|---|---|---|---|---|---|"]
        for row in fleet:
            ratio = row["pyinfra_noop_s"] / row["ansible_noop_s"]
            lines.append(f"| {row['hosts']} | {row['pyinfra_first_s']:.1f} | {row['ansible_first_s']:.1f} | "
                         f"{row['pyinfra_noop_s']:.2f} | {row['ansible_noop_s']:.2f} | {ratio:.2f} ({_mark(ratio <= 1 / 3)}) | "
                         f"{row['pyinfra_noop_changes']} / {row['ansible_noop_changes']} |")
        if len(fleet) > 1:
            first, last = fleet[0], fleet[-1]
            per_host = (last["pyinfra_noop_s"] - first["pyinfra_noop_s"]) / (last["hosts"] - first["hosts"])
            lines += ["", f"No-op time added per extra host (gpufleet, {first['hosts']}→{last['hosts']} hosts): "
                          f"{per_host:.2f} s (target ≤ 0.5 s: {_mark(per_host <= 0.5)})"]
            lines += [f"Control-node memory at {last['hosts']} hosts, peak RSS of the whole process tree: gpufleet "
                      f"{last['pyinfra_first_mib']:.0f} MiB first run / {last['pyinfra_noop_mib']:.0f} MiB no-op; "
                      f"Ansible {last['ansible_first_mib']:.0f} / {last['ansible_noop_mib']:.0f} MiB"]
        lines.append("")
    stage = results.get("staging")
    if stage:
        mb = stage["bytes"] / 1e6
        n = stage["fan_out"]
        ratio = stage["rsync_1_s"] / stage["gpufleet_1_s"]
        fan = stage[f"gpufleet_{n}_s"] / stage["gpufleet_1_s"]
        noop = stage[f"gpufleet_noop_{n}_s"] / n
        lines += [f"Staging {stage['files']} files, {mb / 1e3:.2f} GB (random bytes) over SSH on loopback:", "",
                  "| measure | gpufleet | rsync -a | target |", "|---|---|---|---|",
                  f"| 1 host | {stage['gpufleet_1_s']:.1f} s, {mb / stage['gpufleet_1_s']:.0f} MB/s | "
                  f"{stage['rsync_1_s']:.1f} s, {mb / stage['rsync_1_s']:.0f} MB/s | ≥ 0.9× rsync: {ratio:.2f}× "
                  f"({_mark(ratio >= 0.9)}) |",
                  f"| {n} hosts | {stage[f'gpufleet_{n}_s']:.1f} s ({fan:.2f}× one host) | {stage[f'rsync_{n}_s']:.1f} s "
                  f"({stage[f'rsync_{n}_s'] / stage['rsync_1_s']:.2f}×) | ≤ 1.5× one host: {_mark(fan <= 1.5)} |",
                  *([f"| {n} hosts, fan-out inside the site (1 seed, {n - 1} pull from it) | "
                     f"{stage[f'relay_{n}_s']:.1f} s ({stage[f'relay_{n}_s'] / stage['gpufleet_1_s']:.2f}× one host); "
                     f"the control node sent {stage[f'relay_{n}_control_bytes'] / 1e6:.0f} MB (1 copy, not {n}) | — | "
                     f"≤ 1.5× one host: {_mark(stage[f'relay_{n}_s'] / stage['gpufleet_1_s'] <= 1.5)} |"]
                    if f"relay_{n}_s" in stage else []),
                  f"| no-op re-stage | {stage['gpufleet_noop_1_s']:.2f} s (1 host), {noop:.2f} s per host ({n} hosts) | "
                  f"{stage['rsync_noop_1_s']:.2f} s (1 host) | < 1 s per host: {_mark(noop < 1 and stage['gpufleet_noop_1_s'] < 1)} |",
                  f"| killed half-way, run again | {stage['resume_on_host_bytes'] / 1e6:.0f} MB were on the host; "
                  f"{stage['resume_sent_bytes'] / 1e6:.0f} MB sent ({stage['resume_s']:.1f} s) | — | only the rest: "
                  f"{_mark(stage['resume_sent_bytes'] <= stage['bytes'] - stage['resume_on_host_bytes'] + (1 << 20))} |",
                  f"| SHA-256 of the set | {mb / stage['hash_gpufleet_s']:.0f} MB/s (hashlib) | "
                  f"{mb / stage['hash_sha256sum_s']:.0f} MB/s (sha256sum) | — |", ""]
    sudo = results.get("sudo")
    if sudo:
        mb = sudo["bytes"] / 1e6
        root, through = median(sudo["root_s"]), median(sudo["sudo_s"])
        ratio = root / through
        lines += [f"Staging {sudo['files']} files, {mb / 1e3:.2f} GB to {sudo['host']}, logged in as root and as a "
                  f"sudo user, {sudo['runs']} runs each, interleaved (median, min–max):", "",
                  "| login | seconds | MB/s |", "|---|---|---|",
                  f"| root | {root:.1f} ({min(sudo['root_s']):.1f}–{max(sudo['root_s']):.1f}) | {mb / root:.0f} |",
                  f"| sudo user (`sudo -H -n sh -c`) | {through:.1f} ({min(sudo['sudo_s']):.1f}–{max(sudo['sudo_s']):.1f}) "
                  f"| {mb / through:.0f} |", "",
                  f"Through sudo: {ratio:.2f}× root's throughput (target ≥ 0.90: {_mark(ratio >= 0.9)})", ""]
    latency = results.get("latency")
    if latency:
        lines += [f"Streaming latency, llama.cpp tiny model, {latency['runs']} completions × {latency['max_tokens']} "
                  "tokens per network mode, interleaved:", "",
                  "| network | TTFT p50 (ms) | TTFT p99 (ms) | inter-token p50 (ms) | inter-token p99 (ms) |",
                  "|---|---|---|---|---|"]
        for mode in ("host", "bridge"):
            r = latency[mode]
            lines.append(f"| {mode} | {r['ttft_p50_ms']:.2f} | {r['ttft_p99_ms']:.2f} | {r['gap_p50_ms']:.2f} | "
                         f"{r['gap_p99_ms']:.2f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fleet = results.get("fleet") or []
    latency = results.get("latency")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if fleet:
        hosts = [row["hosts"] for row in fleet]
        for key, label, style in (("pyinfra_noop_s", "gpufleet no-op", "o-"), ("ansible_noop_s", "Ansible no-op", "s-"),
                                  ("pyinfra_first_s", "gpufleet first", "o--"), ("ansible_first_s", "Ansible first", "s--")):
            axes[0].plot(hosts, [row[key] for row in fleet], style, label=label)
        axes[0].set(xlabel="hosts", ylabel="seconds", title="Fleet convergence", yscale="log")
        axes[0].legend()
    if latency:
        modes = ["host", "bridge"]
        for offset, key in ((-0.2, "ttft_p50_ms"), (0.2, "ttft_p99_ms")):
            axes[1].bar([i + offset for i in range(2)], [latency[m][key] for m in modes], width=0.4, label=key)
        axes[1].set_xticks(range(2), modes)
        axes[1].set(ylabel="ms", title="Time to first token")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write(results, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "results.png")
    return text
