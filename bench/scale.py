"""Scale: deploy.py alone on 1, 4, 8 and 16 fresh lab hosts (the full host recipe: real sshd, systemd
and Docker; the lab's bundle, llama.cpp service and weights), first run and no-op re-run: wall time,
the control node's peak RSS and CPU seconds (pyinfra's process tree), and the commands each host ran
on a no-op, counted on a third, logged no-op (pyinfra's debug log names every command it runs,
facts' included; gpufleet's own byte streams, which a no-op does not open, are not in that log).
The slope per extra host is a least-squares fit over the sizes run; the line to 50 hosts is that
fit, extrapolated, not measured."""

import re
import statistics

from .fleet import OUT, fresh_hosts, pyinfra, pyinfra_changes

SIZES = (1, 4, 8, 16)
EXTRAPOLATED_TO = 50
# issue 33's targets for a converged no-op on this machine
TARGET_NOOP_ONE_S, TARGET_NOOP_PER_HOST_S = 3.0, 0.3
_COMMAND = re.compile(r"Running command on (\S+?):")


def commands_per_host(output):
    """host -> how many commands pyinfra ran there, from its debug log."""
    counted = {}
    for name in _COMMAND.findall(output):
        counted[name] = counted.get(name, 0) + 1
    return counted


def fit(points):
    """(intercept, slope) of the least-squares line through ``points`` [(hosts, seconds)]."""
    if len(points) < 2:
        return (points[0][1], 0.0) if points else (0.0, 0.0)
    slope, intercept = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return intercept, slope


def _deployed(count, *args):
    seconds, mib, done = pyinfra(*args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"scale-{count}-last.log").write_text(done.stdout)
    if done.returncode:
        raise RuntimeError(
            f"deploy.py failed on {count} host(s) (its log: {OUT / f'scale-{count}-last.log'}):\n{done.stdout[-3000:]}"
        )
    return {"s": seconds, "mib": mib, "cpu_s": done.cpu_s, "changes": pyinfra_changes(done.stdout)}


def one(count, log, noops=3):
    """Fresh hosts, then deploy.py's first run, ``noops`` no-op runs (median and range) and a logged no-op."""
    fresh_hosts(count)
    first = _deployed(count)
    samples = [_deployed(count) for _ in range(noops)]
    middle = sorted(samples, key=lambda sample: sample["s"])[len(samples) // 2]
    cell = {
        "hosts": count,
        "first_s": first["s"],
        "first_mib": first["mib"],
        "first_cpu_s": first["cpu_s"],
        "noop_samples_s": [sample["s"] for sample in samples],
        "noop_s": middle["s"],
        "noop_mib": middle["mib"],
        "noop_cpu_s": middle["cpu_s"],
        "noop_changes": [sample["changes"] for sample in samples],
    }
    _, _, logged = pyinfra("--debug")
    counted = commands_per_host(logged.stdout)
    if len(counted) != count:
        raise RuntimeError(f"commands counted on {sorted(counted)}, not on {count} host(s)")
    cell["noop_commands_per_host"] = {"min": min(counted.values()), "max": max(counted.values())}
    log(
        f"scale {count}: first {cell['first_s']:.1f} s, no-op {cell['noop_s']:.1f} s "
        f"({cell['noop_changes']} changes, {cell['noop_commands_per_host']['max']} commands per host)"
    )
    return cell


def measure(sizes=SIZES, log=print):
    rows = [one(count, log) for count in sizes]
    lines = {}
    for run in ("first", "noop"):
        intercept, slope = fit([(row["hosts"], row[f"{run}_s"]) for row in rows])
        lines[run] = {
            "intercept_s": intercept,
            "per_extra_host_s": slope,
            f"extrapolated_{EXTRAPOLATED_TO}_s": intercept + slope * EXTRAPOLATED_TO,
        }
    cpu = fit([(row["hosts"], row["noop_cpu_s"]) for row in rows])
    return {"rows": rows, "fit": lines, "noop_cpu_per_extra_host_s": cpu[1], "extrapolated_to": EXTRAPOLATED_TO}
