"""
A picture of the fleet from the site's Prometheus: one SVG with every host's targets (up or down),
the alerts firing, and a chart per question (tokens each engine produces, each host's load). Asked
through SSH on a monitoring host (Prometheus listens on its loopback only):

    python -m operations.monitoring.status_page --ssh ops-01 --out fleet-status.svg

``render`` is pure (answers of Prometheus' HTTP API in, SVG text out); ``main`` asks Prometheus.
"""

import argparse
import json
import shlex
import subprocess
import time
from datetime import UTC, datetime
from urllib.parse import urlencode
from xml.sax.saxutils import escape

# The charts: title -> (PromQL, how a series is named from its labels)
CHARTS = {
    "tokens generated per second, by engine": (
        "sum by (host, service) (rate(llamacpp:tokens_predicted_total[1m]) or rate(vllm:generation_tokens_total[1m]))",
        lambda labels: f"{labels.get('host')}/{labels.get('service')}",
    ),
    "load (1 min), by host": ("node_load1", lambda labels: labels.get("host", "?")),
}
COLOURS = ["#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#4e342e", "#558b2f"]
STATE_COLOURS = {"up": "#2e7d32", "down": "#c62828", "unknown": "#9e9e9e"}
WIDTH = 960


def _columns(targets):
    """The grid's columns: node, each engine service, gateway, gpus (those present), in that order."""
    columns = []
    for job in ("node", "engines", "gateways", "gpus"):
        names = sorted({t["labels"].get("service", job) for t in targets if t["labels"]["job"] == job})
        columns += [(job, name) for name in names]
    return columns


def _grid(targets, top):
    """The targets' grid: a row per host, a cell per column, coloured by health."""
    columns = _columns(targets)
    health = {
        (t["labels"]["host"], t["labels"]["job"], t["labels"].get("service", t["labels"]["job"])): t["health"]
        for t in targets
    }
    hosts = sorted({t["labels"]["host"] for t in targets})
    parts = [f'<text x="20" y="{top}" class="h">targets ({len(targets)})</text>']
    for index, (_job, name) in enumerate(columns):
        parts.append(f'<text x="{170 + index * 110}" y="{top + 22}" class="s">{escape(name)}</text>')
    for row, host_name in enumerate(hosts):
        y = top + 34 + row * 24
        parts.append(f'<text x="20" y="{y + 15}" class="s">{escape(host_name)}</text>')
        for index, (job, name) in enumerate(columns):
            state = health.get((host_name, job, name))
            if state is None:
                continue
            colour = STATE_COLOURS.get(state, STATE_COLOURS["unknown"])
            x = 170 + index * 110
            parts.append(f'<rect x="{x}" y="{y}" width="100" height="20" rx="3" fill="{colour}"/>')
            parts.append(f'<text x="{x + 50}" y="{y + 15}" class="c">{escape(state)}</text>')
    return parts, top + 44 + len(hosts) * 24


def _alerts(alerts, top):
    firing = [a for a in alerts if a.get("state") == "firing"]
    parts = [f'<text x="20" y="{top}" class="h">alerts firing ({len(firing)})</text>']
    for index, alert in enumerate(firing[:8]):
        labels = alert["labels"]
        where = " ".join(f"{key}={labels[key]}" for key in ("host", "service") if key in labels)
        text = f"{labels['alertname']} ({labels.get('severity', '')}) {where}"
        parts.append(f'<text x="30" y="{top + 22 + index * 18}" class="s" fill="#c62828">{escape(text)}</text>')
    if not firing:
        parts.append(f'<text x="30" y="{top + 22}" class="s">none</text>')
    return parts, top + 34 + max(1, min(len(firing), 8)) * 18


def _chart(title, result, name_of, top, height=170):
    """A line chart of a range query's ``result`` (``[{"metric": labels, "values": [[t, "v"], ...]}]``)."""
    left, width = 70, WIDTH - 270
    points = [(float(t), float(v)) for series in result for t, v in series["values"]]
    parts = [f'<text x="20" y="{top}" class="h">{escape(title)}</text>']
    base = top + 14
    parts.append(f'<rect x="{left}" y="{base}" width="{width}" height="{height}" fill="none" stroke="#bbb"/>')
    if not points:
        parts.append(f'<text x="{left + 10}" y="{base + 24}" class="s">no samples</text>')
        return parts, base + height + 30
    start, end = min(t for t, _ in points), max(t for t, _ in points)
    peak = max(v for _, v in points) or 1.0
    span = (end - start) or 1.0
    parts.append(f'<text x="{left - 6}" y="{base + 10}" class="s" text-anchor="end">{peak:.3g}</text>')
    parts.append(f'<text x="{left - 6}" y="{base + height}" class="s" text-anchor="end">0</text>')
    minutes = span / 60
    parts.append(f'<text x="{left}" y="{base + height + 16}" class="s">{minutes:.0f} min ago</text>')
    parts.append(f'<text x="{left + width}" y="{base + height + 16}" class="s" text-anchor="end">now</text>')
    for index, series in enumerate(sorted(result, key=lambda s: name_of(s["metric"]))):
        colour = COLOURS[index % len(COLOURS)]
        line = " ".join(
            f"{left + (float(t) - start) / span * width:.1f},{base + height - float(v) / peak * height:.1f}"
            for t, v in series["values"]
        )
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}"/>')
        y = base + 12 + index * 16
        parts.append(f'<rect x="{left + width + 14}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{left + width + 30}" y="{y}" class="s">{escape(name_of(series["metric"]))}</text>')
    return parts, base + height + 34


def render(title, targets, alerts, charts):
    """
    The fleet's picture as SVG text (pure).

    + title: its heading
    + targets: ``/api/v1/targets``' ``activeTargets``
    + alerts: ``/api/v1/alerts``' ``alerts``
    + charts: ``{chart title: query_range result}``, drawn in order (series named as ``CHARTS`` says)
    """
    parts = [f'<text x="20" y="30" class="t">{escape(title)}</text>']
    grid, top = _grid(targets, 64)
    listed, top = _alerts(alerts, top + 10)
    parts += grid + listed
    for chart_title, result in charts.items():
        drawn, top = _chart(chart_title, result, CHARTS[chart_title][1], top + 10)
        parts += drawn
    style = (
        "<style>text{font-family:sans-serif}.t{font-size:18px;font-weight:bold}.h{font-size:14px;font-weight:bold}"
        ".s{font-size:12px}.c{font-size:12px;fill:#fff;text-anchor:middle}</style>"
    )
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{top + 10}" viewBox="0 0 {WIDTH} {top + 10}">\n'
        f'{style}\n<rect width="100%" height="100%" fill="#fff"/>\n{body}\n</svg>\n'
    )


def ask(ssh, path, port=9090, ssh_config=None):
    """Prometheus' ``data`` for ``path`` of its HTTP API, asked with curl on the monitoring host ``ssh``."""
    command = f"curl -sfg -m 20 {shlex.quote(f'http://127.0.0.1:{port}/api/v1/{path}')}"
    config = ["-F", ssh_config] if ssh_config else []
    done = subprocess.run(["ssh", *config, ssh, command], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)["data"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m operations.monitoring.status_page", description=__doc__)
    parser.add_argument("--ssh", required=True, help="the monitoring host, as ssh reaches it")
    parser.add_argument("--ssh-config", help="an ssh configuration file (ssh -F)")
    parser.add_argument("--port", type=int, default=9090, help="Prometheus' port there (monitoring_prometheus_port)")
    parser.add_argument("--minutes", type=int, default=15, help="how far back the charts go")
    parser.add_argument("--out", default="fleet-status.svg")
    args = parser.parse_args(argv)
    now = time.time()
    step = max(5, args.minutes * 60 // 180)
    charts = {}
    for chart_title, (query, _) in CHARTS.items():
        window = urlencode(
            {"query": query, "start": f"{now - args.minutes * 60:.0f}", "end": f"{now:.0f}", "step": step}
        )
        charts[chart_title] = ask(args.ssh, f"query_range?{window}", args.port, args.ssh_config)["result"]
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M UTC")
    svg = render(
        f"gpufleet: the fleet seen by Prometheus on {args.ssh}, {stamp}",
        ask(args.ssh, "targets", args.port, args.ssh_config)["activeTargets"],
        ask(args.ssh, "alerts", args.port, args.ssh_config)["alerts"],
        charts,
    )
    with open(args.out, "w") as out:
        out.write(svg)
    print(f"{args.out}: {len(svg)} bytes")


if __name__ == "__main__":
    main()
