"""Faults a fleet meets, each survived and named: a secret whose mode drifted, a hold released, an image untagged and
loaded again, a disk without room, a host that is down among live ones, a host that freezes mid-run. Each fault ends with an
assertion on the final state (files, units, the service answering)."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.lab import hosts as lab_hosts
from tests.lab.llamacpp import image_tag

from .conftest import PYINFRA, REPO, measurements, run_deploy

KEY = REPO / ".lab" / "secrets" / "chat-api-key"


@pytest.fixture(scope="module")
def measured():
    yield from measurements("faults")


def sh(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False)


def container_id(name):
    return sh(name, "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()


def answers(name):
    key = KEY.read_text().strip()
    answer = sh(
        name,
        f"curl -sf -m 30 -H 'Authorization: Bearer {key}' http://127.0.0.1:8080/v1/completions "
        '-d \'{"prompt": "hello", "max_tokens": 4}\'',
    )
    return answer.returncode == 0 and json.loads(answer.stdout)["usage"]["completion_tokens"] == 4


def test_a_secret_whose_mode_drifted_is_fixed_without_a_restart(second_deploy):
    running = container_id("lab-1")
    sh("lab-1", "chmod 440 /etc/gpufleet/secrets/chat.key")
    fixed = run_deploy("--limit", "lab-1")
    assert fixed.rc == 0, fixed.output[-3000:]
    assert list(fixed.changed()) == [
        "GPU host | Deploy inference services | Write chat's API key file (its account reads it, nobody else)"
    ], fixed.changed()
    assert sh("lab-1", "stat -c %a /etc/gpufleet/secrets/chat.key").stdout.strip() == "400"
    assert container_id("lab-1") == running and answers("lab-1")


def test_a_hold_released_behind_the_deploys_back_is_held_again(second_deploy):
    """apt's answers are kept while apt's files are unchanged (operations/core/fact_batch.py): a converged
    run keeps them, then ``apt-mark unhold`` rewrites dpkg's status, so the next run asks apt again,
    sees the hold gone and restores it."""
    kept = run_deploy("--limit", "lab-1")  # converged: apt's answers kept with their files' fingerprint
    assert kept.rc == 0 and kept.total_changed() == 0, kept.changed()
    assert sh("lab-1", "apt-mark unhold nvidia-smi").returncode == 0
    assert "nvidia-smi" not in sh("lab-1", "apt-mark showhold").stdout.split()
    fixed = run_deploy("--limit", "lab-1")
    assert fixed.rc == 0, fixed.output[-3000:]
    changed = list(fixed.changed())  # the driver installed at its pinned version and held again; nothing else
    held = r"GPU host \| Install NVIDIA driver \| Install NVIDIA driver [\d.]+ and hold it"
    assert len(changed) == 1 and re.fullmatch(held, changed[0]), changed
    assert "nvidia-smi" in sh("lab-1", "apt-mark showhold").stdout.split()
    again = run_deploy("--limit", "lab-1")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_an_image_untagged_and_loaded_again_restarts_nothing(second_deploy):
    """docker rmi -f untags the running image; the deploy loads it again from the bundle: same ID, so
    the service keeps its container."""
    running = container_id("lab-1")
    image = image_tag()
    sh("lab-1", f"docker rmi -f {image}")
    assert sh("lab-1", f"docker image inspect {image}").returncode != 0
    reloaded = run_deploy("--limit", "lab-1")
    assert reloaded.rc == 0, reloaded.output[-3000:]
    assert (
        f"GPU host | Provide the services' container images | Load the bundle's container images | Load image {image}"
    ) in reloaded.changed()
    assert "Restart gpufleet-chat" not in "".join(reloaded.changed())
    assert container_id("lab-1") == running and answers("lab-1")
    again = run_deploy("--limit", "lab-1")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_no_room_is_refused_before_any_byte_naming_host_path_and_numbers(second_deploy):
    """lab-2's weights root moved onto a 4 MB filesystem: the 1 GB margin cannot fit, so staging
    refuses before sending, names the numbers, and the running service is left as it was."""
    running = container_id("lab-2")
    sh("lab-2", "mkdir -p /srv/full && mount -t tmpfs -o size=4m tmpfs /srv/full")
    try:
        full = run_deploy("--limit", "lab-2", "--data", "inference_weights_root=/srv/full")
        assert full.rc != 0
        free = int(sh("lab-2", "df -P -B1 /srv/full | tail -n 1").stdout.split()[3])
        size = (REPO / ".lab" / "models" / "tiny" / "tiny.gguf").stat().st_size
        assert (
            f"lab-2: /srv/full/tiny: no room: {size} bytes to receive + 1073741824 margin "
            f"(gpufleet_free_space_margin), {free} free on /srv/full; nothing was sent"
        ) in full.output, full.output[-3000:]
        assert sh("lab-2", "find /srv/full -type f | wc -l").stdout.strip() == "0"
        assert container_id("lab-2") == running and answers("lab-2")
        # with the margin lowered to what fits, the same run goes through
        fits = run_deploy(
            "--limit", "lab-2", "--data", "inference_weights_root=/srv/full", "--data", "gpufleet_free_space_margin=1m"
        )
        assert fits.rc == 0, fits.output[-3000:]
        assert (
            sh("lab-2", "sha256sum /srv/full/tiny/tiny.gguf").stdout.split()[0]
            == subprocess.run(
                ["sha256sum", str(REPO / ".lab/models/tiny/tiny.gguf")], capture_output=True, text=True
            ).stdout.split()[0]
        )
        assert answers("lab-2")
    finally:
        back = run_deploy("--limit", "lab-2")
        sh("lab-2", "umount /srv/full && rmdir /srv/full")
    assert back.rc == 0, back.output[-3000:]
    assert answers("lab-2")


def test_a_dead_host_among_live_ones_is_named_and_the_others_converge(second_deploy, lab):
    """lab-ubu-1's SSH stops: the run converges every other host (lab-2's removed host.json written
    again), ends non-zero naming lab-ubu-1; with it back, the next run converges it and redoes
    nothing elsewhere."""
    container = lab["lab-ubu-1"]["container"]
    sh("lab-2", "rm /etc/gpufleet/host.json")
    sh("lab-ubu-1", "rm /etc/gpufleet/host.json")
    subprocess.run(["docker", "exec", container, "systemctl", "stop", "ssh.service"], check=True, timeout=60)
    try:
        # pyinfra's --fail-percent 0: one host lost at connect stops the run before any operation
        stopped = run_deploy("--fail-percent", "0")
        assert stopped.rc != 0 and "Over 0% of hosts failed" in stopped.output, stopped.output[-3000:]
        assert "Starting operation" not in stopped.output
        assert sh("lab-2", "test -e /etc/gpufleet/host.json").returncode == 1
        result = run_deploy()
        assert result.rc != 0
        # a refused or silent port reads "Could not connect"; the lab's published port accepts, then closes
        assert re.search(r"\[lab-ubu-1\]\s+(Could not connect|SSH error)", result.output), result.output[-3000:]
        assert sh("lab-2", "test -s /etc/gpufleet/host.json").returncode == 0
        assert answers("lab-1") and answers("lab-2")
    finally:
        subprocess.run(["docker", "exec", container, "systemctl", "start", "ssh.service"], check=True, timeout=60)
    back = run_deploy()
    assert back.rc == 0, back.output[-3000:]
    assert back.total_changed() == 1 and list(back.changed()) == [
        "Record what gpufleet deployed | Write /etc/gpufleet/host.json"
    ], back.changed()
    assert sh("lab-ubu-1", "test -s /etc/gpufleet/host.json").returncode == 0


def test_a_frozen_host_is_failed_within_the_liveness_bound_and_the_others_converge(second_deploy, lab, measured):
    """lab-ubu-1 frozen (docker pause: its TCP connection stays open, nothing answers) once the run has
    connected: within gpufleet_liveness_interval + gpufleet_liveness_timeout (10 + 20 s) its connection
    is closed and it is named; lab-1 and lab-2 converge (lab-2's removed host.json written again); the
    run ends non-zero; unfrozen, the next run converges it too."""
    hosts = ["--limit", "lab-1", "--limit", "lab-2", "--limit", "lab-ubu-1"]
    started = time.monotonic()
    baseline = run_deploy(*hosts)
    baseline_s = time.monotonic() - started
    assert baseline.rc == 0, baseline.output[-3000:]
    sh("lab-2", "rm /etc/gpufleet/host.json")
    container = lab["lab-ubu-1"]["container"]
    process = subprocess.Popen(
        [PYINFRA, "-y", "inventories/lab.py", "deploy.py", *hosts],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, frozen_at = [], None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    started = time.monotonic()
    reader.start()
    try:
        while frozen_at is None and process.poll() is None and time.monotonic() - started < 120:
            if any("--> Preparing operation files" in line for line in list(lines)):
                subprocess.run(["docker", "pause", container], check=True, timeout=60)
                frozen_at = time.monotonic()
            time.sleep(0.05)
        process.wait(600)  # bounded: a run that hangs fails the test here
        ended = time.monotonic()
        reader.join(30)
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["docker", "unpause", container], check=False, timeout=60)
    output = "".join(lines)
    assert frozen_at is not None, output[-3000:]
    assert process.returncode != 0, output[-3000:]
    assert "[lab-ubu-1] its SSH server granted no channel within 20 s" in output, output[-3000:]
    assert sh("lab-2", "test -s /etc/gpufleet/host.json").returncode == 0  # the live hosts went on
    assert answers("lab-1") and answers("lab-2")
    measured["frozen_host"] = {
        "converged_run_s": round(baseline_s, 1),
        "frozen_run_s": round(ended - started, 1),
        "frozen_after_s": round(frozen_at - started, 1),
        "bound_s": 10 + 20,
    }
    # the live hosts finish within the bound plus their own time (and a margin for this machine)
    assert ended - started <= baseline_s + 10 + 20 + 30, measured["frozen_host"]
    back = run_deploy(*hosts)
    assert back.rc == 0, back.output[-3000:]


def _killed_when(command, seen, limit_s=120):
    """Run ``pyinfra command`` and SIGKILL it (its whole process group) the moment ``seen()`` is true;
    polled every 0.05 s for at most ``limit_s``. Returns whether it was killed that way."""
    process = subprocess.Popen(
        [PYINFRA, "-y", "inventories/lab.py", "deploy.py", *command],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + limit_s
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if seen():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
                return True
            time.sleep(0.05)
        return False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def test_control_node_killed_mid_relay_leaves_no_key_once_the_next_run_ends(second_deploy, lab):
    """lab-2 pulls the image archive from lab-1 over a one-run key; pyinfra is killed while that key
    is in lab-1's authorized_keys. The next run removes the key, finishes the pull (verified), and
    the one after changes nothing."""
    seed, puller = "lab-1", "lab-2"
    relay = ("--limit", seed, "--limit", puller, "--data", f"gpufleet_stage_via={seed}")
    login = lab[seed]["user"]
    keys = ("/root" if login == "root" else f"/home/{login}") + "/.ssh/authorized_keys"
    sh(puller, "rm -rf /var/lib/gpufleet/bundle/images")
    killed = _killed_when(relay, lambda: "gpufleet-relay" in sh(seed, f"cat {keys}").stdout)
    assert killed, "the relay key never appeared"
    assert "gpufleet-relay" in sh(seed, f"cat {keys}").stdout  # left by the killed run
    resumed = run_deploy(*relay)
    assert resumed.rc == 0, resumed.output[-3000:]
    assert "relay key(s) an interrupted run left in" in resumed.output
    assert "gpufleet-relay" not in sh(seed, f"cat {keys}").stdout
    assert sh(seed, f"stat -c %U {keys}").stdout.strip() == login  # still the login's own file
    assert sh(puller, "ls -A /var/lib/gpufleet/relay").stdout.strip() == ""
    again = run_deploy(*relay)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
    assert answers(puller)


def test_control_node_killed_during_a_service_restart_converges_on_the_next_run(second_deploy):
    """A changed engine argument restarts lab-2's service; pyinfra is killed while systemd restarts
    it. systemd finishes the restart alone; the next run records what it left undone and the one
    after changes nothing; the service answers with the new argument."""
    changed = (
        "--limit",
        "lab-2",
        "--data",
        "inference_services="
        + json.dumps(
            [
                {
                    "name": "chat",
                    "engine": "llamacpp",
                    "image": image_tag(),
                    "model": "tiny/tiny.gguf",
                    "port": 8080,
                    "memory": "1g",
                    "args": ["--ctx-size", "128", "--threads", "1"],
                    "api_key_file": str(KEY),
                }
            ]
        ),
    )
    before = container_id("lab-2")
    try:
        killed = _killed_when(changed, lambda: container_id("lab-2") != before)
        assert killed, "the service never restarted"
        for _ in range(60):  # systemd finishes the start it was given (bounded: 60 × 0.5 s)
            if sh("lab-2", "systemctl is-active gpufleet-chat").stdout.strip() == "active":
                break
            time.sleep(0.5)
        assert "--ctx-size 128" in sh("lab-2", "cat /etc/systemd/system/gpufleet-chat.service").stdout
        resumed = run_deploy(*changed)
        assert resumed.rc == 0, resumed.output[-3000:]
        assert "Restart gpufleet-chat" not in "".join(resumed.changed())  # it was ready: not restarted again
        again = run_deploy(*changed)
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
        assert answers("lab-2")
    finally:
        back = run_deploy("--limit", "lab-2")
    assert back.rc == 0, back.output[-3000:]


def _settled_size(path, rounds=30):
    """``path``'s size on lab-2 once two reads half a second apart agree (at most ``rounds`` reads)."""
    last = None
    for _ in range(rounds):
        size = int(sh("lab-2", f"stat -c %s {path}").stdout.strip())
        if size == last:
            return size
        last = size
        time.sleep(0.5)
    raise AssertionError(f"lab-2: {path} still growing after {rounds} reads: {last} bytes")


def test_control_node_killed_mid_staging_resumes_with_the_rest(second_deploy):
    """lab-2's image archive is staged again from the control node; pyinfra is killed once part of it
    has arrived. No final file and no record of it are left, and the next run sends only the rest."""
    manifest = json.loads((REPO / ".lab" / "bundle" / "manifest.json").read_text())
    image = manifest["images"][0]["file"]
    size = manifest["files"][image]["size"]
    remote = f"/var/lib/gpufleet/bundle/{image}"
    sh("lab-2", f"rm -f {remote} {remote}.gpufleet-part")

    def arriving():
        part = sh("lab-2", f"stat -c %s {remote}.gpufleet-part 2>/dev/null").stdout.strip()
        return part.isdigit() and 0 < int(part) < size

    assert _killed_when(("--limit", "lab-2"), arriving), "the archive was never seen arriving"
    assert sh("lab-2", f"test -e {remote}").returncode == 1  # not in place half-written
    part = _settled_size(f"{remote}.gpufleet-part")  # the receiver writes what reached it, then exits
    assert 0 < part < size
    # the record is whole (the previous one: it names the archive with a size and mtime no file has now)
    record = json.loads(sh("lab-2", "cat /var/lib/gpufleet/bundle/images/.gpufleet-staged.json").stdout)
    assert set(record) <= {path.split("/", 1)[1] for path in manifest["files"] if path.startswith("images/")}
    resumed = run_deploy("--limit", "lab-2")
    assert resumed.rc == 0, resumed.output[-3000:]
    sent = re.search(
        r"\[lab-2\] staged 1 file\(s\), (\d+) bytes sent through the OpenSSH client, into /var/lib/gpufleet/bundle/images",
        resumed.output,
    )
    assert sent and int(sent.group(1)) == size - part, (part, size, resumed.output[-3000:])  # the rest, no more
    assert sh("lab-2", f"sha256sum {remote}").stdout.split()[0] == manifest["files"][image]["sha256"]
    again = run_deploy("--limit", "lab-2")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
    assert answers("lab-2")
