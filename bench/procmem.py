"""Run a command and sample the resident memory of its whole process tree (Ansible forks workers),
and count the CPU seconds it and the children it waited for used."""

import os
import resource
import subprocess
import threading
import time

# A sample reads every process's /proc entry (3 ms with a 16-host lab up): every 50 ms that took a
# tenth of a core from the runs it measures on this 2-core machine; every 200 ms still sees a no-op
# of one host (1.3 s) six times.
SAMPLE_EVERY_S = 0.2


def _tree_rss_kib(root):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
        stack += children.get(pid, [])
    return total


def _children_cpu_s():
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def run(command, **kwargs):
    """(seconds, peak MiB of the process tree, CompletedProcess-like) for ``command``; the
    CompletedProcess also carries ``cpu_s``, the CPU seconds (user and system) of its tree."""
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kib(process.pid))
            time.sleep(SAMPLE_EVERY_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    done = subprocess.CompletedProcess(command, process.returncode, output)
    done.cpu_s = _children_cpu_s() - cpu_before
    return seconds, peak[0] / 1024, done
