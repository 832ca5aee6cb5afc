"""The benchmark's tables (Markdown) and plot, made from the JSON under bench/results/ only, with
each target marked met or missed; ``python -m bench report`` writes them and the benchmark page's section (docs/benchmark.md)
between its bench markers."""

import re
from pathlib import Path
from statistics import median

from . import record

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmark.md"
BEGIN, END = "<!-- bench:begin (made by `python -m bench report` from bench/results/*.json) -->", "<!-- bench:end -->"
NAMES = {
    "gpufleet": "gpufleet (`deploy.py`)",
    "ansible_naive": "Ansible, naive (`copy` per directory)",
    "ansible_tuned": "Ansible, tuned (`synchronize`)",
    "ansible_mitogen": "Ansible, tuned + Mitogen",
    "rsync": "rsync -a (OpenSSH's default cipher)",
    "rsync_gcm": "rsync -a (AES-128-GCM)",
    "gpufleet_paramiko": "gpufleet, pyinfra's connection (paramiko, AES-128-GCM)",
    "gpufleet_openssh": "gpufleet, OpenSSH client (AES-128-GCM; the default)",
    "gpufleet_openssh_cold": "gpufleet, OpenSSH client, set never hashed before (hashes it first)",
}


def _mark(ok):
    return "met" if ok else "**missed**"


def _machine(document):
    m = document["machine"]
    v = m["versions"]
    return (
        f"{m['cores']} × {m['cpu']} (AES-NI: {'yes' if m['aes_ni'] else 'no'}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, {m['os']}; Python {v['python']}, pyinfra {v['pyinfra']}, paramiko "
        f"{v['paramiko']}, {v['openssh']}, {v['rsync']}, ansible-core {v['ansible-core']}, Mitogen "
        f"{v['mitogen']}, Docker {v['docker']}"
    )


def _spread(cell, scale=1):
    return f"{cell['median'] * scale:.1f} ({cell['min'] * scale:.1f}–{cell['max'] * scale:.1f})"


def fleet_table(rows):
    """Median (range) of each cell's samples; a target met only when its whole range meets it."""
    samples = min(len(row["gpufleet"]["noop_s"]["samples"]) for row in rows)
    lines = [
        f"| hosts | tool | first run (s), median (range) of {samples} | no-op (s), median (range) | gpufleet's no-op ÷ "
        "this, worst case (target ≤ 0.33 vs tuned) | changes on no-op | checks passed / skipped / failed | "
        "peak RSS first / no-op (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row["gpufleet"]["noop_s"]
        for variant in [v for v in NAMES if v in row]:
            cell = row[variant]
            worst = ours["max"] / cell["noop_s"]["min"]
            ratio = (
                "—"
                if variant == "gpufleet"
                else f"{worst:.2f}" + (f" ({_mark(worst <= 1 / 3)})" if variant == "ansible_tuned" else "")
            )
            times = f"{_spread(cell['first_s'])} | {_spread(cell['noop_s'])}"
            if not cell["counts"]:
                times = f"~~{times.replace(' | ', '~~ | ~~')}~~ (checks differ from gpufleet's: not counted)"
            checks = cell["checks"]
            lines.append(
                f"| {row['hosts']} | {NAMES[variant]} | {times} | {ratio} | {cell['noop_changes']} | "
                f"{checks['passed']} / {checks['skipped']} / {checks['failed']} | {cell['first_mib']:.0f} / "
                f"{cell['noop_mib']:.0f} |"
            )
        differ = {
            v: row[v]["checks_differ_from_gpufleet"]
            for v in NAMES
            if v in row and row[v]["checks_differ_from_gpufleet"]
        }
        lines += ["", f"{row['hosts']} host(s), orders run: " + "; ".join(" → ".join(o) for o in row["orders"]) + "."]
        lines.append(
            "Every check had the same outcome on every variant's hosts as on gpufleet's, in every sample."
            if not differ
            else "Checks whose outcome differs from gpufleet's: "
            + "; ".join(f"{v}: {', '.join(d)}" for v, d in differ.items())
            + "."
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        steps = last["hosts"] - first["hosts"]
        per_host = (last["gpufleet"]["noop_s"]["median"] - first["gpufleet"]["noop_s"]["median"]) / steps
        worst = (last["gpufleet"]["noop_s"]["max"] - first["gpufleet"]["noop_s"]["min"]) / steps
        lines += [
            "",
            f"gpufleet's no-op time added per extra host ({first['hosts']} → {last['hosts']} hosts): "
            f"{per_host:.2f} s at the medians, {worst:.2f} s worst case (target ≤ 0.5 s: {_mark(worst <= 0.5)}).",
        ]
    return lines


def scale_table(scale):
    lines = [
        "| hosts | first run (s) | no-op (s), median (range) of 3 | changes on no-op | commands per host on a "
        "no-op | control node: peak RSS first / no-op (MiB) | CPU first / no-op (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in scale["rows"]:
        samples, commands = row["noop_samples_s"], row["noop_commands_per_host"]
        lines.append(
            f"| {row['hosts']} | {row['first_s']:.1f} | {row['noop_s']:.2f} ({min(samples):.2f}–{max(samples):.2f}) | "
            f"{', '.join(str(n) for n in row['noop_changes'])} | {commands['min']}–{commands['max']} | "
            f"{row['first_mib']:.0f} / {row['noop_mib']:.0f} | {row['first_cpu_s']:.1f} / {row['noop_cpu_s']:.1f} |"
        )
    first, noop, far = scale["fit"]["first"], scale["fit"]["noop"], scale["extrapolated_to"]
    one = next((row["noop_s"] for row in scale["rows"] if row["hosts"] == 1), None)
    per_host = noop["per_extra_host_s"]
    lines += [
        "",
        f"Least-squares fit over these sizes: first run {first['intercept_s']:.1f} s + "
        f"{first['per_extra_host_s']:.1f} s per host; no-op {noop['intercept_s']:.2f} s + {per_host:.2f} s per "
        f"host (control-node CPU {scale['noop_cpu_per_extra_host_s']:.2f} s per host). **Extrapolated, not "
        f"measured**, to {far} hosts: first run {first[f'extrapolated_{far}_s']:.0f} s, no-op "
        f"{noop[f'extrapolated_{far}_s']:.0f} s. Targets: no-op ≤ 3 s for one host "
        + (f"({one:.2f} s: {_mark(one <= 3)})" if one is not None else "(one host not run)")
        + f", ≤ 0.3 s per extra host ({_mark(per_host <= 0.3)}).",
    ]
    return lines


def staging_table(stage):
    mb = stage["bytes"] / 1e6
    one = stage["one_host"]
    base = one["rsync_gcm"]["median"]
    lines = [
        f"To one host ({stage['host']}), {stage['files']} files, {mb / 1e3:.2f} GB of random bytes, "
        f"{stage['repeats']} repeats per row, the rows' order rotated each repeat, the source's pages warm "
        "and the host's writes flushed before every run; whole commands timed (gpufleet's includes "
        "starting pyinfra, making the directory's manifest as a `dir` weight volume does, connecting "
        "and its facts):",
        "",
        "| how | seconds, median (min–max) | MB/s (median) | ÷ rsync AES-128-GCM |",
        "|---|---|---|---|",
    ]
    for cell in [c for c in NAMES if c in one]:
        ratio = base / one[cell]["median"]
        lines.append(f"| {NAMES[cell]} | {_spread(one[cell])} | {mb / one[cell]['median']:.0f} | {ratio:.2f}× |")
    ours = base / one["gpufleet_openssh"]["median"]
    lines += ["", f"Target: gpufleet ≥ 0.9× rsync with the same cipher: {ours:.2f}× ({_mark(ours >= 0.9)}).", ""]
    lines += [
        "| measure | gpufleet | rsync -a (AES-128-GCM) | target |",
        "|---|---|---|---|",
        f"| no-op re-stage, 1 host | {stage['gpufleet_noop_1_s']:.2f} s | {stage['rsync_noop_1_s']:.2f} s | "
        f"< 1 s per host: {_mark(stage['gpufleet_noop_1_s'] < 1)} |",
    ]
    n = stage["fan_out"]
    if n > 1:
        single = one["gpufleet_openssh"]["median"]
        fan = stage[f"gpufleet_{n}_s"] / single
        relay = stage[f"relay_{n}_s"] / single
        noop = stage[f"gpufleet_noop_{n}_s"] / n
        lines += [
            f"| {n} hosts, all from the control node (one sample) | {stage[f'gpufleet_{n}_s']:.1f} s "
            f"({fan:.2f}× one host) | {stage[f'rsync_{n}_s']:.1f} s "
            f"({stage[f'rsync_{n}_s'] / base:.2f}×) | ≤ 1.5× one host: {_mark(fan <= 1.5)} |",
            f"| {n} hosts, fan-out inside the site (1 seed, {n - 1} pull from it; one sample) | "
            f"{stage[f'relay_{n}_s']:.1f} s ({relay:.2f}× one host); the control node sent "
            f"{stage[f'relay_{n}_control_bytes'] / 1e6:.0f} MB (1 copy, not {n}) | — | ≤ 1.5× one host: "
            f"{_mark(relay <= 1.5)} |",
            f"| no-op re-stage, {n} hosts | {noop:.2f} s per host | — | < 1 s per host: {_mark(noop < 1)} |",
        ]
    rest = stage["bytes"] - stage["resume_on_host_bytes"]
    lines += [
        f"| killed half-way, run again | {stage['resume_on_host_bytes'] / 1e6:.0f} MB were on the host; "
        f"{stage['resume_sent_bytes'] / 1e6:.0f} MB sent ({stage['resume_s']:.1f} s) | — | only the rest: "
        f"{_mark(stage['resume_sent_bytes'] <= rest + (1 << 20))} |",
        f"| SHA-256 of the set | {mb / stage['hash_gpufleet_s']:.0f} MB/s (hashlib) | "
        f"{mb / stage['hash_sha256sum_s']:.0f} MB/s (sha256sum) | — |",
    ]
    return lines


def sudo_table(sudo):
    mb = sudo["bytes"] / 1e6
    root, through = median(sudo["root_s"]), median(sudo["sudo_s"])
    ratio = root / through
    return [
        f"{sudo['files']} files, {mb / 1e3:.2f} GB to {sudo['host']}, logged in as root and as a sudo user, "
        f"{sudo['runs']} runs each, interleaved (median, min–max):",
        "",
        "| login | seconds | MB/s |",
        "|---|---|---|",
        f"| root | {root:.1f} ({min(sudo['root_s']):.1f}–{max(sudo['root_s']):.1f}) | {mb / root:.0f} |",
        f"| sudo user (`sudo -H -n sh -c`) | {through:.1f} ({min(sudo['sudo_s']):.1f}–{max(sudo['sudo_s']):.1f}) "
        f"| {mb / through:.0f} |",
        "",
        f"Through sudo: {ratio:.2f}× root's throughput (target ≥ 0.90: {_mark(ratio >= 0.9)}).",
    ]


def latency_table(latency):
    rounds = latency["kept_alive_rounds"]

    def over_rounds(path, metric):
        values = [r[path][metric] for r in rounds]
        return f"{median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = [
        f"llama.cpp tiny model, one lab host; {len(rounds)} rounds of {latency['runs']} streamed completions × "
        f"{latency['max_tokens']} tokens per path, interleaved, through HAProxy on a kept-alive connection, to "
        "the engine on a new one each time (llama-cpp-python's server closes it after each streamed answer); "
        "median of the rounds, their range in brackets:",
        "",
        "| path | TTFT p50 (ms) | TTFT p99 (ms) | inter-token p50 (ms) | inter-token p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "host": "engine, host network (HTTP)",
        "bridge": "engine, bridge + published port (HTTP)",
        "front": "host's TLS front (HAProxy)",
        "gateway": "site gateway (TLS) → TLS front",
    }
    for path, name in names.items():
        lines.append(
            f"| {name} | {over_rounds(path, 'ttft_p50_ms')} | {over_rounds(path, 'ttft_p99_ms')} | "
            f"{over_rounds(path, 'gap_p50_ms')} | {over_rounds(path, 'gap_p99_ms')} |"
        )
    added = latency["added_ttft_p50_ms"]["gateway"]
    fresh = latency["new_connection"]
    lines += [
        "",
        f"Added to the p50 time to first token through the gateway: {added['median']:.2f} ms "
        f"({added['min']:.2f}–{added['max']:.2f}; target ≤ {latency['target_added_ttft_p50_ms']:.0f} ms: "
        f"{_mark(latency['met'])}). On a new connection each time (TCP and both TLS handshakes included): "
        f"TTFT p50 {fresh['host']['ttft_p50_ms']:.2f} ms to the engine, {fresh['gateway']['ttft_p50_ms']:.2f} ms "
        "through the gateway.",
        "",
        "| concurrent streams | completions/s, engine | completions/s, gateway | TTFT p50 engine (ms) | TTFT p50 gateway (ms) |",
        "|---|---|---|---|---|",
    ]
    for direct, through in zip(latency["throughput"]["host"], latency["throughput"]["gateway"], strict=True):
        lines.append(
            f"| {direct['streams']} | {direct['per_s']:.1f} | {through['per_s']:.1f} | "
            f"{direct['ttft_p50_ms']:.2f} | {through['ttft_p50_ms']:.2f} |"
        )
    return lines


def rollout_table(rollout):
    return [
        f"{rollout['from']} → {rollout['to']} with `upgrade.py`, batches of one, {rollout['hosts']} hosts serving "
        "llama.cpp, each sent a completion twice a second from the control node:",
        "",
        "| measure | value |",
        "|---|---|",
        f"| rollout wall time | {rollout['wall_s']:.0f} s |",
        f"| per host (batch) | {', '.join(f'{s:.0f} s' for s in rollout['batch_s'])} |",
        f"| longest any host was out of service | {rollout['longest_out_of_service_s']:.1f} s "
        f"({rollout['longest_out_of_service_host']}) |",
        f"| fewest hosts answering in any of {rollout['probe_rounds']} rounds | "
        f"{rollout['fewest_answering']} of {rollout['hosts']} |",
    ]


TABLES = {
    "fleet": (
        "Fleet convergence: full deploy without a GPU (bundle staging, driver, Docker, toolkit, image "
        "load, weights, llama.cpp service ready), fresh lab hosts per tool and sample",
        fleet_table,
    ),
    "scale": ("Scale: deploy.py alone on fresh lab hosts of each size", scale_table),
    "staging": ("Weight staging", staging_table),
    "sudo": ("Staging through a sudo login", sudo_table),
    "latency": ("Streaming latency", latency_table),
    "rollout": ("Rolling driver upgrade", rollout_table),
}


def markdown(documents):
    machines = {_machine(document) for document in documents.values()}
    lines = [f"Machine: {machines.pop()}.", ""] if len(machines) == 1 else []
    for part, (title, table) in TABLES.items():
        if part in documents:
            document = documents[part]
            where = f"; on {_machine(document)}" if not lines else ""
            lines += [
                f"**{title}** ({document['date']}, `{document['command']}`{where}):",
                "",
                *table(document["results"]),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def plot(documents, path):
    """The plot, when matplotlib (a bench-only dependency: bench/requirements.txt) is installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"(no plot: matplotlib is not installed; {path} left as it was)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = documents.get("fleet", {}).get("results") or []
    if rows:
        hosts = [row["hosts"] for row in rows]
        for variant, style in (
            ("gpufleet", "o-"),
            ("ansible_naive", "s-"),
            ("ansible_tuned", "^-"),
            ("ansible_mitogen", "v-"),
        ):
            if all(variant in row for row in rows):
                axes[0].plot(hosts, [row[variant]["noop_s"]["median"] for row in rows], style, label=f"{variant} no-op")
                axes[0].plot(
                    hosts,
                    [row[variant]["first_s"]["median"] for row in rows],
                    style.replace("-", "--"),
                    label=f"{variant} first",
                )
        axes[0].set(xlabel="hosts", ylabel="seconds", title="Fleet convergence", yscale="log")
        axes[0].legend(fontsize=7)
    stage = documents.get("staging", {}).get("results")
    if stage:
        cells = [c for c in NAMES if c in stage["one_host"]]
        axes[1].boxplot([stage["one_host"][c]["samples"] for c in cells], labels=[c.replace("_", "\n") for c in cells])
        axes[1].set(ylabel="seconds", title=f"Staging {stage['bytes'] / 1e9:.1f} GB to one host")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def readme_section(text=None):
    """The benchmark page's section as it stands."""
    text = PAGE.read_text() if text is None else text
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    return match and match.group(1)


def write(out=record.RESULTS, readme=True):
    """Tables and plot from the JSON in ``out``; the benchmark page's section (docs/benchmark.md) too when ``readme``."""
    documents = record.load(out)
    text = markdown(documents)
    (out / "table.md").write_text(text)
    plot(documents, out / "results.png")
    if readme:
        current = PAGE.read_text()
        if readme_section(current) is None:
            raise SystemExit(f"{PAGE}: no bench section ({BEGIN} ... {END})")
        start = current.index(BEGIN) + len(BEGIN) + 1
        PAGE.write_text(current[:start] + text + current[current.index(END, start) :])
    return text
